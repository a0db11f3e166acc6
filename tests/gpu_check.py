"""The GPU self-check (`make gpu-check`): every GPU path at the paper's and the field's sizes, each with its results
checked, the failures raised at the end. It lives beside the tests (not in the package): it is a check, not a benchmark.
It runs on a CPU too, small (`tests/test_gpu_check.py` does, in `make test`), so it is known to work between GPU
sessions. Run it as `python tests/gpu_check.py [--quick] [--out FILE] [--budget-s S]`."""
from __future__ import annotations
import argparse, copy, gc, math, os, subprocess, sys, tempfile, time
from pathlib import Path
import torch
from torch import nn, Tensor
from aicsd.bench import (machine_info, time_interleaved, peak_memory, bench_icsd, bench_step, bench_latency, append_rows,
                         format_tables, VOC_SHAPES, CITYSCAPES_SHAPES, _amp, _dev, _sync)
from aicsd.losses import ce_loss, pixel_kd_loss, icsd_loss, released_icsd_loss
from aicsd.similarity import ics_matrix
from aicsd.models import deeplabv3plus, deeplabv3
from aicsd.objective import DistillObjective
from aicsd.distill import train_step, load_checkpoint
from aicsd.runfolder import read_run
from aicsd.data import make_synthetic
from aicsd.process import native_bf16

def _reps(c)->int: return 1 if c.quick else 3     # timed rounds: one where only the check's working matters (CPU tests)
def _warm(c)->int: return 0 if c.quick else 1     # (quick: the times are reported, not judged)

def _check(ok:bool, msg:str):
    if not ok: raise AssertionError(msg)

def _rel(a:Tensor, b:Tensor)->float: return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

_ICSD = DistillObjective('icsd')   # CE + KD + 0.1 ICSD: the objective the engine runs

def _distill_loss(s:Tensor, t:Tensor, y:Tensor)->Tensor: return _ICSD(s, t, y)[0]

GPU_SECTIONS = ('losses', 'icsd', 'teacher', 'steps', 'default_step', 'eval', 'latency', 'deeplabv3', 'field_cli', 'ddp', 'compile')

def _gpu_losses(c):
    "The ICSD losses on the device in float32 against float64 on the CPU: values and gradients; under bf16 autocast."
    g = torch.Generator().manual_seed(0)
    losses = {'icsd': icsd_loss, 'icsd_row': lambda a, b: icsd_loss(a, b, normalize='row'), 'released': released_icsd_loss}
    for shape in [(2, 21, 65, 65), (2, 19, 64, 128)]:
        s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
        for name, f in losses.items():
            xr = s.double().requires_grad_(); ref = f(xr, t.double()); ref.backward()
            x = s.to(c.dev).clone().requires_grad_(); v = f(x, t.to(c.dev)); v.backward()
            err, gerr = abs(v.item() - ref.item()) / abs(ref.item()), _rel(x.grad.cpu(), xr.grad)
            c.log(check=f'{name} {c.dev.type} fp32 vs cpu fp64', shape=shape, rel_err=err, grad_rel_err=gerr)
            _check(err < 1e-4 and gerr < 1e-3, f"{name} on {c.dev.type} differs from float64: value {err:.2e}, gradient {gerr:.2e}")
            with torch.autocast(c.dev.type, dtype=torch.bfloat16): va = f(s.to(c.dev), t.to(c.dev))
            _check(va.dtype == torch.float32 and abs(va.item() - v.item()) <= 1e-5 * abs(v.item()),
                   f"{name} under bf16 autocast: {va.item()} vs {v.item()} ({va.dtype})")

def _gpu_icsd(c):
    "ICSD and the released loss against the floor: time and peak memory at the VOC and Cityscapes shapes."
    shapes = [(2, 21, 129, 129)] if c.quick else VOC_SHAPES + CITYSCAPES_SHAPES
    for r in bench_icsd(shapes, device=c.dev, repeats=3, loop_limit=3e10 if c.quick else 0): c.log(check='bench_icsd', **r)
    _icsd_compiled(c)

