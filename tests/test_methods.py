"""Every method of the methods table trains a few steps with finite losses and resumes exactly (in-process, float64),
and the command line lists them all and takes combinations, ALW, weights and term parameters."""
import hashlib, math
import pytest
import torch
from conftest import aicsd_cmd, run, tiny_args

from aicsd.objective import METHODS
from aicsd.distill import fit, load_checkpoint

def _cfg(root, out, **kw):
    # float64: "resumed == uninterrupted" is then a statement about the code, not about a CPU's float32 kernels
    return dict(data='synthetic', data_root=str(root), crop_size=32, scale_min=1.0, scale_max=1.0, batch_size=4,
                val_batch_size=5, lr=0.01, threads=1, device='cpu', tensorboard=False, figures=False, quiet=True, out=str(out),
                dtype='float64', **kw)

@pytest.fixture(scope='module')
def teacher(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('teacher')
    fit(_cfg(tiny_data, out, model='resnet18', max_steps=3))
    for f in out.glob('last*.pt'): f.unlink()             # 266 MB (float64 weights and momentum); best.pt is the teacher
    return out / 'best.pt'

def _record_rng(monkeypatch)->list:
    "The global RNG state (a hash) at each training step from now on: dropout's masks are drawn from it."
    import aicsd.distill as D
    seen, step = [], D.train_step
    def recording(*a, **k):
        seen.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()); return step(*a, **k)
    monkeypatch.setattr(D, 'train_step', recording)
    return seen

@pytest.fixture(scope='module')
def train_rng(tiny_data, tmp_path_factory):
    "The RNG states at the 3 steps of plain training (no teacher, no term) of the student the methods train."
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_rng(mp)
        fit(_cfg(tiny_data, tmp_path_factory.mktemp('plain'), model='mobilenetv2', max_steps=3))
    return seen

# small CIRKD memories and contrast sets keep the test fast; everything else at its defaults
PARAMS = {'cirkd_memory': {'pixel_contrast': 64, 'region_contrast': 16, 'pixel_size': 500, 'region_size': 50}}

@pytest.mark.parametrize('method', [m for m in METHODS if m != 'baseline'])
def test_method_trains_and_resumes_exactly(method, teacher, tiny_data, tmp_path, train_rng, monkeypatch):
    kw = dict(mode='distill', method=method, model='mobilenetv2', teacher=str(teacher), max_steps=3, log_every=1,
              param=PARAMS if 'cirkd' in method else None)
    seen = _record_rng(monkeypatch)
    a = fit(_cfg(tiny_data, tmp_path / 'a', **kw))                                  # uninterrupted
    # a fair comparison: every method's student draws the same dropout masks as plain training, step by step (a term's
    # own random draws, as CIRKD's sampling, use a generator of their own)
    assert seen == train_rng, f"{method}: the RNG state differs from plain training's at steps " \
                              f"{[i for i, (x, y) in enumerate(zip(seen, train_rng)) if x != y]}"
    fit(_cfg(tiny_data, tmp_path / 'b', stop_after=1, **kw))                       # stopped mid-epoch ...
    assert load_checkpoint(tmp_path / 'b' / 'last.pt')['global_step'] == 1
    b = fit(_cfg(tiny_data, tmp_path / 'b', resume=True, **kw))                    # ... and resumed
    rows = (tmp_path / 'a' / 'train_log.csv').read_text().splitlines()
    assert len(rows) == 1 + 3
    for r in rows[1:]: assert all(math.isfinite(float(v)) for v in r.split(',')), r
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    ca, cb = load_checkpoint(tmp_path / 'a' / 'last.pt'), load_checkpoint(tmp_path / 'b' / 'last.pt')
    assert ca['modules'].keys() == cb['modules'].keys()
    assert [k for k in ca['modules'] if not torch.equal(ca['modules'][k], cb['modules'][k])] == []
    assert set(ca['model']) == set(sa)                   # the exported student holds no adapter or memory

def test_help_lists_every_method(tmp_path):
    p = run(aicsd_cmd() + ['distill', '--help'], cwd=tmp_path)
    for m in METHODS: assert f"\n  {m} " in p.stdout, m

def test_combination_alw_weights_params_on_the_command_line(teacher, tiny_data, tmp_path):
    out = tmp_path / 'c'
    run(aicsd_cmd() + ['distill', '--teacher', teacher, '--student', 'mobilenetv2', '--method', 'cwd+icsd', '--alw',
                       '--weight', 'cwd=2', '--param', 'cwd.tau=2', '--max-steps', 2, '--log-every', 1]
        + tiny_args(tiny_data, out), cwd=tmp_path)
    header = (out / 'train_log.csv').read_text().splitlines()[0].split(',')
    assert header[5:] == ['ce', 'kd', 'icsd', 'cwd']
    cfg = load_checkpoint(out / 'last.pt')['config']
    assert (cfg['method'], cfg['alw'], cfg['weight'], cfg['param']) == ('cwd+icsd', True, {'cwd': 2.0}, {'cwd': {'tau': 2}})
    p = run(aicsd_cmd() + ['distill', '--teacher', teacher, '--method', 'cwd+ickdd'] + tiny_args(tiny_data, out),
            cwd=tmp_path, check=False)
    assert p.returncode == 2 and "unknown method 'ickdd'" in p.stderr

