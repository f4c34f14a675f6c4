"""Build and run a TensorRT engine from an exported ONNX file (TensorRT's Python API).

One engine per ONNX file, so per image size; one optimisation profile over the
dynamic batch and text length. A ``hybrid`` file's ``rexfast::<op>`` nodes become the
plugins of :mod:`rexfast.tensorrt.plugins` when they are registered (recent TensorRT 10
parsers prefer a registered plugin for a node carrying ``plugin_namespace``) and their
local functions otherwise. Not run by us: TensorRT cannot be installed on the project's
machines; :func:`profile_shapes` is tested, the build where ``tensorrt`` imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

INPUTS = ("images", "input_ids", "attention_mask")


def profile_shapes(image_size, *, batch: Sequence[int] = (1, 8, 16), text: Sequence[int] = (2, 20, 40)) -> dict:
    """{input: (min, opt, max) shape} for an engine at ``image_size`` (int or (H, W))."""
    from rexfast.export.onnx_export import image_size_pair

    h, w = image_size_pair(image_size)
    for name, sizes, low in (("batch", tuple(batch), 1), ("text", tuple(text), 2)):
        if len(sizes) != 3 or not low <= sizes[0] <= sizes[1] <= sizes[2]:
            raise ValueError(f"{name} sizes must be (min, opt, max) with {low} <= min <= opt <= max, got {sizes}")
    shapes = {"images": tuple((b, 3, h, w) for b in batch)}
    shapes["input_ids"] = shapes["attention_mask"] = tuple((b, t) for b, t in zip(batch, text))
    return shapes


def _uses_plugins(onnx_path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.domain == "rexfast" for n in model.graph.node)


def build_engine(onnx_path: Union[str, os.PathLike], engine_path: Union[str, os.PathLike], *, image_size,
                 batch: Sequence[int] = (1, 8, 16), text: Sequence[int] = (2, 20, 40), fp16: bool = False,
                 plugins: Optional[bool] = None) -> Path:
    """Serialize an engine for ``onnx_path`` to ``engine_path`` (atomically). ``plugins``: register
    the rexfast plugins first (default: when the file has rexfast:: nodes). Float32 engines are
    built without TF32, so they compute what onnxruntime computes."""
    import tensorrt as trt

    from rexfast.io import atomic_write_bytes

    if plugins is None:
        plugins = _uses_plugins(onnx_path)
    if plugins:
        from . import register_plugins

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(image_size, batch=batch, text=text).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_path} (see its log above)")
    return atomic_write_bytes(engine_path, bytes(serialized))


def run_engine(engine: Union[bytes, str, os.PathLike], images, input_ids, attention_mask) -> dict:
    """Run a serialized engine on CUDA torch tensors; returns {output name: tensor}."""
    import tensorrt as trt
    import torch

    data = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    cuda_engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    context = cuda_engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
              trt.int32: torch.int32, trt.bool: torch.bool}
    feeds = dict(zip(INPUTS, (images, input_ids, attention_mask)))
    keep = []
    for name, tensor in feeds.items():
        tensor = tensor.to(device="cuda", dtype=dtypes[cuda_engine.get_tensor_dtype(name)]).contiguous()
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for i in range(cuda_engine.num_io_tensors):
        name = cuda_engine.get_tensor_name(i)
        if cuda_engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[cuda_engine.get_tensor_dtype(name)],
                          device="cuda")
        context.set_tensor_address(name, out.data_ptr())
        outputs[name] = out
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return outputs


__all__ = ["INPUTS", "profile_shapes", "build_engine", "run_engine"]
