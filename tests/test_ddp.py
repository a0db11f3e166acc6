"""Two processes under torchrun (gloo, CPU) with SyncBatchNorm train like one process with the doubled batch, and
distributed evaluation gives exactly the single-process metrics."""
import json, shutil, socket, subprocess, sys
from pathlib import Path
import torch
from conftest import aicsd_cmd, run, tiny_args, state_dict

# Exact by construction: the runs are in float64 (`--dtype float64`). In float32 this tiny, badly conditioned problem
# (BatchNorm over 4 pooled values, 32 px images) amplifies rounding differences ~30x per step, and how much rounding
# there is depends on the CPU's kernels (AMD vs Intel) and the thread count, so no float32 tolerance holds everywhere.
# In float64 the same amplification leaves the two runs within ~1e-13 after 4 steps; the limit 1e-10 is 1000x that
# and still ~1e6x below the float32 gap (3.8e-4) and below any real difference (a wrong all-reduce or statistic).
MODEL, STEPS, LR, TOL = 'resnet18', 4, 0.0005, 1e-10
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'aicsd.cli']

def _train(root, out, batch, model=MODEL):
    # no dropout (per-rank RNG), scale 1 and crop = image size (every pixel labelled: the mean loss per rank
    # then averages to the global mean); random flips stay on (seeded per sample, identical in both runs)
    return ['train', '--model', model, '--max-steps', STEPS, '--no-dropout', '--sync-bn', '--dtype', 'float64'] + \
           tiny_args(root, out) + ['--batch-size', batch, '--lr', LR]

def _init():
    "The seeded initial weights both runs start from."
    from aicsd.models import deeplabv3plus
    torch.manual_seed(0)
    return {k: v for k, v in deeplabv3plus(MODEL, 4).state_dict().items()}

def test_ddp_matches_single_process(tiny_data, tmp_path):
    from aicsd.runfolder import read_run
    run(aicsd_cmd() + _train(tiny_data, tmp_path / 'one', 4) + ['--log-every', 1], cwd=tmp_path)
    s1, best = state_dict(tmp_path / 'one' / 'last.pt'), state_dict(tmp_path / 'one' / 'best.pt')
    log1 = read_run(tmp_path / 'one')['train']
    shutil.rmtree(tmp_path / 'one')                # 665 MB of float64 ResNet-18 checkpoints: one run on disk at a time
    p = run(TORCHRUN + _train(tiny_data, tmp_path / 'two', 2) + ['--log-every', 1], cwd=tmp_path, timeout=300)
    assert 'terminate called' not in p.stderr
    s2 = state_dict(tmp_path / 'two' / 'last.pt')
    # the logged loss is the mean over the processes (every pixel labelled: the one-process loss), not rank 0's half
    log2 = read_run(tmp_path / 'two')['train']
    for k in ('loss', 'ce'):
        assert len(log1[k]) == STEPS and max(abs(a - b) for a, b in zip(log1[k], log2[k])) < TOL, (k, log1[k], log2[k])
    assert s1.keys() == s2.keys()
    worst = max(float((s1[k].double() - s2[k].double()).abs().max()) for k in s1 if s1[k].is_floating_point())
    print(f"max |w_ddp - w_single| = {worst:.3g}")
    assert worst < TOL, f"max |w_ddp - w_single| = {worst:.3g} (limit {TOL})"
    moved = max(float((s1[k].double() - v.double()).abs().max()) for k, v in _init().items() if v.is_floating_point())
    assert moved > 1e3 * TOL, f"the weights barely moved ({moved:.3g}): the comparison proves nothing"
    changed = max(float((s1[k].double() - v.double()).abs().max()) for k, v in best.items() if v.is_floating_point())
    assert changed == 0.0                                                 # best.pt = the final weights here

