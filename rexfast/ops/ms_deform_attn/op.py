"""``ms_deform_attn``: multi-scale deformable attention (Deformable DETR, ReLA's pixel decoder).

One op in one place: input checks, the ``torch.library`` registration of the
forward and backward ops, their fake (meta) functions, the autograd formula,
and the op's backends (``BACKENDS``). The semantics (bilinear, zero-padded
sampling at x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5, NaN/inf and border rules)
live in :mod:`.reference`; the Triton kernels in :mod:`.triton_kernels`; the
C++/CUDA kernels in ``csrc/cpu/ms_deform_attn.cpp``, ``csrc/cuda/ms_deform_attn.cu``
and ``kernels/ms_deform_attn.cu``.

Shapes: value (B, S, M, D) with S = Σ_l H_l·W_l (M heads of D channels),
spatial_shapes (L, 2) int64 rows (H_l, W_l), level_start_index (L,) int64,
sampling_locations (B, Q, M, L, P, 2) as (x, y), attention_weights (B, Q, M, L, P)
→ output (B, Q, M·D).

Gradients (g = d out[b,q,h,:], s = the point's bilinear sample, w_t its tap weights):
    d a       = g · s
    d value_t += a · w_t · g                 (every inside tap t of every point)
    d loc_x   = W_l · a · Σ_t (∂w_t/∂x) (g · value_t),  d loc_y likewise with H_l
                (both 0 on the half-pixel edge x = −1 or y = −1: the sample is 0 for x ≤ −1)
None for the integer tensors.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..common import FLOAT_DTYPES, inner_contiguous, lazy, op_backends
from .reference import ms_deform_attn_reference, reference_backward, reference_forward

_INDEX_LIMIT = 2**31


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


# ----------------------------------------------------------------------------- checks
def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    named = (("value", value), ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
             ("sampling_locations", sampling_locations), ("attention_weights", attention_weights))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, dims, what in (
        ("value", value, 4, "(B, S, M, D)"),
        ("spatial_shapes", spatial_shapes, 2, "(L, 2)"),
        ("level_start_index", level_start_index, 1, "(L,)"),
        ("sampling_locations", sampling_locations, 6, "(B, Q, M, L, P, 2)"),
        ("attention_weights", attention_weights, 5, "(B, Q, M, L, P)"),
    ):
        if t.dim() != dims:
            raise ValueError(f"ms_deform_attn: {name} must be {dims}-D {what}, got shape {_shape(t)}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"ms_deform_attn: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(
            "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64 (torch.long), got {t.dtype}")
    if not (value.device == sampling_locations.device == attention_weights.device):
        raise ValueError(
            "ms_deform_attn: value, sampling_locations and attention_weights must be on one device, got "
            f"{value.device}, {sampling_locations.device}, {attention_weights.device}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device and t.device.type != "cpu":
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device} "
                             "(pass it on value's device or on the CPU)")

    B, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2) rows (H_l, W_l), got {_shape(spatial_shapes)}")
    if L == 0:
        raise ValueError("ms_deform_attn: spatial_shapes has no levels (L = 0)")
    if level_start_index.shape[0] != L:
        raise ValueError(f"ms_deform_attn: level_start_index must be (L,) = ({L},) to match spatial_shapes "
                         f"{_shape(spatial_shapes)}, got {_shape(level_start_index)}")
    if M == 0 or D == 0 or S == 0:
        raise ValueError(f"ms_deform_attn: value must have non-empty S, M and D, got shape {_shape(value)}")
    loc = sampling_locations
    if loc.shape[0] != B or loc.shape[2] != M or loc.shape[3] != L or loc.shape[5] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (B, Q, M, L, P, 2) = ({B}, Q, {M}, {L}, P, 2) to match "
            f"value {_shape(value)} and spatial_shapes {_shape(spatial_shapes)}, got {_shape(loc)}"
        )
    if loc.shape[4] == 0:
        raise ValueError(f"ms_deform_attn: sampling_locations has no points (P = 0), shape {_shape(loc)}")
    if _shape(attention_weights) != _shape(loc)[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (B, Q, M, L, P) = {_shape(loc)[:5]} to match "
            f"sampling_locations {_shape(loc)}, got {_shape(attention_weights)}"
        )
    Q, P = loc.shape[1], loc.shape[4]
    if B * Q * M * L * P >= _INDEX_LIMIT or B * S * M >= _INDEX_LIMIT:
        raise ValueError(f"ms_deform_attn: B·Q·M·L·P and B·S·M must be below 2^31, got value {_shape(value)}, "
                         f"sampling_locations {_shape(loc)}")


def _check_level_values(spatial_shapes: Tensor, level_start_index: Tensor, S: int) -> None:
    """spatial_shapes ≥ 1, Σ H_l·W_l = S, level_start_index the exclusive running sum.

    Free for CPU tensors; one small device-to-host copy for CUDA ones. Skipped
    while tracing (torch.compile/export, where it would break the graph) and
    with REXFAST_SKIP_VALUE_CHECKS=1. The kernels bound every read by S anyway,
    so unchecked bad shapes give wrong numbers, never an out-of-bounds access."""
    if torch.compiler.is_compiling() or os.environ.get("REXFAST_SKIP_VALUE_CHECKS") == "1":
        return
    shapes = spatial_shapes.detach().cpu().tolist()
    starts = level_start_index.detach().cpu().tolist()
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: every level needs H_l, W_l >= 1, got spatial_shapes {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} hold Σ H_l·W_l = {total} pixels but value has "
                         f"S = {S}")
    expected, run = [], 0
    for h, w in shapes:
        expected.append(run)
        run += h * w
    if starts != expected:
        raise ValueError(f"ms_deform_attn: level_start_index must be {expected} for spatial_shapes {shapes}, "
                         f"got {starts}")


# ----------------------------------------------------------------------------- backends
def _ext_forward(value, spatial_shapes, level_start_index, loc, attn):
    return torch.ops.rexfast_C.ms_deform_attn_fwd(value, spatial_shapes, level_start_index, loc, attn)


def _ext_backward(grad_output, value, spatial_shapes, level_start_index, loc, attn):
    # The CPU kernel is always deterministic; the CUDA one offers atomics or a
    # deterministic gather for the value gradient.
    deterministic = torch.are_deterministic_algorithms_enabled()
    return torch.ops.rexfast_C.ms_deform_attn_bwd(grad_output, value, spatial_shapes, level_start_index, loc, attn,
                                                  deterministic)


_TRITON = f"{__package__}.triton_kernels"  # imported on the first Triton call


def _triton_backward(grad_output, value, spatial_shapes, level_start_index, loc, attn):
    # As the CUDA kernel: atomics, or a deterministic gather for the value gradient.
    return lazy(_TRITON, "backward")(grad_output, value, spatial_shapes, level_start_index, loc, attn,
                                     deterministic=torch.are_deterministic_algorithms_enabled())


BACKENDS = op_backends("ms_deform_attn", reference=(reference_forward, reference_backward),
                       native=(_ext_forward, _ext_backward), native_symbol="ms_deform_attn_fwd",
                       triton=(lazy(_TRITON, "forward"), _triton_backward), triton_module=_TRITON)


def _prepare(value, spatial_shapes, level_start_index, loc, attn):
    """The layout every backend receives: value with unit stride over D (other
    strides free), locations and weights contiguous, the integer tensors
    contiguous int64 on value's device."""
    idx = dict(device=value.device, dtype=torch.int64)
    return (inner_contiguous(value), spatial_shapes.to(**idx).contiguous(), level_start_index.to(**idx).contiguous(),
            loc.contiguous(), attn.contiguous())


