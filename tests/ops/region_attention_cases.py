"""Op specs for ``region_image_attention`` (RIA) and ``region_language_attention`` (RLA):
input construction and edge cases for the parity harness (float64 references).

RIA's mask is a hard decision (sigmoid(bilinear logits) < 0.5, made in float32
from the same logits by the reference and by every kernel), so the float64
reference and a float32 kernel see the same mask; inputs are fresh random
values. Random region logits are smooth blobs (a few keys allowed per query,
as a trained ReLA's masks look), with rows forced to block everything (then
unblocked by the all-blocked rule) or nothing. The edge cases put logits on and
around the fp32 decision threshold (sigmoid rounds to exactly 0.5 for logits
in (−1.79e-7, 0)), use region maps smaller, larger and non-square relative to
the key map, put NaN/±inf into every input, and empty the batch or query axis.
"""

from __future__ import annotations

import math

import torch

from harness import Case, OpSpec
from rexfast.ops import (region_image_attention, region_image_attention_reference, region_language_attention,
                         region_language_attention_reference)
from rexfast.ops.region_attention.region_image_attention import BACKENDS as RIA_BACKENDS
from rexfast.ops.region_attention.region_language_attention import BACKENDS as RLA_BACKENDS

NAN, INF = float("nan"), float("inf")
# The largest float32 logit whose float32 sigmoid is < 0.5 (= −(1.5·2⁻²³ − 2⁻⁴⁶)); the
# next float toward zero already rounds to sigmoid = 0.5 (allowed).
THRESHOLD = -1.7881392011531716e-07
THRESHOLD_UP = float(torch.nextafter(torch.tensor(THRESHOLD), torch.tensor(0.0)))
THRESHOLD_DOWN = float(torch.nextafter(torch.tensor(THRESHOLD), torch.tensor(-1.0)))


# ----------------------------------------------------------------------------- RIA inputs
def _qkv(B, H, Q, S, d, g, layout="contiguous"):
    if layout == "strided":
        # q, k, v as the heads of projected (B, L, H·d) tensors: (B, H, L, d) views with
        # batch/head/row strides of a (B, L, H, 3d) buffer, unit stride on d
        qkv = torch.randn(B, max(Q, S), H, 3 * d + 5, generator=g)
        q = qkv[:, :Q, :, :d].permute(0, 2, 1, 3)
        k = qkv[:, :S, :, d + 2:2 * d + 2].permute(0, 2, 1, 3)
        v = qkv[:, :S, :, 2 * d + 5:].permute(0, 2, 1, 3)
        return q, k, v
    return (torch.randn(B, H, Q, d, generator=g), torch.randn(B, H, S, d, generator=g),
            torch.randn(B, H, S, d, generator=g))


def blob_logits(B, Q, mh, mw, g, *, forced=True):
    """Smooth region logits: a Gaussian blob per query (a few keys allowed), noise on
    top; rows 1 (mod 7) block everything, rows 3 (mod 7) nothing (when ``forced``)."""
    yy = torch.arange(mh, dtype=torch.float32)[:, None]
    xx = torch.arange(mw, dtype=torch.float32)[None, :]
    cy = torch.rand(B, Q, 1, 1, generator=g) * mh
    cx = torch.rand(B, Q, 1, 1, generator=g) * mw
    radius = (0.15 + 0.35 * torch.rand(B, Q, 1, 1, generator=g)) * max(mh, mw)
    dist2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    logits = 4.0 * (1.0 - dist2) + 0.5 * torch.randn(B, Q, mh, mw, generator=g)
    if forced:
        logits[:, 1::7] = -3.0 - torch.rand(B, len(range(1, Q, 7)), mh, mw, generator=g)
        logits[:, 3::7] = 3.0 + torch.rand(B, len(range(3, Q, 7)), mh, mw, generator=g)
    return logits


def ria_case(shape, *, dtype=torch.float32, device="cpu", seed=0, layout="contiguous", logits_dtype=None,
             scale=None) -> Case:
    """shape = (B, H, Q, kh, kw, d, mh, mw)."""
    B, H, Q, kh, kw, d, mh, mw = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(B, H, Q, kh * kw, d, g, layout)
    logits = blob_logits(B, Q, mh, mw, g)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    logits = logits.to(logits_dtype or (torch.float32 if dtype == torch.float64 else dtype)).to(device)
    kwargs = {} if scale is None else {"scale": scale}
    return Case((to(q), to(k), to(v), logits, (kh, kw)), kwargs, label=f"{shape} {layout}")