def test_without_sync_bn_the_logged_miou_is_the_saved_networks(tiny_data, tmp_path):
    """Without --sync-bn each process's BatchNorm statistics are its own; the evaluation during training is of rank 0's
    network, the one saved: eval_log.csv's mIoU equals `aicsd evaluate` of last.pt on one process, exactly (float64)."""
    args = ['train', '--model', 'mobilenetv2', '--max-steps', 2, '--no-dropout', '--dtype', 'float64'] + \
           tiny_args(tiny_data, tmp_path / 'r') + ['--batch-size', 2]
    run(TORCHRUN + args, cwd=tmp_path, timeout=300)
    ev = ['evaluate', '--ckpt', tmp_path / 'r' / 'last.pt', '--data', 'synthetic', '--data-root', tiny_data,
          '--threads', 1, '--device', 'cpu', '--json', tmp_path / 'one.json']
    run(aicsd_cmd() + ev, cwd=tmp_path)
    from aicsd.runfolder import read_run
    logged = read_run(tmp_path / 'r')['eval']['miou'][-1]
    assert logged == json.loads((tmp_path / 'one.json').read_text())['miou'], logged

def test_compiled_ddp_resumes_like_one_process(tiny_data, tmp_path):
    """`--compile` under torchrun (the dynamo `eager` backend: no C++ compiler), stopped after 2 steps and resumed by a new
    torchrun, ends where one uncompiled process with the doubled batch ends (float64, as above)."""
    # ResNet-18, as above: MobileNetV2's float64 gradients at random initialisation are ill-conditioned (the biases of
    # its batch norms after 1x1 convs differ by ~1 % of the largest gradient between torch's batch norm and the same
    # formula written out), so no exact comparison holds for it
    m = MODEL
    run(aicsd_cmd() + _train(tiny_data, tmp_path / 'one', 4, model=m), cwd=tmp_path)
    s1 = state_dict(tmp_path / 'one' / 'last.pt'); shutil.rmtree(tmp_path / 'one')
    two = _train(tiny_data, tmp_path / 'two', 2, model=m) + ['--compile', 'eager']
    run(TORCHRUN + two + ['--stop-after', 2], cwd=tmp_path, timeout=300)
    assert torch.load(tmp_path / 'two' / 'last.pt', weights_only=True)['global_step'] == 2
    p = run(TORCHRUN + two + ['--resume'], cwd=tmp_path, timeout=300)
    assert 'terminate called' not in p.stderr
    s2 = state_dict(tmp_path / 'two' / 'last.pt')
    assert s1.keys() == s2.keys() and not any(k.startswith('_orig_mod') for k in s2)   # the plain modules' state_dict
    worst = max(float((s1[k].double() - s2[k].double()).abs().max()) for k in s1 if s1[k].is_floating_point())
    print(f"compiled, resumed DDP: max |w_ddp - w_single| = {worst:.3g}")
    assert worst < TOL, f"max |w_ddp - w_single| = {worst:.3g} (limit {TOL})"

def test_resume_on_another_process_count_is_refused(tiny_data, tmp_path):
    """A run started on one process and resumed by torchrun on two would take 2x the images per step and re-split its
    epoch: refused, naming both counts; the recipe's total (--total-batch) is checked at the start of every run."""
    args = ['train', '--model', 'mobilenetv2', '--max-steps', 3, *tiny_args(tiny_data, tmp_path / 'r'), '--batch-size', 2]
    run(aicsd_cmd() + args + ['--stop-after', 1], cwd=tmp_path)
    p = run(TORCHRUN + args + ['--resume', '--total-batch', 2], cwd=tmp_path, timeout=300, check=False)
    err = ' '.join(p.stderr.split())
    assert p.returncode != 0 and '1 -> 2 process(es) (2 x 1 = 2 images per step then, 2 x 2 = 4 now)' in err, err[-3000:]
    assert '2 images per process (--batch-size) x 2 process(es) = 4 images per step, not the 2 of --total-batch' in err
    assert torch.load(tmp_path / 'r' / 'last.pt', weights_only=True)['global_step'] == 1      # the run is untouched

def test_distributed_evaluation_is_exact(tiny_data, tmp_path):
    # any network will do (the evaluation is what is compared): MobileNetV2's checkpoints are a third of ResNet-18's
    run(aicsd_cmd() + _train(tiny_data, tmp_path / 'm', 4, model='mobilenetv2'), cwd=tmp_path)
    ev = ['evaluate', '--ckpt', tmp_path / 'm' / 'best.pt', '--data', 'synthetic', '--data-root', tiny_data,
          '--threads', 1, '--device', 'cpu']
    run(aicsd_cmd() + ev + ['--json', tmp_path / 'one.json'], cwd=tmp_path)
    run(TORCHRUN + ev + ['--json', tmp_path / 'two.json'], cwd=tmp_path, timeout=300)   # 5 images: ranks get 3 and 2
    one, two = json.loads((tmp_path / 'one.json').read_text()), json.loads((tmp_path / 'two.json').read_text())
    assert one.keys() == two.keys()
    for k in one: assert json.dumps(one[k]) == json.dumps(two[k]), k    # exactly, NaN included