def test_epoch_alw_follows_the_epochs(teacher, tiny_data, tmp_path):
    "The paper's recipes take alpha per epoch: epoch e of E (from 0) trains at alpha = e / E, by hand [0, 0.5] for 2."
    fit(_cfg(tiny_data, tmp_path / 'e', mode='distill', method='aicsd', model='mobilenetv2', teacher=str(teacher),
             epochs=2, alw_unit='epoch', log_every=1))
    import csv
    rows = list(csv.DictReader((tmp_path / 'e' / 'train_log.csv').open()))
    assert [(int(r['epoch']), float(r['alpha'])) for r in rows] == [(1, 0.0)] * 3 + [(2, 0.5)] * 3, rows

MY_TERMS = """from aicsd.objective import Term, Method, register_term, register_method
def term_lskd(s, t, target, mod=None, T=2.0):
    z = lambda x: (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)   # logit-standardised KD
    ls, lt = (z(o['logits']) / T for o in (s, t))
    return (lt.softmax(1) * (lt.log_softmax(1) - ls.log_softmax(1))).sum(1).mean() * T * T
register_term('lskd', Term(term_lskd, alw='fade', weight=WEIGHT, params=dict(T=2.0), bounds=dict(T='>0')))
register_method('lskd_icsd', Method(('ce', 'lskd', 'icsd'), doc='CE + logit-standardised KD + ICSD'))
"""

def test_a_method_of_your_own_on_the_command_line(teacher, tiny_data, tmp_path):
    "--import registers a user's term and method; distill, --resume and compare run it; a redefinition refuses --resume."
    (tmp_path / 'my_terms.py').write_text(MY_TERMS.replace('WEIGHT', '1.0'))
    out, imp = tmp_path / 'u', ['--import', 'my_terms.py']
    args = ['distill', '--teacher', teacher, '--student', 'mobilenetv2', '--method', 'lskd_icsd', '--param', 'lskd.T=3',
            '--max-steps', 3, '--log-every', 1] + tiny_args(tiny_data, out)
    p = run(aicsd_cmd() + args, cwd=tmp_path, check=False)              # without the module: named, with the way in
    assert p.returncode == 2 and "unknown term 'lskd'" in p.stderr and '--import MODULE registers it' in p.stderr, p.stderr
    p = run(aicsd_cmd() + args + imp + ['--stop-after', 1, '--quiet'], cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr
    assert (out / 'train_log.csv').read_text().splitlines()[0].split(',')[5:] == ['ce', 'icsd', 'lskd']
    ck = load_checkpoint(out / 'last.pt')
    assert ck['objective']['terms']['lskd']['params']['T'] == 3 and ck['objective']['terms']['lskd']['fn'] == 'my_terms.term_lskd'
    (tmp_path / 'my_terms.py').write_text(MY_TERMS.replace('WEIGHT', '5.0'))   # the term edited between two sessions
    p = run(aicsd_cmd() + args + imp + ['--resume'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'term lskd: weight 1.0 -> 5.0' in p.stderr, p.stderr
    (tmp_path / 'my_terms.py').write_text(MY_TERMS.replace('WEIGHT', '1.0'))
    run(aicsd_cmd() + args + imp + ['--resume'], cwd=tmp_path)
    assert load_checkpoint(out / 'last.pt')['global_step'] == 3
    bare = [a for a in args if a not in ('--param', 'lskd.T=3')]                 # --resume without --import: the module named
    p = run(aicsd_cmd() + bare + ['--resume'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "unknown method 'lskd_icsd'" in p.stderr, p.stderr
    assert p.stderr.rstrip().endswith(f"The run in {out} was started with terms of module(s) my_terms: give --import with each "
                                      "(the module name or its .py file), as when it started"), p.stderr
    p = run(aicsd_cmd() + ['distill', '--help', '--import', 'my_terms'], cwd=tmp_path)   # a module name, from this folder
    assert 'lskd_icsd' in p.stdout and 'CE + logit-standardised KD + ICSD' in p.stdout


def test_errors_of_a_module_of_your_own_are_one_line(tmp_path):
    "A term aicsd cannot call, or one replacing a built-in, is refused at --import in one line (exit 2), not a traceback."
    for name, body, want in (
            ('bad_sig', "register_term('bad', Term(lambda s, t: 0))", "aicsd: error: term 'bad': `fn` (<lambda>(s, t)) must accept"),
            ('clash', "register_term('kd', Term(lambda s, t, target, mod=None: 0))",
             "aicsd: error: register_term('kd'): 'kd' is one of aicsd's terms; replaced, the built-in method(s) kd, icsd")):
        (tmp_path / f'{name}.py').write_text(f"from aicsd.objective import Term, register_term\n{body}\n")
        p = run(aicsd_cmd() + ['distill', '--import', f'{name}.py', '--help'], cwd=tmp_path, check=False)
        assert p.returncode == 2 and p.stderr.startswith(want) and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_an_error_in_your_own_term_shows_where(teacher, tiny_data, tmp_path):
    """A term of an --import module that raises (here a ValueError, which aicsd's own errors print in one line) comes with
    its traceback, down to the line of the user's file, then the one line."""
    (tmp_path / 'my_bug.py').write_text(
        "from aicsd.objective import Term, Method, register_term, register_method\n"
        "def term_bug(s, t, target, mod=None):\n"
        "    raise ValueError('my bug')\n"
        "register_term('bug', Term(term_bug)); register_method('bugm', Method(('ce', 'bug')))\n")
    p = run(aicsd_cmd() + ['distill', '--import', 'my_bug.py', '--teacher', teacher, '--student', 'mobilenetv2', '--method',
                           'bugm', '--max-steps', 1] + tiny_args(tiny_data, tmp_path / 'b'), cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'Traceback' in p.stderr and 'my_bug.py", line 3, in term_bug' in p.stderr, p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == 'aicsd: error: my bug', p.stderr
