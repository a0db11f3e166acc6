"""Run the multi-process tests (tests/test_ddp.py: DDP vs one process, distributed evaluation, a crashing rank)
N times and count failures and hangs. Not part of `make test` (it takes N x ~1.5 min on 2 cores):

    .venv/bin/python tests/stress_ddp.py            # 20 rounds
    .venv/bin/python tests/stress_ddp.py --rounds 5
"""
import argparse, re, subprocess, sys, time
from pathlib import Path

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=20)
    ap.add_argument('--timeout', type=int, default=900, help='seconds before a round counts as a hang')
    a = ap.parse_args()
    here = Path(__file__).resolve().parent
    fails, hangs, times = [], [], []
    for r in range(1, a.rounds + 1):
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, '-m', 'pytest', str(here / 'test_ddp.py'), '-q', '-p', 'no:cacheprovider'],
                               cwd=here.parent, capture_output=True, text=True, timeout=a.timeout)
            ok = p.returncode == 0
            summary = (re.findall(r'\d+ (?:passed|failed)[^\n]*', p.stdout) or [p.stdout[-200:]])[-1]
            if not ok: fails.append(r); print(p.stdout[-3000:], p.stderr[-2000:], sep='\n')
        except subprocess.TimeoutExpired:
            ok, summary = False, f'hang: no result after {a.timeout} s'; hangs.append(r)
        times.append(time.time() - t0)
        print(f"round {r}/{a.rounds}: {'ok' if ok else 'FAILED'} ({summary.strip()}, {times[-1]:.0f} s)", flush=True)
    print(f"\n{a.rounds} rounds: {len(fails)} failed {fails}, {len(hangs)} hung {hangs}; "
          f"{min(times):.0f}-{max(times):.0f} s per round")
    return 1 if fails or hangs else 0

if __name__ == '__main__': sys.exit(main())