def _icsd_compiled(c):
    """Issue 21 asks for ICSD in at most 1 ms on CUDA at 8 x 21 x 513 x 513 (forward and backward), where the fused
    kernels take 3-5 ms, launch-bound. The candidates, timed against them and checked against float64 on the CPU:
    the autograd formulas (`bench._icsd_plain`, `bench._released_plain`) under torch.compile (inductor fuses the
    softmax, logarithm and exponentials into a few kernels) and, on CUDA, under mode='reduce-overhead' (CUDA graphs:
    one launch replays the whole sequence). A variant that is exact and at most 1 ms is the one to adopt."""
    from aicsd.bench import _icsd_plain, _released_plain
    shape = (2, 21, 129, 129) if c.quick else (8, 21, 513, 513)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    backend = 'inductor' if c.dev.type == 'cuda' else 'eager'       # a CPU may have no C++ compiler for inductor
    cands = {'icsd fused': (icsd_loss, _icsd_plain), 'released fused': (released_icsd_loss, _released_plain),
             'icsd compiled': (torch.compile(_icsd_plain, backend=backend), _icsd_plain),
             'released compiled': (torch.compile(_released_plain, backend=backend), _released_plain)}
    if c.dev.type == 'cuda':
        cands['icsd compiled, CUDA graphs'] = (torch.compile(_icsd_plain, mode='reduce-overhead'), _icsd_plain)
        cands['released compiled, CUDA graphs'] = (torch.compile(_released_plain, mode='reduce-overhead'), _released_plain)
    sd, td = s.to(c.dev), t.to(c.dev)
    fns, errs, refs = {}, {}, {}
    for name, (f, ref_f) in cands.items():
        if ref_f not in refs:                                          # each float64 reference once (tens of seconds on a CPU)
            xr = s.double().requires_grad_(); ref = ref_f(xr, t.double()); ref.backward(); refs[ref_f] = (ref.detach(), xr.grad)
        ref, ref_grad = refs[ref_f]
        for _ in range(3):                                             # compile, record the CUDA graphs, then check
            x = sd.clone().requires_grad_(); v = f(x, td); v.backward()
        errs[name] = (abs(v.item() - ref.item()) / abs(ref.item()), _rel(x.grad.cpu(), ref_grad))
        _check(errs[name][0] < 1e-4 and errs[name][1] < 1e-3,
               f"{name} differs from float64: value {errs[name][0]:.2e}, gradient {errs[name][1]:.2e}")
        def step(f=f):
            z = sd.detach().requires_grad_(); f(z, td).backward()
        fns[name] = step
    times = time_interleaved(fns, 1 if c.quick else 10, warmup=0 if c.quick else 1, device=c.dev)
    for name in cands:
        tm = min(times[name]); lim = 1e-3 if name.startswith('icsd') else 2e-3
        c.log(check=f'icsd variants {"x".join(map(str, shape))}', variant=name, time_ms=tm * 1e3,
              rel_err=errs[name][0], grad_rel_err=errs[name][1], goal_ms=lim * 1e3, within_goal=tm <= lim)

