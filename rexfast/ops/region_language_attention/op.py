"""``region_language_attention`` (RLA): ReLA's region-word attention, with an optional key padding mask.

Checks, ``torch.library`` registration (forward, backward, fake functions,
autograd) and backends, like :mod:`rexfast.ops.region_image_attention`, whose
attention core it shares (semantics: :mod:`rexfast.ops.region_attention`).

Math (per b, h): s = where(padded_j, −∞, scale·q kᵀ), p = softmax_j(s), out = p v;
with ``key_padding_mask=None`` nothing is masked (the authors' main branch). A
sample whose every word is padded gives zero output rows and zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import registry
from ..region_attention import (check_qkv, check_scale, compute_dtype, contiguous_grads, contiguous_like,
                               inner_contiguous)
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
def _ext_forward(q, k, v, key_padding_mask, scale):
    from . import native

    return native.forward(q, k, v, key_padding_mask, scale)


def _ext_backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    from . import native

    return native.backward(dout, q, k, v, key_padding_mask, scale, out, lse)


def _triton_forward(q, k, v, key_padding_mask, scale):
    from . import triton_kernels

    return triton_kernels.forward(q, k, v, key_padding_mask, scale)


def _triton_backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    from . import triton_kernels

    return triton_kernels.backward(dout, q, k, v, key_padding_mask, scale, out, lse)


BACKENDS = registry.OpBackends(OP, triton_module=f"{__package__}.triton_kernels")
BACKENDS.register(registry.reference_backend(reference_forward, reference_backward))
BACKENDS.register(registry.cpu_backend(_ext_forward, _ext_backward, "region_language_attention_fwd"))
BACKENDS.register(registry.cuda_backend(_ext_forward, _ext_backward, "region_language_attention_fwd"))
BACKENDS.register(registry.triton_backend(_triton_forward, _triton_backward))


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
