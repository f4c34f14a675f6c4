"""``group_assign`` at inference in plain PyTorch: the decomposition exporters lower to.

No noise, no gradient: what the op's forward returns when called without
``noise``/``seed`` (the deterministic eval of CGFormer), written with
operations every exporter and TensorRT take (matmul, reductions with constant
axes, comparisons, ``where``): no softmax, no scatter, no argmax.

    S = l2n(q) l2n(k)ᵀ,  Z = S / τ                     (B, N, P)
    winner per pixel p: the *first* token n with Z[n, p] = max_N Z[·, p] over the
        non-NaN logits (torch.argmax's rule, and the kernels': ``winner`` in
        ``csrc/cpu/group_assign.cpp``), found as min{n : Z[n, p] = max};
        τ > 0 makes this the argmax of softmax_N(Z) exactly where the kernels' is
        (they, too, pick from Z);
    H = onehot(winner) by comparing the token index with the winner;
    r = Σ_P H,  out = (H v) / (r + 1),  assign = H,  counts = r.

NaN semantics (the kernels', and the reference's up to its softmax rounding): a
pixel whose logits hold a NaN, or whose largest non-NaN logit is ±inf (a +inf,
or every logit −inf or NaN), is *poisoned*: its assignment column is NaN and
its winner token 0; the counts of every token of its batch item are NaN, and so
is that item's whole ``out``. A non-finite value in v at (p, d) reaches every
token's output at d (0·inf and 0·NaN are NaN), as the kernels compute Â·v.

Computed in float32 (float64 for float64 inputs) like the reference backend;
``out`` and ``assign`` come back in q's dtype, ``counts`` in float32.

:func:`group_assign_decomposition` is the single source of truth for the export
paths: the onnxscript function in :mod:`rexfast.export.onnx_functions` is this
computation operation for operation (tested against it and against the op), and
:data:`rexfast.ops.decompositions.INFERENCE_DECOMPOSITIONS` lowers the
registered op to it (``torch.export`` → ``run_decompositions``, torch-TensorRT).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import l2n


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_assign_decomposition(q: Tensor, k: Tensor, v: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (B,N,C), k (B,P,C), v (B,P,D), tau a one-element tensor → (out (B,N,D), assign (B,N,P), counts (B,N))."""
    compute = _compute_dtype(q.dtype)
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    n_tokens = qc.shape[1]
    z = (l2n(qc) @ l2n(kc).transpose(-1, -2)) / tau.to(device=qc.device, dtype=compute).reshape(())
    nan = torch.isnan(z)
    finite_or_inf = torch.where(nan, float("-inf"), z)
    best = finite_or_inf.amax(dim=1, keepdim=True)  # (B, 1, P): the softmax shift
    poisoned = nan.any(dim=1, keepdim=True) | torch.isinf(best)  # (B, 1, P)
    tokens = torch.arange(n_tokens, device=qc.device).view(1, n_tokens, 1)
    first = torch.where(finite_or_inf == best, tokens, n_tokens).amin(dim=1, keepdim=True)
    first = torch.where(poisoned, 0, first)
    hard = (tokens == first).to(compute)  # (B, N, P)
    assign = torch.where(poisoned, float("nan"), hard)
    item_poisoned = poisoned.any(dim=2)  # (B, 1)
    counts = hard.sum(dim=2) + torch.where(item_poisoned, float("nan"), 0.0)  # (B, N)
    out = (hard @ vc) / (counts + 1).unsqueeze(-1)
    return out.to(q.dtype), assign.to(q.dtype), counts.to(torch.float32)


def decompose_registered(q, k, v, tau, noise=None, key=None, backend=None):
    """``rexfast::group_assign`` (its registered arguments) → the decomposition.

    Inference only: the op with ``noise``/``seed`` draws Gumbel noise, which no
    exported graph reproduces (export a model with ``eval_noise=False``)."""
    if noise is not None or key is not None:
        raise ValueError("group_assign: only the noise-free op (no noise=, no seed=) has an inference decomposition; "
                         "Gumbel noise at inference (CGFormer eval_noise=True) cannot be exported")
    return group_assign_decomposition(q, k, v, tau)


__all__ = ["group_assign_decomposition", "decompose_registered"]