def _gpu_inputs(c):
    "Images, labels and the R101 teacher's fp32 logits shared by the sections (made once)."
    if c.x is None:
        torch.manual_seed(0)
        c.x = torch.randn(c.batch, 3, c.crop, c.crop, device=c.dev)
        c.y = torch.randint(0, c.num_classes, (c.batch, c.crop, c.crop), device=c.dev); c.y[:, :, :c.crop // 8] = 255
        T = deeplabv3plus(c.teacher, c.num_classes).to(c.dev).eval()
        with torch.no_grad(): c.t32 = T(c.x / 256).float()
        c.T = T
    return c.x, c.y, c.t32

def _gpu_teacher(c):
    "The frozen teacher in bf16 and fp16 against fp32 (images scaled so that fp16 holds the random network's activations)."
    x, y, t32 = _gpu_inputs(c)
    with torch.no_grad():
        for p in ('bf16', 'fp16'):
            with _amp(c.dev, p): th = c.T(x / 256).float()
            _check(torch.isfinite(th).all().item(), f"teacher logits under {p} autocast are not finite")
            e, ie = _rel(th, t32), _rel(ics_matrix(th), ics_matrix(t32))
            c.log(check=f'teacher {c.teacher} {p} vs fp32', logits_rel_diff=e, ics_rel_diff=ie,
                  argmax_agreement=(th.argmax(1) == t32.argmax(1)).float().mean().item())
            _check(e < 0.05, f"teacher under {p}: logits differ from fp32 by {e:.3g} (relative)")

def _gpu_steps(c):
    "Each student: loss terms per precision (eval mode), then distillation steps in every variant beside the released-style step."
    x, y, t32 = _gpu_inputs(c)
    for student in c.students:
        torch.manual_seed(0)
        S = deeplabv3plus(student, c.num_classes).to(c.dev).eval()
        ref = None
        for p in ('fp32', 'bf16', 'fp16'):
            with torch.no_grad(), _amp(c.dev, p): s = S(x).float()
            terms = dict(ce=ce_loss(s, y).item(), kd=pixel_kd_loss(s, t32, target=y).item(), icsd=icsd_loss(s, t32).item())
            _check(all(math.isfinite(v) for v in terms.values()), f"{student} under {p}: loss terms {terms}")
            if ref is None: ref, s32 = terms, s
            diff = {k: abs(v - ref[k]) / max(abs(ref[k]), 1e-12) for k, v in terms.items()}
            e = _rel(s, s32)
            c.log(check=f'{student} {p} vs fp32 (eval)', logits_rel_diff=e, **{f'{k}_rel_diff': v for k, v in diff.items()})
            _check(e < 0.05 and max(diff.values()) < 0.05,
                   f"{student} under {p}: logits differ from fp32 by {e:.3g}, loss terms by {diff} (relative)")
        del S
        variants = [dict(name='ours fp32', style='ours'), dict(name='ours fp32, teacher bf16', teacher_amp='bf16'),
                    dict(name='ours bf16', amp='bf16'), dict(name='ours fp16+GradScaler', amp='fp16'),
                    dict(name='ours fp32 channels-last', channels_last=True),
                    dict(name='ours bf16 channels-last', amp='bf16', channels_last=True),
                    dict(name='ours bf16 channels-last cudnn.benchmark', amp='bf16', channels_last=True, cudnn_benchmark=True),
                    dict(name='released-style fp32', style='released')]
        rows = bench_step(variants, c.teacher, student, c.crop, c.batch, c.num_classes, device=c.dev, repeats=_reps(c))
        for r in rows:
            _check(math.isfinite(r['loss']), f"{student} step {r['variant']}: loss {r['loss']}")
            c.log(check=f'step {c.teacher} -> {student}', **r)
        rel = rows[-1]
        for o in rows[:2]:
            c.log(check=f'goal {student}: ours >= 2x released-style fp32, memory <=', variant=o['variant'],
                  speedup=rel['time_s'] / o['time_s'], memory_ratio=o.get('peak_mb', 0) / max(rel.get('peak_mb', 1), 1e-9),
                  met=rel['time_s'] / o['time_s'] >= 2 and o.get('peak_mb', 0) <= rel.get('peak_mb', 0))
        gc.collect(); torch.cuda.empty_cache()

def _eval_at(c, check:str, m, size:tuple, **extra)->dict:
    "One `1 x 3 x size` image through `m` in fp32 and bf16: images/s and peak memory logged; the outputs returned."
    xe, outs = torch.randn(1, 3, *size, device=c.dev), {}
    for p in ('fp32', 'bf16'):
        def f():
            with torch.inference_mode(), _amp(c.dev, p): return m(xe)
        outs[p] = out = f().float()
        _check(out.shape == (1, 19, *size) and torch.isfinite(out).all().item(), f"{check} {p} at {size}: bad output")
        t = min(time_interleaved({'e': f}, _reps(c), warmup=_warm(c), device=c.dev)['e'])
        c.log(check=check, **extra, dtype=p, images_per_s=1 / t, peak_mb=peak_memory(f, c.dev) / 2**20)
    return outs

def _gpu_eval(c):
    "Evaluation of each network on one Cityscapes-sized image (1024 x 2048) in fp32 and bf16: images/s and peak memory."
    # quick on a CPU without bf16 instructions: bf16 is emulated there (35x fp32), so a smaller image checks the same code
    size = ((64, 128) if c.dev.type == 'cpu' and not native_bf16(c.dev) else (256, 512)) if c.quick else (1024, 2048)
    for bb in dict.fromkeys((c.teacher, *c.students)):
        torch.manual_seed(0)
        m = deeplabv3plus(bb, 19).to(c.dev).eval()
        outs = _eval_at(c, f'eval {size[0]}x{size[1]}', m, size, backbone=bb)
        agree = (outs['bf16'].argmax(1) == outs['fp32'].argmax(1)).float().mean().item()
        c.log(check=f'eval {bb} bf16 vs fp32', argmax_agreement=agree, logits_rel_diff=_rel(outs['bf16'], outs['fp32']))
        del m; gc.collect(); torch.cuda.empty_cache()

def _gpu_latency(c):
    "Eval-mode cost of every backbone (params, GMACs, images/s at batch 1 and 8, fp32 and bf16)."
    for r in bench_latency(device=c.dev, quick=c.quick, repeats=3): c.log(check='latency', **r)

def _gpu_ddp(c):
    "torchrun on every GPU: train a teacher, then distil with AICSD (NCCL, SyncBatchNorm from 2 GPUs; bf16); the first loss must match one process."
    from aicsd.data import make_synthetic
    n = torch.cuda.device_count() if c.dev.type == 'cuda' else 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_synthetic(tmp / 'syn', n_train=8 * n, n_val=4, size=160)
        common = ['--data', 'synthetic', '--data-root', root, '--crop-size', 129, '--batch-size', 4, '--max-steps', 3,
                  '--log-every', 1, '--device', c.dev.type, '--no-tensorboard', '--no-figures', '--quiet', '--seed', 0]
        amp = ['--precision', 'bf16'] if c.dev.type == 'cuda' else []
        tr = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', '-m', 'aicsd.cli']
        one = [sys.executable, '-m', 'aicsd.cli']
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        def run(cmd, what):
            t0 = time.perf_counter()
            p = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, env=env, timeout=600)
            _check(p.returncode == 0, f"{what} exited {p.returncode}:\n{p.stderr[-3000:]}")
            return time.perf_counter() - t0
        dt = run([*tr, 'train', '--model', 'resnet18', *common, *amp, '--sync-bn', '--out', tmp / 't'], 'torchrun train')
        how = ((('NCCL' if c.dev.type == 'cuda' else 'gloo') + ', SyncBatchNorm') if n > 1 else
               'one process: no process group, no DDP or SyncBatchNorm (those need 2 GPUs)') + ', bf16' * bool(amp)
        c.log(check=f'torchrun train x{n} ({how})', wall_s=dt, steps=len(read_run(tmp / 't')['train']['step']))
        _check((tmp / 't/last.pt').is_file(), "torchrun train wrote no last.pt")
        dis = ['distill', '--teacher', tmp / 't/last.pt', '--student', 'mobilenetv2', '--method', 'aicsd', *common]
        dt = run([*tr, *dis, *amp, '--sync-bn', '--out', tmp / 'd'], 'torchrun distill')
        run([*one, *dis, *amp, '--out', tmp / 'd1', '--batch-size', 4 * n], 'one-process distill')
        l, l1 = (float(read_run(tmp / r)['train']['loss'][0]) for r in ('d', 'd1'))
        c.log(check=f'torchrun distill x{n} vs one process', wall_s=dt, loss_step1=l, loss_step1_one_process=l1,
              rel_diff=abs(l - l1) / abs(l1))
        _check(math.isfinite(l) and abs(l - l1) <= 0.02 * abs(l1),
               f"first distillation loss under torchrun ({l}) differs from one process ({l1})")
        # --compile under torchrun, stopped and resumed by a new torchrun (issue 21): inductor on CUDA (the eager backend
        # on a CPU, which may have no C++ compiler); the checkpoint holds the plain modules' state_dict
        cd = [*tr, *dis, *amp, '--sync-bn', '--compile', 'inductor' if c.dev.type == 'cuda' else 'eager', '--max-steps', 4,
              '--out', tmp / 'dc']
        dt0 = run([*cd, '--stop-after', 2], 'compiled torchrun distill, first 2 steps')
        dt1 = run([*cd, '--resume'], 'compiled torchrun distill, resumed')
        ck = load_checkpoint(tmp / 'dc' / 'last.pt')
        lc = [float(v) for v in read_run(tmp / 'dc')['train']['loss']]
        c.log(check=f'torchrun distill x{n} --compile, stopped and resumed', wall_s_first=dt0, wall_s_resumed=dt1,
              steps=ck['global_step'], loss_last=lc[-1])
        _check(ck['global_step'] == 4 and all(math.isfinite(v) for v in lc) and len(lc) == 4,
               f"compiled, resumed torchrun distill: step {ck['global_step']}, losses {lc}")
        _check(not any(k.startswith('_orig_mod') or k.startswith('module.') for k in ck['model']),
               "a compiled DDP run saved wrapped keys: " + ', '.join(list(ck['model'])[:3]))

