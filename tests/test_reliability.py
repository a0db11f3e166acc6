"""Never lose a run, never use the wrong data silently: each case fails loudly, names the file or option, changes nothing."""
import json, os, re, shutil, signal, subprocess, sys, time
import pytest
import torch
from conftest import ENV, aicsd_cmd, run, tiny_args

def _train(root, out, *more):
    return aicsd_cmd() + ['train', '--model', 'mobilenetv2', '--epochs', 1] + tiny_args(root, out) + list(more)

def test_existing_run_is_not_replaced(tiny_data, tmp_path):
    out = tmp_path / 'r'
    run(_train(tiny_data, out), cwd=tmp_path)
    before = (out / 'best.pt').read_bytes()
    p = run(_train(tiny_data, out, '--lr', 0.5), cwd=tmp_path, check=False)
    assert p.returncode == 2 and '--resume' in p.stderr and '--force' in p.stderr and str(out) in p.stderr, p.stderr
    assert (out / 'best.pt').read_bytes() == before                       # nothing overwritten
    run(_train(tiny_data, out, '--force'), cwd=tmp_path)                  # --force moves the old run aside
    aside = [d for d in out.iterdir() if d.name.startswith('replaced-')]
    assert len(aside) == 1 and (aside[0] / 'best.pt').read_bytes() == before

