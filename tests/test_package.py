"""The package imports, has a version, and its console script answers."""
import subprocess, sys
import aicsd
from conftest import aicsd_cmd, ENV

def test_version():
    assert isinstance(aicsd.__version__, str) and aicsd.__version__.count('.') >= 1

def test_modules_import():
    import aicsd.distill, aicsd.cli, aicsd.models, aicsd.data, aicsd.schedule, aicsd.metrics  # noqa: F401
    assert callable(aicsd.cli.main) and callable(aicsd.distill.fit)

def test_console_script_help():
    p = subprocess.run(aicsd_cmd() + ['--help'], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in ('train', 'distill', 'evaluate', 'demo', 'recipes', 'data'): assert cmd in p.stdout
    assert 'examples:' in p.stdout
