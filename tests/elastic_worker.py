"""`python -m aicsd.cli` for torchrun, with one fault planted from outside the library: on the job's first attempt
(TORCHELASTIC_RESTART_COUNT 0) the process of rank AICSD_TEST_KILL_RANK kills itself (SIGKILL, as a lost machine
would end it) when it is about to train step AICSD_TEST_KILL_STEP (counted from 1). Restarted attempts run unchanged."""
import os, signal, sys

import aicsd.distill as engine
from aicsd.cli import main

if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0' and \
        os.environ.get('RANK') == os.environ.get('AICSD_TEST_KILL_RANK', '1'):
    _real, _seen, _at = engine.train_step, [0], int(os.environ['AICSD_TEST_KILL_STEP'])
    def _dying_step(*args, **kwargs):
        _seen[0] += 1
        if _seen[0] == _at: os.kill(os.getpid(), signal.SIGKILL)
        return _real(*args, **kwargs)
    engine.train_step = _dying_step

sys.exit(main(sys.argv[1:]))