def _gpu_compile(c):
    "torch.compile of each student: compiled logits against eager ones (TF32 off), then compiled bf16 training steps."
    x, y, t32 = _gpu_inputs(c)
    for student in c.students:
        if c.over(): c.log(check=f'{student} compile', skipped='time budget spent'); continue
        torch.manual_seed(0)
        S = deeplabv3plus(student, c.num_classes).to(c.dev).eval()
        Sc = torch.compile(S)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            t0 = time.perf_counter()
            with torch.no_grad(): e, cl = S(x), Sc(x)
            tce = time.perf_counter() - t0
        finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        err = _rel(cl, e)
        c.log(check=f'{student} compiled vs eager (fp32, eval)', rel_diff=err, compile_s=tce)
        _check(err < 1e-3, f"{student}: compiled logits differ from eager by {err:.3g} (relative)")
        # gradients of one training step (fp32, TF32 off) from the same weights, eager and compiled, each against
        # float64 eager: the compiled error may not exceed 10x eager float32's own error (its noise floor)
        S.train()
        for mod in S.modules():                      # dropout off: compiled code draws its masks from another generator
            if isinstance(mod, nn.Dropout): mod.eval()
        E2 = copy.deepcopy(S); Ec = torch.compile(E2); S64 = copy.deepcopy(S).double()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            res = {}
            for name, net, run, dt in (('eager', S, S, torch.float32), ('compiled', E2, Ec, torch.float32),
                                       ('float64', S64, S64, torch.float64)):
                net.zero_grad(set_to_none=True)
                l = _distill_loss(run(x.to(dt)), c.t32.to(dt), y); l.backward()
                res[name] = (l.item(), torch.cat([p.grad.flatten() for p in net.parameters()]))
        finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        (l64, g64), err = res['float64'], {}
        for k in ('eager', 'compiled'): err[k] = (abs(res[k][0] - l64) / abs(l64), _rel(res[k][1], g64))
        c.log(check=f'{student} compiled vs eager (fp32 training step, each vs float64)', loss_err_eager=err['eager'][0],
              loss_err_compiled=err['compiled'][0], grad_err_eager=err['eager'][1], grad_err_compiled=err['compiled'][1])
        _check(all(err['compiled'][i] <= 10 * err['eager'][i] + 1e-6 for i in (0, 1)),
               f"{student}: a compiled training step is further from float64 than eager float32: {err}")
        del S64, E2, Ec
        S.train(); opt = torch.optim.SGD(S.parameters(), lr=1e-4, momentum=0.9)
        def step(model):
            def f():
                with torch.autocast(c.dev.type, dtype=torch.bfloat16): s = model(x)
                l = _distill_loss(s.float(), t32, y); opt.zero_grad(set_to_none=True); l.backward(); opt.step()
                return l.detach()
            return f
        t0 = time.perf_counter(); l0 = step(Sc)(); _sync(c.dev); tc = time.perf_counter() - t0
        times = time_interleaved({'compiled': step(Sc), 'eager': step(S)}, _reps(c), warmup=_warm(c), device=c.dev)
        l1 = step(Sc)().item()
        _check(math.isfinite(l0.item()) and math.isfinite(l1), f"{student}: compiled steps give loss {l0.item()}, {l1}")
        c.log(check=f'{student} compiled bf16 step', compile_and_first_step_s=tc, time_s=min(times['compiled']),
              eager_time_s=min(times['eager']), images_per_s=c.batch / min(times['compiled']), loss=l1)
        del S, Sc, opt; gc.collect(); torch.cuda.empty_cache()

