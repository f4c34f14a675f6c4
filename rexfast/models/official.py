"""Reading the authors' released checkpoint files (shared by the models' loaders).

Released files are ``torch.save`` pickles: CGFormer's ``{"model_state_dict": ...}``
(DDP copies carry ``module.`` prefixes), ReLA's detectron2 ``{"model": ...}``.
They are read with ``weights_only=True``, which refuses anything that is not a
tensor or a plain value before it can run.
"""

from __future__ import annotations

import os
from typing import Mapping, Union

from torch import Tensor

from ..io import safe_torch_load


def read_checkpoint(checkpoint: Union[str, os.PathLike, Mapping]) -> dict[str, Tensor]:
    """The model state dict of a released checkpoint (file or loaded object),
    unwrapped from ``model_state_dict`` / ``state_dict`` / ``model`` and with
    every ``module.`` prefix removed. Files are read with ``weights_only=True``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = safe_torch_load(checkpoint, "checkpoint")
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
