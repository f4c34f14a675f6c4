"""ONNX / TensorRT export (its own top layer beside the CLI: imports models and ops, never the reverse).

``export_onnx(model, path, image_size=..., mode="decomposed" | "hybrid")`` writes one
ONNX file per image size with dynamic batch and text length; ``rexfast export`` is
the command line for it. Needs the ``export`` extra (onnx, onnxscript, onnxruntime);
nothing here is imported by ``import rexfast``.
"""

from __future__ import annotations

MODES = ("decomposed", "hybrid")
OPSETS = (18, 19, 20)  # torch.onnx's own opset is 18; TensorRT 10 parses opsets 9-20

_LAZY = {
    "export_onnx": "onnx_export", "ExportResult": "onnx_export", "MissingDependencyError": "onnx_export",
    "example_inputs": "onnx_export", "onnxruntime_outputs": "onnx_export", "image_size_pair": "onnx_export",
    "check_tensorrt_compatibility": "tensorrt_rules",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "OPSETS", *sorted(_LAZY)]