def bad_label_copy(src, dst, index=5):
    "A copy of a synthetic dataset whose training label `index` holds a value outside the classes."
    import shutil
    import numpy as np
    from PIL import Image
    from aicsd.data import save_label_png
    shutil.copytree(src, dst)
    name = (dst / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()[index]
    f = dst / 'SegmentationClass' / f'{name}.png'
    m = np.array(Image.open(f)); m[0, 0] = 77
    save_label_png(m, f)
    return dst, f

def test_a_crashing_rank_ends_the_job(tiny_data, tmp_path):
    """One rank fails (a bad label only it reads): the torchrun job exits non-zero with that rank's message, and the other
    process's traceback is not shown; a hang is caught by run's timeout."""
    root, bad = bad_label_copy(tiny_data, tmp_path / 'bad')
    p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', '--epochs', 1, '--sync-bn'] + tiny_args(root, tmp_path / 'x') +
            ['--batch-size', 2], cwd=tmp_path, timeout=240, check=False)
    print(f"torchrun exited {p.returncode}")
    assert p.returncode != 0, p.stderr[-3000:]
    assert f'Label file {bad}' in p.stderr and 'holds values [77]' in p.stderr, p.stderr[-3000:]
    # the other process, whose next collective fails on the closed connection, says so in one line (or was stopped first)
    assert not any(l.startswith('[rank') for l in p.stderr.splitlines()), p.stderr[-3000:]

def _check_fails_once(p, message):
    "A torchrun job that failed at set-up: `message` said once, no process's traceback, none killed after torchrun's 30 s."
    assert p.returncode != 0, p.stderr[-3000:]
    assert p.stderr.count('aicsd: error:') == 1 and message in p.stderr, p.stderr[-3000:]
    assert not any(l.startswith('[rank') for l in p.stderr.splitlines()), p.stderr[-3000:]   # a rank's traceback
    assert 'forcefully exiting via 9' not in p.stderr, p.stderr[-3000:]                    # one ignored torchrun's SIGTERM

def test_a_folder_in_use_stops_every_rank_at_once(tiny_data, tmp_path):
    """Rank 0 alone takes the run folder's lock and finds it held: every process leaves at set-up with that one message
    (the other rank used to wait in its first collective until torchrun killed it, 30 s later, with a traceback)."""
    out = tmp_path / 'busy'; out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    try:
        (out / '.lock').write_text(f"{holder.pid} {socket.gethostname()}\n")
        p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', '--max-steps', 1] + tiny_args(tiny_data, out) +
                ['--batch-size', 2], cwd=tmp_path, timeout=240, check=False)
    finally: holder.kill(); holder.wait()
    _check_fails_once(p, f'{out} is in use by process {holder.pid}')
    assert sorted(f.name for f in out.iterdir()) == ['.lock']

def test_an_error_of_every_rank_is_said_once(tmp_path):
    "A wrong --data-root, met by both processes: said once (it was printed by each), and no folder is left."
    p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', '--data', 'voc', '--data-root', tmp_path / 'nothere',
                        '--max-steps', 1, '--threads', 1, '--device', 'cpu', '--out', tmp_path / 'x'],
            cwd=tmp_path, timeout=240, check=False)
    _check_fails_once(p, f'{tmp_path / "nothere"} does not exist')
    assert not (tmp_path / 'x').exists()

def test_a_schedule_error_is_said_once(tiny_data, tmp_path):
    "--warmup-steps past the run's end, found as the optimizer is built (after DDP's set-up): said once, by one process."
    p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', *tiny_args(tiny_data, tmp_path / 'w'), '--batch-size', 2,
                        '--max-steps', 2, '--warmup-steps', 2], cwd=tmp_path, timeout=240, check=False)
    _check_fails_once(p, '--warmup-steps 2: the warm-up must end before the run')

