"""``region_language_attention`` in plain PyTorch: the truth every fused backend is tested against.

ReLA's region-language attention (the decoder's ``RLA_lang_att``): region
queries attend over word features. The authors' main branch passes no key
padding mask (``key_padding_mask=None`` here reproduces it: every word, padding
included, is a key). With a mask (B, S) bool, True = padded, padded words are
blocked for every query of that sample (the softmax core of
:mod:`rexfast.ops.region_attention.core`).

A sample whose every word is padded has no key to attend to: its output rows
are **zero** and nothing flows back from them (zero gradients to its q, k, v),
whatever its values (nn.MultiheadAttention would give NaN there). Every backend
does the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import compute_dtype, default_scale, masked_attention, masked_attention_backward, masked_attention_lse


def _blocked(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]


def region_language_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                                        scale: Optional[float] = None) -> Tensor:
    """q (B,H,Q,d), k/v (B,H,S,d), key_padding_mask (B,S) bool or None → (B,H,Q,d)."""
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if key_padding_mask is None:
        return masked_attention(q, k, v, None, scale)
    padded = key_padding_mask.bool()
    keep = ~padded.all(dim=-1)  # samples with at least one word
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    out[keep] = masked_attention(q[keep], k[keep], v[keep], _blocked(padded[keep]), scale)
    return out


def reference_forward(q, k, v, key_padding_mask, scale):
    compute = compute_dtype(q.dtype)
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    out, lse = masked_attention_lse(qc, kc, vc, _blocked(key_padding_mask), scale)
    if key_padding_mask is not None:
        empty = key_padding_mask.bool().all(dim=-1)[:, None, None]  # (B, 1, 1)
        out = torch.where(empty[..., None], 0.0, out)
        lse = torch.where(empty, float("-inf"), lse)
    return out.to(q.dtype), lse


def reference_backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    if key_padding_mask is not None:
        empty = key_padding_mask.bool().all(dim=-1)
        if empty.any():  # nothing flows back from an all-padded sample
            dq, dk, dv = (torch.zeros(t.shape, dtype=compute_dtype(q.dtype), device=q.device) for t in (q, k, v))
            keep = ~empty
            if keep.any():
                gq, gk, gv = masked_attention_backward(dout[keep], q[keep], k[keep], v[keep],
                                                       _blocked(key_padding_mask[keep]), scale)
                dq[keep], dk[keep], dv[keep] = gq, gk, gv
            return dq, dk, dv
    return masked_attention_backward(dout, q, k, v, _blocked(key_padding_mask), scale)


__all__ = ["region_language_attention_reference", "reference_forward", "reference_backward"]
