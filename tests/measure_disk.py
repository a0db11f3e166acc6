"""Peak and leftover temporary-disk use of a command (by default the pytest suite). It runs the command with TMPDIR set
to a fresh folder (pytest's basetemp, `tempfile` folders, torchrun's files all land there), adds up the bytes of the
files in it twice a second, and prints the peak (with the folders that held it) and what is left when the command has
ended; then removes the folder.

    .venv/bin/python tests/measure_disk.py                                     # pytest tests/ -q -p no:cacheprovider
    .venv/bin/python tests/measure_disk.py tests/test_resume.py                # pytest on some files
    .venv/bin/python tests/measure_disk.py -- .venv/bin/nbdev_test --n_workers 2
"""
import os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

def folder_bytes(root) -> dict:
    "Bytes of the files under `root` by folder, 3 levels deep (pytest-of-USER/pytest-N/test_x0); robust to files vanishing."
    sizes = {}
    for d, _, files in os.walk(root):
        key = str(Path(*Path(d).relative_to(root).parts[:3]))
        for f in files:
            try: sizes[key] = sizes.get(key, 0) + os.lstat(os.path.join(d, f)).st_size
            except OSError: pass
    return sizes

def _top(sizes, n=3) -> str:
    return ', '.join(f"{k} {b / 1e6:.1f} MB" for k, b in sorted(sizes.items(), key=lambda kb: -kb[1])[:n] if b)

def measure(cmd, interval=0.5) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix='aicsd-disk-'))
    peak, stop = [0, 0.0, {}], threading.Event()
    def sample():
        while not stop.is_set():
            s = folder_bytes(tmp); b = sum(s.values())
            if b > peak[0]: peak[:] = [b, time.time() - t0, s]
            stop.wait(interval)
    t0 = time.time()
    th = threading.Thread(target=sample, daemon=True); th.start()
    rc = subprocess.run(cmd, env={**os.environ, 'TMPDIR': str(tmp)}).returncode
    stop.set(); th.join()
    left = folder_bytes(tmp)
    res = dict(rc=rc, seconds=round(time.time() - t0), peak_mb=peak[0] / 1e6, left_mb=sum(left.values()) / 1e6,
               left_files=sum(1 for p in tmp.rglob('*') if p.is_file()), left_entries=sorted(os.listdir(tmp)))
    print(f"\nmeasure_disk: exit {rc} after {res['seconds']} s; peak {res['peak_mb']:.1f} MB at {peak[1]:.0f} s "
          f"({_top(peak[2])}); left behind {res['left_mb']:.1f} MB in {res['left_files']} files "
          f"({_top(left, 10) or 'nothing'}); top-level entries left: {res['left_entries']}")
    shutil.rmtree(tmp, ignore_errors=True)
    return res

if __name__ == '__main__':
    args = sys.argv[1:]
    if args[:1] == ['--']: cmd = args[1:]
    else: cmd = [sys.executable, '-m', 'pytest', *(args or ['tests/']), '-q', '-p', 'no:cacheprovider']
    sys.exit(measure(cmd)['rc'])
