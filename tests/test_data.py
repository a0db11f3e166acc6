"""aicsd.data on files: actionable error messages, byte-identical synthetic data across processes,
and the loader's sharding under torch.distributed (2 processes, gloo)."""
import os, shutil, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aicsd.data import (VOCSegmentation, CityscapesSegmentation, get_dataset, make_synthetic, build_sbd_trainaug,
                        build_loader, train_transform, save_label_png, read_synthetic_info)


def voc_root(tmp_path, n=2, size=(40, 50)):
    "A tiny VOC 2012 tree in the real formats (JPEG images, palette PNG labels with a 255 border)."
    root = tmp_path / 'VOC2012'
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root / d).mkdir(parents=True)
    ids = [f'2007_{k:06d}' for k in range(n)]
    for k, i in enumerate(ids):
        m = np.zeros(size, np.uint8); m[5:-5, 5:-5] = 255; m[7:-7, 7:-7] = k + 1
        save_label_png(m, root / 'SegmentationClass' / f'{i}.png')
        Image.fromarray(np.full(size + (3,), 60 * k, np.uint8)).save(root / 'JPEGImages' / f'{i}.jpg')
    (root / 'ImageSets/Segmentation/train.txt').write_text(''.join(f'{i}\n' for i in ids))
    return root, ids


# ---------------------------------------------------------------- missing data: path, layout, where to get it
def test_missing_voc_root_names_path_layout_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(tmp_path / 'VOCdevkit' / 'VOC2012')
    msg = str(e.value)
    assert str(tmp_path / 'VOCdevkit' / 'VOC2012') in msg
    assert 'JPEGImages/' in msg and 'SegmentationClass/' in msg and 'ImageSets/Segmentation/' in msg
    assert 'host.robots.ox.ac.uk/pascal/VOC/voc2012' in msg and 'data/README.md' in msg


def test_missing_split_list_names_the_list(tmp_path):
    root, _ = voc_root(tmp_path)
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(root, 'val')
    msg = str(e.value)
    assert str(root / 'ImageSets' / 'Segmentation' / 'val.txt') in msg and msg.endswith(f"the lists of {root}: train")
    assert 'host.robots.ox.ac.uk' not in msg                  # the data set is there: no download advice
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(root, 'trainaug')
    assert 'trainaug.txt' in str(e.value) and 'semantic_contours' in str(e.value)   # says how to build it


def test_archive_root_points_at_the_images_folder(tmp_path):
    "--data-root at VOCdevkit/ (or above), not at the VOC2012/ folder holding the images: the error names that folder."
    root, _ = voc_root(tmp_path / 'data' / 'VOCdevkit')
    for up in (root.parent, root.parent.parent):             # VOCdevkit/, data/
        with pytest.raises(FileNotFoundError) as e: VOCSegmentation(up)
        assert str(e.value) == f"No JPEGImages/ folder in {up}, but {root} has one: did you mean --data-root {root}?"
    for low in (root / 'JPEGImages', root / 'ImageSets' / 'Segmentation'):   # a level or two too low: the folder above
        with pytest.raises(FileNotFoundError) as e: VOCSegmentation(low)
        assert str(e.value) == f"No JPEGImages/ folder in {low}; {root} holds it: did you mean --data-root {root}?"


def test_data_folder_with_several_trees_points_at_voc2012(tmp_path):
    "data/ holding aicsd's synthetic set (data/synthetic, classes.json) and VOCdevkit/VOC2007 + VOC2012: VOC 2012 is named, all listed."
    data = tmp_path / 'data'
    tree = lambda dest: shutil.move(str(voc_root(tmp_path / dest.name)[0]), str(dest)) and dest
    syn = tree(data / 'synthetic'); (syn / 'classes.json').write_text('{"classes": ["bg", "a"]}')
    v07, v12 = tree(data / 'VOCdevkit' / 'VOC2007'), tree(data / 'VOCdevkit' / 'VOC2012')
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(data)
    assert str(e.value) == (f"No JPEGImages/ folder in {data}, but {v12} has one: did you mean --data-root {v12}? "
                            f"(folders there with JPEGImages/: {v12}, {v07}, {syn})"), str(e.value)
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(data, kind='synthetic')   # --data synthetic: aicsd's set first
    assert f"but {syn} has one" in str(e.value), str(e.value)


