"""``region_image_attention`` in plain PyTorch: the truth every fused backend is tested against.

:func:`region_image_attention_reference` is the authors' official path, written
here from their decoder's semantics (``forward_prediction_heads`` and
``forward`` of ReLA's ``MultiScaleMaskedReferringDecoder``): bilinear resampling
of the region logits to the key map (``align_corners=False``), ``sigmoid < 0.5``
= blocked, rows that block every key unblocked, then multi-head softmax
attention with that boolean mask, shared by every head. Autograd through it
defines the gradients of q, k, v; the region logits get none.

:func:`reference_forward` / :func:`reference_backward` are the ``reference``
backend: the same computation returning what the fused kernels return (the
output and the row log-sum-exp), and the gradient as an explicit formula
(inside a custom op autograd does not record), term for term what autograd
computes through softmax and ``torch.where``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..core import compute_dtype, default_scale, masked_attention, masked_attention_backward, masked_attention_lse
from ..mask import official_region_blocked


def region_image_attention_reference(q: Tensor, k: Tensor, v: Tensor, region_logits: Tensor,
                                     key_size: Sequence[int], scale: Optional[float] = None) -> Tensor:
    """q (B,H,Q,d), k/v (B,H,kh·kw,d), region_logits (B,Q,mh,mw) → (B,H,Q,d)."""
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    blocked = official_region_blocked(region_logits, key_size).to(q.device)
    return masked_attention(q, k, v, blocked[:, None], scale)


def reference_forward(q, k, v, region_logits, kh, kw, scale):
    """(out, lse, open): open (B, Q) bool marks the rows that block every key (they attend to all)."""
    compute = compute_dtype(q.dtype)
    blocked, open_rows = official_region_blocked(region_logits, (kh, kw), with_open_rows=True)
    out, lse = masked_attention_lse(q.to(compute), k.to(compute), v.to(compute), blocked[:, None], scale)
    return out.to(q.dtype), lse, open_rows


def reference_backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows):
    blocked = official_region_blocked(region_logits, (kh, kw))[:, None]
    return masked_attention_backward(dout, q, k, v, blocked, scale)


__all__ = ["region_image_attention_reference", "reference_forward", "reference_backward"]
