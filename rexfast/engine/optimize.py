"""``rexfast.optimize(model)``: a copy of a model prepared for inference.

What it does to the copy (the given model is not touched: same weights, same mode):

1. ``eval()`` and ``requires_grad_(False)``: an inference copy.
2. BatchNorm (``nn.BatchNorm2d`` with running statistics, and
   :class:`~rexfast.models.layers.FrozenBatchNorm2d`) folded into the convolution
   before it — W' = W·s, b' = (b − μ)·s + β with s = γ/√(σ² + ε), computed in float64 —
   and replaced by ``nn.Identity``: exact up to rounding, one pass over the
   activations fewer per conv.
3. Every op on its automatically chosen (fused) backend and the models' exact fused
   formulations (``model.use_fused_ops()``), whatever the model's runtime options pinned —
   except the options given in ``runtime=`` (what a user set explicitly, e.g.
   ``--set model.ops_backend=reference``), which the copy keeps as given.
4. Convolution weights and the image input channels-last (NHWC), the layout oneDNN's
   CPU convolutions compute in, so no conv reorders its input and output
   (``model.use_channels_last()``); a model's own ``channels_last`` option given in
   ``runtime=`` (CGFormer's) decides this step instead of the ``channels_last`` argument.
5. The precision (:mod:`rexfast.engine.precision`): ``bf16`` casts the weights and the
   input images to bf16 — activations then stay bf16 from end to end instead of being
   cast at every layer, as ``torch.autocast`` does — except the submodules the model
   lists in ``fp32_modules()`` (the Swin backbone's pixel-word attentions), which keep
   their float32 weights unrounded and whose outputs are cast back to bf16 at their boundary.
   ReLA's deformable pixel decoder, which the authors run in float32 under any autocast, is
   no such island: it runs in bf16 here, its matmuls and norms accumulating in float32 and
   ``ms_deform_attn`` sampling in float32 from the bf16 values, locations and weights
   (:mod:`rexfast.models.rela.pixel_decoder`). Norm layers, softmax and the rexfast ops
   accumulate in float32 internally on bf16 data. On a CPU, every bf16 ``nn.Linear`` with a bias adds it inside oneDNN's matmul
   (:class:`rexfast.models.layers.BiasInMatmulLinear`) instead of first copying it into every
   output row as ``torch.addmm`` does: those copies were 235 of a bf16 ReLA R50's 414
   ``aten::copy_`` calls.
6. ``compile=True``: ``torch.compile`` of ``forward_features`` (what ``forward``,
   ``predict`` and ``inference_outputs`` run); the first call compiles.

The copy carries ``optimization`` (an :class:`Optimization`) describing what was done.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from .precision import check_precision, describe, resolve_precision

log = logging.getLogger("rexfast")


@dataclasses.dataclass(frozen=True)
class Optimization:
    precision: str  # the resolved mode: fp32 | bf16
    requested: str  # what was asked for: fp32 | bf16 | auto
    folded_batchnorms: int
    channels_last: bool
    fp32_modules: tuple[str, ...]
    compiled: bool
    description: str  # the log line
    runtime: dict = dataclasses.field(default_factory=dict)  # the runtime options kept as given (runtime=)


def _cast_floating(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):  # transformers' ModelOutput is a dict subclass: keep its type
        cast = {k: _cast_floating(v, dtype) for k, v in value.items()}
        return type(value)(**cast) if all(isinstance(k, str) for k in cast) else cast
    return value


class _CastInputs:
    """Forward pre-hook: a float32 island's floating inputs in float32."""

    def __call__(self, module, args, kwargs):
        return _cast_floating(args, torch.float32), _cast_floating(kwargs, torch.float32)


