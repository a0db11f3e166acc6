"""End to end through the `aicsd` command on tiny synthetic data: train, distill with each method, evaluate."""
import argparse, json
from pathlib import Path
import pytest
import torch
from conftest import aicsd_cmd, run, tiny_args

METHODS = ['baseline', 'kd', 'icsd', 'aicsd']

@pytest.fixture(scope='module')
def teacher(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs') / 'teacher'
    p = run(aicsd_cmd() + ['train', '--model', 'mobilenetv2', '--epochs', 1] + tiny_args(tiny_data, out), cwd=out.parent)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res['steps'] == 3 and 0.0 <= res['best_miou'] <= 1.0
    return out

def test_train_writes_checkpoints(teacher):
    from aicsd.models import load_model
    for f in ('last.pt', 'best.pt'):
        ck = torch.load(teacher / f, map_location='cpu', weights_only=True)
        assert ck['arch'] == dict(family='deeplabv3plus', backbone='mobilenetv2', num_classes=4, output_stride=16)
        assert ck['config']['model'] == 'mobilenetv2' and ck['config']['mode'] == 'train'
        assert load_model(teacher / f).num_classes == 4
    last = torch.load(teacher / 'last.pt', map_location='cpu', weights_only=True)
    assert (last['epoch'], last['step_in_epoch'], last['global_step']) == (1, 0, 3)
    assert {'optimizer', 'scheduler', 'rng'} <= set(last)
    lines = (teacher / 'train_log.csv').read_text().splitlines()
    assert lines[0].startswith('step,epoch,lr,alpha,loss,ce') and len(lines) == 1 + 1  # log_every=10: the last step only
    import csv
    ev = list(csv.DictReader(open(teacher / 'eval_log.csv')))
    assert lines[1].split(',')[:2] == ['3', '1'] and [(r['step'], r['epoch']) for r in ev] == [('3', '1')]   # epochs from 1 in both

@pytest.mark.parametrize('method', METHODS)
def test_distill(method, teacher, tiny_data):
    out = teacher.parent / f'student-{method}'
    p = run(aicsd_cmd() + ['distill', '--teacher', teacher / 'best.pt', '--student', 'mobilenetv2', '--method', method,
                           '--epochs', 1, '--log-every', 1] + tiny_args(tiny_data, out), cwd=teacher.parent)
    assert json.loads(p.stdout.strip().splitlines()[-1])['steps'] == 3
    header = (out / 'train_log.csv').read_text().splitlines()[0].split(',')
    want = {'baseline': ['ce'], 'kd': ['ce', 'kd'], 'icsd': ['ce', 'kd', 'icsd'], 'aicsd': ['ce', 'kd', 'icsd']}[method]
    assert sorted(header[5:]) == sorted(want)                      # each weighted term is logged
    ck = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['config']['method'] == method and ck['arch']['backbone'] == 'mobilenetv2'

def test_evaluate(teacher, tiny_data):
    js = teacher / 'metrics.json'
    p = run(aicsd_cmd() + ['evaluate', '--ckpt', teacher / 'best.pt', '--data', 'synthetic', '--data-root', tiny_data,
                           '--threads', 1, '--val-batch-size', 5, '--json', js], cwd=teacher.parent)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    full = json.loads(js.read_text())
    assert set(res) >= {'miou', 'pixel_acc', 'mean_acc', 'fwiou'} and len(full['iou']) == 4
    best = torch.load(teacher / 'best.pt', map_location='cpu', weights_only=True)
    # same model, data, batch size and thread count as the evaluation inside training: the same float32 kernels run,
    # so the numbers are equal exactly (a different batch size may pick other kernels and flip near-tied pixels)
    assert res['miou'] == pytest.approx(best['metrics']['miou'], abs=1e-9)

def test_errors_are_clear(tiny_data, tmp_path):
    p = run(aicsd_cmd() + ['distill', '--method', 'kd'] + tiny_args(tiny_data, tmp_path / 'x'), cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'teacher' in p.stderr
    p = run(aicsd_cmd() + ['train', '--model', 'vgg16'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'invalid choice' in p.stderr
    # evaluate --figures-dir: a failed evaluation leaves no empty folder behind
    p = run(aicsd_cmd() + ['evaluate', '--ckpt', tmp_path / 'none.pt', '--figures-dir', tmp_path / 'f' / 'g'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'checkpoint not found' in p.stderr and not (tmp_path / 'f').exists(), p.stderr

def test_out_of_range_weights_are_refused(teacher, tiny_data, tmp_path):
    "`--lambda-kd -1` and friends: exit 2 before anything runs, the message names the flag and the range."
    for more, flag in ((['--lambda-kd', -1], '--lambda-kd'), (['--weight', 'kd=nan'], '--weight kd='),
                       (['-T', 0], '--temperature'), (['--param', 'kd.T=-2'], '--param kd.T')):
        out = tmp_path / 'x'
        p = run(aicsd_cmd() + ['distill', '--teacher', teacher / 'best.pt', '--student', 'mobilenetv2', '--method', 'kd',
                               '--epochs', 1, *more] + tiny_args(tiny_data, out), cwd=tmp_path, check=False)
        assert p.returncode == 2 and flag in p.stderr and 'finite number' in p.stderr, (more, p.returncode, p.stderr[-800:])
        assert 'Traceback' not in p.stderr and not out.exists()

def _parsers(p, name='aicsd'):
    "`p` and its subcommands' parsers, at every depth."
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, sp in a.choices.items(): yield from _parsers(sp, f'{name} {n}')

def test_every_option_shows_its_help_and_default():
    "Each option of each subcommand (`aicsd data synthetic` too) has a help line that shows its default (on/off for switches)."
    from aicsd.cli import build_parser
    squash = lambda s: ''.join(s.split())                  # line breaks differ with the column width: compare without them
    seen = 0
    for name, p in _parsers(build_parser()):
        text = squash(p.format_help())
        for a in p._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)): continue
            seen += 1
            assert a.help and a.help.strip(), (name, a.option_strings)
            block = squash(p._get_formatter()._format_action(a))     # what --help prints for this option
            assert block in text, (name, block)
            if a.required: want = '(required)'
            elif isinstance(a.default, bool): want = f"default: {'on' if a.default else 'off'}"
            elif a.default is not None: want = f'{a.default}'
            else: want = 'default:'
            assert squash(want) in block and ('default:' in block or a.required), (name, block, want)
    assert seen > 100

def test_recipes_roundtrip(tmp_path):
    p = run(aicsd_cmd() + ['recipes'], cwd=tmp_path)
    assert 'voc-r18-aicsd' in p.stdout and '70.03' in p.stdout
    p = run(aicsd_cmd() + ['recipes', 'cityscapes-mbv2-aicsd'], cwd=tmp_path)
    assert '66.53' in p.stdout and 'lr: 0.01' in p.stdout

def test_bench_quick(tmp_path):
    "`aicsd bench --quick` prints the machine and a markdown table per benchmark (ours, released, floor for ICSD)."
    p = run(aicsd_cmd() + ['bench', 'icsd', 'data', '--quick', '--threads', 1], cwd=tmp_path)
    assert p.stdout.startswith('machine: ') and '## icsd' in p.stdout and '## data' in p.stdout
    for name in ('| floor', '| icsd', '| released'): assert name in p.stdout, name

def _one_line_error(p, *want):
    "Exit 2 with one `aicsd: error:` line that holds each of `want`, and no traceback."
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert 'Traceback' not in p.stderr and p.stderr.count('aicsd: error:') == 1, p.stderr[-3000:]
    line = next(l for l in p.stderr.splitlines() if 'error:' in l)
    for w in want: assert w in line, (w, line)

@pytest.mark.parametrize('device', ['gpu', 'cuda:x'] + ([] if torch.backends.mps.is_available() else ['mps']))
def test_bad_device_is_one_line(device, tiny_data, tmp_path):
    "`--device gpu` and friends: not torch's RuntimeError traceback but one line naming the flag, the value and what it takes."
    p = run(aicsd_cmd() + ['train', '--epochs', 1] + tiny_args(tiny_data, tmp_path / 'x') + ['--device', device],
            cwd=tmp_path, check=False)
    _one_line_error(p, '--device', repr(device), 'cpu, cuda, cuda:N', 'auto')

def test_bad_compile_backend_is_one_line(tiny_data, tmp_path):
    p = run(aicsd_cmd() + ['train', '--epochs', 1, '--compile', 'nosuchbackend'] + tiny_args(tiny_data, tmp_path / 'x'),
            cwd=tmp_path, check=False)
    _one_line_error(p, '--compile', 'nosuchbackend', 'inductor')
    assert not (tmp_path / 'x').exists()

def test_bad_size_names_what_it_expects(tmp_path):
    p = run(aicsd_cmd() + ['train', '--crop-size', '40x'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--crop-size: expected a size N or HxW, got '40x'" in p.stderr, p.stderr
    assert 'size_arg' not in p.stderr

def test_closed_stdout_is_quiet(tmp_path):
    "`aicsd recipes | head -5`: the reader leaves; no 'Broken pipe' error, the exit status of a process killed by SIGPIPE."
    import subprocess
    from conftest import ENV
    p = subprocess.Popen(aicsd_cmd() + ['recipes'], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                     # before the command writes (it takes seconds to start)
    err = p.stderr.read().decode(); p.wait(timeout=120)
    assert p.returncode == 141 and err == '', (p.returncode, err)

def test_loader_worker_error_is_one_line(tiny_data, tmp_path):
    "A bad label read in a loader process: its message in one line, as with --workers 0, not torch's wrapped traceback."
    import shutil
    import numpy as np
    from PIL import Image
    root = tmp_path / 'syn'; shutil.copytree(tiny_data, root)
    train = (root / 'ImageSets/Segmentation/train.txt').read_text().split()   # the validation labels stay good: they
    for f in (root / 'SegmentationClass' / f'{i}.png' for i in train):         # are checked before the loader starts
        im = Image.open(f); a = np.array(im); a[0, 0] = 200
        im2 = Image.fromarray(a, mode=im.mode)
        if im.mode == 'P': im2.putpalette(im.getpalette())
        im2.save(f)
    out = tmp_path / 'x'
    p0 = run(aicsd_cmd() + ['train', '--epochs', 1] + tiny_args(root, out, '--workers', 0), cwd=tmp_path, check=False)
    _one_line_error(p0, 'holds values')
    p = run(aicsd_cmd() + ['train', '--epochs', 1] + tiny_args(root, out, '--workers', 2), cwd=tmp_path, check=False)
    _one_line_error(p, 'holds values', '(in a loader worker)')
    assert 'Original Traceback' not in p.stderr and 'Caught ' not in p.stderr

def test_bench_help_names_its_default(tmp_path):
    p = run(aicsd_cmd() + ['bench', '--help'], cwd=tmp_path)
    text = ' '.join(p.stdout.split())
    assert 'icsd, step, data and loop' in text and 'default: icsd step data loop' in text, text

def test_docs_examples_on_synthetic_data_are_small():
    "The examples of nbs/09_cli.ipynb that train on the synthetic data use the --help epilog's small settings."
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[1] / 'nbs' / '09_cli.ipynb').read_text())
    lines = [l.strip() for c in nb['cells'] if c['cell_type'] == 'markdown' for l in ''.join(c['source']).splitlines()
             if l.strip().startswith(('aicsd train', 'aicsd distill')) and '--config' not in l and '--resume' not in l]
    assert lines
    for l in lines: assert '--crop-size 64' in l and '--epochs 5' in l, l

@pytest.mark.parametrize('how, sig', [('console script', 'SIGINT'), ('python -m aicsd.cli', 'SIGINT'),   # (the second: what
                                      ('console script', 'SIGTERM')])                             # torchrun -m aicsd.cli runs)
def test_ctrl_c_while_torch_loads_is_one_line(how, sig, tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) once torch has begun to load (its library mapped into the process) or later:
    one line, exit 130 (143), no traceback."""
    import signal, subprocess, sys, time
    from conftest import aicsd_cmd
    cmd = aicsd_cmd() if how == 'console script' else [sys.executable, '-m', 'aicsd.cli']
    p = subprocess.Popen(cmd + ['bench', 'icsd', '--quick'], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])
    # a point fixed by the process, not by a delay: before it Python itself is starting (a Ctrl-C there is Python's own
    # traceback: no code of ours has run yet); after it `console_main` is importing aicsd.cli, or the command runs
    t0 = time.time()
    while 'libtorch' not in Path(f'/proc/{p.pid}/maps').read_text():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()[1][-3000:] if p.poll() is not None else 'too slow'
        time.sleep(0.005)
    p.send_signal(getattr(signal, sig))
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + getattr(signal, sig) and 'Traceback' not in err and err.strip().splitlines()[-1].startswith('aicsd: '), err[-2000:]

@pytest.mark.parametrize('argv, prog, bad, guess', [
    (['train', '--epoch', '1'], 'aicsd train', '--epoch 1', '--epochs'),         # a prefix is not taken (allow_abbrev off)
    (['distill', '--temprature=2'], 'aicsd distill', '--temprature=2', '--temperature'),
    (['data', 'stats', '--splt', 'val'], 'aicsd data stats', '--splt val', '--split'),
    (['data', 'synthetic', '--nval', '3'], 'aicsd data synthetic', '--nval 3', '--n-val'),
    (['evaluate', '--ckpt', 'x.pt', '--bogus'], 'aicsd evaluate', '--bogus', None),     # nothing near: no guess
    (['train', '--ckpt', '3'], 'aicsd train', '--ckpt 3', '; --ckpt is an option of aicsd evaluate, not of aicsd train'),   # not --ckpt-every
    (['demo', '--methods', 'kd'], 'aicsd demo', '--methods kd', '; --methods is an option of aicsd compare, not of aicsd demo'),
])
def test_unknown_flag_is_the_subcommands_error(argv, prog, bad, guess, tmp_path):
    "A misspelt flag: the subcommand's usage and one error line from it, with the nearest flag it takes; exit 2."
    p = run(aicsd_cmd() + argv, cwd=tmp_path, check=False)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.splitlines()
    assert lines[0].startswith(f'usage: {prog} [-h]') and 'COMMAND' not in p.stderr, p.stderr   # not the top-level usage
    want = f"{prog}: error: unrecognized arguments: {bad}" + (guess if (guess or '').startswith(';') else
                                                              f"; did you mean {guess}?" if guess else '')   # (or who takes it)
    assert [l for l in lines if 'error:' in l] == [want] and lines[-1] == want, p.stderr
    assert not list(tmp_path.iterdir())                                       # nothing ran

def test_data_root_either_spelling(tmp_path):
    "`aicsd data synthetic` and `aicsd data stats` take the dataset folder as --data-root (as everywhere) or --root."
    small = ['--n-train', 2, '--n-val', 1, '--size', 16, '--num-classes', 3]
    for flag in ('--data-root', '--root'):
        p = run(aicsd_cmd() + ['data', 'synthetic', flag, tmp_path / flag.strip('-'), *small], cwd=tmp_path)
        assert (tmp_path / flag.strip('-') / 'classes.json').is_file(), (flag, p.stdout, p.stderr)
    stats = [run(aicsd_cmd() + ['data', 'stats', flag, tmp_path / 'root'], cwd=tmp_path).stdout for flag in ('--data-root', '--root')]
    assert stats[0] == stats[1] and len(stats[0].splitlines()) == 4, stats   # a header, then 3 classes
    for action in ('synthetic', 'stats'):
        p = run(aicsd_cmd() + ['data', action, '--help'], cwd=tmp_path)
        assert '--data-root DIR, --root DIR' in p.stdout, p.stdout

def test_data_synthetic_defaults(tmp_path):
    """`aicsd data synthetic` as typed, no flag: the default dataset in ./data/synthetic, complete and consistent on disk;
    `aicsd data stats` (its default --data-root too) counts the pixels numpy counts."""
    import inspect
    import numpy as np
    from PIL import Image
    from aicsd.data import make_synthetic
    d = {k: v.default for k, v in inspect.signature(make_synthetic).parameters.items()}
    run(aicsd_cmd() + ['data', 'synthetic'], cwd=tmp_path, timeout=300)
    root = tmp_path / d['root']
    ids = {s: (root / 'ImageSets/Segmentation' / f'{s}.txt').read_text().split() for s in ('train', 'val')}
    assert (len(ids['train']), len(ids['val'])) == (d['n_train'], d['n_val'])
    labs = []
    for i in ids['train'] + ids['val']:
        img, lab = Image.open(root / 'JPEGImages' / f'{i}.jpg'), np.array(Image.open(root / 'SegmentationClass' / f'{i}.png'))
        assert img.size == (d['size'], d['size']) and img.mode == 'RGB' and lab.shape == (d['size'], d['size']), i
        labs.append(lab)
    lab = np.concatenate([l.ravel() for l in labs[:d['n_train']]])
    assert set(np.unique(lab)) <= set(range(d['num_classes'])) | {255}
    p = run(aicsd_cmd() + ['data', 'stats', '--data', 'synthetic'], cwd=tmp_path)      # train split, default root
    counts = np.bincount(lab[lab != 255], minlength=d['num_classes'])
    assert p.stdout.splitlines()[0].startswith(f"synthetic at data/synthetic, split train: {d['n_train']} images"), p.stdout
    assert [int(l.split()[-1]) for l in p.stdout.splitlines()[1:]] == counts.tolist(), p.stdout

def _doc_commands() -> list:
    "(file, arguments) of each `aicsd ...` command in the docs' shell blocks (``` fences of markdown), as a user would paste it."
    import glob, json, re
    root = Path(__file__).resolve().parents[1]
    out = []
    for f in sorted(glob.glob(str(root/'nbs/**/*.ipynb'), recursive=True)) + [str(root/'README.md'), str(root/'data/README.md')]:
        texts = ([''.join(c['source']) for c in json.loads(Path(f).read_text())['cells'] if c['cell_type'] == 'markdown']
                 if f.endswith('.ipynb') else [Path(f).read_text()])
        for block in (b for t in texts for b in re.findall(r'```[a-z]*\n(.*?)```', t, re.S)):
            for line in block.replace('\\\n', ' ').splitlines():
                for part in re.split(r'&&|\|\||;|\|', line):           # one command at a time; redirections and comments cut
                    part = part.split(' #')[0].split('>')[0].strip()
                    m = re.match(r'(?:\S*/)?aicsd (\S.*)$', part) or re.match(r'torchrun .*?-m aicsd\.cli (\S.*)$', part)
                    if m: out.append((Path(f).relative_to(root), m.group(1).strip()))
    return out

def test_documented_commands_parse():
    "Every complete command the docs show (no placeholder: `...`, `$VAR`, `<x>`, a capital like N or DIR) is one `aicsd` takes."
    import contextlib, io, re, shlex
    from aicsd.cli import build_parser
    cmds = [(f, c) for f, c in _doc_commands() if not re.search(r'\.\.\.|\$|<|\b[A-Z]+\b', c)]
    assert len(cmds) >= 20, cmds                                       # the blocks were found
    bad = []
    for f, c in cmds:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): build_parser().parse_args(shlex.split(c))
        except SystemExit as e:
            if e.code not in (0, None): bad.append(f"{f}: aicsd {c}\n    {err.getvalue().strip().splitlines()[-1]}")
    assert not bad, 'commands in the docs that `aicsd` refuses:\n' + '\n'.join(bad)


def test_evaluate_takes_the_precision_its_run_evaluated_in(tiny_data, tmp_path):
    """A student trained (and evaluated during training) under bf16 autocast is evaluated under bf16 by a plain `aicsd
    evaluate`, so its mIoU is eval_log.csv's; on a CPU without native bf16 it says why it is fp32 instead."""
    from aicsd.process import native_bf16
    from aicsd.runfolder import read_run
    run(aicsd_cmd() + ['train', '--model', 'mobilenetv2', '--max-steps', 2, '--precision', 'bf16'] +
        tiny_args(tiny_data, tmp_path / 'r'), cwd=tmp_path)
    logged = read_run(tmp_path / 'r')['eval']['miou'][-1]
    for f in ('best.pt', 'last.pt'):                  # best.pt (what people evaluate) keeps the decision as last.pt does
        p = run(aicsd_cmd() + ['evaluate', '--ckpt', tmp_path / 'r' / f, '--data', 'synthetic', '--data-root', tiny_data,
                               '--threads', 1, '--device', 'cpu', '--json', tmp_path / 'e.json'], cwd=tmp_path)
        got = json.loads((tmp_path / 'e.json').read_text())['miou']
        if native_bf16(torch.device('cpu')):
            assert 'evaluating under bf16 autocast, as its run' in p.stderr and got == logged, (f, p.stderr, got, logged)
        else: assert 'has no native bf16, so fp32 here' in p.stderr, (f, p.stderr)
