"""``region_language_attention`` at inference in plain PyTorch: the decomposition exporters lower to.

The reference backend's forward is already plain PyTorch with no data-dependent
indexing (the public reference selects samples with a boolean index, which an
exported graph cannot): masked softmax attention over every sample, then
``where`` puts zeros on the rows of a sample whose every word is padded (and
−inf in their log-sum-exp), exactly what every backend returns:

    s = where(padded_j, −∞, scale·q kᵀ),  out = softmax(s) v,  lse = logsumexp(s)
    out = 0 and lse = −∞ for a sample with every word padded.

Without a padding mask (ReLA's main branch) nothing is masked. NaN semantics:
:mod:`rexfast.ops.region_attention.core`. The onnxscript functions in
:mod:`rexfast.export.onnx_functions` compute this operation for operation.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core import compute_dtype
from .reference import reference_forward


def region_language_attention_decomposition(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                                            scale: float) -> tuple[Tensor, Tensor]:
    """q (B,H,Q,d), k/v (B,H,S,d), key_padding_mask (B,S) bool or None → (out (B,H,Q,d), lse (B,H,Q))."""
    out, lse = reference_forward(q, k, v, key_padding_mask, float(scale))
    return out, lse.to(compute_dtype(q.dtype))


def decompose_registered(q, k, v, key_padding_mask, scale, backend=None):
    """``rexfast::region_language_attention`` (its registered arguments) → the decomposition."""
    return region_language_attention_decomposition(q, k, v, key_padding_mask, scale)


__all__ = ["region_language_attention_decomposition", "decompose_registered"]
