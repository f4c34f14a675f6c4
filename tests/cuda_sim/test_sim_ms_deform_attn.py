"""kernels/ms_deform_attn.cu executed on the CPU by cuda_sim: the forward kernel,
and the backward in both modes: atomic (atomicAdd into grad_value, or into a
float workspace then convert_kernel for half/bfloat16) and deterministic
(bwd_kernel's tap records, the CUB radix sort (here a stable-sort stand-in with
the same key-bit contract), offsets_kernel, gather_kernel), through the host
launchers, against the float64 reference of tests/ops.

Covered: the parity shapes of tests/ops (1 to 4 levels, 1 to 8 points, 1 to 8
heads, odd and > 32 channels, contiguous and strided value/locations/weights),
half, bfloat16 and double, every edge case of tests/ops (locations on the border,
on pixel centres and on the half-pixel edges, far outside, ±inf and NaN; NaN/±inf
values and weights; B = 0 and Q = 0), level starts that run past S (never read
or written out of bounds: guard pages would kill the process), bad sizes, and the
deterministic mode's bitwise reproducibility over block schedules and worker
threads (the atomic mode races for real across two OS threads).

What the simulation cannot see: speed; the GPU memory model (threads of a block
run one at a time between barriers; atomics are std::atomic_ref); nvcc's fma
contraction and fast-math (this build rounds every operation as written); warp
divergence scheduling; the real CUB sort's temporary-storage needs.
"""

from __future__ import annotations

import pytest
import torch

import sim_glue
from cuda_sim_lib import DTYPE_CODE, INVALID_VALUE, SUCCESS, i64
from ms_deform_attn_cases import EDGE_CASES, PARITY_SHAPES, SPEC, make_case
from rexfast.ops.ms_deform_attn.reference import ms_deform_attn_reference
from sim_parity import check_against_reference, upstream_for

pytestmark = pytest.mark.cuda_sim


def run_case(sim, case, deterministic):
    out = sim_glue.ms_deform_attn_fwd(sim, *case.args)
    upstream = upstream_for((out,))
    grads = sim_glue.ms_deform_attn_bwd(sim, upstream[0], *case.args, deterministic)
    return out, grads, upstream


def check_case(sim, case, dtype, modes=(False, True)):
    """Forward, then the backward in each mode, against the reference."""
    results = []
    for deterministic in modes:
        out, grads, upstream = run_case(sim, case, deterministic)
        check_against_reference(SPEC, case, (out,), grads, upstream, dtype,
                                label="cuda_sim deterministic" if deterministic else "cuda_sim atomic")
        results.append((out, grads))
    return results


PARITY = [(shape, "contiguous") for shape in PARITY_SHAPES] + [
    (shape, "strided") for shape in PARITY_SHAPES if shape[0] * shape[1] * shape[2] * shape[4] < 500]


