"""CGFormer (Tang et al., CVPR 2023): ``config.py``, ``model.py``, ``losses.py``,
and ``checkpoint.py`` (the authors' released checkpoint format)."""

from . import checkpoint
from .config import CGFormerConfig
from .model import CGFormer

# The loader knows the model; the model does not import the loader.
CGFormer.from_official = classmethod(checkpoint.from_official)

__all__ = ["CGFormer", "CGFormerConfig"]
