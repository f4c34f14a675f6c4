"""rexfast: fast referring expression segmentation (CGFormer, ReLA).

``from rexfast import Segmenter`` segments what a sentence names in your own images
(:class:`rexfast.Segmenter`, :class:`rexfast.Segmentation`). ``import rexfast`` is light
(no triton, no transformers): the models are imported on first access, e.g.
``rexfast.CGFormer``.
"""

from __future__ import annotations

from ._version import __version__
from . import ops

_LAZY = {name: "rexfast.models" for name in ("CGFormer", "CGFormerConfig", "ReLA", "ReLAConfig")}
_LAZY["optimize"] = "rexfast.engine.optimize"  # imports torch only (the models load when it runs)
_LAZY.update({name: "rexfast.engine.segmenter" for name in ("Segmenter", "Segmentation")})


def info() -> dict:
    """Versions, built extensions and the backends each op can run per device type."""
    from .ops.registry import info as _info

    from .engine.precision import cpu_bf16_support, describe

    out = {"rexfast": __version__}
    out.update(_info())
    out["cpu_native_bf16"] = cpu_bf16_support() or "none"
    out["cpu_precision_auto"] = describe("auto", "cpu")  # what --precision auto runs on this CPU
    return out


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rexfast' has no attribute {name!r}")


__all__ = ["ops", "info", "__version__", *_LAZY]
