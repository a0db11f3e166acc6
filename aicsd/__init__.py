__version__ = "0.1.0"

# Written by hand (nbdev generates the other modules): `import aicsd` then `aicsd.losses.icsd_loss(...)` works, each
# submodule imported on its first use (importing all of them up front would cost every command seconds).
import importlib as _importlib
_SUBMODULES = ('baselines', 'bench', 'blocks', 'checkpoint', 'cli', 'config', 'data', 'distill', 'distributions', 'docs',
               'entry', 'evaluation', 'experiments', 'losses', 'metrics', 'models', 'objective', 'precision', 'process',
               'runfolder', 'similarity', 'viz')

def __getattr__(name):
    if name in _SUBMODULES: return _importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_DEV_ONLY = ('docs',)     # needs nbdev (the `dev` extra): left out of dir(), so `help(aicsd)` works in a plain install

def __dir__(): return sorted(set(globals()) | set(_SUBMODULES) - set(_DEV_ONLY))