def _gpu_deeplabv3(c):
    "The field's DeepLabV3 pair (R101 -> R18 / MBV2): step time, memory and images/s at 512 x 1024 through the engine's\n    `train_step` (fp32 and bf16 + channels-last), and whole-image evaluation at 1024 x 2048."
    crop, full = ((32, 64), (64, 128)) if c.quick else ((512, 1024), (1024, 2048))
    torch.manual_seed(0)
    T = deeplabv3('resnet101', 19, aux=True).to(c.dev).eval().requires_grad_(False)
    x = torch.randn(c.batch, 3, *crop, device=c.dev); y = torch.randint(0, 19, (c.batch, *crop), device=c.dev)
    for student in ('resnet18', 'mobilenetv2'):
        for prec, mf in (('fp32', torch.contiguous_format), ('bf16', torch.channels_last)):
            torch.manual_seed(0)
            S = deeplabv3(student, 19).to(c.dev, memory_format=mf).train()
            Tm = T.to(memory_format=mf); xm = x.to(memory_format=mf)
            opt = torch.optim.SGD(S.parameters(), lr=1e-3, momentum=0.9)
            dt = torch.bfloat16 if prec == 'bf16' else None
            f = lambda: train_step(S, Tm, _ICSD, xm, y, opt, amp_dtype=dt)
            loss = float(f()[0]); _check(math.isfinite(loss), f"DeepLabV3 {student} {prec} step: loss {loss}")
            t = min(time_interleaved({'s': f}, _reps(c), warmup=_warm(c), device=c.dev)['s'])
            c.log(check=f'deeplabv3 r101 -> {student} step {crop[0]}x{crop[1]}', precision=prec, batch=c.batch, time_s=t,
                  images_per_s=c.batch / t, peak_mb=peak_memory(f, c.dev) / 2**20, loss=loss)
            del S, opt; gc.collect(); torch.cuda.empty_cache() if c.dev.type == 'cuda' else None
    for bb, m in (('resnet101', T), ('resnet18', deeplabv3('resnet18', 19).to(c.dev).eval()),
                  ('mobilenetv2', deeplabv3('mobilenetv2', 19).to(c.dev).eval())):
        _eval_at(c, f'deeplabv3 {bb} whole-image eval {full[0]}x{full[1]}', m, full)

