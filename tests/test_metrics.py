"""SegMetrics under torch.distributed: two gloo processes give exactly the metrics of one process."""
import json, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
from conftest import ENV

SCRIPT = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    from aicsd.metrics import SegMetrics
    dist.init_process_group("gloo"); r, w = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 6, (7, 13, 11), generator=g); t[torch.rand(t.shape, generator=g) < 0.2] = 255
    p = torch.randint(0, 5, t.shape, generator=g)          # class 5 never predicted
    shares = {0: range(0, 7), 1: range(0, 0)} if sys.argv[2] == "empty" else {k: range(k, 7, w) for k in range(w)}
    m = SegMetrics(6)
    for i in shares[r]: m.update(p[i:i+1], t[i:i+1])       # this rank's share of the images
    res = m.compute()
    out = dict(rank=r, local=int(m.confmat.sum()), **{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in res.items()})
    json.dump(out, open(f"{sys.argv[1]}.{r}", "w"))
    if r == 0: torch.save(dict(p=p, t=t), sys.argv[1] + ".data")
    dist.destroy_process_group()
''')

def _numpy_metrics(p, t, C, ignore=255):
    "Independent per-class computation from boolean masks (no confusion matrix)."
    keep = t != ignore; p, t = p[keep], t[keep]
    inter = np.array([np.sum((p == c) & (t == c)) for c in range(C)])
    union = np.array([np.sum((p == c) | (t == c)) for c in range(C)])
    g = np.array([np.sum(t == c) for c in range(C)])
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    acc = np.where(g > 0, inter / np.maximum(g, 1), np.nan)
    return dict(miou=np.nanmean(iou), pixel_acc=np.mean(p == t), mean_acc=np.nanmean(acc),
                fwiou=np.nansum(g / len(t) * iou), iou=iou)

def _run(tmp_path, mode):
    import torch
    s = tmp_path / 's.py'; s.write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name('torchrun')
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, '-m', 'torch.distributed.run']
    out = str(tmp_path / 'out.json')
    p = subprocess.run(cmd + ['--standalone', '--nproc_per_node=2', str(s), out, mode],
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = [json.loads(Path(f'{out}.{r}').read_text()) for r in range(2)]
    data = torch.load(out + '.data', weights_only=True)
    return res, data['p'].numpy(), data['t'].numpy()

def test_distributed_equals_single(tmp_path):
    res, p, t = _run(tmp_path, 'split')
    from aicsd.metrics import SegMetrics
    import torch
    single = SegMetrics(6).update(torch.from_numpy(p), torch.from_numpy(t)).compute()
    ref = _numpy_metrics(p.ravel(), t.ravel(), 6)
    total = int((t != 255).sum())
    assert 0 < res[0]['local'] < total and res[0]['local'] + res[1]['local'] == total  # each rank saw part of it
    for r in res:
        for k in ('miou', 'pixel_acc', 'mean_acc', 'fwiou'):
            assert r[k] == single[k], (k, r[k], single[k])   # exactly, not approximately
            assert abs(r[k] - ref[k]) < 1e-12, (k, r[k], ref[k])
        np.testing.assert_allclose(np.array(r['iou'], dtype=float), ref['iou'], rtol=0, atol=1e-12)

def test_rank_without_images(tmp_path):
    "A rank that evaluated nothing still takes part in the reduction."
    res, p, t = _run(tmp_path, 'empty')
    ref = _numpy_metrics(p.ravel(), t.ravel(), 6)
    assert res[1]['local'] == 0
    for r in res: assert abs(r['miou'] - ref['miou']) < 1e-12
