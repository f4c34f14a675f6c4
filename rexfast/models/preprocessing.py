"""What a model expects of its inputs: the preprocessing spec a model folder stores
in ``preprocessor_config.json``.

A model only answers well at the input size it was trained at (CGFormer's decoder
even builds its positional embeddings for one size), on images normalised as in
training and on sentences cut to the same number of tokens. The spec records those
so that ``eval``, ``predict`` and ``export`` of a folder run as training did:

    image = resize(image, (size, size))          PIL bilinear, aspect ratio not kept (LAVT/CGFormer/ReLA)
    x     = (image / 255 − mean) / std           per channel
    ids   = tokenizer(text)[:max_tokens]          [CLS] … [SEP], zero-padded to max_tokens

The file uses the key names of the ecosystem's image processors (``size``,
``image_mean``, ``image_std``, ``rescale_factor``) so other tools can read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZES = ("bilinear",)  # the whole image to size × size with PIL's bilinear filter (aspect ratio not kept)
DEFAULT_IMAGE_SIZE = 480  # every released CGFormer / ReLA model
DEFAULT_MAX_TOKENS = 20  # ditto


@dataclass(frozen=True)
class Preprocessing:
    """The input side of a model: square input size, normalisation, resize rule, sentence length."""

    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resize: str = "bilinear"
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"preprocessing image_size must be a positive int, got {size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"preprocessing {name} must be three numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not all(v > 0 for v in self.std):
            raise ValueError(f"preprocessing std must be positive, got {self.std}")
        if self.resize not in RESIZES:
            raise ValueError(f"preprocessing resize must be one of {list(RESIZES)}, got {self.resize!r}")
        tokens = self.max_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
            raise ValueError(f"preprocessing max_tokens must be an int >= 2 (room for [CLS] and [SEP]), got {tokens!r}")

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The ``preprocessor_config.json`` content."""
        return {
            "image_processor_type": "rexfast",
            "size": {"height": self.image_size, "width": self.image_size},
            "resize": self.resize,
            "rescale_factor": 1 / 255,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_dict(cls, raw, where: str = "preprocessor config") -> "Preprocessing":
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        size = raw.get("size")
        if isinstance(size, dict):
            if size.get("height") != size.get("width"):
                raise ValueError(f"{where}: size must be square (rexfast models run at size × size), got {size}")
            size = size.get("height")
        if size is None:
            raise ValueError(f"{where}: 'size' is missing")
        scale = raw.get("rescale_factor", 1 / 255)
        if not isinstance(scale, (int, float)) or abs(scale - 1 / 255) > 1e-12:
            raise ValueError(f"{where}: rescale_factor must be 1/255 (images are scaled to [0, 1]), got {scale!r}")
        try:
            return cls(image_size=size, mean=raw.get("image_mean", IMAGENET_MEAN),
                       std=raw.get("image_std", IMAGENET_STD), resize=raw.get("resize", "bilinear"),
                       max_tokens=raw.get("max_tokens", DEFAULT_MAX_TOKENS))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def write_preprocessing(preprocessing: Preprocessing, directory: Union[str, os.PathLike]) -> Path:
    from ..io import atomic_write_json

    return atomic_write_json(Path(directory) / PREPROCESSOR_FILE, preprocessing.to_dict())


def read_preprocessing(directory: Union[str, os.PathLike]) -> Optional[Preprocessing]:
    """The folder's spec, or None for a folder written before rexfast stored one."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
    return Preprocessing.from_dict(raw, str(path))


def default_preprocessing(config) -> Preprocessing:
    """The spec of a model known only by its config (a released checkpoint, a folder written
    before rexfast stored the spec): its config's ``image_size`` where it has one (CGFormer's
    positional embeddings are built for it), else the released 480²."""
    size = getattr(config, "image_size", None)
    return Preprocessing(image_size=int(size) if size else DEFAULT_IMAGE_SIZE)


__all__ = ["PREPROCESSOR_FILE", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "write_preprocessing",
           "read_preprocessing", "default_preprocessing"]