def test_split_list_naming_missing_files(tmp_path):
    root, ids = voc_root(tmp_path)
    (root / 'JPEGImages' / f'{ids[1]}.jpg').unlink()
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(root)
    assert ids[1] in str(e.value) and str(root / 'JPEGImages') in str(e.value)
    assert str(e.value).endswith("(A list line's id is its first word.)")


def test_split_list_file_in_a_format_not_read(tmp_path):
    "An image saved as .bmp or a label as .jpg exists: the error names it and the formats read, not just 'missing'."
    root, ids = voc_root(tmp_path)
    from PIL import Image
    img = root / 'JPEGImages' / f'{ids[1]}.jpg'
    Image.open(img).save(img.with_suffix('.bmp')); img.unlink()
    lab = root / 'SegmentationClass' / f'{ids[0]}.png'
    lab.rename(lab.with_suffix('.jpg'))
    with pytest.raises(FileNotFoundError) as e: VOCSegmentation(root)
    msg = str(e.value)
    assert f"1 images missing from {root / 'JPEGImages'} (e.g. ['{ids[1]}'])" in msg and f"1 labels missing" in msg
    assert msg.endswith(f"exist in formats that are not read: {ids[1]}.bmp, {ids[0]}.jpg (images: .jpg, .jpeg or .png; "
                        "labels: .png)."), msg


def test_missing_cityscapes_names_path_layout_and_download(tmp_path):
    for call in (lambda: CityscapesSegmentation(tmp_path / 'cityscapes', 'val'),
                 lambda: get_dataset('cityscapes', tmp_path / 'cityscapes', 'val')):
        with pytest.raises(FileNotFoundError) as e: call()
        msg = str(e.value)
        assert str(tmp_path / 'cityscapes') in msg and 'leftImg8bit/' in msg and 'gtFine_labelIds.png' in msg
        assert 'cityscapes-dataset.com' in msg


def test_missing_cityscapes_label_named(tmp_path):
    root = tmp_path / 'cityscapes'
    (root / 'leftImg8bit/val/lindau').mkdir(parents=True); (root / 'gtFine/val/lindau').mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / 'leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png')
    with pytest.raises(FileNotFoundError) as e: CityscapesSegmentation(root, 'val')
    assert 'lindau_000000_000019_gtFine_labelIds.png' in str(e.value)


def test_missing_synthetic_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('synthetic', tmp_path / 'syn')
    assert str(tmp_path / 'syn') in str(e.value) and 'make_synthetic' in str(e.value)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown dataset 'coco'.*cityscapes.*synthetic.*voc"): get_dataset('coco')


# ---------------------------------------------------------------- bad files: name the file(s) and the problem
def test_size_mismatch_names_both_files(tmp_path):
    root, ids = voc_root(tmp_path)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(root / 'JPEGImages' / f'{ids[0]}.jpg')
    with pytest.raises(ValueError) as e: VOCSegmentation(root)[0]
    msg = str(e.value)
    assert str(root / 'JPEGImages' / f'{ids[0]}.jpg') in msg and str(root / 'SegmentationClass' / f'{ids[0]}.png') in msg
    assert '(30, 50)' in msg and '(40, 50)' in msg


def test_label_values_outside_classes_name_file_and_values(tmp_path):
    root, ids = voc_root(tmp_path)
    m = np.zeros((40, 50), np.uint8); m[0, 0] = 21; m[1, 1] = 254; m[2, 2] = 255; m[3, 3] = 20
    save_label_png(m, root / 'SegmentationClass' / f'{ids[1]}.png')
    with pytest.raises(ValueError) as e: VOCSegmentation(root)[1]
    msg = str(e.value)
    assert str(root / 'SegmentationClass' / f'{ids[1]}.png') in msg and '[21, 254]' in msg and '255' in msg
    VOCSegmentation(root)[0]                                        # the good file still loads


