"""How the fused RIA kernels decide a (query, key) without building the mask: the
decision plans for CPU and CUDA tensors, the resampler arithmetic they repeat (in
PyTorch, for the tests and the once-per-device checks), and the kernels' plan
arguments.

The decision is the authors' (:mod:`.mask`): blocked where
sigmoid(bilinear(region logits → key map)) < 0.5 in float32. A kernel reads four
texels of the logits per decision and must round exactly as torch's own resampler
on that device; the comment above ``RESAMPLE_CL`` says how, and which plan a
device gets.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("rexfast")


# Fused RIA kernels never build the mask: each (query, key) decision is made in the
# kernel from four texels of the region logits. To be *identical* to the official
# fp32 decision, the kernel repeats the arithmetic of the resampler torch runs on
# that device, rounding for rounding, then compares with the sigmoid threshold.
#
# torch's CPU upsample_bilinear2d (float, NCHW contiguous input), read from its
# source and verified bit for bit here (torch 2.13, AVX512, AVX2 and DEFAULT):
#   per axis  scale = float(in)/out, real = max(scale·(i+0.5) − 0.5, 0) (one fma in
#             the FMA builds), i0 = min(floor(real), in−1), i1 = i0 + (i0 < in−1),
#             λ1 = clamp(real − i0, 0, 1), λ0 = 1 − λ1 (in == out: i0 = i1 = i, λ = 1, 0)
#   oh + ow ≤ 128 (or one thread and 3 channels): the "channels-last" kernel over
#             the Q channels; w_yx = λy·λx; channels in the vector part
#             (q < Q − Q mod 8) get fma(a,w00, fma(b,w01, fma(d,w11, c·w10))),
#             the scalar tail fma(d,w11, fma(c,w10, fma(a,w00, b·w01)))
#   otherwise the generic kernel: fma(fma(a,λx0, b·λx1), λy0, fma(c,λx0, d·λx1)·λy1)
#   (a, b, c, d = texels (y0,x0), (y0,x1), (y1,x0), (y1,x1); DEFAULT builds: no fma).
# torch's CUDA kernel (upsample_bilinear2d_out_frame, the NCHW kernel that the
# contiguous logits take; identical sizes are a copy):
#   real = fma(i+0.5, scale, −0.5) clamped at 0, i0 = (int)real, λ1 = real − i0,
#   t0 = fma(λx0, a, λx1·b), t1 = fma(λx0, c, λx1·d), v = fma(λy0, t0, λy1·t1)
#   nvcc's contraction of torch's λy0·(λx0·a + λx1·b) + λy1·(λx0·c + λx1·d): read
#   from the sm_90 SASS of upsample_bilinear2d_out_frame<float, float> in torch
#   2.11.0's CUDA 13 wheel (the device image's build) with cuobjdump, and the same
#   from nvcc 13.0 -O3 -arch=sm_90 on the expression. The contraction depends on
#   the context: the channels-last kernel of the same build fuses t0 the other way,
#   fma(λx1, b, λx0·a), and an older nvcc may too. So it is checked, not trusted:
#   once per GPU against F.interpolate (cuda_resampler_verified), with the map
#   fallback below; not run on a GPU here.
# A capability or build whose resampler the CPU kernel does not reproduce (checked
# once per process against F.interpolate) falls back to RESAMPLE_MAP: the wrapper
# resamples with F.interpolate itself (B·Q·S fp32, 1/H of a per-head mask) and the
# kernel reads those values.
#
# The sigmoid: sigmoid(x) < 0.5 ⇔ 1 + exp(−x) > 2 in fp32, i.e. x ≤ T for one float
# T; T is measured per device from torch.sigmoid itself (bisection over the float
# bit patterns, then an exhaustive check of the neighbourhood), so NaN (never
# blocked) and every rounding agree with the reference.
RESAMPLE_CL, RESAMPLE_GENERIC, RESAMPLE_CUDA, RESAMPLE_COPY, RESAMPLE_MAP = 0, 1, 2, 3, 4
# (fma, lanes) per ATen CPU capability. The resampler is dispatched up to AVX2 only (no
# AVX512 kernel), so its vector part is 8 floats wide on AVX512 machines too (measured).
_CPU_CAPABILITIES = {"AVX512": (True, 8), "AVX2": (True, 8), "DEFAULT": (False, 8)}


@dataclass(frozen=True)
class DecisionPlan:
    mode: int  # RESAMPLE_*
    fma: bool  # CPU modes: the FMA build's roundings
    q_vec: int  # RESAMPLE_CL: queries [0, q_vec) take the vector-lane formula
    threshold: float  # blocked iff resampled logit <= threshold


def _device_key(device: torch.device):
    return (device.type, device.index if device.index is not None else
            (torch.cuda.current_device() if device.type == "cuda" else 0))


@functools.lru_cache(maxsize=None)
def _sigmoid_threshold(device_key) -> float:
    device = torch.device(device_key[0], device_key[1]) if device_key[0] == "cuda" else torch.device("cpu")

    def blocked(bits: Tensor) -> Tensor:  # bits: int32 patterns of positive floats → decision at −x
        x = -bits.to(device).view(torch.float32)
        many = x.repeat_interleave(4) if x.numel() < 64 else x  # vectorised path, as big tensors take it
        return (torch.sigmoid(many) < 0.5).view(x.numel(), -1).all(-1).cpu()

    lo = int(torch.tensor([2.0 ** -28]).view(torch.int32))  # sigmoid(−2⁻²⁸) = 0.5: allowed
    hi = int(torch.tensor([2.0 ** -18]).view(torch.int32))  # sigmoid(−2⁻¹⁸) < 0.5: blocked
    if blocked(torch.tensor([lo], dtype=torch.int32)).item() or not blocked(torch.tensor([hi], dtype=torch.int32)).item():
        raise RuntimeError("region_image_attention: torch.sigmoid's 0.5 crossing is outside [-2^-18, -2^-28]")
    while hi - lo > 1:  # invariant: lo allowed, hi blocked
        mid = (lo + hi) // 2
        if blocked(torch.tensor([mid], dtype=torch.int32)).item():
            hi = mid
        else:
            lo = mid
    window = torch.arange(hi - 2**16, hi + 2**16, dtype=torch.int32)
    got = blocked(window)
    if not torch.equal(got, window >= hi):
        raise RuntimeError("region_image_attention: torch.sigmoid(x) < 0.5 is not a threshold in x on "
                           f"{device}; fused kernels cannot reproduce it")
    if device.type == "cpu":  # the scalar tail of torch's CPU loop (libm exp) must agree too
        x = -window[2**16 - 64: 2**16 + 64].view(torch.float32)
        scalar = torch.cat([torch.sigmoid(x[i:i + 7]) < 0.5 for i in range(0, x.numel(), 7)])
        if not torch.equal(scalar, window[2**16 - 64: 2**16 + 64] >= hi):
            raise RuntimeError("region_image_attention: torch's scalar and vector CPU sigmoid disagree")
    return float(-torch.tensor([hi], dtype=torch.int32).view(torch.float32))


def sigmoid_threshold(device: torch.device) -> float:
    """The largest fp32 logit x with torch.sigmoid(x) < 0.5 on ``device`` (−1.7881392e-07 on
    x86 CPUs with correctly rounded exp)."""
    return _sigmoid_threshold(_device_key(device))


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def decision_plan(device: torch.device, Q: int, region_size, key_size, *, verified: bool = True) -> DecisionPlan:
    """How a fused kernel reproduces the official decision for these sizes on ``device``."""
    (mh, mw), (kh, kw) = region_size, key_size
    threshold = sigmoid_threshold(device)
    if device.type == "cuda":
        if (mh, mw) == (kh, kw):
            return DecisionPlan(RESAMPLE_COPY, True, 0, threshold)
        if verified and not cuda_resampler_verified(device):
            return DecisionPlan(RESAMPLE_MAP, False, 0, threshold)
        return DecisionPlan(RESAMPLE_CUDA, True, 0, threshold)
    capability = _cpu_capability()
    if capability not in _CPU_CAPABILITIES or (verified and not cpu_resampler_verified()):
        return DecisionPlan(RESAMPLE_MAP, False, 0, threshold)
    fma, lanes = _CPU_CAPABILITIES[capability]
    channels_last = kh + kw <= 128 or (torch.get_num_threads() == 1 and Q == 3)
    if channels_last:
        return DecisionPlan(RESAMPLE_CL, fma, Q - Q % lanes, threshold)
    return DecisionPlan(RESAMPLE_GENERIC, fma, 0, threshold)


def resample_axis(in_size: int, out_size: int, plan: DecisionPlan, device=None):
    """Per-output-index taps and weights of one axis, as the plan's resampler computes
    them: (i0, i1) int32 and (λ0, λ1) float32, each of length ``out_size``."""
    i = torch.arange(out_size, dtype=torch.float64)
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size  # float(in) / out, in fp32
    # scale·(i+0.5) − 0.5: one rounding with the fused multiply-add; without fma, two
    # fp32 roundings.
    if plan.fma:
        real = fma32(scale, (i + 0.5).to(torch.float32), torch.tensor(-0.5))
    else:
        real = (scale * (i + 0.5).to(torch.float32)) - 0.5
    real = torch.clamp(real, min=0.0)
    if plan.mode == RESAMPLE_CUDA:
        i0 = real.to(torch.int64)  # truncation, no guard (real < in - 1 + 1 for align_corners=False)
        lam1 = real - i0.to(torch.float32)
    else:
        i0 = torch.clamp(torch.floor(real).to(torch.int64), max=in_size - 1)
        lam1 = torch.clamp(real - i0.to(torch.float32), 0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    if in_size == out_size and plan.mode != RESAMPLE_CUDA:
        i0 = i1 = torch.arange(out_size)
        lam0, lam1 = torch.ones(out_size), torch.zeros(out_size)
    out = (i0.to(torch.int32), i1.to(torch.int32), lam0.to(torch.float32), lam1.to(torch.float32))
    return tuple(t.to(device) for t in out) if device is not None else out


def emulate_cuda_resample(logits: Tensor, key_size) -> Tensor:
    """RESAMPLE_CUDA's arithmetic (what the Triton and CUDA kernels compute) with torch
    ops: (B, Q, S) float32. A fused multiply-add is one rounding of the exact float64
    value (a product of two floats is exact in float64)."""
    kh, kw = key_size
    plan = DecisionPlan(RESAMPLE_CUDA, True, 0, 0.0)
    y0, y1, ly0, ly1 = resample_axis(logits.shape[2], kh, plan, logits.device)
    x0, x1, lx0, lx1 = resample_axis(logits.shape[3], kw, plan, logits.device)
    y0, y1, x0, x1 = (t.long() for t in (y0, y1, x0, x1))
    R = logits.to(torch.float32)
    a, b = R[..., y0[:, None], x0[None, :]], R[..., y0[:, None], x1[None, :]]
    c, d = R[..., y1[:, None], x0[None, :]], R[..., y1[:, None], x1[None, :]]

    return cuda_bilinear(a, b, c, d, lx0[None, :], lx1[None, :], ly0[:, None], ly1[:, None]).flatten(2)


def cuda_bilinear(a: Tensor, b: Tensor, c: Tensor, d: Tensor, lx0: Tensor, lx1: Tensor, ly0: Tensor,
                  ly1: Tensor) -> Tensor:
    """RESAMPLE_CUDA's value from the texels a, b, c, d = (y0,x0), (y0,x1), (y1,x0), (y1,x1)
    and the axis weights (float32 tensors, broadcast): nvcc's contraction of torch's
    λy0·(λx0·a + λx1·b) + λy1·(λx0·c + λx1·d), i.e.

        t0 = fma(λx0, a, λx1·b),  t1 = fma(λx0, c, λx1·d),  v = fma(λy0, t0, λy1·t1)

    (see the comment above ``RESAMPLE_CL``), each fma rounded once (:func:`fma32`)."""
    t0 = fma32(lx0, a, lx1 * b)
    t1 = fma32(lx0, c, lx1 * d)
    return fma32(ly0, t0, ly1 * t1)


def fma32(p: Tensor, q: Tensor, r: Tensor) -> Tensor:
    """The float32 fused multiply-add p·q + r, rounded once (as CUDA's fma.rn.f32 and
    std::fma), with torch ops.

    p·q is exact in float64 (24 + 24 bits). The float64 sum h = p·q + r is not always:
    rounding it to float32 afterwards could round twice. So the sum is rounded to odd
    instead (h, or its neighbour toward the exact value, whichever has an odd last
    bit, when the TwoSum error e of h is not 0): a value rounded to odd with at least
    two more bits than float32 rounds to nearest-even exactly as the exact value would
    (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", 2008)."""
    prod = p.double() * q.double()
    add = r.double()
    h = prod + add
    back = h - prod
    e = (prod - (h - back)) + (add - back)  # TwoSum: prod + add = h + e exactly
    toward = torch.nextafter(h, torch.where(e > 0, torch.inf, -torch.inf).to(h))
    even = (h.view(torch.int64) & 1) == 0
    odd = torch.where((e != 0) & even & torch.isfinite(h), toward, h)
    return odd.to(torch.float32)


def cuda_resampler_verified(device: torch.device) -> bool:
    """Once per GPU: does RESAMPLE_CUDA's arithmetic equal torch's CUDA F.interpolate bit
    for bit there? (It is read from torch's source and nvcc's PTX, and cannot be run
    where it was written.) If not, fused kernels read F.interpolate's values instead."""
    key = ("cuda",) + _device_key(device)
    if key in _RESAMPLER_STATE:
        return _RESAMPLER_STATE[key]
    ok = True
    for logits, key_size in cuda_resampler_probes():
        logits = logits.to(device)
        want = F.interpolate(logits, size=key_size, mode="bilinear", align_corners=False).flatten(2)
        ok = ok and torch.equal(emulate_cuda_resample(logits, key_size), want)
    if not ok:
        log.warning("region_image_attention: torch's CUDA resampler on %s differs from the arithmetic the fused "
                    "kernels repeat; their decisions read F.interpolate's output instead", device)
    _RESAMPLER_STATE[key] = ok
    return ok


_RESAMPLER_STATE: dict = {}


def cuda_resampler_probes():
    """The (logits (2, Q, mh, mw) float32 on the CPU, key size) pairs the once-per-GPU check
    resamples: down, up and mixed scales; a third of the rows scaled to ~1e-7 so that
    values near the sigmoid threshold are among them. (A test checks that they tell the
    two fma orders of t0 apart.)"""
    g = torch.Generator().manual_seed(0)
    for (mh, mw, kh, kw, Q) in ((13, 9, 5, 7, 21), (120, 120, 60, 60, 4), (33, 47, 61, 67, 5), (7, 3, 7, 9, 3)):
        logits = torch.randn(2, Q, mh, mw, generator=g) * 3
        logits[:, ::3] *= 1e-7
        yield logits, (kh, kw)


def cpu_resampler_verified() -> bool:
    """Once per process: does the C++ kernel's resampler (the arithmetic its attention
    kernel inlines) equal torch's F.interpolate bit for bit on this CPU? Probes the
    vector and tail channels of the channels-last kernel and the generic kernel."""
    if "cpu" in _RESAMPLER_STATE:
        return _RESAMPLER_STATE["cpu"]
    ok = False
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("rexfast_C::region_resample", "CPU")
    except RuntimeError:
        has = False
    if has:
        g = torch.Generator().manual_seed(0)
        ok = True
        for (mh, mw, kh, kw, Q) in ((13, 9, 5, 7, 21), (5, 5, 9, 3, 9), (2, 5, 7, 3, 13), (33, 47, 61, 67, 5),
                                     (12, 12, 6, 6, 3), (9, 9, 9, 9, 18)):
            logits = torch.randn(2, Q, mh, mw, generator=g) * 3
            logits[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), float("-inf")])
            plan = decision_plan(torch.device("cpu"), Q, (mh, mw), (kh, kw), verified=False)
            if plan.mode == RESAMPLE_MAP:
                ok = False
                break
            want = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False).flatten(2)
            got = torch.ops.rexfast_C.region_resample(logits, kh, kw, plan.mode, plan.fma, plan.q_vec)
            same = torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
            ok = ok and same
    if not ok:
        log.warning("region_image_attention: the C++ kernel does not reproduce torch's CPU resampler on this "
                    "machine (capability %s); its decisions read F.interpolate's output instead", _cpu_capability())
    _RESAMPLER_STATE["cpu"] = ok
    return ok


def plan_args(q: Tensor, region_logits: Tensor, kh: int, kw: int):
    """What the C++/CUDA kernels take for one call: (logits fp32 contiguous, mode, fma,
    q_vec, threshold, resampled-or-None); ``resampled`` is F.interpolate's output where
    the plan is RESAMPLE_MAP (a resampler the kernels do not reproduce)."""
    logits = region_logits.detach().to(torch.float32).contiguous()
    plan = decision_plan(q.device, q.shape[2], tuple(logits.shape[2:]), (kh, kw))
    resampled = None
    if plan.mode == RESAMPLE_MAP:  # a resampler the kernel does not reproduce: take torch's values
        resampled = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False).flatten(2).contiguous()
    return logits, plan.mode, plan.fma, plan.q_vec, plan.threshold, resampled


__all__ = [
    "DecisionPlan", "decision_plan", "sigmoid_threshold", "resample_axis", "cpu_resampler_verified",
    "cuda_resampler_verified", "cuda_resampler_probes", "emulate_cuda_resample", "cuda_bilinear", "fma32",
    "plan_args", "RESAMPLE_CL", "RESAMPLE_GENERIC", "RESAMPLE_CUDA", "RESAMPLE_COPY", "RESAMPLE_MAP",
]
