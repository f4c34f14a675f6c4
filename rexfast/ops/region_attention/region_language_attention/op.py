"""``region_language_attention`` (RLA): ReLA's region-word attention, with an optional key padding mask.

Checks, ``torch.library`` registration (forward, backward, fake functions,
autograd) and backends, like :mod:`rexfast.ops.region_attention.region_image_attention`,
whose attention core it shares (semantics: :mod:`rexfast.ops.region_attention.core`).

Math (per b, h): s = where(padded_j, −∞, scale·q kᵀ), p = softmax_j(s), out = p v;
with ``key_padding_mask=None`` nothing is masked (the authors' main branch). A
sample whose every word is padded gives zero output rows and zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...common import inner_contiguous, lazy, op_backends
from ..checks import check_qkv, check_scale
from ..core import compute_dtype, contiguous_grads, contiguous_like
from .reference import reference_backward, reference_forward

OP = "region_language_attention"


def _check_inputs(q, k, v, key_padding_mask):
    check_qkv(OP, q, k, v)
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"{OP}: key_padding_mask must be a bool tensor or None, got {type(key_padding_mask).__name__}")
    B, S = q.shape[0], k.shape[2]
    if tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"{OP}: key_padding_mask must be (B, S) = ({B}, {S}) to match q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"{OP}: key_padding_mask must be a bool tensor (True = padded), got {key_padding_mask.dtype}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


# ----------------------------------------------------------------------------- backends
# The C++/CUDA kernels: csrc/cpu/region_language_attention.cpp, csrc/cuda/region_language_attention.cu.
def _ext_forward(q, k, v, key_padding_mask, scale):
    return torch.ops.rexfast_C.region_language_attention_fwd(q, k, v, key_padding_mask, scale)


def _ext_backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    return torch.ops.rexfast_C.region_language_attention_bwd(dout, q, k, v, key_padding_mask, scale, out, lse)


_TRITON = "rexfast.ops.region_attention.triton_kernels"  # the family's Triton kernels, imported on first use
BACKENDS = op_backends(OP, reference=(reference_forward, reference_backward),
                       native=(_ext_forward, _ext_backward), native_symbol="region_language_attention_fwd",
                       triton=(lazy(_TRITON, "rla_forward"), lazy(_TRITON, "rla_backward")), triton_module=_TRITON)


# ----------------------------------------------------------------------------- registration
@torch.library.custom_op("rexfast::region_language_attention", mutates_args=())
def _rla_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
            backend: str) -> tuple[Tensor, Tensor]:
    B, H, Q, _ = q.shape
    if B == 0 or H == 0 or Q == 0:
        return q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=compute_dtype(q.dtype))
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    out, lse = BACKENDS[backend].forward(q, k, v, kpm, scale)
    return out, lse.to(compute_dtype(q.dtype))


@_rla_op.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    B, H, Q, _ = q.shape
    return q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("rexfast::region_language_attention_backward", mutates_args=())
def _rla_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
                     out: Tensor, lse: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Q, _ = q.shape
    if B == 0 or H == 0 or Q == 0:
        return tuple(g.zero_() for g in contiguous_like(q, k, v))
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    dq, dk, dv = BACKENDS[backend].backward(dout.contiguous(), q, k, v, kpm, scale, out.contiguous(), lse.contiguous())
    return contiguous_grads(dq, dk, dv, q, k, v)


@_rla_backward_op.register_fake
def _(dout, q, k, v, key_padding_mask, scale, out, lse, backend):
    return contiguous_like(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.args = (scale, backend)
    ctx.set_materialize_grads(True)


def _backward(ctx, dout, dlse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    scale, backend = ctx.args
    dq, dk, dv = _rla_backward_op(dout, q, k, v, key_padding_mask, scale, out, lse, backend)
    return dq, dk, dv, None, None, None


_rla_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def region_language_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, *,
                              scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """ReLA's region-language attention (RLA): regions attend over words.

    Args:
        q: (B, H, Q, d) region queries.  k, v: (B, H, S, d) word keys/values.
        key_padding_mask: (B, S) bool, True = padded (ignored); None (the
            authors' main branch) attends to every word.
        scale: softmax scale, default 1/√d.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (default automatic).

    A sample whose every word is padded gets zero output rows (and zero
    gradients). Returns (B, H, Q, d) in q's dtype.
    """
    _check_inputs(q, k, v, key_padding_mask)
    scale = check_scale(OP, scale, q.shape[3])
    name = BACKENDS.choose(q.device, backend)
    out, _ = _rla_op(q, k, v, key_padding_mask, scale, name)
    return out


__all__ = ["region_language_attention", "BACKENDS"]
