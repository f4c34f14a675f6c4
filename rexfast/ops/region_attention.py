"""Pieces shared by ``region_image_attention`` (RIA) and ``region_language_attention``
(RLA), ReLA's decoder attentions: the masked-softmax attention core in plain
PyTorch, the official RIA mask construction, and the input checks both ops use.

Semantics of the core (every backend of both ops computes exactly this)
----------------------------------------------------------------------
For one (b, h): s_ij = scale · q_i·k_j, then s_ij = −∞ where key j is blocked for
query i (``torch.where``: a blocked key's score is replaced, so a NaN/inf in a
blocked key's k never enters), p = softmax_j(s), out_i = Σ_j p_ij v_j as a
matrix product over *all* keys (IEEE: a blocked key has p_ij = 0, and 0·inf or
0·NaN in its v is NaN). So, as PyTorch computes it:

* a non-finite value in v (at any key, blocked or not) makes the output column
  NaN (or ±inf) for every query of that (b, h);
* a row with a NaN or +inf allowed score, or whose allowed scores are all −inf,
  is NaN throughout (softmax of such a row is NaN, blocked entries included);
* gradients follow autograd through these three operations (a non-finite k
  anywhere in (b, h) reaches every dq row through 0·inf in ds·k, a non-finite
  q every dk row).

Fused kernels skip key blocks that are blocked for a whole query block; they do
so only where it cannot change a result (all q, k, v of that (b, h) finite, and
in the backward no row of the query block with a non-finite log-sum-exp), so
the semantics above hold for every backend.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- the official RIA mask
def official_region_blocked(region_logits: Tensor, key_size: Sequence[int]) -> Tensor:
    """The RIA mask as the authors' decoder builds it, (B, Q, kh·kw) bool, True = blocked.

    ``forward_prediction_heads``: ``F.interpolate(all_mask, key_size, "bilinear",
    align_corners=False)``, ``.sigmoid() < 0.5`` (flattened, the same for every
    head); ``forward``: rows that block every key are unblocked entirely. The
    logits are taken in float32 (as the authors' fp32 inference computes them;
    fp16/bf16 logits convert exactly) and contiguous (an (B, Q, mh, mw) tensor as
    their einsum makes it), and the decision is made on the tensors' device by
    PyTorch's own kernels. No gradient flows into the logits.
    """
    kh, kw = int(key_size[0]), int(key_size[1])
    logits = region_logits.detach().to(torch.float32).contiguous()
    if logits.shape[0] == 0 or logits.shape[1] == 0:  # torch's resampler refuses empty inputs
        return torch.zeros(logits.shape[0], logits.shape[1], kh * kw, dtype=torch.bool, device=logits.device)
    resampled = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False)
    blocked = resampled.sigmoid().flatten(2) < 0.5
    # attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    return blocked & ~blocked.all(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- the attention core
def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def masked_scores(q: Tensor, k: Tensor, blocked: Optional[Tensor], scale: float) -> Tensor:
    """scale·q kᵀ with −∞ where blocked (``blocked`` broadcasts to (B, H, Q, S))."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if blocked is not None:
        s = torch.where(blocked, float("-inf"), s)
    return s


def masked_attention(q: Tensor, k: Tensor, v: Tensor, blocked: Optional[Tensor], scale: float) -> Tensor:
    """softmax(masked scores) @ v in q's dtype (see the module docstring)."""
    return torch.matmul(masked_scores(q, k, blocked, scale).softmax(dim=-1), v)


def masked_attention_lse(q: Tensor, k: Tensor, v: Tensor, blocked: Optional[Tensor], scale: float):
    """(out, lse): the core and its row log-sum-exp (the statistic fused kernels keep)."""
    s = masked_scores(q, k, blocked, scale)
    return torch.matmul(s.softmax(dim=-1), v), torch.logsumexp(s, dim=-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- checks
def check_qkv(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, L, d), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
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
    if scale is None:
        return default_scale(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


def inner_contiguous(t: Tensor) -> Tensor:
    # Kernels take any batch/head/row stride but need unit stride on the last axis.
    return t if t.stride(-1) == 1 else t.contiguous()


__all__ = [
    "FLOAT_DTYPES", "official_region_blocked", "default_scale", "masked_scores", "masked_attention",
    "masked_attention_lse", "compute_dtype", "check_qkv", "check_scale", "inner_contiguous",
]
