"""kernels/group_assign.cu executed on the CPU by cuda_sim: every kernel of the
forward (normalise_rows, assign, pool_partial, nonfinite_total, pool_reduce) and
the backward (normalise_rows, bwd_token_prep, bwd_pixels, dq_partial,
dq_finalize, dtau_finalize), through the host launchers (their tiling and
shared-memory planning included), against the float64 reference of tests/ops.

Covered: the parity shapes of tests/ops (N from 1 to 128, C and D up to 1100,
several pixel tiles, pool segments and dq̂ pixel splits, N and C tiles of the dq̂
product), explicit, in-kernel (seeded) and no noise, strided q/k/v, half,
bfloat16 and double, every edge case of tests/ops (exact ties: the first token
wins; zero rows; NaN and ±inf in q, k, v and the noise; all -inf columns), the
shared-memory plans (q̂/dout staged or not, tiles halved down to 8, the > 48 KiB
opt-in, and the refusal when even 8 pixels do not fit), bad sizes, and bitwise
reproducibility over block schedules and worker threads.

What the simulation cannot see: speed; races under the GPU's memory model (each
simulated thread runs alone until it reaches a barrier or a warp collective;
varying the schedule is the only probe); nvcc's contraction of a*b+c into fma and
--use_fast_math's approximations (this build rounds every operation as written
and uses glibc's expf); warp divergence scheduling. Float32 results are compared
with a tolerance, never bit for bit with a GPU.
"""

from __future__ import annotations

import pytest
import torch

import sim_glue
from cuda_sim_lib import DTYPE_CODE, INVALID_CONFIGURATION, INVALID_VALUE, i64
from group_assign_cases import EDGE_CASES, PARITY_SHAPES, SPEC, assert_one_hot, make_case
from rexfast.ops.group_assign.reference import reference_forward
from rexfast.ops.gumbel import seed_key
from sim_parity import check_against_reference, upstream_for

pytestmark = pytest.mark.cuda_sim


def run_case(sim, case, *, dassign_dtype=None):
    """Forward and backward of the simulated kernels for one case of group_assign_cases."""
    q, k, v, tau = case.args
    noise, seed = case.kwargs.get("noise"), case.kwargs.get("seed")
    key = None if seed is None else seed_key(seed)
    out, assign, counts = sim_glue.group_assign_fwd(sim, q, k, v, tau, noise, key)
    upstream = upstream_for((out, assign))
    dout, dassign = upstream
    if dassign_dtype is not None:
        dassign = dassign.to(dassign_dtype)
    dq, dk, dv, dtau = sim_glue.group_assign_bwd(sim, dout, dassign, q, k, v, tau, noise, key, out, counts)
    return (out, assign, counts), (dq, dk, dv, dtau.reshape(tau.shape)), upstream


def check_case(sim, case, dtype, **kw):
    (out, assign, counts), grads, upstream = run_case(sim, case, **kw)
    check_against_reference(SPEC, case, (out, assign), grads, upstream, dtype)
    q, k, v, tau = case.args
    noise, seed = case.kwargs.get("noise"), case.kwargs.get("seed")
    _, ref_assign, ref_counts = reference_forward(q, k, v, tau, noise, None if seed is None else seed_key(seed))
    # the hard assignment and the counts are exact (NaN where the reference has NaN)
    assert torch.equal(assign.isnan(), ref_assign.isnan()) and torch.equal(assign.nan_to_num(), ref_assign.nan_to_num())
    assert torch.equal(counts.isnan(), ref_counts.isnan()) and torch.equal(counts.nan_to_num(), ref_counts.nan_to_num())
    return out, assign, counts, grads


PARITY = [(shape, "explicit", "contiguous") for shape in PARITY_SHAPES] + [
    ((2, 2, 300, 64, 48), "none", "contiguous"),
    ((2, 2, 300, 64, 48), "seed", "contiguous"),
    ((2, 32, 97, 16, 24), "seed", "strided"),
    ((1, 8, 129, 32, 16), "none", "strided"),
    ((1, 2, 33, 5, 1100), "explicit", "contiguous"),  # D > 1024: two pooling passes
]