# (B, H, Q, kh, kw, d, mh, mw): ReLA's ratios (120² logits → 15², 30², 60² keys) at small Q,
# Q across the 16/8-lane vector boundary of torch's CPU resampler, region maps smaller,
# larger, equal and non-square, d from 8 to 64, and an output size past the 128 threshold
# where torch switches resampling kernels.
RIA_SHAPES = [
    (2, 2, 7, 6, 6, 16, 12, 12),
    (1, 3, 20, 5, 7, 8, 9, 13),
    (2, 2, 33, 15, 15, 32, 120, 120),
    (1, 2, 17, 9, 12, 24, 4, 5),
    (1, 1, 40, 12, 11, 64, 12, 11),
    (1, 2, 5, 70, 61, 16, 40, 30),
    (2, 1, 100, 8, 8, 32, 30, 30),
]
RIA_DTYPE_SHAPES = [(2, 2, 33, 15, 15, 32, 120, 120), (1, 2, 17, 9, 12, 24, 4, 5)]


# ----------------------------------------------------------------------------- RIA edge cases
def _ria_base(dtype, device, *, B=2, H=2, Q=9, kh=6, kw=5, d=8, mh=12, mw=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(B, H, Q, kh * kw, d, g)
    return q, k, v, blob_logits(B, Q, mh, mw, g), (kh, kw), g


def _ria(q, k, v, logits, key_size, dtype, device, label):
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return Case((to(q), to(k), to(v), logits.to(device), key_size), {}, label=label)


def ria_all_blocked_rows(dtype, device):
    """Rows that block every key (unblocked entirely), rows that block none, and a batch
    element whose every row is all-blocked."""
    q, k, v, logits, ks, g = _ria_base(dtype, device)
    logits[0, ::2] = -8.0
    logits[0, 1::2] = 8.0
    logits[1] = -1.0 - torch.rand(logits[1].shape, generator=g)
    return _ria(q, k, v, logits, ks, dtype, device, "all-blocked rows")


def ria_near_zero(dtype, device, *, kh=6, kw=5, mh=12, mw=10, Q=9):
    """Texels on and next to the fp32 decision threshold and around zero (±0, ±1e-7, …).
    With mh = 2·kh the bilinear weights are exact (0.25), so 2×2 blocks of equal texels
    resample to exactly that texel; the last rows are random in ±4e-7 (the resampler's
    rounding decides)."""
    q, k, v, logits, ks, g = _ria_base(dtype, device, Q=Q, kh=kh, kw=kw, mh=mh, mw=mw)
    values = torch.tensor([THRESHOLD, THRESHOLD_UP, THRESHOLD_DOWN, 0.0, -0.0, -1e-7, 1e-7, -2e-7, -1.5e-7,
                           -1.78e-7, -1.79e-7, -3e-7, 5e-8, -1e-30, -1e-45])
    idx = torch.randint(0, len(values), (logits.shape[0], Q, mh // 2, mw // 2), generator=g)
    blocks = values[idx].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    logits[:, :Q - 2, : blocks.shape[2], : blocks.shape[3]] = blocks[:, :Q - 2]
    logits[:, Q - 2:] = (torch.rand(logits[:, Q - 2:].shape, generator=g) - 0.5) * 8e-7
    return _ria(q, k, v, logits, ks, dtype, device, "near-zero logits")


def ria_near_zero_resampled(kh, kw, mh, mw, Q=20):
    """Logits within ±6e-7 of zero on a region map of another size than the key map:
    every decision hangs on the exact rounding of torch's resampling arithmetic."""
    def make(dtype, device):
        q, k, v, logits, ks, g = _ria_base(dtype, device, Q=Q, kh=kh, kw=kw, mh=mh, mw=mw)
        logits = (torch.rand(logits.shape, generator=g) - 0.55) * 1.2e-6
        return _ria(q, k, v, logits, ks, dtype, device, f"near-zero {mh}x{mw}->{kh}x{kw}")
    return make


def _ria_poke(name, value, where, *, label=None):
    def make(dtype, device):
        q, k, v, logits, ks, g = _ria_base(dtype, device)
        target = {"q": q, "k": k, "v": v, "logits": logits}[name]
        target[where] = value
        return _ria(q, k, v, logits, ks, dtype, device, label or f"{name}{list(where)}={value}")
    return make


def ria_nan_k_at_blocked_key(dtype, device):
    """NaN in the k of a key every query blocks: it never enters (where-masked scores)."""
    q, k, v, logits, ks, g = _ria_base(dtype, device)
    logits[0, :, :2, :2] = -9.0  # key (0, 0) of batch 0 blocked for every query...
    logits[0, :, 4:, 4:] = 9.0  # ...and no row all-blocked
    k[0, 1, 0, 3] = NAN
    return _ria(q, k, v, logits, ks, dtype, device, "NaN k at a blocked key")


def ria_huge_scores(dtype, device):
    """Finite inputs whose scores overflow fp32 (q·k = ±inf): NaN rows, as in PyTorch."""
    q, k, v, logits, ks, g = _ria_base(dtype, device)
    q[1, 0, 2] = 3e19
    k[1, 0, :, :] = k[1, 0].sign() * 3e19
    return _ria(q, k, v, logits, ks, dtype, device, "overflowing scores")


def ria_empty(B, Q):
    def make(dtype, device):
        q, k, v, logits, ks, g = _ria_base(dtype, device)
        return _ria(q[:B, :, :Q], k[:B], v[:B], logits[:B, :Q], ks, dtype, device, f"B={B} Q={Q}")
    return make


RIA_EDGE_CASES = {
    "all_blocked_rows": ria_all_blocked_rows,
    "near_zero_logits": ria_near_zero,
    "near_zero_smaller_map": ria_near_zero_resampled(6, 5, 4, 3),
    "near_zero_larger_map": ria_near_zero_resampled(5, 7, 13, 9),
    "near_zero_non_square": ria_near_zero_resampled(3, 11, 7, 5),
    "near_zero_same_size": ria_near_zero_resampled(6, 5, 6, 5),
    "near_zero_wide_output": ria_near_zero_resampled(40, 100, 30, 33, Q=3),
    "nan_q": _ria_poke("q", NAN, (1, 0, 3, 2)),
    "inf_q": _ria_poke("q", INF, (0, 1, 0, 0)),
    "nan_k": _ria_poke("k", NAN, (0, 0, 7, 1)),
    "inf_k": _ria_poke("k", -INF, (1, 1, 20, 5)),
    "nan_k_blocked_key": ria_nan_k_at_blocked_key,
    "nan_v": _ria_poke("v", NAN, (0, 1, 11, 4)),
    "inf_v": _ria_poke("v", INF, (1, 0, 2, 7)),
    "nan_logits": _ria_poke("logits", NAN, (0, 2, 5, 5)),
    "inf_logits": _ria_poke("logits", INF, (1, 4, 3, slice(0, 4))),
    "neg_inf_logits": _ria_poke("logits", -INF, (0, 5, slice(None), slice(2, 6))),
    "empty_batch": ria_empty(0, 9),
    "empty_queries": ria_empty(2, 0),
}


def _ria_reference(q, k, v, region_logits, key_size, scale=None):
    return region_image_attention_reference(q, k, v, region_logits, key_size, scale=scale)


def _ria_interpreter_too_slow(backend, shape):
    B, H, Q, kh, kw, d, mh, mw = shape
    return backend == "triton" and B * H * Q * kh * kw * d > 3_000_000


RIA_SPEC = OpSpec(
    name="region_image_attention",
    fn=region_image_attention,
    reference=_ria_reference,
    backends=RIA_BACKENDS,
    make_case=ria_case,
    shapes=RIA_SHAPES,
    modes=({"layout": "contiguous"}, {"layout": "strided", "scale": 0.3}),
    dtype_shapes=RIA_DTYPE_SHAPES,
    differentiable=(0, 1, 2),
    edge_cases=RIA_EDGE_CASES,
    dtypes={"triton": (torch.float32, torch.float16, torch.bfloat16)},
    too_slow=_ria_interpreter_too_slow,
    output_names=("out",),
)


# ----------------------------------------------------------------------------- RLA inputs
def padding_mask(B, S, g, mode):
    """None, random sentence lengths ≥ 1 (words first, then padding), or with one
    sample all padded ("with_empty")."""
    if mode == "none":
        return None
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    mask = torch.arange(S)[None, :] >= lengths[:, None]
    if mode == "scattered":  # padding anywhere, not only at the end
        mask = torch.rand(B, S, generator=g) < 0.4
        mask[:, 0] = False
    if mode == "with_empty":
        mask[B // 2] = True
    return mask


def rla_case(shape, *, dtype=torch.float32, device="cpu", seed=0, mask="padded", layout="contiguous",
             scale=None) -> Case:
    """shape = (B, H, Q, S, d)."""
    B, H, Q, S, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(B, H, Q, S, d, g, layout)
    kpm = padding_mask(B, S, g, mask)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    kwargs = {} if scale is None else {"scale": scale}
    return Case((to(q), to(k), to(v), None if kpm is None else kpm.to(device)), kwargs, label=f"{shape} {mask}")


# (B, H, Q, S, d): ReLA's word attention (100 regions × 20 words, 8 heads of 32), one word,
# key counts across block sizes, odd head sizes
RLA_SHAPES = [
    (2, 8, 100, 20, 32),
    (1, 2, 7, 1, 8),
    (2, 3, 33, 70, 16),
    (3, 1, 5, 129, 24),
    (1, 2, 65, 17, 64),
]
RLA_DTYPE_SHAPES = [(2, 8, 100, 20, 32), (2, 3, 33, 70, 16)]


def _rla_base(dtype, device, *, B=3, H=2, Q=9, S=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(B, H, Q, S, d, g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 12:] = True
    mask[2, 5:] = True
    return q, k, v, mask, g


def _rla(q, k, v, mask, dtype, device, label):
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return Case((to(q), to(k), to(v), None if mask is None else mask.to(device)), {}, label=label)


def _rla_poke(name, value, where, *, no_mask=False):
    def make(dtype, device):
        q, k, v, mask, g = _rla_base(dtype, device)
        {"q": q, "k": k, "v": v}[name][where] = value
        return _rla(q, k, v, None if no_mask else mask, dtype, device, f"{name}{list(where)}={value}")
    return make


def rla_all_padded(dtype, device):
    """One sample with every word padded (zero output, zero gradients), NaN in its inputs too."""
    q, k, v, mask, g = _rla_base(dtype, device)
    mask[1] = True
    q[1, 0, 0, 0] = NAN
    k[1, 1, 3, 2] = INF
    v[1, 0, 5, 1] = NAN
    return _rla(q, k, v, mask, dtype, device, "all-padded sample")


def rla_everything_padded(dtype, device):
    q, k, v, mask, g = _rla_base(dtype, device)
    return _rla(q, k, v, torch.ones_like(mask), dtype, device, "every sample padded")


def rla_no_mask(dtype, device):
    q, k, v, mask, g = _rla_base(dtype, device)
    return _rla(q, k, v, None, dtype, device, "no padding mask")


def rla_empty(B, Q):
    def make(dtype, device):
        q, k, v, mask, g = _rla_base(dtype, device)
        return _rla(q[:B, :, :Q], k[:B], v[:B], mask[:B], dtype, device, f"B={B} Q={Q}")
    return make


RLA_EDGE_CASES = {
    "all_padded_sample": rla_all_padded,
    "every_sample_padded": rla_everything_padded,
    "no_mask": rla_no_mask,
    "nan_q": _rla_poke("q", NAN, (0, 1, 4, 3)),
    "inf_q": _rla_poke("q", -INF, (2, 0, 1, 0)),
    "nan_k_padded_word": _rla_poke("k", NAN, (0, 0, 15, 2)),
    "nan_k": _rla_poke("k", NAN, (2, 1, 1, 6)),
    "inf_k_no_mask": _rla_poke("k", INF, (1, 0, 7, 0), no_mask=True),
    "nan_v_padded_word": _rla_poke("v", NAN, (2, 1, 19, 3)),
    "inf_v": _rla_poke("v", INF, (1, 1, 2, 2)),
    "empty_batch": rla_empty(0, 9),
    "empty_queries": rla_empty(3, 0),
}


def _rla_reference(q, k, v, key_padding_mask=None, scale=None):
    return region_language_attention_reference(q, k, v, key_padding_mask, scale=scale)


RLA_SPEC = OpSpec(
    name="region_language_attention",
    fn=region_language_attention,
    reference=_rla_reference,
    backends=RLA_BACKENDS,
    make_case=rla_case,
    shapes=RLA_SHAPES,
    modes=({"mask": "padded"}, {"mask": "none"}, {"mask": "with_empty", "layout": "strided", "scale": 0.2},
           {"mask": "scattered"}),
    dtype_shapes=RLA_DTYPE_SHAPES,
    differentiable=(0, 1, 2),
    edge_cases=RLA_EDGE_CASES,
    dtypes={"triton": (torch.float32, torch.float16, torch.bfloat16)},
    too_slow=lambda backend, shape: backend == "triton" and math.prod(shape) > 3_000_000,
    output_names=("out",),
)


# ----------------------------------------------------------------------------- mask probes
def decision_probe(logits: torch.Tensor, key_size, *, dtype=torch.float32):
    """q = 0, k = 0 and v = the identity over keys (d = S): every allowed key of a row gets
    the same weight, so out[b, h, i, j] = allowed_ij / (number allowed) and the
    mask a backend used can be read back exactly from its output."""
    B, Q = logits.shape[:2]
    S = key_size[0] * key_size[1]
    q = torch.zeros(B, 1, Q, S, dtype=dtype, device=logits.device)
    k = torch.zeros(B, 1, S, S, dtype=dtype, device=logits.device)
    v = torch.eye(S, dtype=dtype, device=logits.device).expand(B, 1, S, S).contiguous()
    return q, k, v


__all__ = ["RIA_SPEC", "RLA_SPEC", "ria_case", "rla_case", "blob_logits", "decision_probe", "THRESHOLD",
           "THRESHOLD_UP", "THRESHOLD_DOWN", "padding_mask"]