def test_cityscapes_label_ids_outside_table(tmp_path):
    root = tmp_path / 'cityscapes'
    (root / 'leftImg8bit/val/ulm').mkdir(parents=True); (root / 'gtFine/val/ulm').mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / 'leftImg8bit/val/ulm/ulm_000000_000019_leftImg8bit.png')
    lab = np.full((4, 4), 7, np.uint8); lab[0, 0] = 40
    Image.fromarray(lab, mode='L').save(root / 'gtFine/val/ulm/ulm_000000_000019_gtFine_labelIds.png')
    with pytest.raises(ValueError) as e: CityscapesSegmentation(root, 'val')[0]
    assert 'ulm_000000_000019_gtFine_labelIds.png' in str(e.value) and '[40]' in str(e.value)


def test_unreadable_image_named(tmp_path):
    root, ids = voc_root(tmp_path)
    (root / 'JPEGImages' / f'{ids[0]}.jpg').write_bytes(b'\xff\xd8 this is not a jpeg')
    with pytest.raises(ValueError) as e: VOCSegmentation(root)[0]
    assert str(root / 'JPEGImages' / f'{ids[0]}.jpg') in str(e.value) and 'Cannot read image' in str(e.value)


def test_unreadable_label_and_rgb_label_named(tmp_path):
    root, ids = voc_root(tmp_path)
    (root / 'SegmentationClass' / f'{ids[0]}.png').write_bytes(b'garbage')
    with pytest.raises(ValueError) as e: VOCSegmentation(root)[0]
    assert str(root / 'SegmentationClass' / f'{ids[0]}.png') in str(e.value)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / 'SegmentationClass' / f'{ids[1]}.png')
    with pytest.raises(ValueError) as e: VOCSegmentation(root)[1]
    assert f'{ids[1]}.png' in str(e.value) and "mode RGB (colours)" in str(e.value) and 'class index' in str(e.value)


def test_sbd_missing_release_says_where_to_get_it(tmp_path):
    root, _ = voc_root(tmp_path)
    with pytest.raises(FileNotFoundError) as e: build_sbd_trainaug(tmp_path / 'benchmark_RELEASE', root)
    assert 'cls/' in str(e.value) and 'semantic_contours' in str(e.value) and str(tmp_path / 'benchmark_RELEASE') in str(e.value)


def test_sbd_unreadable_mat_named(tmp_path):
    root, ids = voc_root(tmp_path)
    (root / 'ImageSets/Segmentation/val.txt').write_text('')
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'; (sbd / 'cls').mkdir(parents=True)
    (sbd / 'train.txt').write_text('2008_000001\n'); (sbd / 'val.txt').write_text('')
    (sbd / 'cls' / '2008_000001.mat').write_bytes(b'not matlab')
    (sbd / 'img').mkdir(); Image.new('RGB', (8, 6)).save(sbd / 'img' / '2008_000001.jpg')   # every input there but the .mat's content
    with pytest.raises(ValueError) as e: build_sbd_trainaug(tmp_path / 'benchmark_RELEASE', root, progress=False)
    assert '2008_000001.mat' in str(e.value)


# ---------------------------------------------------------------- synthetic data: reuse, overwrite, determinism
def test_synthetic_reuse_mismatch_and_overwrite(tmp_path):
    root = make_synthetic(tmp_path / 'syn', n_train=4, n_val=2, size=32, seed=0)
    stamp = (root / 'classes.json').stat().st_mtime_ns
    assert make_synthetic(root, n_train=4, n_val=2, size=32, seed=0) == root
    assert (root / 'classes.json').stat().st_mtime_ns == stamp               # reused, not rewritten
    with pytest.raises(FileExistsError, match='overwrite=True'): make_synthetic(root, n_train=5, n_val=2, size=32)
    make_synthetic(root, n_train=5, n_val=2, size=32, overwrite=True)
    assert read_synthetic_info(root)['settings']['n_train'] == 5 and len(VOCSegmentation(root)) == 5
    (tmp_path / 'other').mkdir(); (tmp_path / 'other' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='not an aicsd synthetic dataset'): make_synthetic(tmp_path / 'other')
    (tmp_path / 'empty').mkdir()
    assert len(VOCSegmentation(make_synthetic(tmp_path / 'empty', n_train=2, n_val=1, size=16), 'val')) == 1


