"""The field's protocol end to end on a CPU: every method of the methods table distils a field-format DeepLabV3 teacher
(a plain state_dict as CIRKD publishes it, told from its keys) into DeepLabV3 students, and resumes bit for bit
(float64); the auxiliary head's term; the command line with a field teacher, a backbone weight FILE and sliding-window
evaluation, every default on."""
import math
import pytest
import torch
from conftest import aicsd_cmd, run, tiny_args
import test_methods

from aicsd.objective import METHODS
from aicsd.distill import fit, load_checkpoint
from aicsd.models import deeplabv3, load_model

def _cfg(root, out, **kw):
    return test_methods._cfg(root, out, arch='deeplabv3', **kw)    # the same tiny float64 run, on DeepLabV3

@pytest.fixture(scope='module')
def field_teacher(tmp_path_factory):
    "A ResNet-18 DeepLabV3 with its aux head, random weights and BatchNorm statistics, saved as the field saves it."
    torch.manual_seed(0)
    m = deeplabv3('resnet18', 4, aux=True)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp('field') / 'deeplabv3_resnet18_citys_best_model.pth'
    torch.save(m.state_dict(), path)                      # a plain state_dict: no 'arch', no wrapper
    return path

PARAMS = test_methods.PARAMS

@pytest.mark.parametrize('method', [m for m in METHODS if m != 'baseline'])
def test_method_on_deeplabv3_resumes_exactly(method, field_teacher, tiny_data, tmp_path):
    kw = dict(mode='distill', method=method, model='mobilenetv2', teacher=str(field_teacher), max_steps=2, log_every=1,
              param=PARAMS if 'cirkd' in method else None)
    a = fit(_cfg(tiny_data, tmp_path / 'a', **kw))
    fit(_cfg(tiny_data, tmp_path / 'b', stop_after=1, **kw))
    b = fit(_cfg(tiny_data, tmp_path / 'b', resume=True, **kw))
    for r in (tmp_path / 'a' / 'train_log.csv').read_text().splitlines()[1:]:
        assert all(math.isfinite(float(v)) for v in r.split(',')), r
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert load_checkpoint(tmp_path / 'a' / 'best.pt')['arch']['family'] == 'deeplabv3'

def test_aux_head_term_is_trained_and_logged(field_teacher, tiny_data, tmp_path):
    r = fit(_cfg(tiny_data, tmp_path / 'x', mode='distill', method='kd', model='resnet18', aux_weight=0.4,
                 teacher=str(field_teacher), max_steps=2, log_every=1))
    header = (tmp_path / 'x' / 'train_log.csv').read_text().splitlines()[0].split(',')
    assert header[-3:] == ['ce', 'kd', 'aux'], header
    arch = load_checkpoint(tmp_path / 'x' / 'best.pt')['arch']
    assert (arch['family'], arch['aux']) == ('deeplabv3', True)
    assert r['model'].auxlayer is not None

def test_field_protocol_on_the_command_line(field_teacher, tiny_data, tmp_path):
    "Every default on (figures, TensorBoard, progress): a field teacher, a backbone weight file, sliding evaluation."
    torch.manual_seed(1)
    bb = deeplabv3('mobilenetv2', 4).pretrained.state_dict()
    wfile = tmp_path / 'mobilenetv2-imagenet.pth'
    torch.save({**bb, 'classifier.1.weight': torch.zeros(1000, 1280)}, wfile)   # a classifier the file carries is ignored
    out = tmp_path / 's'
    p = run(aicsd_cmd() + ['distill', '--arch', 'deeplabv3', '--teacher', field_teacher, '--student', 'mobilenetv2',
                           '--pretrained-backbone', wfile, '--method', 'cwd', '--max-steps', 2,
                           '--eval-mode', 'slide', '--eval-crop', '24x32', '--eval-stride', '16',
                           '--data', 'synthetic', '--data-root', tiny_data, '--crop-size', '32x32', '--batch-size', 4,
                           '--threads', 1, '--out', out], cwd=tmp_path)
    assert 'Traceback' not in p.stderr and 'aicsd: warning' not in p.stderr, p.stderr
    ck = load_checkpoint(out / 'last.pt')
    assert ck['config']['eval_mode'] == 'slide' and ck['config']['crop_size'] == [32, 32]
    assert {'curves.png'} <= {f.name for f in (out / 'figures').iterdir()}
    first = load_checkpoint(out / 'best.pt')            # evaluate it again, with the checkpoint's own protocol
    e = run(aicsd_cmd() + ['evaluate', '--ckpt', out / 'best.pt', '--data', 'synthetic', '--data-root', tiny_data,
                           '--threads', 1], cwd=tmp_path)
    assert 'evaluating as in training: --eval-mode slide' in e.stderr
    import json
    assert abs(json.loads(e.stdout.strip().splitlines()[-1])['miou'] - first['metrics']['miou']) < 1e-6
