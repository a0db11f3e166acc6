"""`python -m aicsd.cli` for torchrun, with one fault planted from outside the library, on the job's first attempt
(TORCHELASTIC_RESTART_COUNT 0) only, in the process of rank AICSD_TEST_RANK (default 1); restarted attempts run unchanged.
AICSD_TEST_AT says where, AICSD_TEST_SIGNAL what (default KILL: SIGKILL, as a lost machine would end it):
- `step:N`: when the process is about to train step N (counted from 1);
- `eval`: when its first evaluation starts;
- `finish`: once the run's last checkpoint is written (after its last vote on stopping).
AICSD_TEST_SLOW_SAVE=S makes rank 0's checkpoint writes end S seconds later (a large model on a slow disk)."""
import os, signal, sys, time

import aicsd.distill as engine
from aicsd.runfolder import Checkpointer
from aicsd.cli import main

_sig = getattr(signal, 'SIG' + os.environ.get('AICSD_TEST_SIGNAL', 'KILL'))
_at = os.environ.get('AICSD_TEST_AT', '')
if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0' and os.environ.get('RANK') == os.environ.get('AICSD_TEST_RANK', '1'):
    def _hit(): os.kill(os.getpid(), _sig)
    if _at.startswith('step:'):
        _real, _seen, _n = engine.train_step, [0], int(_at[5:])
        def _step(*args, **kwargs):
            _seen[0] += 1
            if _seen[0] == _n: _hit()
            return _real(*args, **kwargs)
        engine.train_step = _step
    elif _at == 'eval':
        _real_eval = engine.evaluate
        def _eval(*args, **kwargs): _hit(); return _real_eval(*args, **kwargs)
        engine.evaluate = _eval
    elif _at == 'finish':
        _real_finish = Checkpointer.finish
        def _finish(self, *args, **kwargs): r = _real_finish(self, *args, **kwargs); _hit(); return r
        Checkpointer.finish = _finish
if os.environ.get('AICSD_TEST_SLOW_SAVE') and os.environ.get('RANK') == '0':
    _real_save, _wait = Checkpointer.save_last, float(os.environ['AICSD_TEST_SLOW_SAVE'])
    def _save(self, *args, **kwargs):            # (after the save's collective part: the other processes go on meanwhile)
        r = _real_save(self, *args, **kwargs); time.sleep(_wait); return r
    Checkpointer.save_last = _save

sys.exit(main(sys.argv[1:]))