def test_resume_without_checkpoint_is_an_error(tiny_data, tmp_path):
    p = run(_train(tiny_data, tmp_path / 'none', '--resume'), cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'last.pt' in p.stderr and 'drop --resume' in p.stderr

def test_lock_keeps_a_second_run_out(tiny_data, tmp_path):
    out = tmp_path / 'l'; out.mkdir()
    (out / '.lock').write_text(f"{os.getpid()} {os.uname().nodename}\n")     # this (live) test process holds it
    p = run(_train(tiny_data, out), cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'in use by process' in p.stderr and not (out / 'last.pt').exists()

def test_stale_lock_takeover_is_one_warning_line(tiny_data, tmp_path):
    "A lock left by a process that is gone is taken over, with one `aicsd: warning:` line (no Python UserWarning)."
    out = tmp_path / 's'; out.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()   # a pid that has exited
    (out / '.lock').write_text(f"{dead.pid} {os.uname().nodename}\n")
    env = {k: v for k, v in ENV.items() if k != 'PYTHONWARNINGS'}         # Python's warnings shown, as a user sees them
    p = subprocess.run([str(a) for a in _train(tiny_data, out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr
    assert (out / 'last.pt').exists() and not (out / '.lock').exists()
    warned = [l for l in p.stderr.splitlines() if 'warning' in l.lower()]
    assert len(warned) == 1 and warned[0].startswith('aicsd: warning: ') and f'process {dead.pid}' in warned[0], p.stderr
    assert 'UserWarning' not in p.stderr and 'warnings.warn' not in p.stderr, p.stderr

def _training(args, cwd, out, **popen) -> subprocess.Popen:
    "Start a training command; return once it has logged its first step (it is then inside the loop)."
    p = subprocess.Popen([str(a) for a in args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         **popen)
    t0 = time.time()
    while not (out / 'train_log.csv').exists():
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read() if p.poll() is not None else 'too slow'
        time.sleep(0.05)
    return p

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_checkpoints_and_resumes(tiny_data, tmp_path, sig):
    "Ctrl-C, SIGTERM (kill, timeout, a scheduler's time limit) or SIGHUP (a closed terminal): last.pt written, exit 128 + signal, resumable."
    out = tmp_path / 'c'
    args = _train(tiny_data, out, '--epochs', 50, '--log-every', 1)
    p = _training(args, tmp_path, out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    how = 'interrupted' if sig == signal.SIGINT else f'stopped by {signal.Signals(sig).name}'
    assert 'Traceback' not in err and f'{how} at step' in err and '--resume' in err, err
    step = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step']
    assert 1 <= step < 150
    r = run(_train(tiny_data, out, '--epochs', 50, '--log-every', 1, '--stop-after', 2, '--resume'), cwd=tmp_path,
            check=False)
    assert r.returncode == 0, r.stderr                       # it continues from the checkpoint's step ...
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == step + 2   # ... to the end

def test_sigterm_to_the_process_group_with_loader_workers(tiny_data, tmp_path):
    """A batch scheduler's SIGTERM (SLURM, `timeout`, `kill -- -PGID`) reaches every process of the group, loader workers
    too: they must not die first (the main process would fail with "DataLoader worker exited unexpectedly" before it
    writes last.pt)."""
    out = tmp_path / 'g'
    args = _train(tiny_data, out, '--epochs', 50, '--log-every', 1, '--workers', 2)
    p = _training(args, tmp_path, out, start_new_session=True)
    os.killpg(p.pid, signal.SIGTERM)                     # the whole group: the run and its loader workers
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and 'stopped by SIGTERM at step' in err and 'Traceback' not in err, err[-3000:]
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] >= 1

def test_loader_workers_under_a_deep_tmpdir(tiny_data, tmp_path):
    """A worker passes each batch's tensors through a Unix socket under $TMPDIR (at most 107 characters): under a deep
    TMPDIR the batch was dropped with a traceback in the worker and the run waited for it forever (seen in CI)."""
    deep = tmp_path / ('d' * 60) / ('e' * 40); deep.mkdir(parents=True)
    assert len(str(deep)) > 107 - 32
    p = subprocess.run([str(a) for a in _train(tiny_data, tmp_path / 'w', '--workers', 2)], cwd=tmp_path,
                       env={**ENV, 'TMPDIR': str(deep)}, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0 and 'AF_UNIX' not in p.stderr, p.stderr[-3000:]
    assert (tmp_path / 'w' / 'best.pt').exists()

def test_empty_val_split_and_default_roots(tmp_path):
    from aicsd.data import make_synthetic
    root = make_synthetic(tmp_path / 'syn', n_train=8, n_val=0, size=32, num_classes=3, seed=0, ext='png')
    p = run(_train(root, tmp_path / 'e'), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "validation split 'val'" in p.stderr and 'no images' in p.stderr, p.stderr
    # --data voc without --data-root reads the documented VOC root, never the synthetic folder
    p = run(aicsd_cmd() + ['train', '--data', 'voc', '--out', tmp_path / 'v', '--device', 'cpu'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'data/VOCdevkit/VOC2012' in p.stderr, p.stderr

def test_clear_errors_for_bad_input(tiny_data, tmp_path):
    "Each bad input: exit 2, one message naming the file or option, no traceback."
    junk = tmp_path / 'junk.pt'; junk.write_bytes(os.urandom(3000))
    text = tmp_path / 'text.pt'; text.write_text('101\n')
    ev = ['evaluate', '--data', 'synthetic', '--data-root', tiny_data, '--device', 'cpu', '--threads', 1, '--ckpt']
    cases = [(ev + [junk], f'cannot read checkpoint {junk}'), (ev + [text], f'cannot read checkpoint {text}'),
             (_train(tiny_data, tmp_path / 'b1', '--batch-size', 1)[len(aicsd_cmd()):], '--batch-size'),
             (_train(tiny_data, tmp_path / 'c0', '--crop-size', 0)[len(aicsd_cmd()):], '--crop-size'),
             (_train(tiny_data, tmp_path / 'lr', '--lr', 'nan')[len(aicsd_cmd()):], '--lr'),
             (_train(tiny_data, tmp_path / 'ms', '--max-steps', -5)[len(aicsd_cmd()):], '--max-steps'),
             (_train(tiny_data, tmp_path / 'nan', '--lr', 1e9, '--epochs', 3)[len(aicsd_cmd()):], 'non-finite term(s): ce'),
             (['data', 'synthetic', '--root', tmp_path / 'neg', '--n-train', -3], '--n-train')]
    for args, want in cases:
        p = run(aicsd_cmd() + [str(a) for a in args],
                cwd=tmp_path, check=False)
        assert p.returncode == 2 and want in p.stderr and 'Traceback' not in p.stderr, (args, p.stderr[-800:])

def test_evaluate_refuses_other_class_count_and_writes_strict_json(tiny_data, tmp_path):
    import json
    from aicsd.data import make_synthetic
    out = tmp_path / 't'
    run(_train(tiny_data, out), cwd=tmp_path)                                   # 4 classes
    three = make_synthetic(tmp_path / 'syn3', n_train=4, n_val=2, size=32, num_classes=3, seed=0, ext='png')
    p = run(aicsd_cmd() + ['evaluate', '--ckpt', out / 'best.pt', '--data', 'synthetic', '--data-root', three,
                           '--device', 'cpu'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'predicts 4 classes' in p.stderr and 'has 3' in p.stderr, p.stderr
    js = tmp_path / 'm.json'
    run(aicsd_cmd() + ['evaluate', '--ckpt', out / 'best.pt', '--data', 'synthetic', '--data-root', tiny_data,
                       '--device', 'cpu', '--json', js], cwd=tmp_path)
    assert 'NaN' not in js.read_text()
    json.loads(js.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

def test_synthetic_overwrite_never_deletes_a_user_folder(tmp_path):
    mine = tmp_path / 'VOC2012'; mine.mkdir(); (mine / 'notes.txt').write_text('keep me')
    p = run(aicsd_cmd() + ['data', 'synthetic', '--root', mine, '--overwrite'], cwd=tmp_path, check=False)
    assert p.returncode != 0 and 'nothing was changed' in p.stderr and '--overwrite' not in p.stderr.split('nothing')[1]
    assert (mine / 'notes.txt').read_text() == 'keep me'

def _steps(csv):
    return [int(l.split(',')[0]) for l in csv.read_text().splitlines()[1:]]

def test_corrupt_last_falls_back_to_the_previous_checkpoint(tiny_data, tmp_path):
    "A truncated last.pt: --resume says so and continues from last.prev.pt; the log has every step once."
    out = tmp_path / 'f'
    args = _train(tiny_data, out, '--epochs', 2, '--ckpt-every', 1, '--log-every', 1)
    run(args + ['--stop-after', 4], cwd=tmp_path)                            # last.pt at step 4, last.prev.pt at 3
    prev = torch.load(out / 'last.prev.pt', map_location='cpu', weights_only=True)['global_step']
    assert prev == 3 and _steps(out / 'train_log.csv') == [1, 2, 3, 4]
    data = (out / 'last.pt').read_bytes(); (out / 'last.pt').write_bytes(data[:len(data) // 2])   # cut short
    r = run(args + ['--resume'], cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert f'cannot read checkpoint {out / "last.pt"}' in r.stderr and f'resuming from {out / "last.prev.pt"}' in r.stderr
    assert 'step 3' in r.stderr, r.stderr
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 6
    assert _steps(out / 'train_log.csv') == [1, 2, 3, 4, 5, 6]               # step 4's row was dropped, then re-logged
    for f in ('last.pt', 'last.prev.pt'): (out / f).write_bytes(b'junk')     # nothing readable: a clear refusal
    r = run(args + ['--resume'], cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'neither checkpoint' in r.stderr and '--force' in r.stderr, r.stderr
    shutil.copy(out / 'best.pt', out / 'last.pt')                          # "continue from the best": weights only
    r = run(args + ['--resume'], cwd=tmp_path, check=False)
    assert r.returncode == 2 and f'{out / "last.pt"} is not a checkpoint to resume from (it lacks optimizer' in r.stderr \
        and 'a best.pt or a model file?' in r.stderr and 'Traceback' not in r.stderr, r.stderr   # (it said `error: rng`)

def test_resume_refuses_a_changed_schedule_and_warns_about_a_changed_crop(tiny_data, tmp_path):
    out = tmp_path / 'o'
    run(_train(tiny_data, out, '--stop-after', 1), cwd=tmp_path)
    r = run(_train(tiny_data, out, '--lr', 0.02, '--resume'), cwd=tmp_path, check=False)
    assert r.returncode == 2 and '--lr 0.01 -> 0.02' in r.stderr and 'define the run' in r.stderr, r.stderr
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 1      # unchanged
    r = run(_train(tiny_data, out, '--crop-size', 24, '--resume'), cwd=tmp_path, check=False)
    assert r.returncode == 0 and 'warning' in r.stderr and '--crop-size 32 -> 24' in r.stderr, r.stderr
    # the checkpoints store the latest session's options and, beside them, what each --resume changed and from which step
    changed = [dict(step=1, changes=['--crop-size 32 -> 24'])]
    for f in ('last.pt', 'best.pt'):
        ck = torch.load(out / f, map_location='cpu', weights_only=True)
        assert (ck['config']['crop_size'], ck['changes']) == (24, changed), (f, ck['config']['crop_size'], ck.get('changes'))
    run(aicsd_cmd() + ['evaluate', '--ckpt', out / 'best.pt', '--device', 'cpu', '--threads', 1, '--json', tmp_path / 'm.json'],
        cwd=tmp_path)
    assert json.loads((tmp_path / 'm.json').read_text())['checkpoint']['changed_on_resume'] == changed

def test_device_and_teacher_backbone_messages(tiny_data, tmp_path):
    out = tmp_path / 't'
    if not torch.cuda.is_available():
        r = run(_train(tiny_data, out, '--device', 'cuda'), cwd=tmp_path, check=False)
        assert r.returncode == 2 and '--device cuda:' in r.stderr and '--device cpu' in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr
    run(_train(tiny_data, out), cwd=tmp_path)
    r = run(aicsd_cmd() + ['distill', '--method', 'kd', '--student', 'mobilenetv2', '--teacher', out / 'best.pt',
                           '--teacher-backbone', 'resnet101', '--epochs', 1] + tiny_args(tiny_data, tmp_path / 'd'),
            cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'mobilenetv2' in r.stderr and '--teacher-backbone' in r.stderr and 'drop --teacher-backbone' in r.stderr, r.stderr

def _cfg(root, out, **kw):
    "A tiny in-process run on `tiny_data`: 3 steps per epoch."
    return {**dict(data='synthetic', data_root=str(root), model='mobilenetv2', crop_size=32, scale_min=1.0, scale_max=1.0,
                   batch_size=4, val_batch_size=5, lr=0.01, threads=1, device='cpu', tensorboard=False, figures=False,
                   quiet=True, out=str(out)), **kw}

def _spy_last_writes(monkeypatch, out) -> list:
    "Each write of a last.pt: (its step, the step last.pt held when the write began, the step it held when it ended)."
    seen, save = [], torch.save
    def held():
        f = out / 'last.pt'
        return torch.load(f, map_location='cpu', weights_only=True)['global_step'] if f.exists() else None
    def spy(obj, f, *a, **k):
        if not (isinstance(obj, dict) and 'optimizer' in obj): return save(obj, f, *a, **k)
        before = held(); save(obj, f, *a, **k)
        seen.append((obj['global_step'], before, held()))
    monkeypatch.setattr(torch, 'save', spy)
    return seen

def test_one_checkpoint_write_per_step(tiny_data, tmp_path, monkeypatch):
    """Epochs that end on a checkpoint step, a stop at an epoch end, a resume: last.pt is written once per step, except
    where an evaluation ends the session (--stop-after at an epoch's end, the run's end): before it and after it."""
    from aicsd.distill import fit
    seen = _spy_last_writes(monkeypatch, tmp_path / 'o')
    fit(_cfg(tiny_data, tmp_path / 'o', epochs=2, ckpt_every=1, stop_after=3))
    fit(_cfg(tiny_data, tmp_path / 'o', epochs=2, ckpt_every=1, resume=True))
    assert [s for s, _, _ in seen] == [1, 2, 3, 3, 4, 5, 6, 6], seen

def test_last_pt_stays_until_the_new_checkpoint_is_complete(tiny_data, tmp_path, monkeypatch):
    "While a checkpoint is written, last.pt holds the previous one; then the previous one becomes last.prev.pt."
    from aicsd.distill import fit, load_checkpoint
    out = tmp_path / 'o'
    seen = _spy_last_writes(monkeypatch, out)
    out.mkdir(); (out / '.eval_log.csv.k3j2.tmp').write_text('a killed write')   # swept when the run starts
    fit(_cfg(tiny_data, out, epochs=2, ckpt_every=1))
    assert seen[0] == (1, None, None)                                     # the first write: nothing before it
    for (step, before, after), (prev, _, _) in zip(seen[1:], seen):
        assert (before, after) == (prev, prev), seen                      # the old last.pt, complete, the whole time
    assert load_checkpoint(out / 'last.pt')['global_step'] == 6 and not (out / 'last.prev.pt').exists()   # complete: deleted
    assert not list(out.glob('.*.tmp'))                                    # no temporary file left behind

def test_a_failure_drawing_figures_does_not_end_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    import aicsd.viz
    from aicsd.distill import fit
    def boom(*a, **k): raise RuntimeError('stack expects each tensor\nto be equal size')
    monkeypatch.setattr(aicsd.viz, 'write_eval_figures', boom)
    from aicsd.viz import run_figures                     # the command line's hook (--figures, the default)
    r = fit(_cfg(tiny_data, tmp_path / 'g', epochs=2, figures=True, figures_every=1), draw=run_figures)   # both evaluations draw
    assert r['steps'] == 6 and (tmp_path / 'g' / 'best.pt').exists()
    warned = [l for l in capsys.readouterr().err.splitlines() if 'warning' in l]
    assert warned == [f'aicsd: warning: figures at step {s} not drawn: RuntimeError: stack expects each tensor to be '
                      f'equal size' for s in (3, 6)], warned

def test_make_config_refuses_out_of_range_weights_and_parameters():
    "Negative, NaN or infinite weights, temperatures and term parameters: refused, naming the option and the range."
    from aicsd.distill import make_config
    kd = dict(mode='distill', method='kd', teacher='t.pt')
    nan, inf = float('nan'), float('inf')
    cases = [(dict(lambda_kd=-1), '--lambda-kd', '>= 0'), (dict(lambda_icsd=nan), '--lambda-icsd', '>= 0'),
             (dict(temperature=0), '--temperature', '> 0'), (dict(temperature=inf), '--temperature', '> 0'),
             (dict(weight={'kd': -0.5}), '--weight kd=', '>= 0'), (dict(weight={'kd': inf}), '--weight kd=', '>= 0'),
             (dict(param={'kd': {'T': 0}}), '--param kd.T', '> 0'), (dict(param={'kd': {'T': nan}}), '--param kd.T', '> 0'),
             (dict(method='cwd', param={'cwd': {'tau': -4}}), '--param cwd.tau', '> 0'),
             (dict(clip_grad=0), '--clip-grad', '> 0'), (dict(max_val=0), '--max-val', '>= 1')]
    for kw, flag, bound in cases:
        with pytest.raises(ValueError, match=re.escape(flag)) as e: make_config({**kd, **kw})
        assert f'a finite number {bound}' in str(e.value) or f'an integer {bound}' in str(e.value), str(e.value)
    c = make_config(kd, lambda_kd=0, weight={'kd': 0})                     # a weight of 0 switches a term off
    assert (c['lambda_kd'], c['weight']) == (0, {'kd': 0.0})

def test_loader_workers_stop_when_the_run_ends(tiny_data, tmp_path, monkeypatch):
    """The training loader's persistent workers are stopped by `fit` itself. Left to the garbage collector (the loader
    is in a reference cycle), torch waits 5 s for each worker and then kills it (pytorch#81794): exit code -15."""
    from torch.utils.data import dataloader as D
    from aicsd.distill import fit
    made, init = [], D._MultiProcessingDataLoaderIter.__init__
    def spy(self, *a, **k): init(self, *a, **k); made.append(self)
    monkeypatch.setattr(D._MultiProcessingDataLoaderIter, '__init__', spy)
    r = fit(_cfg(tiny_data, tmp_path / 'w', epochs=2, workers=2, stop_after=4))
    assert r['steps'] == 4 and [it._persistent_workers for it in made] == [True, False]   # training (both epochs), evaluation
    assert [w.exitcode for it in made for w in it._workers] == [0] * 4   # each worker left by itself, none killed

def _umask() -> int:
    old = os.umask(0); os.umask(old); return old

def test_run_files_and_dataset_are_readable_by_the_group_and_a_folder_is_no_checkpoint(tiny_data, tmp_path):
    "Checkpoints get the mode of the logs (mkstemp alone gives 0600); a run folder given as a checkpoint is named as such."
    assert (tiny_data.stat().st_mode & 0o777) == 0o777 & ~_umask()         # make_synthetic's root (mkdtemp alone: 0700)
    out = tmp_path / 't'
    run(_train(tiny_data, out), cwd=tmp_path)
    for f in ('best.pt', 'last.pt', 'train_log.csv'):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~_umask(), f
    ev = ['evaluate', '--data', 'synthetic', '--data-root', tiny_data, '--device', 'cpu', '--threads', 1, '--ckpt']
    p = run(aicsd_cmd() + ev + [out], cwd=tmp_path, check=False)
    assert p.returncode == 2 and f'{out} is a folder, not a checkpoint file' in p.stderr, p.stderr
    assert f"did you mean {out / 'best.pt'}?" in p.stderr and 'Traceback' not in p.stderr, p.stderr

def test_a_run_that_failed_before_its_first_checkpoint_is_rerun_plainly(tiny_data, tmp_path):
    "Only logs in --out (the run died before any checkpoint): the same command starts afresh; the logs are moved aside."
    out = tmp_path / 'f'
    p = run(_train(tiny_data, out, '--lr', 1e9, '--log-every', 1, '--epochs', 3), cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'non-finite' in p.stderr, p.stderr
    if any((out / f).exists() for f in ('last.pt', 'best.pt', 'last.prev.pt')):   # it got as far as a checkpoint
        for f in ('last.pt', 'best.pt', 'last.prev.pt'): (out / f).unlink(missing_ok=True)
    (out / 'tb').mkdir(exist_ok=True); (out / 'tb' / 'events').write_text('x')     # what --tensorboard leaves
    logs = sorted(f.name for f in out.iterdir() if f.name != '.lock')
    p = run(_train(tiny_data, out), cwd=tmp_path, check=False)                       # the same command, again
    assert p.returncode == 0, p.stderr
    aside = [d for d in out.iterdir() if d.name.startswith('replaced-')]
    assert len(aside) == 1 and sorted(f.name for f in aside[0].iterdir()) == logs, (logs, list(aside[0].iterdir()))
    said = [l for l in p.stderr.splitlines() if str(aside[0]) in l]
    assert len(said) == 1 and 'nothing is lost' in said[0], p.stderr
    assert (out / 'best.pt').exists()
    p = run(_train(tiny_data, out), cwd=tmp_path, check=False)                       # a checkpoint now: refused
    assert p.returncode == 2 and 'already holds a run' in p.stderr, p.stderr

def test_csv_logs_keep_one_line_ending_across_a_resume(tiny_data, tmp_path):
    from aicsd.distill import fit
    out = tmp_path / 'n'
    fit(_cfg(tiny_data, out, epochs=2, log_every=1, stop_after=2))
    (out / 'eval_log.csv').unlink(missing_ok=True)
    old = (out / 'train_log.csv').read_bytes()
    (out / 'train_log.csv').write_bytes(old.replace(b'\r\n', b'\n').replace(b'\n', b'\r\n'))   # as an older aicsd wrote it
    fit(_cfg(tiny_data, out, epochs=2, log_every=1, resume=True))
    for f in ('train_log.csv', 'eval_log.csv'):
        b = (out / f).read_bytes()
        assert b'\r' not in b and b.endswith(b'\n'), (f, b[:200])
    assert [int(l.split(b',')[0]) for l in (out / 'train_log.csv').read_bytes().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]
