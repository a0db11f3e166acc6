"""Never lose a run, never use the wrong data silently: each case fails loudly, names the file or option, changes nothing."""
import os, signal, subprocess, sys, time
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
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()   # a pid that has exited
    (out / '.lock').write_text(f"{dead.pid} {os.uname().nodename}\n")
    run(_train(tiny_data, out), cwd=tmp_path)                              # a stale lock is taken over
    assert (out / 'last.pt').exists() and not (out / '.lock').exists()

def test_ctrl_c_checkpoints_and_resumes(tiny_data, tmp_path):
    out = tmp_path / 'c'
    args = _train(tiny_data, out, '--epochs', 50, '--log-every', 1)
    p = subprocess.Popen([str(a) for a in args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / 'train_log.csv').exists():
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read() if p.poll() is not None else 'too slow'
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert 'Traceback' not in err and 'interrupted at step' in err and '--resume' in err, err
    step = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step']
    assert 1 <= step < 150
    r = run(_train(tiny_data, out, '--epochs', 50, '--log-every', 1, '--stop-after', 2, '--resume'), cwd=tmp_path,
            check=False)
    assert r.returncode == 0, r.stderr                       # it continues from the checkpoint's step ...
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == step + 2   # ... to the end

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

def test_resume_refuses_a_changed_schedule_and_warns_about_a_changed_crop(tiny_data, tmp_path):
    out = tmp_path / 'o'
    run(_train(tiny_data, out, '--stop-after', 1), cwd=tmp_path)
    r = run(_train(tiny_data, out, '--lr', 0.02, '--resume'), cwd=tmp_path, check=False)
    assert r.returncode == 2 and '--lr 0.01 -> 0.02' in r.stderr and 'define the run' in r.stderr, r.stderr
    assert torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 1      # unchanged
    r = run(_train(tiny_data, out, '--crop-size', 24, '--resume'), cwd=tmp_path, check=False)
    assert r.returncode == 0 and 'warning' in r.stderr and '--crop-size 32 -> 24' in r.stderr, r.stderr

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
    assert r.returncode == 2 and 'mobilenetv2' in r.stderr and '--teacher-backbone' in r.stderr and 'drop it' in r.stderr, r.stderr