# ----------------------------------------------------------------------------- registration
@torch.library.custom_op("rexfast::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor, backend: str) -> Tensor:
    B, _, M, D = value.shape
    Q = sampling_locations.shape[1]
    if B == 0 or Q == 0:  # nothing for a kernel to do
        return value.new_empty(B, Q, M * D)
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return BACKENDS[backend].forward(*args)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    B, _, M, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], M * D)


@torch.library.custom_op("rexfast::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
                                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, Q = sampling_locations.shape[:2]
    if B == 0 or Q == 0:  # no query samples anything: zero value gradient, empty others
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                     for t in (value, sampling_locations, attention_weights))
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    grads = BACKENDS[backend].backward(grad_output.to(value.dtype).contiguous(), *args)
    # Contiguous gradients in their input's dtype (whatever the input's strides).
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (value, sampling_locations, attention_weights)))


@_ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    return (torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend
    ctx.set_materialize_grads(True)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ctx.backend
    )
    return grad_value, None, None, grad_loc, grad_attn, None


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention (the official ``MSDeformAttnFunction``).

    Args:
        value: (B, S, M, D) per-head values of all levels, S = Σ_l H_l·W_l
            (any strides with unit stride over D).
        spatial_shapes: (L, 2) int64, rows (H_l, W_l).
        level_start_index: (L,) int64, the first pixel of each level in S
            (the exclusive running sum of H_l·W_l).
        sampling_locations: (B, Q, M, L, P, 2) as (x, y), (0, 0) the top-left and
            (1, 1) the bottom-right corner of each level's map; outside is zero padding.
        attention_weights: (B, Q, M, L, P), usually a softmax over L·P.
        backend: ``reference`` | ``cpu`` | ``cuda`` | ``triton``; default from
            ``REXFAST_BACKEND`` or automatic (see :mod:`rexfast.ops.registry`).

    value, sampling_locations and attention_weights share one float dtype (fp16/bf16
    accumulate in fp32). Returns (B, Q, M·D) in that dtype; differentiable in
    value, sampling_locations and attention_weights. Non-finite inputs and
    borders: see :mod:`rexfast.ops.ms_deform_attn.reference`.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_level_values(spatial_shapes, level_start_index, value.shape[1])
    name = BACKENDS.choose(value.device, backend)
    return _ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, name)


__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "BACKENDS"]