def test_synthetic_byte_identical_in_another_process(tmp_path):
    kw = dict(n_train=6, n_val=2, size=(40, 56), num_classes=12, seed=5)
    a = make_synthetic(tmp_path / 'a', **kw)
    code = f"from aicsd.data import make_synthetic; make_synthetic({str(tmp_path / 'b')!r}, **{kw!r})"
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONHASHSEED': '123'})
    fa = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
    fb = sorted(p.relative_to(tmp_path / 'b') for p in (tmp_path / 'b').rglob('*') if p.is_file())
    assert fa == fb and len(fa) == 2 * 8 + 3 + 1
    assert all((a / f).read_bytes() == (tmp_path / 'b' / f).read_bytes() for f in fa)


# ---------------------------------------------------------------- loaders under torch.distributed (gloo, 2 ranks)
DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from aicsd.data import VOCSegmentation, build_loader, train_transform
    rank, root, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    ds = VOCSegmentation(root, 'train', transform=train_transform(crop_size=24, base_size=24))
    tr = build_loader(ds, 2, train=True, seed=3); tr.sampler.set_epoch(1)
    ev = build_loader(VOCSegmentation(root, 'train'), 2, train=False)
    res = dict(train_idx=[i for _, i in tr.sampler], train=[b for b in tr],
               eval_idx=list(ev.sampler), eval=[b for b in ev], distributed=tr.sampler.num_replicas)
    torch.save(res, out)
    dist.destroy_process_group()
