"""GPU checks, skipped where CUDA is absent: the fused ICSD losses on CUDA against float64 on the CPU, their memory
against the autograd implementations, and the quick form of the GPU self-check (`tests/gpu_check.py`) (which raises on wrong results:
non-finite or precision-dependent losses, a teacher that changes under bf16/fp16, compiled logits far from eager)."""
import pytest, torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

def _losses():
    from aicsd.losses import icsd_loss, released_icsd_loss
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 65, 65, generator=g) > 0.2
    return {'icsd': icsd_loss, 'icsd_row_T2': lambda a, b: icsd_loss(a, b, T=2.0, normalize='row'),
            'icsd_mask': lambda a, b: icsd_loss(a, b, mask=mask.to(a.device)), 'released': released_icsd_loss}

@pytest.mark.parametrize('name', ['icsd', 'icsd_row_T2', 'icsd_mask', 'released'])
def test_losses_on_cuda_match_float64(name):
    f = _losses()[name]
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 21, 65, 65, generator=g) * 3, torch.randn(2, 21, 65, 65, generator=g) * 3
    xr = s.double().requires_grad_(); ref = f(xr, t.double()); ref.backward()
    x = s.cuda().requires_grad_(); v = f(x, t.cuda()); v.backward()
    assert v.dtype == torch.float32
    assert abs(v.item() - ref.item()) <= 1e-4 * abs(ref.item()), (v.item(), ref.item())
    assert (x.grad.double().cpu() - xr.grad).norm() <= 1e-3 * xr.grad.norm()
    with torch.autocast('cuda', dtype=torch.bfloat16): va = f(s.cuda(), t.cuda())
    assert va.dtype == torch.float32 and abs(va.item() - v.item()) <= 1e-5 * abs(v.item())

def test_fused_icsd_memory_on_cuda():
    from aicsd.bench import bench_icsd
    rows = bench_icsd([(2, 21, 129, 129)], device='cuda', repeats=2, loop_limit=0)
    x = {r['method']: r['x_logits'] for r in rows}
    floor = min(x['floor'], x['floor_g'])                       # log_softmax output + its gradient (CUDA's
    assert abs(floor - 2.0) < 0.1, x                            # sum().backward() also materialises a 3rd copy)
    assert x['icsd'] < x['icsd_plain'] and x['released'] < x['released_plain'], x
    assert x['icsd'] <= floor + 0.1 and x['released'] <= floor + 0.1, x

def test_logits4_tap_on_cuda():
    from aicsd.models import deeplabv3plus
    m = deeplabv3plus('mobilenetv2', 5).cuda().eval()
    x = torch.randn(2, 3, 65, 49, device='cuda')
    with torch.no_grad(): y, f = m(x, return_features=True)
    assert torch.equal(F.interpolate(f['logits4'], size=x.shape[2:], mode='bilinear', align_corners=True), y)

def test_gpu_check_quick():
    from gpu_check import gpu_check
    rows = gpu_check(quick=True, verbose=False, sections=('losses', 'teacher', 'steps', 'eval'))
    assert [r['status'] for r in rows if 'status' in r] == ['ok'] * 4
    checks = {r['check'] for r in rows}
    assert any(c.startswith('step resnet101 -> resnet18') for c in checks) and any(c.startswith('eval ') for c in checks)
