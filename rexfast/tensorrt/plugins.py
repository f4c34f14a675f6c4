"""The rexfast plugins as TensorRT quickly deployable plugins (``tensorrt.plugin``, TensorRT >= 10.6).

Importing this module registers ``rexfast::group_assign``, ``rexfast::region_image_attention``
and ``rexfast::ms_deform_attn`` (version "1"): the names, namespace and attributes of the
``rexfast::<op>`` nodes of a ``hybrid`` ONNX file, so TensorRT's ONNX parser builds these
plugins for them. Shapes, types and computation come from :mod:`.plugin_specs`; the
computation runs the registered rexfast op on TensorRT's stream (CUDA tensors: the
op's Triton/CUDA kernels). An engine with these layers runs in a Python process that
has imported this module (they are JIT, not ahead-of-time, plugins).

Not run by us: TensorRT cannot be installed on the project's machines. The glue below is
exercised on CPU with a stand-in for ``tensorrt.plugin`` (tests/export/test_tensorrt.py).
"""

from __future__ import annotations

from typing import List, Tuple

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from .plugin_specs import GROUP_ASSIGN, MS_DEFORM_ATTN, REGION_IMAGE_ATTENTION


def _descs(spec, descs, **attributes):
    shapes = spec.output_shapes(*[d.shape_expr for d in descs], **attributes)
    dtypes = spec.output_dtypes([d.dtype for d in descs], trt.float32, trt.bool)
    out = tuple(trtp.from_shape_expr(tuple(shape), dtype=dtype) for shape, dtype in zip(shapes, dtypes))
    return out if len(out) > 1 else out[0]


def _as_torch(tensor):
    return torch.as_tensor(tensor, device="cuda")


def _stream(stream: int):
    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def _execute(spec, inputs, outputs, stream, **attributes) -> None:
    with _stream(stream):
        results = spec.run(*[_as_torch(t) for t in inputs], **attributes)
        for out, value in zip(outputs, results):
            _as_torch(out).copy_(value)


def _combinations(spec) -> List:
    return [trtp.AutoTuneCombination(spec.type_combination, "LINEAR")]


# ----------------------------------------------------------------------------- group_assign
@trtp.register("rexfast::group_assign")
def _group_assign_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                       tau: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    return _descs(GROUP_ASSIGN, (q, k, v, tau))


@trtp.autotune("rexfast::group_assign")
def _group_assign_autotune(q, k, v, tau, outputs) -> List[trtp.AutoTuneCombination]:
    return _combinations(GROUP_ASSIGN)


@trtp.impl("rexfast::group_assign")
def _group_assign_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, tau: trtp.Tensor,
                       outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _execute(GROUP_ASSIGN, (q, k, v, tau), outputs, stream)


# ----------------------------------------------------------------------------- region_image_attention
@trtp.register("rexfast::region_image_attention")
def _ria_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, region_logits: trtp.TensorDesc, kh: int,
              kw: int, scale: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    return _descs(REGION_IMAGE_ATTENTION, (q, k, v, region_logits), kh=kh, kw=kw, scale=scale)


@trtp.autotune("rexfast::region_image_attention")
def _ria_autotune(q, k, v, region_logits, kh: int, kw: int, scale: float,
                  outputs) -> List[trtp.AutoTuneCombination]:
    return _combinations(REGION_IMAGE_ATTENTION)


@trtp.impl("rexfast::region_image_attention")
def _ria_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, region_logits: trtp.Tensor, kh: int, kw: int,
              scale: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _execute(REGION_IMAGE_ATTENTION, (q, k, v, region_logits), outputs, stream, kh=kh, kw=kw, scale=scale)


# ----------------------------------------------------------------------------- ms_deform_attn
@trtp.register("rexfast::ms_deform_attn")
def _msda_desc(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
               sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc) -> trtp.TensorDesc:
    return _descs(MS_DEFORM_ATTN, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights))


@trtp.autotune("rexfast::ms_deform_attn")
def _msda_autotune(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   outputs) -> List[trtp.AutoTuneCombination]:
    return _combinations(MS_DEFORM_ATTN)


@trtp.impl("rexfast::ms_deform_attn")
def _msda_impl(value: trtp.Tensor, spatial_shapes: trtp.Tensor, level_start_index: trtp.Tensor,
               sampling_locations: trtp.Tensor, attention_weights: trtp.Tensor, outputs: Tuple[trtp.Tensor],
               stream: int) -> None:
    _execute(MS_DEFORM_ATTN, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights),
             outputs, stream)


__all__: list = []
