"""The jobs on the built-in synthetic data, with every default on: `aicsd demo --quick`, `aicsd compare --quick` (every
method of the table) and `aicsd bench --quick` (its default sections, threads and device).

Apart from tests/test_defaults.py (the commands that read real-format data trees) so that `make test`'s two
pytest workers (pytest-xdist, one test file each at a time) can run these long jobs beside that file.
"""
import json, math, re, signal, subprocess, time

from conftest import ENV, run, aicsd_cmd


def aicsd(*args, cwd, timeout=400):
    "Run `aicsd ARGS` as a user would (no flag switched off); fail with its output on a non-zero exit."
    return run([*aicsd_cmd(), *args], cwd=cwd, timeout=timeout)


# ---------------------------------------------------------------------------------------------- the demo
def test_demo_quick_defaults(tmp_path):
    """`aicsd demo --quick`, then Ctrl-C in a re-run and the same command with --resume: finished students kept, the
    interrupted one continued, no copies pile up."""
    out = tmp_path / 'demo'
    demo = ('demo', '--quick', '--out', out, '--data-root', tmp_path / 'syn')
    aicsd('data', 'synthetic', '--root', tmp_path / 'syn', '--n-train', 40, '--n-val', 20, '--size', 56, cwd=tmp_path)
    so = aicsd(*demo, cwd=tmp_path, timeout=600).stdout
    # the data used (not the preset's) and the images scored: --quick evaluates the first 16 (max_val) of the 20
    assert 'Synthetic shapes (40 train / 20 val images, the first 16 scored (--quick), 56 px)' in (out / 'report.md').read_text()
    assert {'ics_matrices.png', 'predictions.png'} <= {q.name for q in out.rglob('*.png')}
    said = re.search(r'finished in (\d+) s', so).group(1)                  # the time printed is the report's (figures too)
    assert f'Total wall time: {said} s.' in (out / 'report.md').read_text(), said
    first = {r['method']: r for r in json.loads((out / 'results.json').read_text())}
    # Ctrl-C while the kd student trains: the line says how to continue
    p = subprocess.Popen([str(a) for a in (*aicsd_cmd(), *demo)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    run, t0 = out / 'student-kd' / 'seed0', time.time()
    # the demo clears a student's folder when it reaches it; then `fit` takes the run's lock, installs its Ctrl-C handler and
    # logs the first step: both files there means this process is inside the training loop
    while not ((run / '.lock').exists() and (run / 'train_log.csv').exists()):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()[1][-3000:] if p.poll() is not None else 'too slow'
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    so, err = p.communicate(timeout=300)
    assert p.returncode == 130 and 'Traceback' not in err, err[-3000:]
    assert (f"of student kd, seed 0; continue with the same command and --resume (without it, it reuses the teacher in "
            f"{out / 'teacher-quick'} and trains every student)") in err, err[-3000:]
    # the first run's students are replaced one at a time, as reached: baseline and kd; icsd and aicsd are kept, and so
    # is no report of runs that are gone
    assert so.count('the earlier run in') == 2 and f"the earlier run in {out / 'student-kd' / 'seed0'} is replaced" in so, so
    assert (run / 'last.pt').is_file() and (out / 'student-icsd' / 'seed0' / 'last.pt').is_file()
    assert not (out / 'report.md').exists() and not (out / 'results.json').exists()
    # --resume: baseline, icsd and aicsd read back as they finished, kd continued from its last.pt; nothing replaced
    so = aicsd(*demo, '--resume', cwd=tmp_path, timeout=600).stdout
    assert 'the earlier run in' not in so and 'earlier teacher' not in so, so
    assert so.count('its run in this folder is resumed (or kept, if complete)') == 4 and '(4 of 4)' in so, so
    assert so.count(', ICS distance to the teacher ') == 4, so                                  # each student's result, as it ends
    md = (out / 'report.md').read_text()
    assert 'Paired differences in ICS distance to the teacher' in md and 'the runs kept from an earlier one are not in it' in md, md
    rows = {r['method']: r for r in json.loads((out / 'results.json').read_text())}
    assert rows[next(iter(rows))]['note'] == 'cached'                                       # the teacher
    assert [rows[m]['note'] for m in ('baseline', 'kd', 'icsd', 'aicsd')] == ["1 of 1 resumed: this session's time only"] * 4, rows
    for m in ('baseline', 'kd', 'icsd', 'aicsd'):   # the same runs as the first time, bit for bit (kd: resumed exactly)
        assert rows[m]['runs'][0]['miou'] == first[m]['runs'][0]['miou'], (m, rows[m], first[m])
    assert not list(out.rglob('replaced-*')), sorted(map(str, out.rglob('replaced-*')))
    # a complete run's last.pt holds no optimizer state: about the size of best.pt
    for d in (out / 'teacher-quick', out / 'student-kd' / 'seed0'):
        assert (d / 'last.pt').stat().st_size < 1.2 * (d / 'best.pt').stat().st_size, d
    # --resume with one student's checkpoint damaged (a disk error): that student again, the others kept, a report
    (out / 'student-icsd' / 'seed0' / 'last.pt').write_bytes(b'cut')
    (out / '.report.md.x1y2z3.tmp').write_text('a killed write')                        # swept at the start
    so = aicsd(*demo, '--resume', cwd=tmp_path, timeout=600).stdout
    assert so.count('this student is trained again') == 1 and so.count('resumed (or kept, if complete)') == 4, so
    assert (out / 'report.md').is_file() and not list(out.glob('.*.tmp'))
    rows = {r['method']: r for r in json.loads((out / 'results.json').read_text())}
    assert rows['icsd']['runs'][0]['miou'] == first['icsd']['runs'][0]['miou']          # trained again: the same run


def test_compare_quick_every_method_defaults(tmp_path):
    "`aicsd compare --quick` with its default method list (every method of the table), figures and report on."
    from aicsd.objective import METHODS
    out = tmp_path / 'cmp'
    aicsd('data', 'synthetic', '--root', tmp_path / 'syn', '--n-train', 40, '--n-val', 12, '--size', 56, cwd=tmp_path)
    aicsd('compare', '--quick', '--out', out, '--data-root', tmp_path / 'syn', cwd=tmp_path, timeout=900)
    rows = json.loads((out / 'results.json').read_text())
    assert [r['method'] for r in rows[1:]] == list(METHODS), [r['method'] for r in rows]   # the teacher first
    for r in rows: assert all(math.isfinite(r[k]) for k in ('miou', 'pixel_acc', 'ics_dist')), r
    names = {q.name for q in out.iterdir()}
    assert {'report.md', 'ics_matrices.png', 'predictions.png'} | {f'ics_{m}.png' for m in METHODS} <= names, sorted(names)
    # a method of one's own that gives NaN: its student named, and what to do in `compare` (which takes no --lr)
    (tmp_path / 'nan_terms.py').write_text(
        "from aicsd.objective import Term, Method, register_term, register_method\n"
        "register_term('nan_t', Term(lambda s, t, target, mod=None: s['logits'].mean() * float('nan'), teacher=False))\n"
        "register_method('nanm', Method(('ce', 'nan_t')))\n")
    p = run([*aicsd_cmd(), 'compare', '--quick', '--out', out, '--data-root', tmp_path / 'syn', '--import', 'nan_terms.py',
             '--methods', 'baseline', 'nanm', '--resume'], cwd=tmp_path, timeout=600, check=False)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert 'the new report covers baseline, nanm; kd, ' in p.stdout and 'are left out of it (their runs stay in' in p.stdout, p.stdout
    assert ("aicsd: error: student nanm, seed 0: the loss is nan at step 1 (non-finite term(s): nan_t" in p.stderr
            and "give the term a smaller --weight TERM=W (it applies to every method using the term) or change it where it "
                "is registered (`register_term`), then continue with the same command and --resume" in p.stderr
            and '--lr' not in p.stderr), p.stderr[-3000:]
    # --weight and --param for every compared method with the term: those students are trained again on --resume
    (tmp_path / 'ok_terms.py').write_text(          # and a method of one's own: the report says where its term comes from
        "from aicsd.objective import Term, Method, register_term, register_method\n"
        "def term_mse(s, t, target, mod=None): return (s['logits'] - t['logits']).pow(2).mean()\n"
        "register_term('mse_logits', Term(term_mse, weight=0.5))\n"
        "register_method('msem', Method(('ce', 'mse_logits')))\n")
    p = aicsd('compare', '--quick', '--out', out, '--data-root', tmp_path / 'syn', '--methods', 'kd', 'cwd', 'baseline', 'msem',
              '--weight', 'kd=2', '--param', 'cwd.tau=3', '--import', 'ok_terms.py', '--resume', cwd=tmp_path, timeout=600)
    assert p.stdout.count('this student is trained again') == 2 and 'kd=2.0' in p.stdout, p.stdout
    rows = {r['method']: r for r in json.loads((out / 'results.json').read_text())}
    import torch
    kd, cwd = (torch.load(out / f'student-{m}' / 'seed0' / 'last.pt', map_location='cpu', weights_only=True)['config']
               for m in ('kd', 'cwd'))
    assert (kd['weight'], kd['param'], cwd['weight'], cwd['param']) == ({'kd': 2.0}, None, None, {'cwd': {'tau': 3}}), (kd, cwd)
    assert kd['teacher_bf16'] is cwd['teacher_bf16'] is False      # one teacher precision for every student, not a timing's pick
    assert rows['kd']['terms'] == 'ce 1, kd 2' and rows['cwd']['terms'].endswith('[tau=3]'), rows
    assert rows['msem']['terms'] == 'ce 1, mse_logits 0.5; mse_logits is ok_terms.term_mse', rows['msem']
    assert '- msem: ce 1, mse_logits 0.5; mse_logits is ok_terms.term_mse\n' in (out / 'report.md').read_text()


# ---------------------------------------------------------------------------------------------- the benchmarks
def test_bench_quick_defaults(tmp_path):
    "`aicsd bench --quick --out FILE`: every default section (icsd, step, data, loop) and the goals, as tables and rows."
    p = aicsd('bench', '--quick', '--out', tmp_path / 'rows.jsonl', cwd=tmp_path)
    for section in ('icsd', 'step', 'data', 'loop', 'goals'): assert f'\n## {section}\n' in p.stdout, p.stdout[-2000:]
    rows = [json.loads(l) for l in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert {r['bench'] for r in rows} >= {'machine', 'icsd', 'step', 'data', 'loop'}, {r['bench'] for r in rows}
    assert all(r['quick'] is True for r in rows), rows                       # a quick run's rows say so
    icsd = [r for r in rows if r['bench'] == 'icsd']
    assert {'floor', 'icsd', 'released'} <= {r['method'] for r in icsd}
    for r in icsd:                                    # each row's ratio is its time over the floor's at its shape
        floor = next(f['time_s'] for f in icsd if f['shape'] == r['shape'] and f['method'] == 'floor')
        assert math.isclose(r['x_floor'], r['time_s'] / floor, rel_tol=1e-9), r
    for r in (r for r in rows if r['bench'] == 'loop'):   # the loader's share: 1 - step-only time / loop time
        assert math.isclose(r['loader_share'], 1 - r['loop_images_per_s'] / r['step_images_per_s'],
                            rel_tol=1e-9, abs_tol=1e-12), r
