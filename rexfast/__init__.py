"""rexfast: fast referring expression segmentation (CGFormer, ReLA)."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402


def info() -> dict:
    """Versions, built extensions and the backends each device type can run."""
    from .ops.registry import info as _info

    out = {"rexfast": __version__}
    out.update(_info())
    return out


def __getattr__(name):
    # Models import transformers; keep `import rexfast` light.
    if name in ("CGFormer",):
        from .models import cgformer

        return getattr(cgformer, name)
    raise AttributeError(f"module 'rexfast' has no attribute {name!r}")


__all__ = ["ops", "info", "CGFormer", "__version__"]
