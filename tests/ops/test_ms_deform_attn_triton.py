"""Triton-backend specifics of ms_deform_attn: both value-gradient modes (atomics and
the deterministic sort-and-gather), block boundaries, many taps on one value row.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
without CUDA) and on CUDA tensors when a GPU is present. Block sizes these cases
straddle (``rexfast.ops.ms_deform_attn.triton_kernels._blocks``): BLOCK_D =
next_pow2(D) (≥ 2), BLOCK_R = min(64, 2048 / BLOCK_D) rows (≥ 2) in the forward
and min(64, 1024 / BLOCK_D) in the backward; the gather takes min(16, 2048 /
BLOCK_D) taps per step.
"""

import pytest
import torch

from harness import check_against_reference, require_backend
from ms_deform_attn_cases import EDGE_CASES, SPEC, level_tensors, make_case
from rexfast.ops import ms_deform_attn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_runs():
    require_backend(SPEC, "triton", DEVICE)


@pytest.fixture(params=[True, False], ids=["deterministic", "atomic"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    # NaN-filled empties in both modes (the atomic buffer is zero-filled by design)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(previous)


BOUNDARY = [  # (B, Q, M, D, P, levels): around BLOCK_R / BLOCK_D edges and odd shapes
    (1, 3, 1, 1, 1, 2, 3),
    (2, 5, 3, 2, 2, 3, 3, 1, 4),
    (1, 11, 2, 17, 3, 5, 2, 2, 5),
    (1, 16, 4, 64, 2, 4, 6),  # 64 rows: exactly two forward programs (BLOCK_R = 32), four backward (16)
    (1, 9, 2, 65, 2, 3, 5, 2, 2),
    (1, 4, 1, 1024, 2, 3, 3),  # BLOCK_R = 2
]


@pytest.mark.parametrize("shape", BOUNDARY, ids=lambda s: "x".join(map(str, s)))
def test_block_boundaries(deterministic, shape):
    case = make_case(shape, device=DEVICE, seed=sum(shape[:5]))
    check_against_reference(SPEC, case, "triton", torch.float32, device_type=DEVICE)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases_in_both_modes(deterministic, name):
    case = EDGE_CASES[name](torch.float32, DEVICE)
    check_against_reference(SPEC, case, "triton", torch.float32, device_type=DEVICE, grad_seed=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_in_both_modes(deterministic, dtype):
    case = make_case((1, 20, 4, 32, 4, 8, 8, 4, 4, 2, 2), dtype=dtype, device=DEVICE, seed=3, layout="strided")
    check_against_reference(SPEC, case, "triton", dtype, device_type=DEVICE)


def test_many_taps_on_one_value_row(deterministic):
    """Every point of every query samples the same pixel centre: that row gathers
    Q·M·L·P taps (many 16-tap gather steps); its neighbours get the weight-0 taps."""
    shapes, starts = level_tensors([(4, 8)])
    g = torch.Generator().manual_seed(0)
    Q, M, P = 40, 2, 3
    value = torch.randn(1, 32, M, 8, generator=g)
    loc = torch.tensor([3.5 / 8, 1.5 / 4]).expand(1, Q, M, 1, P, 2).contiguous()
    attn = torch.rand(1, Q, M, 1, P, generator=g)
    from harness import Case

    case = Case(tuple(t.to(DEVICE) for t in (value, shapes, starts, loc, attn)))
    check_against_reference(SPEC, case, "triton", torch.float32, device_type=DEVICE)


def test_deterministic_mode_is_bitwise_reproducible():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        value, shapes, starts, loc, attn = make_case((2, 30, 4, 16, 4, 6, 5, 3, 3), device=DEVICE, seed=4).args
        results = []
        for _ in range(2):
            leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="triton")
            results.append((out, *torch.autograd.grad(out, leaves, torch.cos(out.detach()))))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_atomic_and_deterministic_value_gradients_agree():
    from rexfast.ops.ms_deform_attn import triton_kernels as tk

    value, shapes, starts, loc, attn = make_case((2, 30, 4, 16, 4, 6, 5, 3, 3), device=DEVICE, seed=5).args
    grad = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    det = tk.backward(grad, value, shapes, starts, loc, attn, deterministic=True)
    atom = tk.backward(grad, value, shapes, starts, loc, attn, deterministic=False)
    torch.testing.assert_close(det[0], atom[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(det[1], atom[1]) and torch.equal(det[2], atom[2])  # same kernel code for these
