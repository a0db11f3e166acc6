"""What users run, with every default on: each command end to end on data trees written in the real on-disk
formats, with the mixed image sizes of the real data sets.

The first real VOC run of a user crashed at its first evaluation (figures stacked the logits of images of
different sizes) while every test passed `--no-figures` on synthetic images of one size. Here nothing is switched
off: figures, TensorBoard, progress output and the default loader stay as a user gets them. Only the sizes are
small (crops of 32 px, two steps an epoch) so the matrix fits in CI.

Trees: Pascal VOC 2012 (JPEG images, palette PNG labels with 255 borders, landscape / portrait / square images, one
smaller than the crop; train.txt as Notepad saves it, a UTF-8 BOM and CRLF line ends, and one image a 16-bit grayscale PNG
whose id holds a dot), VOC trainaug built from an SBD release (`cls/*.mat`) by `aicsd data sbd`, and Cityscapes with
`*_gtFine_labelIds.png` only and with `*_gtFine_labelTrainIds.png`, images smaller than the crop.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run, aicsd_cmd

CROP = 32
# (height, width): landscape, portrait, square, and one smaller than the crop
TRAIN_SIZES = [(40, 52), (52, 40), (36, 36), (20, 26)]
VAL_SIZES = [(40, 52), (52, 40), (30, 30)]


# ---------------------------------------------------------------------------------------------- the trees
def _label(size, k, num_classes, border=True):
    "A label map: background, one object of class 1 + k % (C-1), a 255 band around the object (VOC's void border)."
    h, w = size
    m = np.zeros(size, np.uint8)
    y0, x0, y1, x1 = h // 5, w // 5, h - h // 5, w - w // 4
    if border: m[y0 - 2:y1 + 2, x0 - 2:x1 + 2] = 255
    m[y0:y1, x0:x1] = 1 + k % (num_classes - 1)
    return m


def _image(lab, seed):
    "An RGB image whose colour follows the label (so a network can learn something), with noise."
    rng = np.random.default_rng(seed)
    lab = lab.astype(np.int64)
    base = np.stack([(lab * 37) % 256, (lab * 91) % 256, (lab * 53) % 256], -1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


ODD = ('train', 2)   # this image: a 16-bit grayscale PNG whose id holds a dot (2007_train0002.v2)


def write_voc(root: Path) -> Path:
    """VOC2012/: JPEGImages/*.jpg, SegmentationClass/*.png (palette), ImageSets/Segmentation/{train,val}.txt.
    As files come in the wild: train.txt as Notepad writes it (a UTF-8 BOM, CRLF), one training image a 16-bit PNG."""
    from aicsd.data import save_label_png
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root / d).mkdir(parents=True)
    splits = {'train': TRAIN_SIZES, 'val': VAL_SIZES}
    for s, sizes in splits.items():
        ids = [f'2007_{s}{k:04d}' + ('.v2' if (s, k) == ODD else '') for k in range(len(sizes))]
        for k, (i, size) in enumerate(zip(ids, sizes)):
            lab = _label(size, k, 21)
            save_label_png(lab, root / 'SegmentationClass' / f'{i}.png')
            if (s, k) == ODD: Image.fromarray((_image(lab, k).mean(-1) * 257).astype(np.uint16)).save(root / 'JPEGImages' / f'{i}.png')
            else: Image.fromarray(_image(lab, k)).save(root / 'JPEGImages' / f'{i}.jpg', quality=90)
        if s == 'train': (root / 'ImageSets/Segmentation/train.txt').write_text(''.join(f'{i}\r\n' for i in ids), encoding='utf-8-sig')
        else: (root / 'ImageSets/Segmentation' / f'{s}.txt').write_text(''.join(f'{i}\n' for i in ids))
    return root


def write_sbd(root: Path, voc: Path) -> Path:
    "benchmark_RELEASE/dataset/: cls/<id>.mat (GTcls.Segmentation), train.txt, val.txt; images go into VOC's JPEGImages."
    from scipy.io import savemat
    d = root / 'benchmark_RELEASE' / 'dataset'
    (d / 'cls').mkdir(parents=True)
    ids = [f'2008_sbd{k:03d}' for k in range(3)]
    for k, (i, size) in enumerate(zip(ids, [(44, 34), (34, 44), (24, 30)])):
        lab = _label(size, k + 5, 21, border=False)                  # SBD has no void border
        savemat(str(d / 'cls' / f'{i}.mat'), {'GTcls': {'Segmentation': lab, 'Boundaries': np.zeros(1),
                                                         'CategoriesPresent': np.unique(lab)}})
        Image.fromarray(_image(lab, 50 + k)).save(voc / 'JPEGImages' / f'{i}.jpg', quality=90)
    (d / 'train.txt').write_text(''.join(f'{i}\n' for i in ids[:2]))
    (d / 'val.txt').write_text(f'{ids[2]}\n')
    return root


# Cityscapes label ids (the 34 of the devkit) and their train ids: road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255
ROAD, CAR, UNLABELED = 7, 26, 0
TRAIN_ID = {ROAD: 0, CAR: 13, UNLABELED: 255}


def write_cityscapes(root: Path, train_ids: bool) -> Path:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png (+ labelTrainIds);
    train, val, and test with void labels only."""
    size = (24, 48)                                                  # a 1:2 frame, smaller than the crop in height
    for s, city, n in (('train', 'aachen', 4), ('val', 'lindau', 2), ('test', 'berlin', 2)):
        (root / 'leftImg8bit' / s / city).mkdir(parents=True); (root / 'gtFine' / s / city).mkdir(parents=True)
        for k in range(n):
            stem = f'{city}_{k:06d}_000019'
            ids = np.full(size, ROAD, np.uint8); ids[:4] = UNLABELED; ids[8:18, 6 + 4 * k:26 + 4 * k] = CAR
            if s == 'test': ids[:] = UNLABELED                       # as published: the test labels are all void
            Image.fromarray(ids).save(root / 'gtFine' / s / city / f'{stem}_gtFine_labelIds.png')
            if train_ids:
                tid = np.vectorize(TRAIN_ID.get)(ids).astype(np.uint8)
                Image.fromarray(tid).save(root / 'gtFine' / s / city / f'{stem}_gtFine_labelTrainIds.png')
            Image.fromarray(_image(ids, 100 + k)).save(root / 'leftImg8bit' / s / city / f'{stem}_leftImg8bit.png')
    return root


@pytest.fixture(scope='module')
def trees(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('trees')
    voc = write_voc(base / 'VOCdevkit' / 'VOC2012')
    return dict(voc=voc, sbd=write_sbd(base / 'sbd', voc),
                cs_ids=write_cityscapes(base / 'cs_ids', train_ids=False),
                cs_train=write_cityscapes(base / 'cs_train', train_ids=True), base=base)


# ---------------------------------------------------------------------------------------------- running and checking
def aicsd(*args, cwd, timeout=400):
    "Run `aicsd ARGS` as a user would (no flag switched off); fail with its output on a non-zero exit."
    return run([*aicsd_cmd(), *args], cwd=cwd, timeout=timeout)


def small(data, root, out, *more):
    "The issue's command: tiny crop and batch, two steps; every other option at its default."
    return ['--data', data, '--data-root', root, '--crop-size', CROP, '--batch-size', 2, '--max-steps', 2,
            '--out', out, *more]


def assert_full_run(out: Path, p, teacher=True, steps=(2,)):
    "Checkpoints, logs, TensorBoard events and every figure of each evaluation are there; nothing was skipped."
    for f in ('last.pt', 'best.pt', 'train_log.csv', 'eval_log.csv'): assert (out / f).is_file(), f
    assert any((out / 'tb').rglob('events.out.tfevents.*')), 'no TensorBoard events'
    figs = {q.name for q in (out / 'figures').iterdir()}
    for s in steps:
        want = {f'ics_step{s:07d}.png', f'predictions_step{s:07d}.png'} | ({f'ics_rows_step{s:07d}.png'} if teacher else set())
        assert want <= figs, (want - figs, figs)
    assert {'curves.png', 'README.md'} <= figs, figs
    err = p.stderr
    assert 'Traceback' not in err, err[-3000:]
    assert 'aicsd: warning: figures' not in err, err[-3000:]         # a drawing failure must not go unseen here
    assert not [l for l in err.splitlines() if l.startswith('ERROR')], err[-3000:]


# ---------------------------------------------------------------------------------------------- VOC, mixed sizes
@pytest.fixture(scope='module')
def voc_teacher(trees, tmp_path_factory) -> Path:
    "The issue's command, verbatim but for the paths: `aicsd train --model resnet18 --data voc ...`."
    out = tmp_path_factory.mktemp('runs') / 'run1'
    p = aicsd('train', '--model', 'resnet18', *small('voc', trees['voc'], out), cwd=trees['base'])
    assert_full_run(out, p, teacher=False)
    for f in ('last.pt', 'last.prev.pt'): (out / f).unlink(missing_ok=True)   # only best.pt is used: keep the disk low
    return out


def test_train_voc_mixed_sizes_defaults(voc_teacher):
    import csv
    rows = list(csv.DictReader(open(voc_teacher / 'eval_log.csv')))
    assert [int(r['step']) for r in rows] == [2] and 0 <= float(rows[0]['miou']) <= 1


@pytest.mark.parametrize('method', ['aicsd', 'cwd+icsd', 'cirkd'])
def test_distill_voc_mixed_sizes_defaults(voc_teacher, trees, tmp_path, method):
    out = tmp_path / 'student'
    more = ['--param', 'cirkd_memory.pixel_size=64', '--param', 'cirkd_memory.region_size=8'] if method == 'cirkd' else []
    p = aicsd('distill', '--teacher', voc_teacher / 'best.pt', '--student', 'mobilenetv2', '--method', method,
              *small('voc', trees['voc'], out), *more, cwd=tmp_path)
    assert_full_run(out, p)
    import csv                              # alpha, ALW's factor, at the logged last step (k = 1 of 2): 1/2; 0 without ALW
    alpha = [float(r['alpha']) for r in csv.DictReader(open(out / 'train_log.csv'))]
    assert alpha == ([0.5] if method == 'aicsd' else [0.0]), alpha


def test_torchrun_distill_voc_mixed_sizes_defaults(voc_teacher, trees, tmp_path):
    """The same distillation as two processes under torchrun (gloo): each rank's share of mixed-size validation images
    (2 and 1) evaluated and summed, the figures drawn on rank 0, every default on."""
    import sys
    out = tmp_path / 'ddp'
    p = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'aicsd.cli', 'distill',
             '--teacher', voc_teacher / 'best.pt', '--student', 'mobilenetv2', *small('voc', trees['voc'], out)],
            cwd=tmp_path, timeout=400)
    assert_full_run(out, p)


def test_paper_recipe_voc_mixed_sizes(voc_teacher, trees, tmp_path):
    """The paper's VOC recipe as a config file, run with only what this machine needs overridden (paths, sizes, steps,
    no ImageNet download): its blur, bf16, per-epoch ALW and 513 x 513 square evaluation on mixed-size images."""
    out = tmp_path / 'recipe'
    (tmp_path / 'r.yaml').write_text(aicsd('recipes', 'voc-r18-aicsd', cwd=tmp_path).stdout)
    p = aicsd('distill', '--config', tmp_path / 'r.yaml', '--teacher', voc_teacher / 'best.pt', '--data-root', trees['voc'],
              '--batch-size', 2, '--crop-size', CROP, '--max-steps', 2, '--pretrained-backbone', 'none',
              '--out', out, cwd=tmp_path)
    assert_full_run(out, p)
    import torch
    cfg = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['config']
    assert (cfg['eval_resize'], cfg['eval_square'], cfg['blur'], cfg['alw_unit'], cfg['method']) == (513, True, True, 'epoch', 'aicsd')
    assert (cfg['train_split'], cfg['param'], cfg['lambda_kd']) == ('train', {'ce': {'batch_average': True}}, 0.4762)
    # the start says what runs: the recipe's weights (10 / 21 for KD), and that 2 images per step are not its 6
    assert 'method aicsd (ce 1 [batch_average=true], kd 0.4762, icsd 0.1 under ALW)' in p.stdout, p.stdout[:2000]
    assert '2 images per step, not the 6 of --total-batch' in ' '.join(p.stderr.split()), p.stderr[-3000:]


@pytest.mark.parametrize('workers', [None, 2])
def test_resume_voc_mixed_sizes_defaults(voc_teacher, trees, tmp_path, workers):
    """Stopped after one step, resumed to the end: the evaluation and its figures happen in the resumed session.
    With `--workers 2` too, the loader a GPU run gets by default (worker processes kept between epochs; on a CPU the
    default is none): mixed sizes collated in the workers, and the workers stopped at the end of each session."""
    out = tmp_path / 'student'
    args = ['distill', '--teacher', voc_teacher / 'best.pt', '--student', 'mobilenetv2', '--method', 'aicsd',
            *small('voc', trees['voc'], out), *(['--workers', workers] if workers else [])]
    aicsd(*args, '--stop-after', 1, cwd=tmp_path)
    assert (out / 'last.pt').is_file() and not (out / 'figures').exists()
    p = aicsd(*args, '--resume', cwd=tmp_path)
    assert_full_run(out, p)


def test_evaluate_voc_mixed_sizes_defaults(voc_teacher, trees, tmp_path):
    p = aicsd('evaluate', '--ckpt', voc_teacher / 'best.pt', '--data', 'voc', '--data-root', trees['voc'],
              '--json', tmp_path / 'm.json', cwd=tmp_path)
    import json
    m = json.loads((tmp_path / 'm.json').read_text())
    assert 0 <= m['miou'] <= 1 and len(m['iou']) == len(m['class_acc']) == len(m['classes']) == 21, m
    line = json.loads(p.stdout.strip().splitlines()[-1])      # stdout: one line of the scalars
    assert line == {k: v for k, v in m.items() if not isinstance(v, (list, dict))}, line
    assert m['checkpoint']['path'] == str(voc_teacher / 'best.pt') and m['protocol']['data'] == 'voc', m   # what the numbers are of
    assert 'Traceback' not in p.stderr


def test_evaluate_without_data_flags_uses_the_checkpoints(voc_teacher, trees, tmp_path):
    "`aicsd evaluate --ckpt best.pt` alone: the data set and folder the network was trained on, said on stderr."
    import json
    p = aicsd('evaluate', '--ckpt', voc_teacher / 'best.pt', '--json', tmp_path / 'a.json', cwd=tmp_path)
    assert f"evaluating on the data of training: --data voc --data-root {trees['voc']}" in p.stderr, p.stderr[-2000:]
    aicsd('evaluate', '--ckpt', voc_teacher / 'best.pt', '--data', 'voc', '--data-root', trees['voc'], '--json',
          tmp_path / 'b.json', cwd=tmp_path)
    assert json.loads((tmp_path / 'a.json').read_text()) == json.loads((tmp_path / 'b.json').read_text())
    # one of the two given: the other from the checkpoint (not synthetic's default, not VOC's usual folder), said
    p = aicsd('evaluate', '--ckpt', voc_teacher / 'best.pt', '--data-root', trees['voc'], '--json', tmp_path / 'c.json', cwd=tmp_path)
    assert f"evaluating --data-root {trees['voc']} as --data voc, the data of training" in p.stderr, p.stderr[-2000:]
    p = aicsd('evaluate', '--ckpt', voc_teacher / 'best.pt', '--data', 'voc', '--json', tmp_path / 'd.json', cwd=tmp_path)
    assert f"evaluating --data voc at {trees['voc']}, where training read it" in p.stderr, p.stderr[-2000:]
    for f in ('c.json', 'd.json'): assert json.loads((tmp_path / f).read_text()) == json.loads((tmp_path / 'a.json').read_text()), f


def test_evaluate_voc_mixed_sizes_scores_what_numpy_counts(voc_teacher, trees, tmp_path):
    """A network that predicts background everywhere, evaluated at every default on mixed sizes: its metrics equal those
    counted with numpy from the label PNGs at their own sizes (a label resized, padded or cropped on the way shows)."""
    import json, torch
    ck = torch.load(voc_teacher / 'best.pt', map_location='cpu', weights_only=True)
    w, b = 'decoder.last_conv.8.weight', 'decoder.last_conv.8.bias'          # the classifier: logits = bias
    ck['model'][w] = torch.zeros_like(ck['model'][w]); ck['model'][b] = torch.zeros_like(ck['model'][b]); ck['model'][b][0] = 1
    torch.save(ck, tmp_path / 'background.pt')
    aicsd('evaluate', '--ckpt', tmp_path / 'background.pt', '--data', 'voc', '--data-root', trees['voc'],
          '--json', tmp_path / 'm.json', '--figures-dir', tmp_path / 'figs', cwd=tmp_path)
    m = json.loads((tmp_path / 'm.json').read_text())
    assert sorted(q.name for q in (tmp_path / 'figs').iterdir()) == ['class_iou.png', 'confusion.png']
    ids = (trees['voc'] / 'ImageSets/Segmentation/val.txt').read_text().split()
    labs = [np.array(Image.open(trees['voc'] / 'SegmentationClass' / f'{i}.png')) for i in ids]
    assert [l.shape for l in labs] == VAL_SIZES
    lab = np.concatenate([l.ravel() for l in labs]).astype(np.int64); lab = lab[lab != 255]
    counts = np.bincount(lab, minlength=21)
    # prediction 0 everywhere: IoU_0 = n_0 / n, IoU_k = 0 for the other classes present, absent classes left out
    iou0, present = counts[0] / lab.size, int((counts > 0).sum())
    assert abs(m['pixel_acc'] - iou0) < 1e-12 and abs(m['iou'][0] - iou0) < 1e-12, (m, iou0)
    assert abs(m['miou'] - iou0 / present) < 1e-12, (m['miou'], iou0 / present)
    assert np.array_equal(np.array(m['confmat'])[:, 0], counts) and np.array(m['confmat'])[:, 1:].sum() == 0   # every pixel: 'background'
    assert present >= 3 and 0 < iou0 < 1                                      # the comparison can tell cases apart
    # the same network as a file of the authors' released code ('state_dict', DataParallel's 'module.' prefix, no
    # architecture): `--backbone` reads it, every other default on, and it scores what numpy counted
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in ck['model'].items()}, 'best_pred': 0.0},
               tmp_path / 'released.pth.tar')
    p = aicsd('evaluate', '--ckpt', tmp_path / 'released.pth.tar', '--backbone', 'resnet18', '--data', 'voc',
              '--data-root', trees['voc'], '--json', tmp_path / 'r.json', cwd=tmp_path)
    r = json.loads((tmp_path / 'r.json').read_text())
    assert abs(r['miou'] - iou0 / present) < 1e-12 and r['iou'] == m['iou'], (r, m)
    assert '--eval-resize 513 --eval-square' in p.stderr, p.stderr[-2000:]   # the released protocol, named


def test_a_split_without_labelled_pixels_is_refused(voc_teacher, trees, tmp_path):
    """Cityscapes' test split (labels all void) as the validation split: refused before training, naming the split and
    the flags, instead of a run whose mIoU is NaN; `evaluate` likewise."""
    out = tmp_path / 'cst'
    p = run([*aicsd_cmd(), 'train', '--model', 'mobilenetv2', *small('cityscapes', trees['cs_ids'], out, '--val-split', 'test')],
            cwd=tmp_path, check=False)
    want = f"the validation split 'test' of {trees['cs_ids']} (--val-split, --data-root) has no labelled pixels"
    assert p.returncode == 2 and want in p.stderr and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert not (out / 'last.pt').exists() and not (out / 'train_log.csv').exists()
    p = run([*aicsd_cmd(), 'evaluate', '--ckpt', voc_teacher / 'best.pt', '--data', 'cityscapes', '--data-root', trees['cs_ids'],
             '--val-split', 'test'], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "the split 'test' of" in p.stderr and 'has no labelled pixels' in p.stderr, p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- SBD trainaug
def test_sbd_trainaug_then_train_defaults(trees, tmp_path):
    import shutil
    voc = tmp_path / 'VOC2012'; shutil.copytree(trees['voc'], voc)   # `data sbd` writes into the VOC tree
    p = aicsd('data', 'sbd', '--sbd-root', trees['sbd'], '--voc-root', voc, cwd=tmp_path)
    ids = (voc / 'ImageSets/Segmentation/trainaug.txt').read_text().split()
    assert len(ids) == len(TRAIN_SIZES) + 3 and len(list((voc / 'SegmentationClassAug').glob('*.png'))) == len(ids)
    assert f"trainaug.txt, {len(ids)} ids (VOC train and SBD, VOC val left out" in p.stdout, p.stdout   # the count to check
    out = tmp_path / 'aug'
    p = aicsd('train', '--model', 'mobilenetv2', *small('voc', voc, out, '--train-split', 'trainaug'), cwd=tmp_path)
    assert f"{len(ids)} training (trainaug) / " in p.stdout, p.stdout             # the split, in the run's first line
    assert_full_run(out, p, teacher=False, steps=(2,))


# ---------------------------------------------------------------------------------------------- Cityscapes
@pytest.mark.parametrize('tree', ['cs_ids', 'cs_train'])
def test_train_cityscapes_defaults(trees, tmp_path, tree):
    out = tmp_path / 'cs'
    p = aicsd('train', '--model', 'mobilenetv2', *small('cityscapes', trees[tree], out), cwd=tmp_path)
    assert_full_run(out, p, teacher=False)
    import csv
    rows = list(csv.DictReader(open(out / 'eval_log.csv')))
    assert len(rows) == 1 and 0 <= float(rows[0]['miou']) <= 1


# ---------------------------------------------------------------------------------------------- the field's protocol
def _field_teacher(path: Path, num_classes: int) -> Path:
    "A ResNet-18 DeepLabV3 with its aux head saved as the field saves it: a plain state_dict, no 'arch'."
    import torch
    from aicsd.models import deeplabv3
    torch.manual_seed(0)
    torch.save(deeplabv3('resnet18', num_classes, aux=True).state_dict(), path)
    return path


def test_field_protocol_voc_mixed_sizes_defaults(trees, tmp_path):
    """DeepLabV3 from a field teacher file, aux head, sliding-window evaluation over mixed sizes (windows larger and
    smaller than the images); then `aicsd evaluate` with multi-scale + flip. Every other default on."""
    out = tmp_path / 'field'
    teacher = _field_teacher(tmp_path / 'deeplabv3_resnet18_voc.pth', 21)
    p = aicsd('distill', '--arch', 'deeplabv3', '--teacher', teacher, '--student', 'resnet18', '--aux-weight', 0.4,
              '--method', 'aicsd', '--eval-mode', 'slide', '--eval-crop', '24x32', '--eval-stride', 16,
              *small('voc', trees['voc'], out), cwd=tmp_path)
    assert_full_run(out, p)
    import json, math
    e = aicsd('evaluate', '--ckpt', out / 'best.pt', '--data', 'voc', '--data-root', trees['voc'], '--eval-mode',
              'multiscale', '--eval-scales', 0.75, 1.0, '--eval-flip', '--json', tmp_path / 'm.json', cwd=tmp_path)
    assert 'Traceback' not in e.stderr and 'evaluating as in training' not in e.stderr   # the options given win
    m = json.loads((tmp_path / 'm.json').read_text())
    assert math.isfinite(m['miou']) and len(m['iou']) == 21, m


def test_field_protocol_cityscapes_defaults(trees, tmp_path):
    """The field's CWD recipe as a config file (DeepLabV3, KD and CWD on the head's stride-8 output, whole-image
    evaluation), from a field teacher file, with only what this machine needs overridden; every other default on."""
    out = tmp_path / 'field_cs'
    teacher = _field_teacher(tmp_path / 'deeplabv3_resnet18_citys.pth', 19)
    (tmp_path / 'f.yaml').write_text(aicsd('recipes', 'field-citys-mbv2-cwd', cwd=tmp_path).stdout)
    p = aicsd('distill', '--config', tmp_path / 'f.yaml', '--teacher', teacher, '--data-root', trees['cs_ids'],
              '--crop-size', '16x32', '--batch-size', 2, '--max-steps', 2, '--pretrained-backbone', 'none',
              '--out', out, cwd=tmp_path)
    assert_full_run(out, p)
    import torch
    cfg = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)['config']
    assert (cfg['arch'], cfg['method'], cfg['eval_mode'], cfg['eval_every']) == ('deeplabv3', 'cwd+kd+cwd_feat', 'whole', 4)
    assert cfg['param'] == {'kd': {'upsampled': False}, 'cwd': {'upsampled': False}}, cfg['param']
    # the teacher file itself, evaluated as the field reports it (whole image), before any run relies on it
    import json
    aicsd('evaluate', '--ckpt', teacher, '--data', 'cityscapes', '--data-root', trees['cs_ids'], '--json', tmp_path / 't.json',
          cwd=tmp_path)
    from aicsd.data import get_dataset, eval_transform
    from aicsd.evaluation import evaluate
    from aicsd.models import load_cirkd_checkpoint
    ref = evaluate(load_cirkd_checkpoint(teacher, 'resnet18'), get_dataset('cityscapes', trees['cs_ids'], 'val', eval_transform()), 19)
    assert abs(json.loads((tmp_path / 't.json').read_text())['pixel_acc'] - float(ref['pixel_acc'])) < 1e-12


# ---------------------------------------------------------------------------------------------- data stats
def _stats(p) -> dict:
    "`aicsd data stats` output (a header, then `name  percent %  count` per class) as {name: count}."
    return {l.rsplit(None, 3)[0].strip(): int(l.rsplit(None, 1)[1]) for l in p.stdout.splitlines()[1:] if l.strip()}


@pytest.mark.parametrize('split', ['train', 'val'])
def test_data_stats_voc_mixed_sizes_defaults(trees, tmp_path, split):
    "Pixel counts per class over the palette PNGs of mixed sizes, against numpy's count of the files (255 left out)."
    p = aicsd('data', 'stats', '--data', 'voc', '--data-root', trees['voc'], '--split', split, cwd=tmp_path)
    got = _stats(p)
    assert len(got) == 21 and 'Traceback' not in p.stderr
    seg = trees['voc'] / 'SegmentationClass'
    ids = (trees['voc'] / 'ImageSets/Segmentation' / f'{split}.txt').read_text(encoding='utf-8-sig').split()
    want = sum(np.bincount(np.asarray(Image.open(seg / f'{i}.png')).ravel(), minlength=256) for i in ids)
    assert list(got.values()) == want[:21].tolist(), (got, want[:21])
    assert sum(got.values()) == sum(h * w for h, w in (TRAIN_SIZES if split == 'train' else VAL_SIZES)) - want[255]


def test_data_stats_cityscapes_label_ids_defaults(trees, tmp_path):
    "A tree with `*_gtFine_labelIds.png` only: the devkit's ids are counted as train ids (road 0, car 13; unlabeled left out)."
    p = aicsd('data', 'stats', '--data', 'cityscapes', '--data-root', trees['cs_ids'], cwd=tmp_path)
    got = list(_stats(p).values())
    ids = np.stack([np.asarray(Image.open(f)) for f in sorted((trees['cs_ids'] / 'gtFine/train').rglob('*_labelIds.png'))])
    assert len(got) == 19 and got[0] == (ids == ROAD).sum() and got[13] == (ids == CAR).sum(), got
    assert sum(got) == (ids != UNLABELED).sum()


def test_num_classes_below_the_labels_names_the_flag(trees, tmp_path):
    "Labels beyond a smaller --num-classes: the error blames the flag (the labels are fine), VOC and Cityscapes."
    for data, root, n in (('voc', trees['voc'], 21), ('cityscapes', trees['cs_ids'], 19)):
        p = run([*aicsd_cmd(), 'train', '--model', 'mobilenetv2', *small(data, root, tmp_path / data, '--num-classes', 3)],
                cwd=tmp_path, check=False)
        assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
        assert f'--num-classes 3 keeps the first 3 of the {n} classes of {data}: leave it out' in p.stderr, p.stderr[-3000:]
