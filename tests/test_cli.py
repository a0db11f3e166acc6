"""End to end through the `aicsd` command on tiny synthetic data: train, distill with each method, evaluate."""
import argparse, json
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
