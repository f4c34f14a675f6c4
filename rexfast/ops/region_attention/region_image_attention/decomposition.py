"""``region_image_attention`` at inference in plain PyTorch: the decomposition exporters lower to.

The reference is already plain PyTorch that every exporter takes (resampling,
sigmoid, comparisons, ``where``, softmax, matmuls): the decomposition *is* the
reference path of :mod:`.reference`, returning what the registered op returns
— the output, the row log-sum-exp and the open rows — so the decisions are the
op's by construction:

    blocked = sigmoid(bilinear(R → kh×kw, align_corners=False)) < 0.5   (float32)
    blocked rows that block every key are unblocked (open_rows, B×Q, marks them)
    s = where(blocked, −∞, scale·q kᵀ),  out = softmax(s) v,  lse = logsumexp(s)

NaN semantics: those of :mod:`rexfast.ops.region_attention.core` (a non-finite v
anywhere in (b, h) reaches every query's output column; a row with a NaN or
+inf allowed score is NaN). The region logits decide only the mask; a NaN logit
gives sigmoid NaN, ``NaN < 0.5`` is false: that key is not blocked.

The onnxscript function in :mod:`rexfast.export.onnx_functions` is this
computation operation for operation (ONNX Resize ``linear``/``half_pixel``), with
the sigmoid test written as the comparison it is in PyTorch's float32:
``sigmoid(x) < 0.5`` exactly when ``x <= -1.7881392e-07`` (checked for every
float32 in [-1e-3, 0]), because runtimes' Sigmoid kernels round differently
next to 0. Its masks equal these whenever the region map needs no resampling
(ReLA's default, ``region_masks_at_key_resolution``); a resampled map can round
its bilinear weights differently in another runtime, which moves decisions only
for logits within ~1e-6 of that threshold.
"""

from __future__ import annotations

from torch import Tensor

from ..core import compute_dtype, masked_attention_lse
from ..mask import official_region_blocked


def region_image_attention_decomposition(q: Tensor, k: Tensor, v: Tensor, region_logits: Tensor, kh: int, kw: int,
                                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q (B,H,Q,d), k/v (B,H,kh·kw,d), region_logits (B,Q,mh,mw) → (out (B,H,Q,d), lse (B,H,Q),
    open_rows (B,Q) bool)."""
    compute = compute_dtype(q.dtype)
    blocked, open_rows = official_region_blocked(region_logits, (kh, kw), with_open_rows=True)
    blocked = blocked.to(q.device)[:, None]  # (B, 1, Q, S)
    out, lse = masked_attention_lse(q.to(compute), k.to(compute), v.to(compute), blocked, float(scale))
    return out.to(q.dtype), lse, open_rows.to(q.device)


def decompose_registered(q, k, v, region_logits, kh, kw, scale, backend=None):
    """``rexfast::region_image_attention`` (its registered arguments) → the decomposition."""
    return region_image_attention_decomposition(q, k, v, region_logits, kh, kw, scale)


__all__ = ["region_image_attention_decomposition", "decompose_registered"]