@pytest.mark.parametrize("shape,noise,layout", PARITY, ids=lambda x: str(x).replace(" ", ""))
def test_matches_float64_reference(sim, shape, noise, layout):
    case = make_case(shape, noise=noise, layout=layout, seed=sum(shape))
    _, assign, _, _ = check_case(sim, case, torch.float32)
    assert_one_hot(assign)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SPEC.dtype_shapes)
def test_other_dtypes(sim, dtype, shape):
    check_case(sim, make_case(shape, dtype=dtype, noise="explicit", seed=3), dtype)


@pytest.mark.parametrize("name", [n for n in EDGE_CASES if n != "empty_batch"])
def test_edge_cases(sim, name):
    """Ties (first token wins), zero rows, NaN/±inf in every input, -inf noise columns."""
    check_case(sim, EDGE_CASES[name](torch.float32, "cpu"), torch.float32)


def test_dassign_in_the_accumulation_type(sim):
    """dassign of another dtype than the inputs is read through dassign_acc."""
    case = make_case((2, 3, 70, 16, 8), noise="explicit", seed=9)
    (out, assign, _), grads, upstream = run_case(sim, case, dassign_dtype=torch.float64)
    check_against_reference(SPEC, case, (out, assign), grads, upstream, torch.float32)


def test_tiles_segments_and_splits_are_taken(sim):
    """The launch grids of a P = 300 case: 5 pixel tiles per batch item, 2 pooling
    segments and 2 pixel splits of the dq̂ product; then 4 token tiles (N = 128) and
    16 channel tiles (C = 1024) of that product."""
    run_case(sim, make_case((2, 2, 300, 64, 48), seed=1))
    grids = {r.name.split("<")[0]: r.grid[0] for r in sim.launches()}
    assert grids["assign_kernel"] == 2 * 5 and grids["bwd_pixels_kernel"] == 2 * 5
    assert grids["pool_partial_kernel"] == 2 * 2 * 2  # B·N·segs
    assert grids["dq_partial_kernel"] == 2 * 2  # B·psplit·ntiles·ctiles
    sim.reset()
    run_case(sim, make_case((1, 128, 70, 24, 8), seed=2))
    assert {r.name.split("<")[0]: r.grid[0] for r in sim.launches()}["dq_partial_kernel"] == 4
    sim.reset()
    run_case(sim, make_case((1, 3, 50, 1024, 7), seed=3))
    assert {r.name.split("<")[0]: r.grid[0] for r in sim.launches()}["dq_partial_kernel"] == 16


# ---------------------------------------------------------------- shared-memory plans
def fwd_plan(N, C, noise, limit, elem=4):
    """kernels/group_assign.cu's FwdSmem choice: (tile, q̂ staged, bytes) or None."""
    def size(tile, q):
        return (N * C * q + N * tile * noise + 8 * N) * elem + tile * 4
    tile = 64
    while tile > 8 and size(tile, 0) > limit:
        tile //= 2
    if size(tile, 0) > limit:
        return None
    q = size(tile, 1) <= min(limit, 100 * 1024)
    return tile, q, size(tile, q)


def bwd_plan(N, C, D, noise, limit, elem=4):
    """BwdSmem's choice: (tile, q̂ staged, dout staged, bytes) or None."""
    def size(tile, q, o):
        return (N * C * q + N * D * o + N * tile + N * tile * noise + 4 * 8 * N + 8) * elem
    tile = 64
    while tile > 8 and size(tile, 0, 0) > limit:
        tile //= 2
    if size(tile, 0, 0) > limit:
        return None
    cap = min(limit, 100 * 1024)
    q = size(tile, 1, 0) <= cap
    o = size(tile, q, 1) <= cap
    return tile, q, o, size(tile, q, o)