class _CastOutputs:
    """Forward hook: a float32 island's floating outputs back in the model's dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args, output):
        return _cast_floating(output, self.dtype)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _kept_options(model, runtime) -> dict:
    """``runtime`` checked against the model's runtime options: names it has (ValueError
    listing them otherwise), values coerced to their types and checked by the options' class."""
    from collections.abc import Mapping

    if runtime is None:
        return {}
    if not isinstance(runtime, Mapping):
        raise TypeError(f"runtime must be a mapping of runtime option names to values, got {type(runtime).__name__}")
    options = model.runtime_class
    unknown = sorted(set(runtime) - set(options.field_names()))
    if unknown:
        raise ValueError(f"runtime: {type(model).__name__} has no runtime option {unknown[0]!r}; its options: "
                         f"{', '.join(options.field_names())}")
    kept = options.coerce(runtime, "runtime")
    options(**kept)  # the options' own checks
    return kept


def optimize(model: nn.Module, *, precision: str = "auto", compile: bool = False,
             channels_last: bool = True, runtime=None) -> nn.Module:
    """A copy of ``model`` prepared for inference (see the module docstring): BatchNorm
    folded, ops on their fused backends, channels-last convolutions, ``precision``
    (``fp32 | bf16 | auto``; ``auto``: bf16 where the CPU has native bf16), and with
    ``compile=True`` its forward compiled. ``runtime``: runtime options the copy keeps as
    given instead of optimize's choice (e.g. ``{"ops_backend": "reference"}``: every op on its
    PyTorch reference; the model's :class:`~rexfast.models.base.RuntimeOptions`). ``model``
    itself is left unchanged."""
    from ..models.base import ReferringModel
    from ..models.layers import use_bias_in_matmul

    if not isinstance(model, ReferringModel):
        raise TypeError(f"model must be a rexfast model (CGFormer, ReLA, ...), got {type(model).__name__}")
    check_precision(precision)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be True or False, got {channels_last!r}")
    given = _kept_options(model, runtime)
    channels_last = given.get("channels_last", channels_last)
    device = _device_of(model)
    resolved = resolve_precision(precision, device)
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float32

    opt = copy.deepcopy(model)
    opt.eval()
    opt.requires_grad_(False)
    folded = opt.fold_batchnorm()
    opt.use_fused_ops()
    if channels_last:
        opt.use_channels_last()
    elif given.get("channels_last") is False:  # asked for: the weights of a channels-last model back to NCHW too
        opt.to(memory_format=torch.contiguous_format)
    if given:
        opt.set_runtime(dataclasses.replace(opt.runtime, **given))
    islands: tuple[str, ...] = ()
    if dtype != torch.float32:
        islands = tuple(opt.fp32_modules())
        # the islands keep their float32 weights exactly: saved before the cast, restored after it
        kept = {name: {k: v.clone() for k, v in opt.get_submodule(name).state_dict().items()} for name in islands}
        opt.to(dtype)
        opt.input_dtype = dtype
        for name in islands:
            island = opt.get_submodule(name)
            island.float()
            island.load_state_dict(kept[name])
            island.register_forward_pre_hook(_CastInputs(), with_kwargs=True)
            island.register_forward_hook(_CastOutputs(dtype))
    if dtype == torch.bfloat16 and device.type == "cpu":
        use_bias_in_matmul(opt)
    if compile:
        opt.forward_features = torch.compile(opt.forward_features)
    line = (f"rexfast.optimize: {type(model).__name__} on {device.type}, precision {describe(precision, device)}, "
            f"{folded} batch norms folded, {'channels-last' if channels_last else 'contiguous'}"
            f"{', float32: ' + ', '.join(islands) if islands else ''}{', compiled' if compile else ''}"
            f"{', kept ' + ', '.join(f'{k}={v}' for k, v in given.items()) if given else ''}")
    log.info(line)
    opt.optimization = Optimization(precision=resolved, requested=precision, folded_batchnorms=folded,
                                    channels_last=channels_last, fp32_modules=islands, compiled=compile,
                                    description=line, runtime=given)
    return opt


__all__ = ["Optimization", "optimize"]
