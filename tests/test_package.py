"""The package imports, has a version, and its console script answers; measuring CPU memory prints no profiler noise;
the test suite's settings leave no files behind."""
import re, subprocess, sys
from pathlib import Path
import aicsd
from conftest import aicsd_cmd, ENV

def test_version():
    assert isinstance(aicsd.__version__, str) and aicsd.__version__.count('.') >= 1

def test_modules_import():
    import aicsd.distill, aicsd.cli, aicsd.models, aicsd.data, aicsd.objective, aicsd.metrics  # noqa: F401
    assert callable(aicsd.cli.main) and callable(aicsd.distill.fit)

def test_submodules_on_first_use():
    "`import aicsd` then `aicsd.losses...`: every module of the package (a new notebook's too) loads on first use."
    import pkgutil
    mods = {m.name for m in pkgutil.iter_modules(aicsd.__path__)} - {'_modidx'}
    assert mods == set(aicsd._SUBMODULES), (mods ^ set(aicsd._SUBMODULES))
    code = ('import sys, torch, aicsd; assert "aicsd.losses" not in sys.modules\n'
            'print(float(aicsd.losses.icsd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))))\n'
            'assert "losses" in dir(aicsd)\n'
            'try: aicsd.nosuch\nexcept AttributeError as e: print(e)')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ['0.0', 'module', "'aicsd'", 'has', 'no', 'attribute', "'nosuch'"], p.stdout + p.stderr

def test_help_without_the_dev_extra():
    "`help(aicsd)` walks `dir(aicsd)`: no module there may need the `dev` extra (nbdev), absent from a plain install."
    code = ('import sys, importlib.abc\n'
            'class NoNbdev(importlib.abc.MetaPathFinder):\n'
            '    def find_spec(self, name, *a):\n'
            '        if name.split(".")[0] == "nbdev": raise ModuleNotFoundError(name)\n'
            'sys.meta_path.insert(0, NoNbdev())\n'
            'import inspect, aicsd; print(len(inspect.getmembers(aicsd)))')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0 and int(p.stdout) > 20, p.stdout + p.stderr[-3000:]

def test_sdist_builds_a_wheel(tmp_path):
    "A source distribution carries what setup.py reads (settings.ini) and the licence, and builds a wheel."
    import tarfile
    root = Path(aicsd.__file__).parent.parent
    p = subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path)], cwd=root, capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    sd = next(tmp_path.glob('aicsd-*.tar.gz'))
    names = {n.split('/', 1)[1] for n in tarfile.open(sd).getnames() if '/' in n}
    assert {'settings.ini', 'LICENSE', 'README.md', 'aicsd/losses.py'} <= names, sorted(names)[:20]
    p = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', str(sd), '-w', str(tmp_path)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0 and any(tmp_path.glob('aicsd-*.whl')), p.stderr[-3000:]

def test_console_script_help():
    p = subprocess.run(aicsd_cmd() + ['--help'], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in ('train', 'distill', 'evaluate', 'demo', 'recipes', 'data'): assert cmd in p.stdout
    assert 'examples:' in p.stdout

KINETO_NOISE = re.compile(r'^(ERROR|USDT|STAGE|INFO|WARNING):\d{4}-\d\d-\d\d |profiler_(start|stop)|gpuGetDeviceCount')

def test_cpu_memory_measurement_is_quiet():
    "`peak_memory` on the CPU (torch.profiler) prints nothing to stderr: a CI log line starting with ERROR is an error."
    code = ('import torch; from aicsd.bench import peak_memory\n'
            'for _ in range(3): assert peak_memory(lambda: torch.ones(1000, 1000) * 2) >= 4_000_000')
    env = {k: v for k, v in ENV.items() if not k.startswith('KINETO_')}     # the library's own setting is tested
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    noise = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith('ERROR') or KINETO_NOISE.search(l)]
    assert not noise, '\n'.join(noise[:10])

INNER_CONFTEST = """
@pytest.fixture(scope='session')
def shared(tmp_path_factory):
    d = tmp_path_factory.mktemp('shared'); (d / 'x').write_text('x'); return d
"""
INNER_A = """
import pytest, tempfile
@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher'); (d / 'best.pt').write_bytes(b'w' * 1000); return d
def test_a(teacher, shared, tmp_path, tmp_path_factory):
    (tmp_path / 'out.pt').write_bytes(b'c' * 1000)
    assert tempfile.gettempdir().startswith(str(tmp_path_factory.getbasetemp()))   # temp files go in the basetemp too
"""
INNER_B = """
def test_b(shared, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert not [p for p in base.glob('teacher*') if p.exists()], 'a module fixture outlived its module'
    assert not [p for p in base.glob('test_a*') if p.exists()], "a passing test's tmp_path outlived it"
    assert (shared / 'x').exists(), 'a session fixture was removed early'
"""

def test_suite_leaves_no_files(tmp_path):
    "The pytest settings and tests/conftest.py: folders go as soon as unused; a passing session leaves nothing."
    from pathlib import Path
    here = Path(__file__).parent
    (tmp_path / 'conftest.py').write_text((here / 'conftest.py').read_text() + INNER_CONFTEST)
    (tmp_path / 'test_a.py').write_text(INNER_A); (tmp_path / 'test_b.py').write_text(INNER_B)
    tmp = tmp_path / 'tmp'; tmp.mkdir()
    p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-c', here.parent / 'pyproject.toml',
                        '--rootdir', tmp_path, tmp_path / 'test_a.py', tmp_path / 'test_b.py'],
                       capture_output=True, text=True, env={**ENV, 'TMPDIR': str(tmp)}, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert '2 passed' in p.stdout, p.stdout[-3000:]
    left = [str(f.relative_to(tmp)) for f in tmp.rglob('*') if f.is_file()]
    assert not left, left
