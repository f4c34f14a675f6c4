"""ReLA (Liu, Ding, Jiang, CVPR 2023): ``config.py``, ``model.py`` (with the
``pixel_decoder.py`` and ``decoder.py`` it is built from), ``losses.py``, and
``checkpoint.py`` (the authors' released checkpoint format)."""

from . import checkpoint  # noqa: F401 (the released format; the registry names its loader)
from .config import ReLAConfig, ReLARuntime
from .model import ReLA

__all__ = ["ReLA", "ReLAConfig", "ReLARuntime"]
