"""Shared fixtures of the end-to-end tests: a tiny synthetic dataset and a way to run the `aicsd` command."""
import os, shutil, subprocess, sys
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

def run(args, cwd, timeout=240, check=True) -> subprocess.CompletedProcess:
    "Run a command with the test environment; on failure show its output."
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
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

def state_dict(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)['model']
