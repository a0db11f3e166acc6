"""Shared fixtures of the end-to-end tests: a tiny synthetic dataset and a way to run the `aicsd` command."""
import json, os, select, shutil, signal, subprocess, sys, tempfile
from pathlib import Path
import pytest

# one thread per process: the tests run side by side with other jobs on a 2-core machine
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}

def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU (skipped without one); `make gpu-check` runs them')

def aicsd_cmd() -> list:
    "The installed console script, or `python -m aicsd.cli` when it is not on disk."
    exe = Path(sys.executable).with_name('aicsd')
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'aicsd.cli']

class _Zygote:
    """tests/zygote.py, started once per test process: each `aicsd` command is a fresh process forked from one that
    imported torch, torchvision and matplotlib already (about 5 s saved per command on a 2-core machine)."""
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).with_name('zygote.py'))], env=ENV, bufsize=0,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _answer(self, timeout=None) -> int|None:
        if not select.select([self.p.stdout], [], [], timeout)[0]: return None
        line = self.p.stdout.readline()
        if not line: raise RuntimeError(f"tests/zygote.py ended (exit status {self.p.wait()}); its stderr is the test's")
        return int(line)

    def run(self, args:list, cwd, timeout) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / 'stdout', Path(d) / 'stderr'
            req = dict(argv=args, cwd=str(cwd), env=ENV, stdout=str(out), stderr=str(err))
            self.p.stdin.write((json.dumps(req) + '\n').encode())
            pid, rc = self._answer(), self._answer(timeout)
            if rc is None:                                  # as subprocess.run's timeout: kill it (its group), then raise
                os.killpg(pid, signal.SIGKILL); self._answer()
                raise subprocess.TimeoutExpired(args, timeout, out.read_text(errors='replace'), err.read_text(errors='replace'))
            return subprocess.CompletedProcess(args, rc, out.read_text(errors='replace'), err.read_text(errors='replace'))

    def close(self):
        self.p.stdin.close(); self.p.wait(timeout=60)

_ZYGOTE = []

def _forked(args) -> bool:
    "Whether `args` is an `aicsd` command the fork server runs (the console script; AICSD_TEST_FORK=0: never)."
    cmd = aicsd_cmd()
    return os.environ.get('AICSD_TEST_FORK', '1') != '0' and len(cmd) == 1 and args[:1] == cmd

def run(args, cwd, timeout=240, check=True) -> subprocess.CompletedProcess:
    "Run a command with the test environment (an `aicsd` command: forked by tests/zygote.py); on failure show its output."
    args = [str(a) for a in args]
    if _forked(args):
        if not _ZYGOTE: _ZYGOTE.append(_Zygote())
        p = _ZYGOTE[0].run(args, cwd, timeout)
    else: p = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}")
    return p

@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    "12 train / 5 val synthetic images, 32 px, 4 classes, no void borders (every pixel labelled), PNG."
    from aicsd.data import make_synthetic
    root = tmp_path_factory.mktemp('data') / 'syn'
    return make_synthetic(root, n_train=12, n_val=5, size=32, num_classes=4, seed=0, border=0, ext='png')

def tiny_args(root, out, *more) -> list:
    "Options of a tiny CPU run on `tiny_data` (3 steps per epoch at batch 4)."
    return ['--data', 'synthetic', '--data-root', root, '--crop-size', 32, '--scale-min', 1, '--scale-max', 1,
            '--batch-size', 4, '--val-batch-size', 5, '--lr', 0.01, '--threads', 1, '--device', 'cpu',
            '--no-tensorboard', '--no-figures', '--quiet', '--out', out, *more]

def said_lines(err:str) -> list:
    "The lines a command said on stderr (`aicsd: ...`), without its warnings and without torchrun's own lines."
    return [l for l in err.splitlines() if l.startswith('aicsd: ') and not l.startswith('aicsd: warning: ')]

def state_dict(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)['model']