def test_a_failure_writing_the_default_data_stops_every_rank(tmp_path):
    """Rank 0 writes the default synthetic data set while the others wait for it: when the write fails (here: 40 classes,
    more than it can draw), every process stops with that one message (a review found them all waiting for ever); an empty
    --config is said once too (by each machine's first process)."""
    p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', '--num-classes', 40, '--max-steps', 1, '--crop-size', 32,
                        '--batch-size', 2, '--threads', 1, '--device', 'cpu', '--out', tmp_path / 'x'],
            cwd=tmp_path, timeout=240, check=False)
    _check_fails_once(p, 'num_classes must be in 2..28')
    (tmp_path / 'empty.yaml').write_text('# nothing\n')
    p = run(TORCHRUN + ['train', '--config', tmp_path / 'empty.yaml'], cwd=tmp_path, timeout=240, check=False)
    _check_fails_once(p, 'holds no options')

def _memory_batch(rank):
    "Process `rank`'s teacher feature and labels: rank 0 has 2 images, rank 1 one (unequal, as gather_ranks allows)."
    g = torch.Generator().manual_seed(10 + rank); b = 2 if rank == 0 else 1
    t = torch.randn(b, 6, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (b, 10, 14), generator=g); y[:, :3] = 255
    return t, y

def _memory_term():
    from aicsd.objective import CIRKDMemoryTerm
    torch.manual_seed(0); return CIRKDMemoryTerm(6, 6, 4, pixel_size=40, region_size=10).double()