@pytest.mark.parametrize("shape,layout", PARITY, ids=lambda x: str(x).replace(" ", ""))
def test_matches_float64_reference(sim, shape, layout):
    check_case(sim, make_case(shape, layout=layout, seed=sum(shape)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(sim, dtype):
    check_case(sim, make_case(SPEC.dtype_shapes[0], dtype=dtype, seed=5), dtype)
    assert any(r.name.startswith("convert_kernel") for r in sim.launches()) == (dtype != torch.float64)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases(sim, name):
    """Border, pixel-centre and half-pixel-edge locations, outside/±inf/NaN locations,
    NaN/±inf values and weights, B = 0 and Q = 0 (the forward launches nothing, the
    backward only zeroes grad_value)."""
    check_case(sim, EDGE_CASES[name](torch.float32, "cpu"), torch.float32)


def test_deterministic_mode_is_bitwise_reproducible(sim):
    case = make_case(PARITY_SHAPES[0], seed=2)
    runs = []
    for settings in (dict(workers=1, schedule="forward"), dict(workers=2, schedule="reverse"),
                     dict(workers=2, schedule="random", seed=9)):
        with sim.settings(**settings):
            runs.append(run_case(sim, case, True)[:2])
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    names = [r.name.split("<")[0] for r in sim.launches()]
    assert {"offsets_kernel", "gather_kernel"} <= set(names)


def test_atomic_mode_with_blocks_racing(sim):
    """grad_value accumulated by atomicAdd from blocks on two OS threads."""
    case = make_case(PARITY_SHAPES[4], seed=3)
    with sim.settings(workers=2):
        check_case(sim, case, torch.float32, modes=(False,))


def test_level_starts_past_the_value_rows_are_never_read(sim):
    """The last level's rows run 8 past S: its taps there are outside (sample 0, no
    gradient), as if value had 8 more rows of zeros; no access leaves the buffers
    (a guard page follows each one)."""
    case = EDGE_CASES["four_levels_eight_points"](torch.float32, "cpu")
    value, shapes, starts, loc, attn = case.args
    S = value.shape[1]
    short = value[:, :S - 8].contiguous()
    out = sim_glue.ms_deform_attn_fwd(sim, short, shapes, starts, loc, attn)
    upstream = upstream_for((out,))
    gv, gl, ga = sim_glue.ms_deform_attn_bwd(sim, upstream[0], short, shapes, starts, loc, attn, True)
    padded = torch.cat([short, torch.zeros_like(value[:, :8])], 1).double().requires_grad_(True)
    loc64, attn64 = loc.double().requires_grad_(True), attn.double().requires_grad_(True)
    ref = ms_deform_attn_reference(padded, shapes, starts, loc64, attn64)
    ref_gv, ref_gl, ref_ga = torch.autograd.grad(ref, (padded, loc64, attn64), upstream[0].double())
    for got, want in ((out, ref), (gv, ref_gv[:, :S - 8]), (gl, ref_gl), (ga, ref_ga)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad_level", [(2, 0), (0, 3), (1, 10_000)], ids=["W=0", "H=0", "W>S"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_degenerate_levels_read_nothing(sim, bad_level, deterministic):
    """A level with an empty or impossible shape (W or H of 0, W > S) samples 0 and reads
    and writes nothing: the other levels give what they give without it, its points get
    zero location and weight gradients."""
    case = make_case((1, 6, 2, 8, 3, 4, 5, 3, 2), seed=4)
    value, shapes, starts, loc, attn = case.args
    bad_shapes = torch.cat([shapes[:1], torch.tensor([bad_level]), shapes[1:]])
    bad_starts = torch.cat([starts[:1], starts[1:2], starts[1:]])  # the bad level starts where level 1 does
    g = torch.Generator().manual_seed(1)
    bad_loc = torch.cat([loc[:, :, :, :1], torch.rand(loc[:, :, :, :1].shape, generator=g), loc[:, :, :, 1:]], 3)
    bad_attn = torch.cat([attn[:, :, :, :1], torch.rand(attn[:, :, :, :1].shape, generator=g), attn[:, :, :, 1:]], 3)
    out = sim_glue.ms_deform_attn_fwd(sim, value, bad_shapes, bad_starts, bad_loc, bad_attn)
    upstream = upstream_for((out,))
    gv, gl, ga = sim_glue.ms_deform_attn_bwd(sim, upstream[0], value, bad_shapes, bad_starts, bad_loc, bad_attn,
                                             deterministic)
    want_out = sim_glue.ms_deform_attn_fwd(sim, value, shapes, starts, loc, attn)
    want_gv, want_gl, want_ga = sim_glue.ms_deform_attn_bwd(sim, upstream[0], value, shapes, starts, loc, attn,
                                                            deterministic)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gv, want_gv, rtol=1e-6, atol=1e-6)
    for got, want in ((gl, want_gl), (ga, want_ga)):
        assert not got[:, :, :, 1].any()
        torch.testing.assert_close(torch.cat([got[:, :, :, :1], got[:, :, :, 2:]], 3), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims,deterministic", [
    ((1, 0, 2, 4, 3, 1, 2), False),  # S = 0
    ((1, 10, 0, 4, 3, 1, 2), False),  # M = 0
    ((1, 10, 2, 4, 3, 0, 2), True),  # L = 0
    ((-1, 10, 2, 4, 3, 1, 2), False),  # B < 0
    ((2**16, 2**16, 1, 1, 1, 1, 1), False),  # B·S ≥ 2^31
    ((2**10, 10, 8, 1, 2**10, 4, 16), True),  # 4·B·Q·M·L·P ≥ 2^31 tap ids in deterministic mode
])
def test_bad_sizes_are_refused(sim, dims, deterministic):
    code = DTYPE_CODE[torch.float32]
    assert sim.lib.sim_msda_workspace(code, i64(*dims), int(deterministic)) == 0
    status = sim.lib.sim_msda_bwd(code, i64(*dims), *([None] * 2), i64(0, 0, 0), *([None] * 7), int(deterministic),
                                  None, 0)
    assert status == INVALID_VALUE
    assert sim.launches() == []


def test_empty_queries_zero_the_value_gradient(sim):
    """B·Q = 0: the backward launches nothing and memsets grad_value (NaN-filled before)."""
    case = EDGE_CASES["empty_queries"](torch.float32, "cpu")
    value = case.args[0]
    out, (gv, gl, ga), _ = run_case(sim, case, False)
    assert out.numel() == 0 and gl.numel() == 0 and ga.numel() == 0
    assert gv.shape == value.shape and not gv.any()
    assert sim.launches() == [] and sim.get("last_error") == SUCCESS