@pytest.mark.parametrize("limit,fwd,bwd", [
    (232448, (64, True), (64, True, True)),
    (9000, (64, True), (64, True, False)),  # q̂ staged, dout not
    (4000, (64, False), (32, False, False)),
    (1800, (32, False), (8, False, False)),  # the smallest tile
])
def test_shared_memory_plans(sim, limit, fwd, bwd):
    """Lower opt-in limits force q̂/dout out of shared memory and halve the pixel tile;
    every plan computes the same result."""
    shape = (2, 9, 300, 64, 48)
    B, N, P, C, D = shape
    assert fwd_plan(N, C, 1, limit)[:2] == fwd and bwd_plan(N, C, D, 1, limit)[:3] == bwd
    with sim.settings(smem_optin=limit):
        check_case(sim, make_case(shape, noise="explicit", seed=4), torch.float32)
    launched = {r.name.split("<")[0]: r for r in sim.launches()}
    assert launched["assign_kernel"].smem == fwd_plan(N, C, 1, limit)[2]
    assert launched["assign_kernel"].grid[0] == B * -(-P // fwd[0])
    assert launched["bwd_pixels_kernel"].smem == bwd_plan(N, C, D, 1, limit)[3]
    assert launched["bwd_pixels_kernel"].grid[0] == B * -(-P // bwd[0])


def test_more_than_48_kib_of_shared_memory_uses_the_opt_in(sim):
    shape = (1, 32, 70, 384, 8)
    assert fwd_plan(32, 384, 1, 232448)[2] > 48 * 1024
    check_case(sim, make_case(shape, noise="explicit", seed=6), torch.float32)
    assert max(r.smem for r in sim.launches()) > 48 * 1024


def test_too_little_shared_memory_is_refused(sim):
    """Even 8 pixels per tile do not fit: cudaErrorInvalidConfiguration, nothing launched."""
    shape = (2, 9, 300, 64, 48)
    assert fwd_plan(9, 64, 1, 1000) is not None and bwd_plan(9, 64, 48, 1, 1000) is None
    case = make_case(shape, noise="explicit", seed=4)
    q, k, v, tau = case.args
    with sim.settings(smem_optin=1000):
        out, assign, counts = sim_glue.group_assign_fwd(sim, q, k, v, tau, case.kwargs["noise"])
        n = len(sim.launches())
        with pytest.raises(Exception, match="cudaErrorInvalidConfiguration"):
            sim_glue.group_assign_bwd(sim, out, assign, q, k, v, tau, case.kwargs["noise"], None, out, counts)
        assert len(sim.launches()) == n
    assert INVALID_CONFIGURATION == 9


@pytest.mark.parametrize("dims", [(0, 3, 70, 16, 8), (2, 0, 70, 16, 8), (2, 3, 0, 16, 8), (2, 3, 70, 0, 8),
                                  (2, 3, 70, 16, 0), (1, 2**16, 2**15, 1, 1)])
def test_bad_sizes_are_refused(sim, dims):
    """Empty axes and B·N·P ≥ 2^31 (the 32-bit noise index): no workspace size, and the
    launchers return cudaErrorInvalidValue without launching anything."""
    code = DTYPE_CODE[torch.float32]
    assert sim.lib.sim_group_assign_workspace(code, 0, i64(*dims)) == 0
    assert sim.lib.sim_group_assign_workspace(code, 1, i64(*dims)) == 0
    nulls = [None] * 16
    assert sim.lib.sim_group_assign_fwd(code, i64(*dims), None, i64(0, 0), None, i64(0, 0), None, i64(0, 0),
                                        *nulls[:2], 0, 0, *nulls[:4], 0) == INVALID_VALUE
    assert sim.launches() == []


def test_bitwise_reproducible_over_schedules_and_workers(sim):
    """No floating-point atomics: the same bits whatever order the simulated threads of a
    block run in and however blocks are spread over OS threads; also with the guard page
    in front of every buffer (underruns fault)."""
    case = make_case((2, 9, 130, 40, 24), noise="seed", seed=8)
    results = []
    for settings, guard in [(dict(workers=1, schedule="forward"), "back"),
                            (dict(workers=2, schedule="reverse"), "back"),
                            (dict(workers=2, schedule="random", seed=3), "front")]:
        sim.guard = guard
        with sim.settings(**settings):
            outputs, grads, _ = run_case(sim, case)
        results.append(outputs + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
