"""ms_deform_attn on CUDA tensors (the "triton" and "cuda" backends) at ReLA's
pixel-decoder shapes, both value-gradient modes, and reproducibility. The generic
parity over shapes, dtypes and edge cases runs in test_group_assign_gpu.py over
every spec in test_parity.SPECS (ms_deform_attn included).

Every test is marked ``gpu`` (skipped without a CUDA device, see conftest.py).
"""

import pytest
import torch

from harness import check_against_reference, require_backend
from ms_deform_attn_cases import SPEC, make_case
from rexfast.ops import ms_deform_attn

pytestmark = pytest.mark.gpu

# ReLA: batch 2, levels 15², 30², 60² (4725 queries = 4725 pixels), 8 heads, D = 32, 4 points
RELA = (2, 4725, 8, 32, 4, 15, 15, 30, 30, 60, 60)


def _need(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_backend(SPEC, backend, "cuda")


@pytest.fixture(params=[True, False], ids=["deterministic", "atomic"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rela_shape(deterministic, backend, dtype):
    _need(backend)
    case = make_case(RELA, dtype=dtype, device="cuda", seed=21)
    check_against_reference(SPEC, case, backend, dtype, device_type="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rela_shape_strided_value(deterministic, backend):
    _need(backend)
    case = make_case(RELA, device="cuda", seed=5, layout="strided")
    assert case.args[0].stride(-1) == 1 and not case.args[0].is_contiguous()
    check_against_reference(SPEC, case, backend, torch.float32, device_type="cuda")


def test_cuda_float64():
    _need("cuda")
    case = make_case((2, 300, 8, 32, 4, 15, 15, 30, 30), dtype=torch.float64, device="cuda", seed=2)
    check_against_reference(SPEC, case, "cuda", torch.float64, device_type="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_mode_is_bitwise_reproducible(backend):
    _need(backend)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        value, shapes, starts, loc, attn = make_case(RELA, device="cuda", seed=4).args
        results = []
        for _ in range(3):
            leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
            results.append((out, *torch.autograd.grad(out, leaves, torch.cos(out.detach()))))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_cuda_and_triton_agree():
    _need("cuda")
    _need("triton")
    value, shapes, starts, loc, attn = make_case(RELA, device="cuda", seed=6).args
    outs = {b: ms_deform_attn(value, shapes, starts, loc, attn, backend=b) for b in ("cuda", "triton")}
    torch.testing.assert_close(outs["cuda"], outs["triton"], rtol=1e-5, atol=1e-5)