def _gpu_field_cli(c):
    "A short `aicsd distill` in the field's protocol through the command line: a field teacher file, DeepLabV3 students,\n    synthetic data at Cityscapes size, loader workers, automatic precision, a checkpoint, an evaluation and a resume."
    size, crop = ((64, 128), '32x64') if c.quick else ((1024, 2048), '512x1024')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_synthetic(tmp / 'syn', n_train=8, n_val=2, size=size, num_classes=19, seed=0)
        torch.manual_seed(0); torch.save(deeplabv3('resnet101', 19, aux=True).state_dict(), tmp / 'teacher.pth')
        cmd = [sys.executable, '-m', 'aicsd.cli', 'distill', '--arch', 'deeplabv3', '--teacher', tmp / 'teacher.pth',
               '--student', 'resnet18', '--aux-weight', '0.4', '--method', 'aicsd', '--data', 'synthetic', '--data-root', root,
               '--crop-size', crop, '--batch-size', 2, '--workers', 2, '--max-steps', 4, '--stop-after', 2,
               '--device', c.dev.type, '--out', tmp / 'run']
        for extra in ([], ['--resume']):
            t0 = time.perf_counter()
            try: p = subprocess.run([str(a) for a in cmd + extra], capture_output=True, text=True, timeout=300 if c.quick else 900)
            except subprocess.TimeoutExpired as e:   # what it printed before it stalled (a loader that never delivered, ...)
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or '')
                raise AssertionError(f"field-protocol distill {extra} ran past {e.timeout:.0f} s; its stderr: {err[-3000:]}") from None
            _check(p.returncode == 0 and 'Traceback' not in p.stderr, f"field-protocol distill {extra}: {p.stderr[-3000:]}")
            c.log(check=f"field protocol on the command line{' (resumed)' if extra else ''}", wall_s=time.perf_counter() - t0,
                  precision=load_checkpoint(tmp / 'run' / 'last.pt').get('decided'))
        ck = load_checkpoint(tmp / 'run' / 'best.pt')
        _check(ck['global_step'] == 4 and math.isfinite(ck['metrics']['miou']), f"field-protocol run: {ck['global_step']} steps")

