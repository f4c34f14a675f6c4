"""Input checks both region-attention ops make before any kernel runs: q, k, v and
the softmax scale. Each op's ``op.py`` adds the checks of its own mask input."""

from __future__ import annotations

import math

from ..common import check_float_tensors
from .core import default_scale


def check_qkv(op: str, q, k, v) -> None:
    """q (B, H, Q, d), k and v (B, H, S, d): one float dtype, one device, d and S non-empty."""
    check_float_tensors(op, (("q", q), ("k", k), ("v", v)), 4, "(B, H, L, d)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Q, d = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(
            f"{op}: k must be (B, H, S, d) = ({B}, {H}, S, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)} (B, H, S, d), got {tuple(v.shape)}")
    if d == 0:
        raise ValueError(f"{op}: the head dimension d of q {tuple(q.shape)} must be non-empty")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: k {tuple(k.shape)} has an empty key axis S")
    if B * H * max(Q, 1) * k.shape[2] >= 2**62:
        raise ValueError(f"{op}: B*H*Q*S is too large ({B}*{H}*{Q}*{k.shape[2]})")


def check_scale(op: str, scale, d: int) -> float:
    """The softmax scale to use: 1/√d for None, else ``scale`` as a finite float."""
    if scale is None:
        return default_scale(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


__all__ = ["check_qkv", "check_scale"]
