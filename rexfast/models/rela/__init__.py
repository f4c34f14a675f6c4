"""ReLA (Liu, Ding, Jiang, CVPR 2023): ``config.py``, ``model.py`` (with the
``pixel_decoder.py`` and ``decoder.py`` it is built from), ``losses.py``, and
``checkpoint.py`` (the authors' released checkpoint format)."""

from . import checkpoint
from .config import ReLAConfig
from .model import ReLA

# The loader knows the model; the model does not import the loader.
ReLA.from_official = classmethod(checkpoint.from_official)

__all__ = ["ReLA", "ReLAConfig"]