def _gpu_default_step(c):
    """The step a plain `aicsd distill` runs (no precision flags: the engine's A/B on the first validation image decides;
    channels-last on CUDA) against the released-style fp32 step, same teacher weights, batch and crop: time and peak
    memory (issue 21's goal: at least 3x faster, at most 0.4x the memory). The teacher is trained first for 200
    steps, so that it is confident as a real one is: a random teacher's ICS matrices move under bf16 and the
    A/B then keeps it in fp32, which no user with a trained teacher would see."""
    from aicsd.distill import build_run, make_config
    from aicsd.objective import alw_alpha
    from aicsd.data import get_dataset, train_transform, build_loader, close_loader
    from aicsd.models import save_model
    from aicsd.precision import resolve_precision
    from aicsd.bench import _step_fn
    steps, small = (6, 33) if c.quick else (200, 129)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_synthetic(tmp / 'syn', n_train=64, n_val=2, size=c.crop + 32, num_classes=c.num_classes, seed=0)
        torch.manual_seed(0)
        T = deeplabv3plus(c.teacher, c.num_classes).to(c.dev).train()
        opt = torch.optim.SGD(T.parameters(), lr=0.01, momentum=0.9)
        dl = build_loader(get_dataset('synthetic', root, 'train', train_transform(small)), c.batch, train=True,
                          num_workers=4 if c.dev.type == 'cuda' else 0)    # decoding 545 px PNGs would set the pace
        t0, done, base = time.perf_counter(), 0, DistillObjective('baseline')
        while done < steps:
            for x, y in dl:
                l, _ = train_step(T, None, base, x.to(c.dev), y.to(c.dev), opt,
                                  amp_dtype=torch.bfloat16 if c.dev.type == 'cuda' else None)
                done += 1
                if done == steps: break
        c.log(check=f'default step: teacher {c.teacher} trained', steps=steps, crop=small, loss=float(l),
              wall_s=time.perf_counter() - t0)
        _check(math.isfinite(float(l)), f"teacher training: loss {float(l)}")
        save_model(T, tmp / 'teacher.pt'); close_loader(dl); del T, opt, dl
        for student in c.students:
            run = build_run(make_config(mode='distill', teacher=str(tmp / 'teacher.pt'), model=student, data='synthetic',
                                        data_root=str(root), num_classes=c.num_classes, crop_size=c.crop,
                                        batch_size=c.batch, workers=0, device=c.dev.type, out=str(tmp / f'run-{student}'),
                                        quiet=True, tensorboard=False, figures=False, max_steps=10))
            resolve_precision(run)
            x, y = next(iter(run.loader))                                  # (workers=0: no process to stop)
            x = x.to(run.device, dtype=run.dtype, memory_format=run.memory_format); y = y.to(run.device)
            alpha = alw_alpha(0, run.total)
            def ours():
                return train_step(run.model, run.teacher, run.objective, x, y, run.opt, run.sched, run.scaler, alpha=alpha,
                                  amp_dtype=run.amp_dtype, teacher_dtype=run.teacher_dtype)[0]
            Tr = copy.deepcopy(run.teacher).float().to(memory_format=torch.contiguous_format).requires_grad_(True)
            Sr = deeplabv3plus(student, c.num_classes).to(c.dev)
            xr = x.float().contiguous()
            rel = _step_fn(Tr, Sr, torch.optim.SGD(Sr.parameters(), lr=1e-4, momentum=0.9), xr, y, style='released')
            how = (f"student {'bf16' if run.amp_dtype == torch.bfloat16 else 'fp32'}, teacher "
                   f"{'bf16' if run.teacher_dtype == torch.bfloat16 else 'fp32'}, "
                   f"{'channels-last' if run.memory_format == torch.channels_last else 'contiguous'}")
            loss = float(ours()); _check(math.isfinite(loss), f"{student} default step: loss {loss}")
            times = time_interleaved({'ours': ours, 'released': rel}, _reps(c), warmup=_warm(c), device=c.dev)
            mem = {k: peak_memory(f, c.dev) / 2**20 for k, f in (('ours', ours), ('released', rel))}
            sp, mr = min(times['released']) / min(times['ours']), mem['ours'] / max(mem['released'], 1e-9)
            for k in ('ours', 'released'):
                c.log(check=f'default step {c.teacher} -> {student}', variant='aicsd distill, no flags' if k == 'ours'
                      else 'released-style fp32', how=how if k == 'ours' else 'fp32, teacher with autograd', batch=c.batch,
                      crop=c.crop, time_s=min(times[k]), images_per_s=c.batch / min(times[k]), peak_mb=mem[k])
            c.log(check=f'goal {student}: aicsd distill (no flags) >= 3x released-style fp32, memory <= 0.4x',
                  variant=f'aicsd distill, no flags ({how})', target='>= 3 x released-style, memory <= 0.4 x',
                  speedup=sp, memory_ratio=mr, met=sp >= 3 and mr <= 0.4, decided=dict(run.decided),
                  why=f"it ran with {how}: in fp32 the bound is (3T+3S)/(T+3S) = 1.8-1.9x; 3x needs bf16 and channels-last")
            run = Tr = Sr = rel = None; gc.collect(); torch.cuda.empty_cache() if c.dev.type == 'cuda' else None

