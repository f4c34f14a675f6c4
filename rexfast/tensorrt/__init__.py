"""TensorRT deployment of the exported graphs: plugins, the torch-TensorRT lowering, engine builds.

Behind import guards: nothing here imports ``tensorrt`` or ``torch_tensorrt`` until a
function that needs it is called, and ``import rexfast`` never imports this package.

* :mod:`.plugin_specs` — for group_assign, region_image_attention and ms_deform_attn,
  the shape and type rules and the implementation body of a TensorRT plugin, in plain
  PyTorch (the body runs the registered op, so on CUDA tensors the Triton/CUDA
  kernels): testable on CPU with the reference backend.
* :mod:`.plugins` — their registration as quickly deployable plugins
  (``tensorrt.plugin``: register / impl / autotune), ``rexfast::<op>``, version "1":
  what a ``hybrid`` ONNX file's ``rexfast::<op>`` nodes resolve to.
* :mod:`.torch_trt` — every op's inference decomposition registered as a
  torch-TensorRT lowering (``torch_tensorrt.compile`` of a model with rexfast ops).
* :mod:`.engine` — build a serialized engine from an exported ONNX file with the
  TensorRT Python API (one optimisation profile over batch and text length).
"""

from __future__ import annotations

from typing import Optional

PLUGIN_OPS = ("group_assign", "region_image_attention", "ms_deform_attn")


def tensorrt_error() -> Optional[str]:
    """None when ``tensorrt`` (with ``tensorrt.plugin``) imports, else why not."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except Exception as exc:  # ImportError, or the bindings failing to load their libraries
        return f"{type(exc).__name__}: {exc}"
    return None


def register_plugins() -> tuple[str, ...]:
    """Register the rexfast plugins with TensorRT (idempotent); returns their names."""
    problem = tensorrt_error()
    if problem is not None:
        raise ImportError(f"TensorRT plugins need tensorrt >= 10.6 with tensorrt.plugin ({problem})")
    from . import plugins  # noqa: F401  (registration happens at import)

    return tuple(f"rexfast::{op}" for op in PLUGIN_OPS)


__all__ = ["PLUGIN_OPS", "tensorrt_error", "register_plugins"]
