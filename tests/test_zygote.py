"""The tests' fork server (tests/zygote.py, used by `conftest.run`) runs a command as the console script does: the same
exit status, output, working folder and environment as a real process; a timeout ends the command, not the server."""
import subprocess, time
import pytest
import conftest
from conftest import ENV, run, aicsd_cmd

pytestmark = pytest.mark.skipif(not conftest._forked(aicsd_cmd()), reason='the fork server is off (AICSD_TEST_FORK=0)')


def _real(args, cwd):
    return subprocess.run([str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize('args', [['data', 'stats', '--splt', 'val'],          # a usage error: exit 2, argparse's message
                                  ['recipes'],                                  # a table on stdout
                                  ['evaluate', '--ckpt', 'missing.pt'],         # an error of the command: its one line
                                  ['train', '--import', 'zygote', '--help']])   # tests/ is not on the command's path
def test_forked_command_is_the_real_process(args, tmp_path):
    forked, real = run(aicsd_cmd() + args, cwd=tmp_path, check=False), _real(aicsd_cmd() + args, tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


def test_the_commands_working_folder(tmp_path):
    "A relative --root lands in the folder the command runs in."
    run(aicsd_cmd() + ['data', 'synthetic', '--root', 'rel/syn', '--n-train', 2, '--n-val', 1, '--size', 16], cwd=tmp_path)
    assert (tmp_path / 'rel/syn/classes.json').is_file()


def test_a_timeout_ends_the_command_and_the_server_goes_on(tmp_path):
    t0 = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        run(aicsd_cmd() + ['bench', 'icsd', '--threads', 1], cwd=tmp_path, timeout=3)   # minutes on a CPU
    assert time.time() - t0 < 60
    assert run(aicsd_cmd() + ['recipes'], cwd=tmp_path).returncode == 0
