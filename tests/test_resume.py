"""Kill a run with SIGKILL between two checkpoints (or Ctrl-C it on its last step), resume it: its final weights, logs and
progress equal an uninterrupted run's, bit for bit."""
import shutil, signal, sys
import pytest
import torch
from conftest import ENV, aicsd_cmd, run, tiny_args, state_dict

def _args(root, out, cmd=None):
    # 3 steps per epoch, 2 epochs; checkpoints every 2 steps (2: mid-epoch 1, 3: epoch end, 4: mid-epoch 2, 6: end)
    return (cmd or aicsd_cmd()) + ['distill', '--method', 'baseline', '--student', 'mobilenetv2', '--epochs', 2,
                                   '--ckpt-every', 2] + tiny_args(root, out) + ['--scale-min', 0.75, '--scale-max', 1.5,
                                                                                '--log-every', 1]

# The command line, killed with SIGKILL by itself right after it logged training step KILL_AT: a fixed point between
# two checkpoints whatever the machine's speed (a parent polling for last.pt would kill it wherever it happens to be)
_KILLED = r'''
import os, signal, sys
from aicsd.runfolder import RunLog
kill_at, sig, row = int(sys.argv[1]), getattr(signal, sys.argv[2]), RunLog.row
def killing_row(self, name, step, values):
    row(self, name, step, values)
    if name == 'train_log' and step == kill_at: os.kill(os.getpid(), sig)
RunLog.row = killing_row
from aicsd.cli import main
sys.exit(main(sys.argv[3:]))
'''

@pytest.fixture(scope='module')
def uninterrupted(tiny_data, tmp_path_factory):
    a = tmp_path_factory.mktemp('uninterrupted') / 'a'
    run(_args(tiny_data, a), cwd=a.parent)
    yield a
    shutil.rmtree(a.parent, ignore_errors=True)

@pytest.mark.parametrize('kill_at, sig, resumed_from', [(3, 'SIGKILL', 2), (4, 'SIGKILL', 3),   # mid-epoch 1, the end of
                                                       (6, 'SIGINT', 6)])   # epoch 1; Ctrl-C on the last step, before its evaluation
