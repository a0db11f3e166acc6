"""Kill a run with SIGKILL between two checkpoints, resume it: its final weights equal an uninterrupted run's, bit for bit."""
import os, signal, subprocess, time
import torch
from conftest import ENV, aicsd_cmd, run, tiny_args, state_dict

def _args(root, out):
    # 3 steps per epoch, 2 epochs; checkpoints every 2 steps (2: mid-epoch 1, 3: epoch end, 4: mid-epoch 2, 6: end)
    return aicsd_cmd() + ['distill', '--method', 'baseline', '--student', 'mobilenetv2', '--epochs', 2,
                          '--ckpt-every', 2] + tiny_args(root, out) + ['--scale-min', 0.75, '--scale-max', 1.5, '--log-every', 1]

def test_sigkill_resume_bit_exact(tiny_data, tmp_path):
    # random scale, crop and flip (and dropout) stay on: their randomness must resume too
    a, b = tmp_path / 'a', tmp_path / 'b'
    run(_args(tiny_data, a), cwd=tmp_path)                      # uninterrupted
    p = subprocess.Popen([str(x) for x in _args(tiny_data, b)], cwd=tmp_path, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (b / 'last.pt').exists():                                  # first checkpoint: step 2, mid-epoch
        assert p.poll() is None, f"run ended before its first checkpoint: {p.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < 180, 'no checkpoint after 180 s'
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    ck = torch.load(b / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['global_step'] < 6, 'the run finished before it was killed: the test proves nothing'
    run(_args(tiny_data, b) + ['--resume'], cwd=tmp_path)
    sa, sb = state_dict(a / 'last.pt'), state_dict(b / 'last.pt')
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    ca = torch.load(a / 'last.pt', map_location='cpu', weights_only=True)
    cb = torch.load(b / 'last.pt', map_location='cpu', weights_only=True)
    assert ca['global_step'] == cb['global_step'] == 6
    assert ck['global_step'] in (2, 3, 4)                                # it was killed between two checkpoints
    # the log of the resumed run has every step once, with the uninterrupted run's values (rows the killed session
    # wrote after its last checkpoint were dropped on resume)
    assert (a / 'train_log.csv').read_text() == (b / 'train_log.csv').read_text()
