"""CGFormer (Tang et al., CVPR 2023): ``config.py``, ``model.py``, ``losses.py``,
and ``checkpoint.py`` (the authors' released checkpoint format)."""

from . import checkpoint  # noqa: F401 (the released format; the registry names its loader)
from .config import CGFormerConfig, CGFormerRuntime
from .model import CGFormer

__all__ = ["CGFormer", "CGFormerConfig", "CGFormerRuntime"]
