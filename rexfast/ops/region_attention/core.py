"""The attention core of the region-attention family in plain PyTorch: the masked
softmax attention both ops compute, its explicit backward, and the dtype and layout
rules of their registered ops.

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
from typing import Optional

import torch
from torch import Tensor


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


def masked_attention_backward(dout, q, k, v, blocked, scale):
    """dq, dk, dv of softmax(where(blocked, −∞, scale·q kᵀ)) @ v, as autograd computes them."""
    compute = compute_dtype(q.dtype)
    q, k, v, dout = (t.to(compute) for t in (q, k, v, dout))
    p = masked_scores(q, k, blocked, scale).softmax(dim=-1)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = (dp - (dp * p).sum(dim=-1, keepdim=True)) * p  # softmax backward
    if blocked is not None:
        ds = torch.where(blocked, 0.0, ds)  # torch.where backward
    ds = ds * scale
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def contiguous_grads(dq: Tensor, dk: Tensor, dv: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """dq, dk, dv contiguous in the inputs' dtypes, whatever the inputs' strides (the models pass
    head views of (B, N, H, d) tensors): what the backward ops' fake functions promise, and what
    Inductor asserts of a custom op's outputs in a compiled graph."""
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


def contiguous_like(*tensors: Tensor) -> tuple:
    """The backward ops' fake outputs: empty tensors shaped as ``tensors``, contiguous."""
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)


__all__ = ["default_scale", "masked_scores", "masked_attention", "masked_attention_lse", "masked_attention_backward",
           "compute_dtype", "contiguous_grads", "contiguous_like"]