""")


def test_loader_under_torch_distributed(tmp_path):
    root = make_synthetic(tmp_path / 'syn', n_train=10, n_val=1, size=32, seed=0)
    script = tmp_path / 'worker.py'; script.write_text(DIST_WORKER)
    init = f"file://{tmp_path / 'store'}"
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(root), init, str(tmp_path / f'r{r}.pt')], env=env)
             for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    r0, r1 = (torch.load(tmp_path / f'r{r}.pt', weights_only=False) for r in range(2))
    assert r0['distributed'] == 2
    # training: the two ranks split the epoch's permutation, 5 samples each
    assert sorted(r0['train_idx'] + r1['train_idx']) == list(range(10))
    # evaluation: rank r reads r, r+2, ...; nothing repeated, nothing padded
    assert r0['eval_idx'] == [0, 2, 4, 6, 8] and r1['eval_idx'] == [1, 3, 5, 7, 9]
    # each sample's augmentation is the same as in a single process (seeded by (seed, epoch, index))
    single = VOCSegmentation(root, 'train', transform=train_transform(crop_size=24, base_size=24))
    one = build_loader(single, 1, train=True, seed=3, drop_last=False); one.sampler.set_epoch(1)
    by_index = {i: b for i, b in zip((i for _, i in one.sampler), one)}
    for r in (r0, r1):
        flat = [(x[k], y[k]) for x, y in r['train'] for k in range(len(x))]
        for i, (x, y) in zip(r['train_idx'], flat):
            assert torch.equal(x, by_index[i][0][0]) and torch.equal(y, by_index[i][1][0])
    ev_single = VOCSegmentation(root, 'train')
    for r, off in ((r0, 0), (r1, 1)):
        flat = [y[k] for _, y in r['eval'] for k in range(len(y))]
        for j, y in zip(range(off, 10, 2), flat): assert torch.equal(y, ev_single[j][1])


def test_renumbered_palette_labels_read_by_colour(tmp_path):
    """`aicsd data stats` on labels an editor re-saved (Pillow's `quantize`: the same VOC colours at indices 0..3) gives
    the class shares of the original files, not those of classes 0..3 (other palettes: 06_data)."""
    from conftest import run, aicsd_cmd
    root, ids = voc_root(tmp_path / 'a', n=3)
    stats = lambda r: run(aicsd_cmd() + ['data', 'stats', '--data', 'voc', '--data-root', r], cwd=tmp_path).stdout.split('\n', 1)[1]
    want = stats(root)
    assert [l.split()[0] for l in want.splitlines() if not l.split()[-1] == '0'] == ['background', 'aeroplane', 'bicycle', 'bird']
    for i in ids:
        p = root / 'SegmentationClass' / f'{i}.png'
        Image.open(p).convert('RGB').quantize(colors=256).save(p)
    assert sorted(np.unique(np.array(Image.open(root / 'SegmentationClass' / f'{ids[2]}.png'))).tolist()) == [0, 1, 2]
    assert stats(root) == want


def test_own_data_in_the_voc_layout(tmp_path):
    "data/README.md's 'Your own data': a VOC-layout tree with a hand-written classes.json trains with --data voc, on its classes."
    from conftest import run, aicsd_cmd
    import json
    root = make_synthetic(tmp_path / 'own', n_train=8, n_val=2, size=32, num_classes=4, seed=0)
    (root / 'classes.json').write_text(json.dumps({'classes': ['background', 'road', 'car', 'tree']}))   # by hand
    p = run(aicsd_cmd() + ['data', 'stats', '--data', 'voc', '--data-root', root], cwd=tmp_path)
    assert [l.split()[0] for l in p.stdout.splitlines()[1:]] == ['background', 'road', 'car', 'tree'], p.stdout
    p = run(aicsd_cmd() + ['train', '--data', 'voc', '--data-root', root, '--model', 'resnet18', '--max-steps', 1,
                           '--crop-size', 32, '--batch-size', 4, '--pretrained-backbone', 'none', '--out', tmp_path / 'run'],
            cwd=tmp_path)
    assert 'voc at' in p.stdout and '8 training (train) / 2 validation (val) images, 4 classes' in p.stdout, p.stdout
    assert torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)['arch']['num_classes'] == 4


def test_data_stats_decodes_every_image(tmp_path):
    "`aicsd data stats` finds a truncated image (headers alone pass it; training failed at that file, hours in)."
    from aicsd.data import class_stats
    root, ids = voc_root(tmp_path, n=3, size=(120, 160))
    class_stats('voc', root)                                                   # whole files: counted
    f = root / 'JPEGImages' / f'{ids[2]}.jpg'; f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError) as e: class_stats('voc', root)
    assert f"Cannot read image file {f}" in str(e.value) and 'truncated' in str(e.value).lower(), str(e.value)


def test_binary_masks_with_the_object_as_255_are_said(tmp_path):
    """Masks of 0 and 255 (the common binary-mask format): 255 is void, so a run would learn background alone and score
    mIoU 1.0; `aicsd data stats` and `aicsd train` say so (on a tree in VOC's layout, labels saved as grayscale PNGs)."""
    from conftest import run, aicsd_cmd, tiny_args
    root, ids = voc_root(tmp_path, n=3)
    for k, i in enumerate(ids):
        m = np.zeros((40, 50), np.uint8); m[8:30, 10 + k:40 + k] = 255                # the object: 33 % of the pixels
        Image.fromarray(m, 'L').save(root / 'SegmentationClass' / f'{i}.png')
    (root / 'ImageSets/Segmentation/val.txt').write_text(''.join(f'{i}\n' for i in ids))
    want = 'hold only 0 and 255, and 255 is 33 % of their pixels: 255 is void'
    p = run(aicsd_cmd() + ['data', 'stats', '--data', 'voc', '--data-root', root], cwd=tmp_path)
    assert want in p.stdout, p.stdout
    args = [a if a != 'synthetic' else 'voc' for a in tiny_args(root, tmp_path / 'r')]
    p = run(aicsd_cmd() + ['train', '--model', 'mobilenetv2', '--max-steps', 1, *args, '--batch-size', 2], cwd=tmp_path)
    assert want in p.stderr, p.stderr[-3000:]
