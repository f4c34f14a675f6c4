"""``export_onnx``: a registered rexfast model → one ONNX file for onnxruntime and TensorRT.

The graph comes from ``torch.onnx.export(dynamo=True)`` (``torch.export`` underneath)
of the model's :meth:`inference_outputs` at one image size, with the batch and the
text length dynamic. Every ``rexfast::<op>`` is translated by
:mod:`rexfast.export.onnx_functions`:

``hybrid``
    each op stays one ``rexfast::<op>`` node (``plugin_namespace="rexfast"``,
    ``plugin_version="1"``) next to a model-local ONNX function of the same name
    holding its decomposition. onnxruntime expands the function; TensorRT's
    parser builds the registered plugin (:mod:`rexfast.tensorrt`) for a node
    carrying ``plugin_namespace`` and expands the function otherwise (recent
    TensorRT 10 parsers; 10.1's expands the local function even when a plugin is
    registered).
``decomposed``
    the same functions inlined: standard ONNX operators only.

One file holds one image size (the positional embeddings, window partition and
deformable-attention levels are built for it): export once per resolution, one
TensorRT engine each. The file is checked (``onnx.checker`` full check, strict
shape inference, TensorRT 10's operator rules: :mod:`rexfast.export.tensorrt_rules`)
before it is written, atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import MODES, OPSETS

INPUT_NAMES = ("images", "input_ids", "attention_mask")
EXAMPLE_BATCH, EXAMPLE_TEXT = 2, 20  # the traced example (the released models use 20 tokens)
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one ModelProto


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    model_type: str
    mode: str
    opset: int
    image_size: tuple[int, int]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict  # input/output name -> {axis: symbolic name}
    op_counts: dict  # (domain, op_type) -> count in the main graph
    bytes: int
    max_abs_error: dict = field(default_factory=dict)  # output -> max |onnxruntime − torch| at the example


class _Inference(nn.Module):
    """The exported callable: the model's named inference outputs as a tuple."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, images, input_ids, attention_mask):
        out = self.model.inference_outputs(images, input_ids, attention_mask)
        return tuple(out[name] for name in self.names)


class MissingDependencyError(ImportError):
    """An optional dependency of the export (the ``export`` extra) is not installed."""


def _require_export_dependencies(verify: bool):
    names = ("onnx", "onnxscript") + (("onnxruntime",) if verify else ())
    for name in names:
        try:
            __import__(name)
        except ImportError as exc:
            raise MissingDependencyError(f"ONNX export needs {name} ({exc}); install the export extra: "
                                         "pip install -e '.[export]' --no-build-isolation") from None


def image_size_pair(image_size, multiple: int = 32) -> tuple[int, int]:
    """``image_size`` (an int or an (H, W) pair) as (H, W), each a positive multiple of ``multiple``."""
    if isinstance(image_size, bool):
        raise TypeError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")
    if isinstance(image_size, int):
        pair = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in image_size):
        pair = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(f"image_size must be an int or an (H, W) pair of ints, got {image_size!r}")
    if any(x <= 0 or x % multiple for x in pair):
        raise ValueError(f"image size must be a positive multiple of {multiple} (height and width), got "
                         f"{pair[0]}x{pair[1]}")
    return pair


def _check_arguments(model, path, image_size, mode, opset):
    from ..io import check_output_file

    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}; choose one of {list(MODES)}")
    if isinstance(opset, bool) or opset not in OPSETS:
        raise ValueError(f"opset must be one of {list(OPSETS)} (TensorRT 10 parses opsets up to 20), got {opset!r}")
    if not hasattr(model, "inference_outputs") or not hasattr(model, "model_type"):
        raise TypeError(f"export_onnx takes a registered rexfast model (CGFormer, ReLA), got {type(model).__name__}")
    size = image_size_pair(image_size, getattr(model, "input_multiple", 32))
    if getattr(model.config, "eval_noise", False):
        raise ValueError("this model draws Gumbel noise at inference (eval_noise=True), and an exported graph is "
                         "deterministic: export it without the noise (rexfast export: --set model.eval_noise=false; "
                         "Python: model.config.eval_noise = False)")
    dtypes = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(f"export a float32 model (TensorRT builds reduced-precision engines from it); this one holds "
                         f"{sorted(str(d) for d in dtypes - {torch.float32})} tensors")
    return check_output_file(path, "ONNX file"), size


