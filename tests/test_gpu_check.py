"""The GPU self-check (`tests/gpu_check.py`, run by `make gpu-check`) on this CPU, small, so that it is known to work
between GPU sessions (the thresholds are those of the GPU run): the losses against float64, a teacher and a student in
bf16 and fp16 against fp32, every step variant, evaluation, the field's DeepLabV3 pair and a field-protocol run through
the command line; and a failing section does not stop the others."""
import pytest, torch
import gpu_check as G

@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)

def test_refuses_what_it_cannot_run():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='needs a CUDA GPU'): G.gpu_check()
    with pytest.raises(ValueError, match=r"unknown gpu_check section\(s\) \['nccl'\]"):
        G.gpu_check(device='cpu', sections=('losses', 'nccl'))

def test_sections_on_cpu():
    rows = G.gpu_check(device='cpu', quick=True, crop=33, teacher='resnet18', students=('mobilenetv2',),
                       sections=('losses', 'teacher', 'steps', 'eval'), verbose=False)
    assert [r['status'] for r in rows if 'status' in r] == ['ok'] * 4
    assert [r['variant'] for r in rows if r['check'].startswith('step ')] == [
        'ours fp32', 'ours fp32, teacher bf16', 'ours bf16', 'ours fp16+GradScaler', 'ours fp32 channels-last',
        'ours bf16 channels-last', 'ours bf16 channels-last cudnn.benchmark', 'released-style fp32']

def test_default_step_on_cpu():
    "The step a plain `aicsd distill` runs (after a briefly trained teacher), timed against the released-style step."
    rows = G.gpu_check(device='cpu', quick=True, crop=33, teacher='resnet18', students=('mobilenetv2',),
                       sections=('default_step',), verbose=False)
    assert [r['status'] for r in rows if 'status' in r] == ['ok']
    steps = [r for r in rows if r['check'] == 'default step resnet18 -> mobilenetv2']
    assert [r['variant'] for r in steps] == ['aicsd distill, no flags', 'released-style fp32']
    assert steps[0]['how'].startswith('student fp32, teacher ') and steps[0]['how'].endswith(', contiguous')   # CPU: fp32 student
    goal, = [r for r in rows if r['check'].startswith('goal ')]
    assert goal['speedup'] == steps[1]['time_s'] / steps[0]['time_s'] and goal['met'] == (goal['speedup'] >= 3 and goal['memory_ratio'] <= 0.4)
    from aicsd.bench import goals
    assert goals({'gpu': rows}, 'cuda')[0]['target'] == '>= 3 x released-style, memory <= 0.4 x'

def test_field_sections_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv('TMPDIR', str(tmp_path))
    rows = G.gpu_check(device='cpu', quick=True, sections=('deeplabv3', 'field_cli'), verbose=False)
    assert [r['status'] for r in rows if 'status' in r] == ['ok', 'ok'], [r for r in rows if r.get('status') == 'FAIL']
    checks = [r['check'] for r in rows]
    assert sum(c.startswith('deeplabv3 r101 -> ') for c in checks) == 4 and sum('whole-image eval' in c for c in checks) == 6
    assert checks.count('field protocol on the command line (resumed)') == 1

def test_a_failing_section_does_not_stop_the_others(monkeypatch):
    def planted(c): raise AssertionError('planted')
    monkeypatch.setattr(G, '_gpu_losses', planted)
    with pytest.raises(AssertionError) as e:
        G.gpu_check(device='cpu', quick=True, crop=33, sections=('losses', 'icsd'), verbose=False)
    assert str(e.value) == 'gpu_check failed in losses: AssertionError: planted'
    assert [(r['check'], r['status']) for r in e.value.rows if 'status' in r] == [('losses', 'FAIL'), ('icsd', 'ok')]