class _GPUCheck:
    "What the sections share: device, sizes, the log, the time budget and the inputs made once."
    def __init__(self, **kw): self.__dict__.update(kw); self.x = None; self.t0 = time.perf_counter()
    def over(self)->bool: return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

def gpu_check(quick:bool=False, # small crops and batch (a minute)
              device='cuda', # 'cuda' (or 'cpu' for a smoke test of this code)
              batch:int=8, crop:int=513, num_classes:int=21,
              teacher:str='resnet101', students=('resnet18', 'mobilenetv2'),
              sections=GPU_SECTIONS, # which checks, in this order (leave out 'compile' to skip torch.compile)
              budget_s:float|None=None, # sections that start after this many seconds are skipped (and say so)
              out:str|Path|None=None, # append each row to this JSON-lines file as it is measured (`append_rows`)
              verbose:bool=True, # print each row as it is measured
             )->list: # rows of measurements; raises AssertionError naming every failed section, after running all
    "Exercise and check the GPU paths; every section runs even when one fails, and the failures are raised at the end."
    dev = _dev(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    if bad := [s for s in sections if s not in GPU_SECTIONS]:
        raise ValueError(f"unknown gpu_check section(s) {bad}; choose from {', '.join(GPU_SECTIONS)}")
    if quick: batch, crop = min(batch, 2), min(crop, 129)
    rows, fails = [], []
    def log(**row):
        rows.append(row)
        if verbose: print(row, flush=True)
        if out is not None: append_rows(out, [row], bench='gpu')
    c = _GPUCheck(dev=dev, quick=quick, batch=batch, crop=crop, num_classes=num_classes, teacher=teacher,
                  students=tuple(students), budget_s=budget_s, log=log)
    log(check='machine', **machine_info())
    fns = dict(losses=_gpu_losses, icsd=_gpu_icsd, teacher=_gpu_teacher, steps=_gpu_steps, default_step=_gpu_default_step,
               eval=_gpu_eval,
               latency=_gpu_latency, deeplabv3=_gpu_deeplabv3, field_cli=_gpu_field_cli, ddp=_gpu_ddp, compile=_gpu_compile)
    for name in sections:
        if c.over(): log(check=name, status='skipped: time budget spent'); continue
        t0 = time.perf_counter()
        try: fns[name](c); log(check=name, status='ok', seconds=time.perf_counter() - t0)
        except Exception as e:
            fails.append(f"{name}: {type(e).__name__}: {e}")
            log(check=name, status='FAIL', seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e)[:2000]}")
        if dev.type == 'cuda': torch.cuda.empty_cache()
    if fails:
        err = AssertionError("gpu_check failed in " + "\n".join(fails)); err.rows = rows
        raise err
    return rows

def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='small crops and batch (a minute)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--out', default=None, help='append every row to this JSON-lines file as it is measured')
    p.add_argument('--budget-s', type=float, default=None, help='skip the sections that would start after this many seconds')
    p.add_argument('--sections', nargs='+', default=GPU_SECTIONS, choices=GPU_SECTIONS)
    a = p.parse_args(argv)
    if torch.device(a.device).type == 'cuda' and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --device cpu runs a smoke test", file=sys.stderr)
        return 2
    try: rows = gpu_check(quick=a.quick, device=a.device, out=a.out, budget_s=a.budget_s, sections=tuple(a.sections))
    except AssertionError as e:
        print(format_tables(getattr(e, 'rows', [])), flush=True); print_goals(getattr(e, 'rows', []), a.device)
        print(f"gpu_check: {e}", file=sys.stderr); return 1
    print(format_tables(rows)); print_goals(rows, a.device); return 0

def print_goals(rows:list, device:str='cuda'):
    "The goals (`aicsd.bench.goals`) that these rows can judge, as a table."
    from aicsd.bench import goals, format_rows
    g = goals({'icsd': [r for r in rows if r.get('check') == 'bench_icsd'], 'gpu': rows}, torch.device(device).type)
    if g: print('\n## goals\n\n' + format_rows(g), flush=True)

if __name__ == '__main__': sys.exit(main())
