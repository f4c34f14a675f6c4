"""kernels/region_attention.cu executed on the CPU by cuda_sim: the open-rows pass,
the forward, and the backward (bwd_dq, bwd_dkdv), through the host launchers, for
region_image_attention (RIA: decisions made in the kernel from the region
logits) and region_language_attention (RLA: a key padding mask, or none),
against the float64 references of tests/ops.

RIA decisions, in the three modes a CUDA tensor uses:
* map (4): the kernel reads resampled logits; given torch's CPU F.interpolate
  output and the CPU sigmoid threshold it must reproduce the official mask, so
  the reference is tests/ops' own (official_region_blocked);
* copy (3): equal region and key sizes, again the official mask exactly;
* cuda (2): the kernel resamples with the arithmetic it assumes torch's CUDA
  kernel uses; the truth is then rexfast.ops.region_attention.plan.emulate_cuda_resample
  (that assumption is the GPU's to confirm: cuda_resampler_verified), and a probe
  (q = k = 0, v = identity) reads every decision back bit for bit.

Covered: the parity shapes and modes of tests/ops (Q past 32, several 32-key
chunks, skipped all-blocked chunks, strided q/k/v, other scales), head sizes 1 to
256, half/bfloat16/double, every edge case (all-blocked and open rows, logits on
and next to the decision threshold, NaN/±inf in q, k, v and the logits, NaN at a
blocked key, overflowing scores, all-padded samples), the log-sum-exp output,
and the launchers' refusals (empty axes, d > 256, inconsistent masks).

What the simulation cannot see: speed; races under the GPU memory model (threads
run one at a time between warp collectives); nvcc's fma contraction and
--use_fast_math (expf/logf are glibc's here, so rows are compared with a
tolerance; the resampler uses explicit __f*_rn intrinsics, which this layer
rounds exactly, so its decisions are compared bit for bit); warp divergence
scheduling; whether torch's CUDA resampler really computes what mode 2 assumes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import sim_glue
from cuda_sim_lib import DTYPE_CODE, INVALID_VALUE, i64
from harness import TOLERANCE, assert_close_to_reference
from region_attention_cases import (RIA_EDGE_CASES, RIA_SHAPES, RIA_SPEC, RLA_EDGE_CASES, RLA_SHAPES, RLA_SPEC,
                                    decision_probe, ria_case, ria_near_zero, ria_near_zero_resampled, rla_case)
from rexfast.ops.region_attention.core import default_scale, masked_attention, masked_attention_lse
from rexfast.ops.region_attention.mask import official_region_blocked
from rexfast.ops.region_attention.plan import RESAMPLE_COPY, RESAMPLE_CUDA, RESAMPLE_MAP, emulate_cuda_resample, sigmoid_threshold
from rexfast.ops.region_attention.region_language_attention.reference import reference_forward as rla_reference_forward
from sim_parity import check_against_reference, upstream_for

pytestmark = pytest.mark.cuda_sim

THRESHOLD = sigmoid_threshold(torch.device("cpu"))


def cuda_mode_blocked(logits, key_size):
    """Mode 2's mask: emulate_cuda_resample's values ≤ threshold, open rows unblocked."""
    blocked = emulate_cuda_resample(logits.detach().to(torch.float32), key_size) <= THRESHOLD
    open_rows = blocked.all(-1)
    return blocked & ~open_rows[..., None], open_rows


def cuda_mode_reference(q, k, v, region_logits, key_size, scale=None):
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return masked_attention(q, k, v, cuda_mode_blocked(region_logits, key_size)[0][:, None], scale)


def ria_run(sim, case, mode):
    """(out, lse, open), (dq, dk, dv), upstream of the simulated kernels in ``mode``."""
    q, k, v, logits, (kh, kw) = case.args
    scale = case.kwargs.get("scale") or default_scale(q.shape[-1])
    logits = logits.to(torch.float32).contiguous()
    resampled = None
    if mode == RESAMPLE_MAP:
        resampled = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False).flatten(2)
    out, lse, open_rows = sim_glue.ria_fwd(sim, q, k, v, logits, kh, kw, scale, mode, THRESHOLD, resampled)
    upstream = upstream_for((out,))
    grads = sim_glue.ria_bwd(sim, upstream[0], q, k, v, logits, kh, kw, scale, mode, THRESHOLD, resampled, out, lse,
                             open_rows)
    return (out, lse, open_rows), grads, upstream


def check_lse(name, lse, want, dtype):
    """The row log-sum-exp the forward keeps for the backward. Where the reference's is
    finite, within the tolerance; where it is not (a NaN or +inf score, or nothing
    allowed) the kernel's must not be either: an +inf there may come out NaN (the
    kernel's exp(s − max) is exp(inf − inf)), and the backward's p = exp(s − lse) is
    NaN for that row either way (the gradient checks cover it)."""
    finite = torch.isfinite(want)
    assert not torch.isfinite(lse[~finite]).any(), f"{name}: finite where the reference is not"
    assert torch.equal(lse[want == -torch.inf], want[want == -torch.inf].to(lse.dtype)), f"{name}: -inf rows"
    assert_close_to_reference(name, lse[finite], want[finite], TOLERANCE[dtype])


def check_ria(sim, case, mode, dtype):
    (out, lse, open_rows), grads, upstream = ria_run(sim, case, mode)
    q, k, v, logits, key_size = case.args
    scale = case.kwargs.get("scale") or default_scale(q.shape[-1])
    if mode == RESAMPLE_CUDA:
        blocked, want_open = cuda_mode_blocked(logits, key_size)
        spec = dataclasses.replace(RIA_SPEC, reference=cuda_mode_reference)
    else:
        blocked, want_open = official_region_blocked(logits, key_size, with_open_rows=True)
        spec = RIA_SPEC
    assert torch.equal(open_rows, want_open)
    check_against_reference(spec, case, (out,), grads, upstream, dtype, label=f"cuda_sim mode {mode}")
    _, want = masked_attention_lse(q.double(), k.double(), v.double(), blocked[:, None], scale)
    check_lse("region_image_attention lse", lse, want, dtype)


RIA_PARITY = [(shape, {"layout": "contiguous"}) for shape in RIA_SHAPES] + [
    (RIA_SHAPES[1], {"layout": "strided", "scale": 0.3}),
    (RIA_SHAPES[3], {"layout": "strided", "scale": 0.3}),
]


@pytest.mark.parametrize("mode", [RESAMPLE_MAP, RESAMPLE_CUDA])
@pytest.mark.parametrize("shape,kw", RIA_PARITY, ids=lambda x: str(x).replace(" ", ""))
def test_ria_matches_float64_reference(sim, shape, kw, mode):
    B, H, Q, kh, kwid, d, mh, mw = shape
    if mode == RESAMPLE_CUDA and (mh, mw) == (kh, kwid):
        mode = RESAMPLE_COPY  # what the CUDA plan takes for equal sizes
    check_ria(sim, ria_case(shape, seed=sum(shape), **kw), mode, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ria_other_dtypes(sim, dtype):
    check_ria(sim, ria_case(RIA_SHAPES[3], dtype=dtype, seed=1), RESAMPLE_CUDA, dtype)


@pytest.mark.parametrize("name", [n for n in RIA_EDGE_CASES if not n.startswith("empty")])
def test_ria_edge_cases(sim, name):
    case = RIA_EDGE_CASES[name](torch.float32, "cpu")
    q, k, v, logits, key_size = case.args
    same = tuple(logits.shape[2:]) == tuple(key_size)
    check_ria(sim, case, RESAMPLE_COPY if same else RESAMPLE_MAP, torch.float32)
    if not same and logits.shape[-1] * logits.shape[-2] < 1000:
        sim.reset()
        check_ria(sim, case, RESAMPLE_CUDA, torch.float32)


def probe_allowed(sim, logits, key_size, mode):
    """The (B, Q, S) decisions the kernels made, read back through decision_probe."""
    q, k, v = decision_probe(logits, key_size)
    kh, kw = key_size
    resampled = None
    if mode == RESAMPLE_MAP:
        resampled = F.interpolate(logits, size=key_size, mode="bilinear", align_corners=False).flatten(2)
    out, _, _ = sim_glue.ria_fwd(sim, q, k, v, logits, kh, kw, 1.0, mode, THRESHOLD, resampled)
    return out[:, 0] > 0


NEAR_ZERO = [ria_near_zero, ria_near_zero_resampled(6, 5, 4, 3), ria_near_zero_resampled(5, 7, 13, 9),
             ria_near_zero_resampled(3, 11, 7, 5), ria_near_zero_resampled(6, 5, 6, 5),
             ria_near_zero_resampled(16, 16, 120, 120, Q=4)]


@pytest.mark.parametrize("make", NEAR_ZERO, ids=range(len(NEAR_ZERO)))
def test_ria_decisions_bit_for_bit(sim, make):
    """Logits on and next to the threshold: every in-kernel decision equals mode 2's
    emulated arithmetic (and, for equal sizes, the official mask); the map mode
    equals the official mask."""
    case = make(torch.float32, "cpu")
    logits, key_size = case.args[3].to(torch.float32).contiguous(), case.args[4]
    same = tuple(logits.shape[2:]) == tuple(key_size)
    official, _ = official_region_blocked(logits, key_size, with_open_rows=True)
    emulated, _ = cuda_mode_blocked(logits, key_size)
    assert torch.equal(probe_allowed(sim, logits, key_size, RESAMPLE_CUDA), ~emulated)
    assert torch.equal(probe_allowed(sim, logits, key_size, RESAMPLE_MAP), ~official)
    if same:
        assert torch.equal(probe_allowed(sim, logits, key_size, RESAMPLE_COPY), ~official)


# ---------------------------------------------------------------- region_language_attention
def rla_run(sim, case):
    q, k, v, kpm = case.args
    scale = case.kwargs.get("scale") or default_scale(q.shape[-1])
    out, lse = sim_glue.rla_fwd(sim, q, k, v, kpm, scale)
    upstream = upstream_for((out,))
    grads = sim_glue.rla_bwd(sim, upstream[0], q, k, v, kpm, scale, out, lse)
    return (out, lse), grads, upstream


def check_rla(sim, case, dtype):
    (out, lse), grads, upstream = rla_run(sim, case)
    check_against_reference(RLA_SPEC, case, (out,), grads, upstream, dtype)
    q, k, v, kpm = case.args
    scale = case.kwargs.get("scale") or default_scale(q.shape[-1])
    _, want = rla_reference_forward(q.double(), k.double(), v.double(), kpm, scale)
    check_lse("region_language_attention lse", lse, want, dtype)


RLA_PARITY = [(shape, {"mask": "padded"}) for shape in RLA_SHAPES] + [
    (RLA_SHAPES[2], {"mask": "none"}),
    (RLA_SHAPES[0], {"mask": "with_empty", "layout": "strided", "scale": 0.2}),
    (RLA_SHAPES[3], {"mask": "scattered"}),
    ((1, 2, 9, 40, 256), {"mask": "none"}),  # the largest head the kernels take
    ((2, 1, 3, 5, 1), {"mask": "scattered"}),
]


@pytest.mark.parametrize("shape,kw", RLA_PARITY, ids=lambda x: str(x).replace(" ", ""))
def test_rla_matches_float64_reference(sim, shape, kw):
    check_rla(sim, rla_case(shape, seed=sum(shape), **kw), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rla_other_dtypes(sim, dtype):
    check_rla(sim, rla_case(RLA_SHAPES[2], dtype=dtype, seed=2, mask="with_empty"), dtype)


@pytest.mark.parametrize("name", [n for n in RLA_EDGE_CASES if not n.startswith("empty")])
def test_rla_edge_cases(sim, name):
    check_rla(sim, RLA_EDGE_CASES[name](torch.float32, "cpu"), torch.float32)


def test_bitwise_reproducible_over_schedules_and_workers(sim):
    case = ria_case(RIA_SHAPES[1], seed=4)
    runs = []
    for settings in (dict(workers=1, schedule="forward"), dict(workers=2, schedule="reverse"),
                     dict(workers=2, schedule="random", seed=1)):
        with sim.settings(**settings):
            outputs, grads, _ = ria_run(sim, case, RESAMPLE_CUDA)
        runs.append(outputs + grads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("what", ["empty batch", "empty queries", "d > 256", "key map != S", "copy of other sizes",
                                  "padding without empty", "unknown resample mode"])
def test_launchers_refuse_bad_parameters(sim, what):
    """valid() in region_attention.cu: cudaErrorInvalidValue and nothing launched."""
    B, H, Q, S, D = 2, 1, 3, 6, 8
    mh, mw, kh, kw, mode, mask = 2, 3, 2, 3, RESAMPLE_CUDA, sim_glue.MASK_REGION
    if what == "empty batch":
        B = 0
    elif what == "empty queries":
        Q = 0
    elif what == "d > 256":
        D = 257
    elif what == "key map != S":
        kw = 4
    elif what == "copy of other sizes":
        mode, mh = RESAMPLE_COPY, 4
    elif what == "unknown resample mode":
        mode = 7
    q, k, v = (sim.empty(shape, torch.float32) for shape in ((B, H, Q, D), (B, H, S, D), (B, H, S, D)))
    logits = sim.empty((max(B, 1), max(Q, 1), mh, mw), torch.float32)
    padded = sim.empty((max(B, 1), S), torch.uint8)
    if what == "padding without empty":
        mask = sim_glue.MASK_PADDING
    st = lambda t: i64(*t.stride()[:3])  # noqa: E731
    p = sim.ptr
    for which in (0, 1, 2):
        status = sim.lib.sim_region_attention(
            which, DTYPE_CODE[torch.float32], i64(B, H, Q, S, D), p(q), st(q), p(k), st(k), p(v), st(v), 1.0, mask,
            p(logits), i64(mh, mw, kh, kw), mode, THRESHOLD, None, None, p(padded), None, p(padded), p(q), p(q),
            p(padded), p(q), p(q), p(q), p(q), p(k), p(v), p(padded))
        assert status == INVALID_VALUE, (what, which)
    assert sim.launches() == []
