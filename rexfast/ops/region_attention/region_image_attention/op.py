"""``region_image_attention`` (RIA): ReLA's region-image cross-attention, masked by region logits.

One op in one place: input checks, the ``torch.library`` registration of the
forward and backward ops, their fake functions, the autograd formula, and the
op's backends (``BACKENDS``). Semantics: :mod:`.reference` (the authors'
official path) and :mod:`rexfast.ops.region_attention.core` (the attention core,
non-finite inputs); the fused kernels' decisions: :mod:`rexfast.ops.region_attention.plan`.

Math (per b, h; q (Q,d), k/v (S,d) with S = kh·kw a row-major key map,
region logits R (Q, mh, mw)):
    blocked_qj = sigmoid(bilinear(R_q → kh×kw)_j) < 0.5   (fp32, as torch computes it)
    blocked_q· = False where blocked_q· is all True        (the all-blocked-row rule)
    s = where(blocked, −∞, scale·q kᵀ),  p = softmax_j(s),  out = p v
The mask is shared by all heads. The registered op also returns lse = log Σ_j exp s_j
(B, H, Q) and the all-blocked rows (B, Q), which the backward takes back. Gradients:
    p = exp(s − lse), dv = pᵀ dout, dp = dout vᵀ, Δ_i = dout_i·out_i,
    ds = where(blocked, 0, p ⊙ (dp − Δ))·scale, dq = ds k, dk = dsᵀ q.
No gradient reaches the region logits (a mask input).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ...common import FLOAT_DTYPES, inner_contiguous, lazy, op_backends
from ..checks import check_qkv, check_scale
from ..core import compute_dtype, contiguous_grads, contiguous_like
from ..plan import plan_args
from .reference import reference_backward, reference_forward

OP = "region_image_attention"


# ----------------------------------------------------------------------------- checks
def _check_key_size(key_size, S: int):
    if isinstance(key_size, Tensor) or not isinstance(key_size, (tuple, list, torch.Size)) or len(key_size) != 2:
        raise TypeError(f"{OP}: key_size must be a pair (kh, kw), got {key_size!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in key_size):
        raise TypeError(f"{OP}: key_size must hold two ints, got {key_size!r}")
    kh, kw = key_size
    if kh <= 0 or kw <= 0:
        raise ValueError(f"{OP}: key_size must be positive, got {tuple(key_size)}")
    if kh * kw != S:
        raise ValueError(f"{OP}: key_size {tuple(key_size)} has kh*kw = {kh * kw} keys but k has S = {S}")
    return int(kh), int(kw)


def _check_inputs(q, k, v, region_logits, key_size):
    check_qkv(OP, q, k, v)
    B, H, Q, _ = q.shape
    kh, kw = _check_key_size(key_size, k.shape[2])
    if not isinstance(region_logits, Tensor):
        raise TypeError(f"{OP}: region_logits must be a torch.Tensor, got {type(region_logits).__name__}")
    if region_logits.dim() != 4:
        raise ValueError(f"{OP}: region_logits must be 4-D (B, Q, mh, mw), got shape {tuple(region_logits.shape)}")
    if region_logits.shape[0] != B or region_logits.shape[1] != Q:
        raise ValueError(f"{OP}: region_logits must be (B, Q, mh, mw) = ({B}, {Q}, mh, mw) to match q "
                         f"{tuple(q.shape)}, got {tuple(region_logits.shape)}")
    if region_logits.shape[2] == 0 or region_logits.shape[3] == 0:
        raise ValueError(f"{OP}: region_logits {tuple(region_logits.shape)} has an empty region map")
    if region_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: region_logits must be a float tensor, got {region_logits.dtype}")
    if region_logits.device != q.device:
        raise ValueError(f"{OP}: region_logits is on {region_logits.device} but q is on {q.device}")
    return kh, kw


# ----------------------------------------------------------------------------- backends
# The C++/CUDA kernels (csrc/cpu/region_image_attention.cpp, csrc/cuda/region_image_attention.cu)
# take the decision plan for the tensors' device (rexfast.ops.region_attention.plan).
def _ext_forward(q, k, v, region_logits, kh, kw, scale):
    logits, mode, fma, q_vec, threshold, resampled = plan_args(q, region_logits, kh, kw)
    return torch.ops.rexfast_C.region_image_attention_fwd(q, k, v, logits, kh, kw, scale, mode, fma, q_vec, threshold,
                                                         resampled)


def _ext_backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows):
    logits, mode, fma, q_vec, threshold, resampled = plan_args(q, region_logits, kh, kw)
    return torch.ops.rexfast_C.region_image_attention_bwd(dout, q, k, v, logits, kh, kw, scale, mode, fma, q_vec,
                                                         threshold, resampled, out, lse, open_rows.contiguous())


_TRITON = "rexfast.ops.region_attention.triton_kernels"  # the family's Triton kernels, imported on first use
BACKENDS = op_backends(OP, reference=(reference_forward, reference_backward),
                       native=(_ext_forward, _ext_backward), native_symbol="region_image_attention_fwd",
                       triton=(lazy(_TRITON, "ria_forward"), lazy(_TRITON, "ria_backward")), triton_module=_TRITON)


# ----------------------------------------------------------------------------- registration
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


@torch.library.custom_op("rexfast::region_image_attention", mutates_args=())
def _ria_op(q: Tensor, k: Tensor, v: Tensor, region_logits: Tensor, kh: int, kw: int, scale: float,
            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Q, _ = q.shape
    if B == 0 or H == 0 or Q == 0:  # nothing for a kernel to do
        return (q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=_lse_dtype(q.dtype)),
                q.new_empty(B, Q, dtype=torch.bool))
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    out, lse, open_rows = BACKENDS[backend].forward(q, k, v, region_logits.contiguous(), kh, kw, scale)
    return out, lse.to(_lse_dtype(q.dtype)), open_rows


@_ria_op.register_fake
def _(q, k, v, region_logits, kh, kw, scale, backend):
    B, H, Q, _ = q.shape
    return (q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=_lse_dtype(q.dtype)),
            q.new_empty(B, Q, dtype=torch.bool))


@torch.library.custom_op("rexfast::region_image_attention_backward", mutates_args=())
def _ria_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, region_logits: Tensor, kh: int, kw: int,
                     scale: float, out: Tensor, lse: Tensor, open_rows: Tensor,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Q, _ = q.shape
    if B == 0 or H == 0 or Q == 0:
        return tuple(g.zero_() for g in contiguous_like(q, k, v))
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    dq, dk, dv = BACKENDS[backend].backward(dout.contiguous(), q, k, v, region_logits.contiguous(), kh, kw, scale,
                                            out.contiguous(), lse.contiguous(), open_rows.contiguous())
    return contiguous_grads(dq, dk, dv, q, k, v)


@_ria_backward_op.register_fake
def _(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows, backend):
    return contiguous_like(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, region_logits, kh, kw, scale, backend = inputs
    out, lse, open_rows = output
    ctx.save_for_backward(q, k, v, region_logits, out, lse, open_rows)
    ctx.args = (kh, kw, scale, backend)
    ctx.set_materialize_grads(True)


def _backward(ctx, dout, dlse, dopen):
    q, k, v, region_logits, out, lse, open_rows = ctx.saved_tensors
    kh, kw, scale, backend = ctx.args
    dq, dk, dv = _ria_backward_op(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows, backend)
    return dq, dk, dv, None, None, None, None, None


_ria_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def region_image_attention(q: Tensor, k: Tensor, v: Tensor, region_logits: Tensor, key_size: Sequence[int], *,
                           scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """ReLA's region-image attention (RIA) with the mask made from region logits.

    Args:
        q: (B, H, Q, d) region queries (per head).
        k, v: (B, H, S, d) image keys/values, S = kh·kw flattened row-major.
        region_logits: (B, Q, mh, mw) region mask logits (any float dtype; the
            decision is made on their float32 values, never differentiated).
        key_size: (kh, kw), the key map's height and width.
        scale: softmax scale, default 1/√d.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default from
            ``REXFAST_BACKEND`` or automatic (see :mod:`rexfast.ops.registry`).

    A key j is blocked for query i where sigmoid(bilinear(region_logits[b, i] →
    key_size, align_corners=False))_j < 0.5, computed exactly as the authors'
    ``F.interpolate`` + ``sigmoid`` on this device; a query that would block every
    key attends to all of them. Returns (B, H, Q, d) in q's dtype.
    """
    kh, kw = _check_inputs(q, k, v, region_logits, key_size)
    scale = check_scale(OP, scale, q.shape[3])
    name = BACKENDS.choose(q.device, backend)
    out, _, _ = _ria_op(q, k, v, region_logits, kh, kw, scale, name)
    return out


__all__ = ["region_image_attention", "BACKENDS"]
