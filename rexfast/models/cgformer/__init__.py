"""CGFormer (Tang et al., CVPR 2023): ``config.py``, ``model.py``, ``losses.py``,
and ``checkpoint.py`` (the authors' released checkpoint format)."""

from .config import CGFormerConfig
from .model import CGFormer

__all__ = ["CGFormer", "CGFormerConfig"]
