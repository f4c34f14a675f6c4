"""The TensorRT plugins' rules and bodies in plain PyTorch (no TensorRT import).

One :class:`PluginSpec` per plugin op, matching the ``rexfast::<op>`` node of a
``hybrid`` ONNX file input for input and attribute for attribute (the tests hold
them to :mod:`rexfast.export.onnx_functions`):

``output_shapes(*input_shapes, **attributes)``
    the output shapes from the input shapes; written only with indexing and ``*``,
    so it works on ints and on TensorRT's symbolic ``ShapeExpr`` alike;
``output_dtypes(input_dtypes, float32, boolean)``
    the output dtypes (``float32`` and ``boolean`` are the dtype objects of the caller's framework);
``run(*inputs, backend=None, **attributes)``
    the plugin's computation on torch tensors: the registered rexfast op, so CUDA
    tensors run its Triton/CUDA kernels (automatic choice, or ``backend=``) and CPU
    tensors its C++ kernel or the reference;
``type_combination``
    the I/O types TensorRT may bind (inputs, then outputs): float32 — exported graphs
    are float32; an FP16 engine keeps these layers in float32 around the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class PluginSpec:
    op: str
    inputs: tuple
    attributes: tuple
    outputs: tuple
    output_shapes: Callable
    output_dtypes: Callable
    run: Callable
    type_combination: str

    @property
    def name(self) -> str:
        return f"rexfast::{self.op}"


def _backend(op: str, device: torch.device, backend: Optional[str]) -> str:
    from rexfast.ops import registry

    return registry.OPS[op].choose(device, backend)


# ----------------------------------------------------------------------------- group_assign
def _group_assign_shapes(q, k, v, tau):
    return (q[0], q[1], v[2]), (q[0], q[1], k[1]), (q[0], q[1])


def _run_group_assign(q, k, v, tau, *, backend=None):
    import rexfast.ops  # noqa: F401  (registers the op)

    return tuple(torch.ops.rexfast.group_assign(q, k, v, tau.reshape(1), None, None,
                                                _backend("group_assign", q.device, backend)))


GROUP_ASSIGN = PluginSpec(
    op="group_assign", inputs=("q", "k", "v", "tau"), attributes=(), outputs=("out", "assign", "counts"),
    output_shapes=_group_assign_shapes,
    output_dtypes=lambda dtypes, float32, boolean: (dtypes[0], dtypes[0], float32),
    run=_run_group_assign,
    type_combination="FP32, FP32, FP32, FP32, FP32, FP32, FP32",
)


# ----------------------------------------------------------------------------- region_image_attention
def _ria_shapes(q, k, v, region_logits, *, kh, kw, scale):
    return (q[0], q[1], q[2], v[3]), (q[0], q[1], q[2]), (q[0], q[2])


def _run_ria(q, k, v, region_logits, *, kh, kw, scale, backend=None):
    import rexfast.ops  # noqa: F401

    return tuple(torch.ops.rexfast.region_image_attention(
        q, k, v, region_logits, int(kh), int(kw), float(scale), _backend("region_image_attention", q.device, backend)))


REGION_IMAGE_ATTENTION = PluginSpec(
    op="region_image_attention", inputs=("q", "k", "v", "region_logits"), attributes=("kh", "kw", "scale"),
    outputs=("out", "lse", "open_rows"),
    output_shapes=_ria_shapes,
    output_dtypes=lambda dtypes, float32, boolean: (dtypes[0], float32, boolean),
    run=_run_ria,
    type_combination="FP32, FP32, FP32, FP32, FP32, FP32, BOOL",
)


# ----------------------------------------------------------------------------- ms_deform_attn
def _msda_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return ((value[0], sampling_locations[1], value[2] * value[3]),)


def _run_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, backend=None):
    import rexfast.ops  # noqa: F401

    out = torch.ops.rexfast.ms_deform_attn(value, spatial_shapes.long(), level_start_index.long(), sampling_locations,
                                           attention_weights, _backend("ms_deform_attn", value.device, backend))
    return (out,)


MS_DEFORM_ATTN = PluginSpec(
    op="ms_deform_attn",
    inputs=("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
    attributes=(), outputs=("out",),
    output_shapes=_msda_shapes,
    output_dtypes=lambda dtypes, float32, boolean: (dtypes[0],),
    run=_run_msda,
    type_combination="FP32, INT64, INT64, FP32, FP32, FP32",
)

SPECS = {spec.op: spec for spec in (GROUP_ASSIGN, REGION_IMAGE_ATTENTION, MS_DEFORM_ATTN)}

__all__ = ["PluginSpec", "SPECS", "GROUP_ASSIGN", "REGION_IMAGE_ATTENTION", "MS_DEFORM_ATTN"]