def example_inputs(model, image_size, batch: int = EXAMPLE_BATCH, text_length: int = EXAMPLE_TEXT, seed: int = 0):
    """(images, input_ids, attention_mask) on the model's device: random images, random in-vocabulary
    ids, the first sample padded after half its words (keeping at least three, as [CLS] word [SEP]
    does: with one unpadded word every pixel attends to the same word, the PWAM output is constant
    over the map and its instance norm amplifies rounding noise ~300×, in any runtime)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    vocab, positions = model.text_limits()
    text_length = min(text_length, positions)
    images = torch.randn(batch, 3, h, w, generator=g)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, text_length), generator=g)
    mask = torch.ones(batch, text_length, dtype=torch.long)
    mask[0, max(min(3, text_length), text_length // 2):] = 0
    return images.to(device), ids.to(device), mask.to(device)


def _dynamic_shapes(model):
    _, positions = model.text_limits()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # A tokenized sentence always holds [CLS] and [SEP]; a length-1 axis could also take
    # broadcasting semantics the traced graph does not have.
    text = torch.export.Dim("text_length", min=2, max=int(positions))
    return {"images": {0: batch}, "input_ids": {0: batch, 1: text}, "attention_mask": {0: batch, 1: text}}


def optimize(ir_model) -> None:
    """Constant folding and clean-up, in place: onnxscript's optimizer without its rewrite rules.

    The rewriter's no-op rules match constants with an absolute tolerance of 1e-8, so
    they turn ``norm + 1e-12`` (group_assign's l2 normalisation) into ``norm`` and a
    zero vector into NaN; nothing here needs a rewrite, so none runs."""
    import onnx_ir as ir
    import onnx_ir.passes.common as ir_passes
    from onnxscript.optimizer import _constant_folding

    cleanup = [ir_passes.RemoveUnusedNodesPass(), ir_passes.RemoveUnusedFunctionsPass(),
               ir_passes.RemoveUnusedOpsetsPass()]
    passes = ir.passes.Sequential(
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT), *cleanup], steps=2,
                              early_stop=True),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.DeduplicateInitializersPass(),
        ir_passes.CommonSubexpressionEliminationPass(),
        ir_passes.NameFixPass(),
    )
    passes(ir_model)


def finalize(ir_model, mode: str, opset: int):
    """A graph holding ``rexfast::<op>`` nodes (as the translations emit them) → the checked
    ModelProto of ``mode``: the ops' functions added (``hybrid``) or inlined (``decomposed``),
    the graph optimised (constant folding, redundant nodes removed)."""
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as ir_passes

    from . import onnx_functions

    used = {node.op_type for node in ir_model.graph if node.domain == onnx_functions.DOMAIN}
    functions = [ir.serde.deserialize_function(p) for p in onnx_functions.function_protos(opset) if p.name in used]
    if mode == "decomposed":
        for function in functions:
            ir_model.functions[function.identifier()] = function
        ir_passes.InlinePass()(ir_model)
        ir_model.opset_imports.pop(onnx_functions.DOMAIN, None)
        optimize(ir_model)
    else:
        # The optimizer folds and rewrites with the shapes it knows at a call site, which
        # must not leak into a function that every call site shares: the main graph is
        # optimised alone (the rexfast:: nodes are opaque to it), then the functions join.
        optimize(ir_model)
        for function in functions:
            ir_model.functions[function.identifier()] = function
        if functions:
            ir_model.opset_imports[onnx_functions.DOMAIN] = 1
    proto = ir.serde.serialize_model(ir_model)
    if mode == "decomposed":
        left = [(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
        if left or len(proto.functions):
            raise AssertionError(f"decomposed export left non-standard nodes or functions: {left[:5]}")
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    return proto


# What torch.onnx and onnxscript print on every export that says nothing about this file:
# (logger, message start) pairs and (category, message regex) pairs. Only these are silenced;
# any other warning or log record still reaches the user.
_KNOWN_LOG_NOISE = (
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    ("onnxscript.optimizer._constant_folding", "Skipping constant folding"),
)
_KNOWN_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: \w+ will not be used, since it shares the same shape constraints"),
)


class _DropKnown(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextlib.contextmanager
def quiet_known_noise():
    """Silence the exporter's known, harmless messages (:data:`_KNOWN_LOG_NOISE`,
    :data:`_KNOWN_WARNINGS`: torchvision's missing ops, a torch deprecation inside torch,
    dynamic-axis renames, onnxscript declining to fold multi-output Splits) and nothing else."""
    filters = [(logging.getLogger(name), _DropKnown(start)) for name, start in _KNOWN_LOG_NOISE]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def _to_onnx(model, args, output_names, mode: str, opset: int):
    """The checked ModelProto of ``model`` (eval mode, no grad) at ``args``."""
    with quiet_known_noise():
        return _to_onnx_loud(model, args, output_names, mode, opset)


def _to_onnx_loud(model, args, output_names, mode: str, opset: int):
    from . import onnx_functions

    program = torch.onnx.export(
        _Inference(model, output_names).eval(), args, dynamo=True, opset_version=opset, optimize=False,
        input_names=list(INPUT_NAMES), output_names=list(output_names), dynamic_shapes=_dynamic_shapes(model),
        custom_translation_table=onnx_functions.translation_table(), verbose=False)
    return finalize(program.model, mode, opset)


def _dynamic_axes(proto) -> dict:
    axes = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        named = {i: d.dim_param for i, d in enumerate(value.type.tensor_type.shape.dim) if d.dim_param}
        if named:
            axes[value.name] = named
    return axes


def onnxruntime_outputs(model_bytes: bytes, inputs) -> list:
    """Run an ONNX model on CPU with onnxruntime: ``inputs`` (images, input_ids, attention_mask) tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy() for name, t in zip(INPUT_NAMES, inputs)}
    return session.run(None, feed)


