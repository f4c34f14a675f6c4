"""Triton-backend specifics of group_assign: block boundaries, split reductions, hash keys.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
without CUDA) and on CUDA tensors when a GPU is present. The block sizes these
cases straddle come from ``rexfast.ops.group_assign.triton_kernels._blocks``: BLOCK_N =
max(16, next_pow2(N)); BLOCK_P = 64 / 32 / 32 / 16 for BLOCK_N = 16 / 32 / 64 / 128;
BLOCK_C = 32; BLOCK_D = 64 (32 for BLOCK_N = 64).
"""

import pytest
import torch

from group_assign_cases import (EDGE_CASES, SPEC, assert_one_hot, assert_several_tiles_per_program,
                                force_tiles_per_program, make_case)
from harness import check_against_reference, rel_err, require_backend
from rexfast.ops.gumbel import gumbel_noise_from_key

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_runs():
    require_backend(SPEC, "triton", DEVICE)


def _parity(case, dtype):
    out, _ = check_against_reference(SPEC, case, "triton", dtype)
    assert_one_hot(out[1])


BOUNDARY = [  # (B, N, P, C, D): around BLOCK_P/BLOCK_C/BLOCK_D/BLOCK_N edges
    (1, 1, 63, 33, 65),
    (2, 2, 64, 32, 64),
    (1, 2, 65, 31, 63),
    (1, 16, 129, 16, 16),
    (1, 17, 64, 40, 17),
    (1, 33, 97, 32, 33),
    (1, 128, 33, 20, 9),
    (1, 3, 65, 1025, 5),
    (1, 2, 40, 6, 1025),
]


@pytest.mark.parametrize("shape", BOUNDARY, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noise", ["explicit", "seed"])
def test_block_boundaries_fp32(poisoned_outputs, shape, noise):
    case = make_case(shape, noise=noise, device=DEVICE, seed=sum(shape))
    _parity(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 65, 31, 63), (1, 17, 64, 40, 17)], ids=lambda s: "x".join(map(str, s)))
def test_block_boundaries_half(poisoned_outputs, dtype, shape):
    case = make_case(shape, dtype=dtype, noise="explicit", device=DEVICE, seed=3)
    _parity(case, dtype)


def test_many_tiles_per_split(poisoned_outputs):
    # B=1, P=1100 → 18 pixel tiles over at most 8 (interpreter) programs: each
    # split owns several tiles, so the in-kernel dq̂ read-modify-write and the
    # two-phase forward both run over more than one tile.
    case = make_case((1, 3, 1100, 24, 20), noise="none", device=DEVICE, seed=17)
    _parity(case, torch.float32)


# (shape, programs in all): (2, 3, 300) has T = 5 tiles of 64 pixels per batch item and
# 2 programs each (3 + 2 tiles); (1, 17, 200) has T = 7 tiles of 32 and 3 programs (2 + 2 + 3).
FORCED_MULTI_TILE = [((2, 3, 300, 24, 20), 4), ((1, 17, 200, 40, 17), 3)]


@pytest.mark.parametrize("noise", ["explicit", "none", "seed"])
@pytest.mark.parametrize("shape, programs", FORCED_MULTI_TILE, ids=lambda x: "x".join(map(str, x)) if
                         isinstance(x, tuple) else f"programs{x}")
def test_forced_several_tiles_per_program(monkeypatch, poisoned_outputs, shape, programs, noise):
    launches = force_tiles_per_program(monkeypatch, programs)
    case = make_case(shape, noise=noise, device=DEVICE, seed=sum(shape))
    _parity(case, torch.float32)
    assert_several_tiles_per_program(launches, uneven=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forced_several_tiles_per_program_half(monkeypatch, poisoned_outputs, dtype):
    launches = force_tiles_per_program(monkeypatch, 4)
    _parity(make_case((2, 3, 300, 24, 20), dtype=dtype, noise="explicit", device=DEVICE, seed=9), dtype)
    assert_several_tiles_per_program(launches, uneven=True)


@pytest.mark.parametrize("name", ["ties", "nan_k", "inf_noise", "neg_inf_noise", "nan_v"])
def test_forced_single_program_edge_cases(monkeypatch, poisoned_outputs, name):
    # The edge cases' P = 70 is two tiles of 64: one program per batch item walks both,
    # so a NaN column or tie in either tile must not leak into, or be lost from, the other.
    launches = force_tiles_per_program(monkeypatch, 1)
    check_against_reference(SPEC, EDGE_CASES[name](torch.float32, DEVICE), "triton", torch.float32)
    assert_several_tiles_per_program(launches)


def test_strided_kv_and_noise_dtypes(poisoned_outputs):
    case = make_case((2, 4, 150, 24, 20), noise="explicit", layout="strided", device=DEVICE, seed=3)
    case.kwargs["noise"] = case.kwargs["noise"].double()  # any float dtype of noise is read in-kernel
    q, k, v, tau = case.args
    case.args = (q, k, v, tau.double())
    _parity(case, torch.float32)


@pytest.mark.parametrize("key", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0])
def test_hash_keys_match_reference_noise(key):
    # Keys at int32 edges: the kernel receives the key's int32 bit pattern.
    from rexfast.ops.group_assign import triton_kernels as tk

    case = make_case((2, 3, 70, 8, 6), noise="none", device=DEVICE, seed=4)
    q, k, v, tau = case.args
    tau = tau.reshape(1).float()
    noise = gumbel_noise_from_key(key, (2, 3, 70), dtype=torch.float32, device=DEVICE)
    out_k, assign_k, counts_k = tk.forward(q, k, v, tau, None, key)
    out_n, assign_n, counts_n = tk.forward(q, k, v, tau, noise, None)
    assert torch.equal(assign_k, assign_n)
    assert torch.equal(counts_k, counts_n)
    assert rel_err(out_k, out_n) < 1e-6


def test_counts_and_determinism(poisoned_outputs):
    case = make_case((2, 5, 300, 16, 12), noise="seed", device=DEVICE, seed=8)
    args = [t.detach().clone().requires_grad_(True) for t in case.args]
    out, assign, counts = torch.ops.rexfast.group_assign(*args, None, 12345, "triton")
    assert counts.dtype == torch.float32
    assert torch.equal(counts, assign.detach().sum(-1))
    dout, dassign = torch.ones_like(out), torch.full_like(assign, 0.5)
    first = torch.autograd.grad((out, assign), args, (dout, dassign))
    out2, assign2, counts2 = torch.ops.rexfast.group_assign(*args, None, 12345, "triton")
    second = torch.autograd.grad((out2, assign2), args, (dout, dassign))
    assert torch.equal(out, out2) and torch.equal(assign, assign2) and torch.equal(counts, counts2)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "backward must be bitwise reproducible"


def test_empty_batch_returns_empty_outputs():
    from rexfast.ops.group_assign import triton_kernels as tk

    q, k, v = torch.randn(0, 2, 8), torch.randn(0, 10, 8), torch.randn(0, 10, 4)
    tau = torch.tensor([0.5])
    out, assign, counts = tk.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tau.to(DEVICE), None, None)
    assert out.shape == (0, 2, 4) and assign.shape == (0, 2, 10) and counts.shape == (0, 2)
    dq, dk, dv, dtau = tk.backward(out, assign, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tau.to(DEVICE), None, None,
                                   out, counts)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and float(dtau) == 0.0
