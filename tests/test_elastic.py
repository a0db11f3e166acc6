"""torchrun past one process group on one host: two node agents (`--nnodes 2`, c10d rendezvous on localhost, one
process each) train exactly like one process with the doubled batch, and a worker lost mid-run (SIGKILL) makes
torchrun (`--max-restarts 1`) restart the group, which resumes from last.pt and ends with the uninterrupted run's
weights, bit for bit. float64, as in tests/test_ddp.py, so the comparisons hold on any x86 CPU and thread count."""
import os, signal, socket, subprocess, sys
from pathlib import Path

import torch
from conftest import ENV, aicsd_cmd, run, tiny_args, state_dict, said_lines

MODEL, STEPS, LR, TOL = 'resnet18', 4, 0.0005, 1e-10
HERE = Path(__file__).resolve().parent


def _train(root, out, batch, *more):
    return ['train', '--model', MODEL, '--max-steps', STEPS, '--no-dropout', '--sync-bn', '--dtype', 'float64',
            *tiny_args(root, out), '--batch-size', batch, '--lr', LR, *more]


def _keep_weights(out: Path) -> dict:
    "The final weights of a run; its folder (hundreds of MB of checkpoints) is removed at once."
    import shutil
    w = state_dict(out / 'last.pt'); shutil.rmtree(out); return w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _worst(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_two_node_agents_match_one_process(tiny_data, tmp_path):
    run(aicsd_cmd() + _train(tiny_data, tmp_path / 'one', 4), cwd=tmp_path)
    one = _keep_weights(tmp_path / 'one')
    port = _free_port()
    agent = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
             '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', f'aicsd-{port}',
             '-m', 'aicsd.cli', *map(str, _train(tiny_data, tmp_path / 'two', 2))]
    procs = [subprocess.Popen(agent, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try: outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs: p.kill() if p.poll() is None else None
    for p, (o, e) in zip(procs, outs): assert p.returncode == 0, f"agent exited {p.returncode}\n{e[-4000:]}"
    worst = _worst(one, state_dict(tmp_path / 'two' / 'last.pt'))
    print(f"two agents vs one process: max |dw| = {worst:.3g}")
    assert worst < TOL


def test_a_lost_worker_restarts_the_group_from_last_pt(tiny_data, tmp_path):
    base = ['--standalone', '--nproc_per_node', '2']
    whole = [sys.executable, '-m', 'torch.distributed.run', *base, '-m', 'aicsd.cli']
    run(whole + _train(tiny_data, tmp_path / 'whole', 2, '--ckpt-every', 1), cwd=tmp_path, timeout=300)
    a = _keep_weights(tmp_path / 'whole')
    faulty = [sys.executable, '-m', 'torch.distributed.run', *base, '--max-restarts', '1', str(HERE / 'elastic_worker.py')]
    env = {**ENV, 'AICSD_TEST_RANK': '1', 'AICSD_TEST_AT': 'step:3', 'PYTHONPATH': str(HERE)}
    p = subprocess.run([str(a) for a in faulty + _train(tiny_data, tmp_path / 'lost', 2, '--ckpt-every', 1)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-5000:]
    assert 'Signals.SIGKILL' in p.stderr or 'exitcode: -9' in p.stderr, p.stderr[-3000:]   # the fault did happen
    assert 'aicsd: warning: torchrun restarted the job (restart 1)' in p.stderr, p.stderr[-3000:]   # and resumed
    assert '-> ' not in p.stderr, p.stderr[-3000:]                                          # with no option changed
    b = state_dict(tmp_path / 'lost' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a), f"max |dw| = {_worst(a, b):.3g}"
    import csv
    steps = [int(r['step']) for r in csv.DictReader(open(tmp_path / 'lost' / 'train_log.csv'))]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps                        # no step logged twice


def test_a_restart_continues_only_the_jobs_own_checkpoint(tiny_data, tmp_path):
    """`torchrun --max-restarts 1` where the first attempt is refused (the folder holds an earlier run; no --resume, no
    --force): the restart refuses too, and the earlier run is not continued behind the refusal."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    args = ['-m', 'aicsd.cli', 'train', '--max-steps', 4, *tiny_args(tiny_data, tmp_path / 'r'), '--batch-size', 2]
    run(cmd + args + ['--stop-after', 2], cwd=tmp_path, timeout=300)                  # an earlier run, stopped at step 2
    step = lambda: torch.load(tmp_path / 'r' / 'last.pt', map_location='cpu', weights_only=True)['global_step']
    assert step() == 2
    p = subprocess.run([str(a) for a in cmd + ['--max-restarts', 1] + args], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode != 0 and 'already holds a run' in p.stderr, p.stderr[-3000:]
    assert 'torchrun restarted the job' not in p.stderr and step() == 2, p.stderr[-3000:]


def _faulty(tmp_path, args, restarts=0, **env):
    "A torchrun job of 2 processes running tests/elastic_worker.py with the fault `env` (AICSD_TEST_*): (rc, stderr)."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--max-restarts', restarts,
           str(HERE / 'elastic_worker.py'), *args]
    p = subprocess.run([str(a) for a in cmd], cwd=tmp_path, env={**ENV, 'PYTHONPATH': str(HERE), **env}, capture_output=True,
                       text=True, timeout=400)
    return p.returncode, p.stderr


def test_stop_after_counts_the_jobs_steps_across_a_restart(tiny_data, tmp_path):
    """`--stop-after 4` in a job whose worker is lost at step 3 (`--max-restarts 1`): the restart resumes from step 2 and
    stops at step 4, where the job was to stop (before: 4 steps past its checkpoint, so the run went on to its end)."""
    args = _train(tiny_data, tmp_path / 'r', 2, '--ckpt-every', 1, '--max-steps', 6, '--stop-after', 4, '--dtype', 'float32')
    rc, err = _faulty(tmp_path, args, restarts=1, AICSD_TEST_AT='step:3')
    assert rc == 0 and 'torchrun restarted the job (restart 1)' in err, err[-5000:]
    ck = torch.load(tmp_path / 'r' / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['global_step'] == 4, (ck['global_step'], err[-3000:])


def test_a_restart_at_the_jobs_stop_after_keeps_its_evaluation(tiny_data, tmp_path):
    """--stop-after 3 (an epoch's end) and a worker lost in that evaluation: the restart resumes at step 3, evaluates it
    and stops there, and its last.pt records that evaluation (a --resume then does not run it again)."""
    args = _train(tiny_data, tmp_path / 'r', 2, '--max-steps', 6, '--stop-after', 3, '--dtype', 'float32')
    rc, err = _faulty(tmp_path, args, restarts=1, AICSD_TEST_AT='eval')
    assert rc == 0 and 'torchrun restarted the job (restart 1)' in err, err[-5000:]
    ck = torch.load(tmp_path / 'r' / 'last.pt', map_location='cpu', weights_only=True)
    assert (ck['global_step'], ck['eval_step']) == (3, 3), (ck['global_step'], ck['eval_step'], err[-3000:])


def test_a_signal_to_one_process_after_the_last_step_is_said_once(tiny_data, tmp_path):
    """SIGTERM to rank 1 once the run is complete (after its last vote): both processes leave alike and rank 0 says so,
    once (before: rank 1 left alone and rank 0 said another process had ended first, with no error anywhere)."""
    args = _train(tiny_data, tmp_path / 'r', 2, '--max-steps', 2, '--dtype', 'float32')
    rc, err = _faulty(tmp_path, args, AICSD_TEST_AT='finish', AICSD_TEST_SIGNAL='TERM')
    said = said_lines(err)
    assert len(said) == 1 and said[0].startswith('aicsd: stopped by SIGTERM after the last step was checked') and \
           said[0].endswith('is written and the run is complete'), err[-3000:]
    assert torch.load(tmp_path / 'r' / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 2


def test_processes_wait_for_the_checkpoint_of_a_stop(tiny_data, tmp_path):
    """SIGTERM to rank 1 at step 3 while rank 0's checkpoint takes 3 s to write: rank 1 waits for it (before: it left at
    once, and torchrun sent rank 0 a SIGTERM in the middle of its write, said as a second line, "writing ... first").
    (torchrun may still signal rank 0 after the write, while it exits: the processes' ends are not synchronised.)"""
    args = _train(tiny_data, tmp_path / 'r', 2, '--max-steps', 6, '--dtype', 'float32')
    rc, err = _faulty(tmp_path, args, AICSD_TEST_AT='step:3', AICSD_TEST_SIGNAL='TERM', AICSD_TEST_SLOW_SAVE='3')
    said = said_lines(err)
    assert len(said) == 1 and said[0].startswith('aicsd: stopped by SIGTERM at step 3;'), err[-3000:]
    assert torch.load(tmp_path / 'r' / 'last.pt', map_location='cpu', weights_only=True)['global_step'] == 3