def test_killed_or_interrupted_run_resumes_bit_exact(tiny_data, tmp_path, uninterrupted, kill_at, sig, resumed_from):
    # random scale, crop and flip (and dropout) stay on: their randomness must resume too
    a, b = uninterrupted, tmp_path / 'b'
    (tmp_path / 'killed.py').write_text(_KILLED)
    p = run(_args(tiny_data, b, [sys.executable, tmp_path / 'killed.py', kill_at, sig]), cwd=tmp_path, check=False)
    assert p.returncode == (-signal.SIGKILL if sig == 'SIGKILL' else 130), p.stderr[-3000:]
    ck = torch.load(b / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['global_step'] == resumed_from
    if sig == 'SIGKILL': assert f'\n{kill_at},' in (b / 'train_log.csv').read_text()   # a row the checkpoint does not hold
    else: assert ck['eval_step'] == 3, ck['eval_step']                  # last.pt written before the last step's evaluation
    run(_args(tiny_data, b) + ['--resume'], cwd=tmp_path)
    sa, sb = state_dict(a / 'last.pt'), state_dict(b / 'last.pt')
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    ca = torch.load(a / 'last.pt', map_location='cpu', weights_only=True)
    cb = torch.load(b / 'last.pt', map_location='cpu', weights_only=True)
    assert ca['global_step'] == cb['global_step'] == 6
    # the log of the resumed run has every step once, with the uninterrupted run's values (rows the killed session
    # wrote after its last checkpoint were dropped on resume)
    assert (a / 'train_log.csv').read_text() == (b / 'train_log.csv').read_text()
    assert _rows(a / 'eval_log.csv') == _rows(b / 'eval_log.csv')       # each evaluation once, at its step and epoch
    assert [(c['epoch'], c['step_in_epoch']) for c in (ca, cb)] == [(2, 0)] * 2, (ca['epoch'], cb['epoch'])

def _rows(csv): # a log's rows without its columns of time
    import csv as C
    return [{k: v for k, v in r.items() if not k.startswith('time')} for r in C.DictReader(open(csv))]

def test_the_cuda_layout_on_a_cpu_resumes_like_a_contiguous_run(tiny_data, tmp_path, monkeypatch, capsys):
    """Channels-last, the layout of every CUDA run, never runs in CI otherwise (`memory_format` gives it on CUDA only).
    Forced here on the CPU in float64: a distillation stopped after 2 steps and resumed (optimizer state and
    evaluation of channels-last networks) ends where an uninterrupted contiguous run ends. Then in float32, where
    the figures are drawn, the figures of channels-last networks."""
    import aicsd.distill as D
    from aicsd.viz import run_figures
    base = dict(data='synthetic', data_root=str(tiny_data), crop_size=32, scale_min=1.0, scale_max=1.0, batch_size=4,
                val_batch_size=5, lr=0.01, threads=1, device='cpu', tensorboard=False, quiet=True, dtype='float64',
                no_dropout=True)
    D.fit(dict(base, model='resnet18', max_steps=2, figures=False, out=str(tmp_path / 't')))     # the teacher
    cfg = dict(base, mode='distill', teacher=str(tmp_path / 't' / 'best.pt'), model='resnet18', method='aicsd', max_steps=4)
    plain = D.fit(dict(cfg, out=str(tmp_path / 'plain'), figures=False))['model']
    monkeypatch.setattr(D, 'memory_format', lambda device, channels_last=True: torch.channels_last)
    out = tmp_path / 'cl'
    D.fit(dict(cfg, out=str(out), stop_after=2), draw=run_figures)
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 2
    cl = D.fit(dict(cfg, out=str(out), resume=True), draw=run_figures)['model']
    w = next(m.weight for m in cl.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()     # it did run channels-last
    a, b = plain.state_dict(), cl.state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    print(f"channels-last, resumed vs contiguous: max |dw| = {worst:.3g}")
    assert worst < 1e-10, worst
    D.fit(dict(cfg, dtype='float32', max_steps=3, out=str(tmp_path / 'cl32')), draw=run_figures)
    figs = {p.name for p in (tmp_path / 'cl32' / 'figures').iterdir()}
    assert {'ics_step0000003.png', 'ics_rows_step0000003.png', 'predictions_step0000003.png', 'curves.png'} <= figs, figs
    assert 'figures at step' not in capsys.readouterr().err                  # none failed and was only warned about

def test_resume_refuses_a_replaced_teacher(tiny_data, tmp_path, capsys):
    """The teacher's path is an option; its weights are fingerprinted in last.pt. A teacher file replaced between
    the sessions of a distillation (or a student's best.pt written where the teacher was) is refused on --resume,
    naming the file; putting the original back resumes."""
    import shutil
    import aicsd.distill as D
    base = dict(data='synthetic', data_root=str(tiny_data), crop_size=32, scale_min=1.0, scale_max=1.0, batch_size=4,
                val_batch_size=5, lr=0.01, threads=1, device='cpu', tensorboard=False, quiet=True, figures=False)
    for name, seed in (('t1', 0), ('t2', 1)):
        D.fit(dict(base, model='mobilenetv2', max_steps=1, seed=seed, out=str(tmp_path / name)))
    teacher = tmp_path / 'teacher.pt'
    shutil.copy(tmp_path / 't1' / 'best.pt', teacher)
    cfg = dict(base, mode='distill', teacher=str(teacher), model='mobilenetv2', method='kd', max_steps=3,
               out=str(tmp_path / 's'))
    D.fit(dict(cfg, stop_after=1))
    shutil.copy(tmp_path / 't2' / 'best.pt', teacher)                     # another teacher at the same path
    try: D.fit(dict(cfg, resume=True)); raise AssertionError('resumed with another teacher')
    except ValueError as e: assert 'holds other weights than when the run started' in str(e) and str(teacher) in str(e), e
    # another path: with other weights, the path change is refused (no question about a replaced file) ...
    try: D.fit(dict(cfg, resume=True, teacher=str(tmp_path / 't2' / 'best.pt'))); raise AssertionError('resumed')
    except ValueError as e:
        assert f"--teacher {teacher} -> {tmp_path / 't2' / 'best.pt'}" in str(e) and 'was the file replaced' not in str(e), e
    # ... with the same weights (the file moved), the run continues, with a warning
    shutil.copy(tmp_path / 't1' / 'best.pt', tmp_path / 'moved.pt')
    capsys.readouterr()
    assert D.fit(dict(cfg, resume=True, teacher=str(tmp_path / 'moved.pt'), stop_after=1))['steps'] == 2
    assert f"--teacher {teacher} -> {tmp_path / 'moved.pt'} (the same weights)" in capsys.readouterr().err
    shutil.copy(tmp_path / 't1' / 'best.pt', teacher)                     # the original back: the run continues
    assert D.fit(dict(cfg, resume=True))['steps'] == 3
