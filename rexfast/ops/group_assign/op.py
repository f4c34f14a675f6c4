"""``group_assign``: CGFormer's cosine-similarity Gumbel hard-assignment grouping.

One op in one place: input checks, the ``torch.library`` registration of the
forward and backward ops, their fake (meta) functions, the autograd formula,
and the op's backends (``BACKENDS``). The reference semantics live in
:mod:`.reference`, the Triton kernels in :mod:`.triton_kernels`, the C++/CUDA
kernels in ``csrc/cpu/group_assign.cpp``, ``csrc/cuda/group_assign.cu`` and
``kernels/group_assign.cu``.

Math (q: B×N×C tokens, k: B×P×C pixel keys, v: B×P×D pixel values, τ > 0):
    S = l2n(q) l2n(k)ᵀ,  Z = (S + G)/τ,  Y = softmax_N(Z),  H = onehot(argmax_N Y)
    A = H − sg(Y) + Y,   r = Σ_P A,      out = (A / (r + 1)) v
Gradients (forward values A = H, Â = H/(r+1), c_n = dout_n·out_n):
    dv_p  = dout_{a(p)} / (r_{a(p)} + 1)
    dY_np = dA_np + (dout_n·v_p − c_n)/(r_n + 1)
    dZ    = Y ⊙ (dY − Σ_N Y⊙dY),  dS = dZ/τ,  dτ = −Σ dZ⊙(Z − max_N Z) / τ
    (the max shift is exact because Σ_N dZ = 0, and keeps fp32 sums accurate)
    dq̂ = dS k̂, dk̂ = dSᵀ q̂, then the l2n backward.
The noise G is an input, never differentiated.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..common import FLOAT_DTYPES, check_float_tensors, inner_contiguous, op_backends
from ..gumbel import seed_key
from .reference import group_assign_reference, reference_backward, reference_forward

# ----------------------------------------------------------------------------- checks
def _check_inputs(q, k, v, tau, noise, seed):
    check_float_tensors("group_assign", (("q", q), ("k", k), ("v", v)), 3)
    B, N, C = q.shape
    if k.shape[0] != B or k.shape[2] != C:
        raise ValueError(
            f"group_assign: k must be (B, P, C) = ({B}, P, {C}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    P = k.shape[1]
    if v.shape[0] != B or v.shape[1] != P:
        raise ValueError(
            f"group_assign: v must be (B, P, D) = ({B}, {P}, D) to match k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if N == 0 or C == 0 or v.shape[2] == 0:
        raise ValueError(f"group_assign: q {tuple(q.shape)} and v {tuple(v.shape)} must have non-empty N, C and D")
    if P == 0:
        raise ValueError(f"group_assign: k has an empty pixel axis P (shape {tuple(k.shape)})")
    if B * N * P >= 2**31:
        raise ValueError(f"group_assign: B*N*P must be below 2^31, got {B}*{N}*{P}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"group_assign: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"group_assign: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(tau, Tensor):
        raise TypeError(f"group_assign: tau must be a float or a tensor, got {type(tau).__name__}")
    if tau.numel() != 1:
        raise ValueError(f"group_assign: tau must hold one value, got shape {tuple(tau.shape)}")
    if tau.dtype not in FLOAT_DTYPES:
        raise TypeError(f"group_assign: tau must be a float tensor, got {tau.dtype}")
    if tau.device != q.device and tau.device.type != "cpu":
        raise ValueError(f"group_assign: tau is on {tau.device} but q is on {q.device}")
    if noise is not None:
        if seed is not None:
            raise ValueError("group_assign: pass either noise= or seed=, not both")
        if not isinstance(noise, Tensor):
            raise TypeError(f"group_assign: noise must be a tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != (B, N, P):
            raise ValueError(f"group_assign: noise must be (B, N, P) = {(B, N, P)}, got {tuple(noise.shape)}")
        if noise.device != q.device:
            raise ValueError(f"group_assign: noise is on {noise.device} but q is on {q.device}")
        if noise.dtype not in FLOAT_DTYPES:
            raise TypeError(f"group_assign: noise must be a float tensor, got {noise.dtype}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"group_assign: seed must be an int, got {type(seed).__name__}")


def _check_tau_value(tau: Tensor):
    # One scalar read; skipped while tracing (torch.compile/export) where it
    # would break the graph. Set REXFAST_SKIP_VALUE_CHECKS=1 to skip the sync.
    import os

    if torch.compiler.is_compiling() or os.environ.get("REXFAST_SKIP_VALUE_CHECKS") == "1":
        return
    value = float(tau.detach().reshape(()).item())
    if math.isnan(value):
        raise ValueError("group_assign: tau is NaN")
    if not value > 0:
        raise ValueError(f"group_assign: tau must be positive, got {value}")


# ----------------------------------------------------------------------------- backends
def _ext_forward(q, k, v, tau, noise, key):
    return torch.ops.rexfast_C.group_assign_fwd(q, k, v, tau, noise, 0 if key is None else key, key is not None)


def _ext_backward(dout, dassign, q, k, v, tau, noise, key, out, counts):
    return torch.ops.rexfast_C.group_assign_bwd(
        dout, dassign, q, k, v, tau, noise, 0 if key is None else key, key is not None, out, counts
    )


BACKENDS = op_backends("group_assign", reference=(reference_forward, reference_backward),
                       native=(_ext_forward, _ext_backward), native_symbol="group_assign_fwd",
                       triton_module=f"{__package__}.triton_kernels")


# ----------------------------------------------------------------------------- registration
@torch.library.custom_op("rexfast::group_assign", mutates_args=())
def _group_assign_op(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, noise: Optional[Tensor], key: Optional[int], backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    B, N, _ = q.shape
    if B == 0:  # an empty batch: nothing for a kernel to do
        return q.new_empty(0, N, v.shape[2]), q.new_empty(0, N, k.shape[1]), q.new_empty(0, N, dtype=torch.float32)
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    noise = None if noise is None else noise.contiguous()
    tau = tau.reshape(1).to(device=q.device).contiguous()
    return BACKENDS[backend].forward(q, k, v, tau, noise, key)


@_group_assign_op.register_fake
def _(q, k, v, tau, noise, key, backend):
    B, N, _ = q.shape
    P, D = k.shape[1], v.shape[2]
    return q.new_empty(B, N, D), q.new_empty(B, N, P), q.new_empty(B, N, dtype=torch.float32)


@torch.library.custom_op("rexfast::group_assign_backward", mutates_args=())
def _group_assign_backward_op(
    dout: Tensor,
    dassign: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    noise: Optional[Tensor],
    key: Optional[int],
    out: Tensor,
    counts: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(tau)
    q, k, v = (inner_contiguous(t) for t in (q, k, v))
    noise = None if noise is None else noise.contiguous()
    tau_flat = tau.reshape(1).to(device=q.device).contiguous()
    dq, dk, dv, dtau = BACKENDS[backend].backward(
        dout.contiguous(), dassign.contiguous(), q, k, v, tau_flat, noise, key, out.contiguous(), counts
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtau.reshape(tau.shape).to(device=tau.device, dtype=tau.dtype)


@_group_assign_backward_op.register_fake
def _(dout, dassign, q, k, v, tau, noise, key, out, counts, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(tau)


def _setup_context(ctx, inputs, output):
    q, k, v, tau, noise, key, backend = inputs
    out, _, counts = output
    ctx.save_for_backward(q, k, v, tau, noise, out, counts)
    ctx.key = key
    ctx.backend = backend
    ctx.set_materialize_grads(True)


def _backward(ctx, dout, dassign, dcounts):
    q, k, v, tau, noise, out, counts = ctx.saved_tensors
    dq, dk, dv, dtau = _group_assign_backward_op(
        dout, dassign, q, k, v, tau, noise, ctx.key, out, counts, ctx.backend
    )
    return dq, dk, dv, dtau, None, None, None


_group_assign_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def group_assign(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Group pixels into tokens by hard (Gumbel) assignment; see the module docstring.

    Args:
        q: (B, N, C) token queries.  k: (B, P, C) pixel keys.  v: (B, P, D) values.
        tau: temperature, a positive float or one-element tensor (differentiable).
        noise: optional explicit Gumbel noise (B, N, P), added to the similarities.
        seed: optional int; the op then draws Gumbel noise itself from a
            counter-based hash (same noise on every backend, never materialised).
            With neither ``noise`` nor ``seed`` the op is deterministic.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default from
            ``REXFAST_BACKEND`` or automatic (see :mod:`rexfast.ops.registry`).

    Returns:
        ``(out, assign)``: out (B, N, D) pooled values, assign (B, N, P) the
        straight-through one-hot assignment (the CGFormer hit map).
    """
    if not isinstance(tau, Tensor):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise TypeError(f"group_assign: tau must be a float or a tensor, got {type(tau).__name__}")
        tau = torch.tensor(float(tau), dtype=torch.float32, device=q.device if isinstance(q, Tensor) else None)
    _check_inputs(q, k, v, tau, noise, seed)
    _check_tau_value(tau)
    name = BACKENDS.choose(q.device, backend)
    key = None if seed is None else seed_key(seed)
    out, assign, _ = _group_assign_op(q, k, v, tau, noise, key, name)
    return out, assign


__all__ = ["group_assign", "group_assign_reference", "BACKENDS"]