OUTPUT_DECODING = {
    "cgformer": "logits (B, 1, H, W): mask probability sigmoid(logits), the mask where it exceeds 0.5; "
                "nt_logits (B, 2; with the no-target head only): the sentence names nothing where "
                "softmax(nt_logits)[:, 1] exceeds 0.5",
    "rela": "mask_logits (B, 2, H/s, W/s; 0 background, 1 target): resized bilinearly (align_corners=False) to "
            "H x W, a pixel is the target where channel 1 beats channel 0; nt_logits (B, 2; 0 target, 1 no "
            "target): the sentence names nothing where nt_logits[:, 1] beats nt_logits[:, 0]; minimap_logits "
            "(B, Q, 2): per-region target scores (training only)",
}


def metadata_props(model, image_size: tuple[int, int], mode: str, opset: int,
                   extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The ``metadata_props`` an exported file carries, so that it can be run without rexfast:
    what it is (rexfast version, model type and config, mode, opset), its one image size, its
    inputs and how to decode its outputs; ``extra`` adds the preprocessing the caller knows
    (image mean/std, text length, tokenizer: ``rexfast export`` adds them from the checkpoint)."""
    from .._version import __version__

    h, w = image_size
    props = {
        "rexfast_version": __version__,
        "model_type": model.model_type,
        "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "export_mode": mode,
        "opset": str(opset),
        "image_size": json.dumps([h, w]),
        "inputs": f"images float32 (B, 3, {h}, {w}); input_ids int64 (B, L); attention_mask int64 (B, L), "
                  "1 on real tokens, 0 on padding; B and L dynamic",
        "outputs": OUTPUT_DECODING.get(model.model_type, "see the model's inference_outputs"),
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {type(value).__name__}")
        props[key] = value
    return props


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *, image_size, mode: str = "decomposed",
                opset: int = 18, verify: bool = True, check_tensorrt: bool = True,
                metadata: Optional[Mapping[str, str]] = None) -> ExportResult:
    """Export a rexfast model (CGFormer, ReLA) to ONNX at one image size.

    Args:
        model: a registered rexfast model with float32 weights (left in the mode it came in).
        path: the ``.onnx`` file to write (atomically: nothing is written on error).
        image_size: the one input resolution, an int or (H, W), multiples of 32.
        mode: ``decomposed`` (standard ONNX operators only) or ``hybrid``
            (``rexfast::<op>`` nodes with model-local functions; see the module docstring).
        opset: ONNX opset, 18 (default), 19 or 20.
        verify: run the file with onnxruntime on the traced example and record the
            largest absolute difference to PyTorch per output (``max_abs_error``).
        check_tensorrt: refuse a graph that breaks TensorRT 10's ONNX operator rules.
        metadata: more ``metadata_props`` (str → str) next to :func:`metadata_props`' own,
            e.g. the preprocessing (``rexfast export`` writes image_mean, image_std,
            text_max_tokens, tokenizer and tokenizer_vocab; the README lists them).

    Inputs: ``images`` (B, 3, H, W) float32 normalised as the data pipeline does,
    ``input_ids`` and ``attention_mask`` (B, L) int64; B and L are dynamic
    (2 ≤ L ≤ the text encoder's positions). Outputs: the model's
    :meth:`inference_outputs` by name (CGFormer ``logits``; ReLA ``mask_logits``,
    ``nt_logits``, ``minimap_logits``).
    """
    _require_export_dependencies(verify)
    from ..io import atomic_write_bytes

    path, size = _check_arguments(model, path, image_size, mode, opset)
    args = example_inputs(model, size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.check_inputs(*args)
            reference = model.inference_outputs(*args)
            output_names = tuple(reference)
            proto = _to_onnx(model, args, output_names, mode, opset)
    finally:
        model.train(was_training)
    if check_tensorrt:
        from .tensorrt_rules import check_tensorrt_compatibility

        problems = check_tensorrt_compatibility(proto)
        if problems:
            raise ValueError(f"the exported graph breaks TensorRT 10's ONNX rules ({len(problems)} problems): "
                             + "; ".join(problems[:5]))
    props = metadata_props(model, size, mode, opset, metadata)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    if len(data) > MAX_PROTO_BYTES:
        raise ValueError(f"the model is {len(data) / 2**30:.1f} GiB, above the 2 GiB of one ONNX file")
    errors = {}
    if verify:
        got = onnxruntime_outputs(data, args)
        for name, value in zip(output_names, got):
            errors[name] = float((torch.from_numpy(value) - reference[name].detach().cpu()).abs().max())
    atomic_write_bytes(path, data)
    counts: dict = {}
    for node in proto.graph.node:
        counts[(node.domain or "", node.op_type)] = counts.get((node.domain or "", node.op_type), 0) + 1
    return ExportResult(path=path, model_type=model.model_type, mode=mode, opset=opset, image_size=size,
                        input_names=INPUT_NAMES, output_names=output_names, dynamic_axes=_dynamic_axes(proto),
                        op_counts=counts, bytes=len(data), max_abs_error=errors)


__all__ = ["MODES", "OPSETS", "INPUT_NAMES", "ExportResult", "MissingDependencyError", "export_onnx",
           "example_inputs", "finalize", "image_size_pair", "metadata_props", "onnxruntime_outputs",
           "quiet_known_noise"]
