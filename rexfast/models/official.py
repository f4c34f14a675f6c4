"""Reading the authors' released checkpoint files (shared by the models' loaders).

Released files are ``torch.save`` pickles: CGFormer's ``{"model_state_dict": ...}``
(DDP copies carry ``module.`` prefixes), ReLA's detectron2 ``{"model": ...}``.
They are read with ``weights_only=True``, which refuses anything that is not a
tensor or a plain value before it can run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor


def read_checkpoint(checkpoint: Union[str, os.PathLike, Mapping]) -> dict[str, Tensor]:
    """The model state dict of a released checkpoint (file or loaded object),
    unwrapped from ``model_state_dict`` / ``state_dict`` / ``model`` and with
    every ``module.`` prefix removed. Files are read with ``weights_only=True``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with what it means
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"cannot read {path} with torch.load(weights_only=True): {first[:200]} (rexfast never unpickles "
                "anything but tensors and plain values, so a file that needs more is refused)"
            ) from None
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a mapping, got {type(checkpoint).__name__}")
    state = checkpoint
    for key in ("model_state_dict", "state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue  # bookkeeping entries next to the weights (e.g. detectron2's iteration counters)
        out[key] = value
    return out


__all__ = ["read_checkpoint"]