# ---------------------------------------------------------------- disk: nothing left behind, peak well under 1 GB
# pyproject.toml sets tmp_path_retention_policy = "failed": pytest removes a passing test's `tmp_path` at its
# teardown and the whole basetemp at the end of a passing session (a failed test's folder is kept for inspection,
# only for the latest session: tmp_path_retention_count = 1). Folders that module- or class-scoped fixtures make
# with `tmp_path_factory.mktemp` (teacher checkpoints of hundreds of MB) would stay until the session ends: they
# are removed as soon as their fixture is torn down, i.e. after the last test of its module.
_FIXTURE_DIRS, _SESSION_DIRS, _OLD_TMPDIR = pytest.StashKey[dict](), pytest.StashKey[set](), pytest.StashKey()
_BUILTIN_TMP = {'tmp_path', 'tmpdir', 'tmp_path_factory', 'tmpdir_factory'}

def _basetemp(config):
    f = getattr(config, '_tmp_path_factory', None)
    return getattr(f, '_basetemp', None)

def _entries(config) -> set:
    b = _basetemp(config)
    return set(b.iterdir()) if b is not None and b.is_dir() else set()

@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    "Note the basetemp folders a fixture wider than a function makes (session fixtures' folders are left to pytest)."
    if fixturedef.scope == 'function' or fixturedef.argname in _BUILTIN_TMP: return (yield)
    before = _entries(request.config)
    try: return (yield)
    finally:
        made, st = _entries(request.config) - before, request.config.stash
        if fixturedef.scope == 'session': st.setdefault(_SESSION_DIRS, set()).update(made)
        elif made: st.setdefault(_FIXTURE_DIRS, {}).setdefault(id(fixturedef), set()).update(made)

def pytest_fixture_post_finalizer(fixturedef, request):
    st = request.config.stash
    for d in st.get(_FIXTURE_DIRS, {}).pop(id(fixturedef), set()) - st.get(_SESSION_DIRS, set()):
        if d.is_symlink(): d.unlink(missing_ok=True)               # pytest's `<name>current` link to the newest folder
        else: shutil.rmtree(d, ignore_errors=True)

# `make test` runs two pytest workers, each a file at a time (pytest-xdist --dist loadfile --no-loadscope-reorder):
# the longest files first, so that the short ones even out the end (seconds of one worker, measured with
# --durations=0 on 2 cores: 253, 179, 177, 156, 135, 133, 127, 88, 69, 49; the rest, under 25 each, after them)
_LONGEST_FIRST = ('test_demo_defaults.py', 'test_defaults.py', 'test_gpu_check.py', 'test_methods.py', 'test_ddp.py',
                  'test_deeplabv3.py', 'test_reliability.py', 'test_cli.py', 'test_elastic.py', 'test_resume.py')

def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable: a file's tests keep their order

def pytest_sessionstart(session):
    """Temporary files of the tests and of the processes they start (torchrun's torchelastic_* logs, torch's
    torchinductor_* folder) go under the basetemp too, so that none are left in the system's temp folder."""
    f = getattr(session.config, '_tmp_path_factory', None)
    if f is None: return
    d = str(f.mktemp('tmp', numbered=False))
    session.config.stash[_OLD_TMPDIR] = os.environ.get('TMPDIR')
    ENV['TMPDIR'] = os.environ['TMPDIR'] = d; tempfile.tempdir = None        # gettempdir() reads TMPDIR again

@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    "Guard: a passing session whose basetemp pytest could not remove (a file still open, a process still writing) fails."
    while _ZYGOTE: _ZYGOTE.pop().close()
    if _OLD_TMPDIR in session.config.stash:
        old = session.config.stash[_OLD_TMPDIR]
        if old is None: os.environ.pop('TMPDIR', None); ENV.pop('TMPDIR', None)
        else: os.environ['TMPDIR'] = ENV['TMPDIR'] = old
        tempfile.tempdir = None
    b = _basetemp(session.config)
    if exitstatus != 0 or b is None or not b.exists() or session.config.getini('tmp_path_retention_policy') != 'failed' \
            or session.config.option.basetemp:
        return
    files = [p for p in b.rglob('*') if p.is_file()]
    if not files: return
    size = sum(p.stat().st_size for p in files if p.exists())
    session.config.get_terminal_writer().line(f"\nFAIL: the tests left {len(files)} files ({size / 1e6:.1f} MB) in {b}: "
                                                f"{[str(p.relative_to(b)) for p in files[:5]]}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