_MEMORY_SCRIPT = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_ddp import _memory_batch, _memory_term
from aicsd.objective import term_cirkd_memory
torch.set_num_threads(1); dist.init_process_group('gloo'); r = dist.get_rank()
mod = _memory_term(); t, y = _memory_batch(r)
term_cirkd_memory({'decoder': t.clone()}, {'decoder': t}, y, mod)
torch.save(mod.memory.state_dict(), f"{sys.argv[1]}/rank{r}.pt")
dist.barrier(); dist.destroy_process_group()
'''

def test_cirkd_memory_gathers_all_processes(tmp_path):
    """Under torchrun each process's CIRKD queues equal one process's that enqueued both processes' batches (CIRKD's
    concat_all_gather), with unequal batch sizes; before the fix each process held only its own batch."""
    script = tmp_path / 'memory.py'; script.write_text(_MEMORY_SCRIPT)
    p = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script, tmp_path,
             Path(__file__).parent], cwd=tmp_path, timeout=300)
    assert 'terminate called' not in p.stderr
    got = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    ref = _memory_term().memory                            # one process: rank 0's images, then rank 1's
    (t0, y0), (t1, y1) = _memory_batch(0), _memory_batch(1)
    ref.enqueue(torch.cat([t0, t1]), torch.cat([y0, y1]))
    for r in (0, 1):
        assert got[r].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items(): assert torch.equal(got[r][k], v), (r, k)
    init = _memory_term().memory
    assert int(ref.region_ptr.sum()) > 0 and not torch.equal(ref.pixel_queue, init.pixel_queue)   # something was enqueued

def test_torchrun_says_things_once(tiny_data, tmp_path):
    """Under torchrun, a command that runs in one process (data, demo, compare, bench, recipes) is refused in one line
    (`demo` took its own folder's lock from the twin process and hung 30 s), and `aicsd evaluate`'s errors are said once."""
    p = run(TORCHRUN + ['data', 'stats', '--data', 'synthetic', '--data-root', tiny_data], cwd=tmp_path, timeout=300, check=False)
    assert p.returncode != 0 and p.stderr.count('aicsd: error:') == 1, p.stderr[-2000:]   # (torchrun exits 1)
    assert '`aicsd data` runs in one process; torchrun starts train, distill and evaluate' in p.stderr, p.stderr[-2000:]
    p = run(TORCHRUN + ['evaluate', '--ckpt', tmp_path / 'nothere.pt', '--data', 'synthetic', '--data-root', tiny_data,
                        '--device', 'cpu', '--threads', 1], cwd=tmp_path, timeout=300, check=False)
    assert p.returncode != 0 and p.stderr.count('aicsd: error:') == 1 and 'nothere.pt' in p.stderr, p.stderr[-3000:]
    if not torch.cuda.is_available():                  # a device this machine lacks: said by its first process only
        p = run(TORCHRUN + ['train', '--device', 'cuda:7', '--data', 'synthetic', '--data-root', tiny_data], cwd=tmp_path,
                timeout=300, check=False)
        assert p.returncode != 0 and p.stderr.count('aicsd: error: --device cuda:7') == 1, p.stderr[-3000:]
    p = run(TORCHRUN + ['evaluate', '--ckpt', tmp_path / 'nothere.pt', '--val-batch-size', 0, '--device', 'cpu'], cwd=tmp_path,
            timeout=300, check=False)                    # an option out of range: likewise
    assert p.returncode != 0 and p.stderr.count("aicsd: error: 'val_batch_size' (--val-batch-size)") == 1, p.stderr[-3000:]

def _stopped_torchrun(root, out, tmp_path, stop):
    """A torchrun job of 2 processes, long enough to be stopped by `stop(torchrun's process)` once rank 0 has logged
    3 steps; returns (exit status, stderr)."""
    import os, signal, time
    from conftest import ENV
    p = subprocess.Popen([str(a) for a in TORCHRUN + ['train', '--model', 'mobilenetv2', '--max-steps', 10000, '--log-every', 1] +
                          tiny_args(root, out) + ['--batch-size', 2]],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0, log = time.time(), out / 'train_log.csv'
        while p.poll() is None and time.time() - t0 < 240 and not (log.exists() and len(log.read_text().splitlines()) > 3):
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1][-3000:]
        stop(p)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    return p.returncode, err

def _said_step(err, how):
    "The step N of rank 0's one line `aicsd: <how> [during the evaluation] at step N; <out>/last.pt written ... --resume`."
    import re
    from conftest import said_lines
    said = said_lines(err)
    assert len(said) == 1, err[-3000:]                                                # said once, by rank 0
    m = re.match(rf'aicsd: {how} (?:during the evaluation )?at step (\d+); \S*last\.pt written.*: continue with the same '
                 'command and --resume', said[0])
    assert m, err[-3000:]
    return int(m[1])

def test_a_ctrl_c_under_torchrun_writes_last_pt(tiny_data, tmp_path):
    """A Ctrl-C reaches every process of a torchrun job (the terminal signals the whole group, torchrun forwards it):
    every process finishes the same step, last.pt holds it, rank 0 says so once, and --resume goes on from that step.
    (Before: each process left where the signal found it, no checkpoint was written, up to an epoch was lost.)"""
    import os, signal
    from aicsd.checkpoint import load_checkpoint
    out = tmp_path / 'r'
    rc, err = _stopped_torchrun(tiny_data, out, tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
    n = _said_step(err, 'interrupted')
    assert n >= 3 and load_checkpoint(out / 'last.pt')['global_step'] == n, (n, err[-3000:])
    p = run(TORCHRUN + ['train', '--model', 'mobilenetv2', '--max-steps', 10000, '--log-every', 1] + tiny_args(tiny_data, out) +
            ['--batch-size', 2, '--resume', '--stop-after', 2], cwd=tmp_path, timeout=300)
    assert load_checkpoint(out / 'last.pt')['global_step'] == n + 2, p.stderr[-3000:]
    from aicsd.runfolder import read_run
    assert list(read_run(out)['train']['step']) == list(range(1, n + 3)), p.stderr[-3000:]   # each step logged once

def test_a_sigterm_to_one_process_stops_the_whole_job(tiny_data, tmp_path):
    """A `kill` of one torchrun worker (rank 1 alone gets SIGTERM): the processes agree to stop at the same step, last.pt
    holds it and rank 0 says so. (Before: rank 1 died, rank 0 waited for it in a collective, no checkpoint.)"""
    import os, signal
    from aicsd.checkpoint import load_checkpoint
    def _rank1(p):
        kids = subprocess.run(['pgrep', '-P', str(p.pid)], capture_output=True, text=True).stdout.split()
        r1 = [k for k in kids if b'RANK=1' in Path(f'/proc/{k}/environ').read_bytes().split(b'\0')]
        assert len(r1) == 1, kids
        os.kill(int(r1[0]), signal.SIGTERM)
    out = tmp_path / 'r'
    rc, err = _stopped_torchrun(tiny_data, out, tmp_path, _rank1)
    n = _said_step(err, 'stopped by SIGTERM')
    assert rc != 0 and load_checkpoint(out / 'last.pt')['global_step'] == n, (rc, n, err[-3000:])
