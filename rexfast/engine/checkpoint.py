"""Training state: atomic checkpoint writes and exact resume.

A training checkpoint (``last.pt``, ``best.pt``) is one ``torch.save`` file that
holds only tensors and plain Python values, so it is always read with
``torch.load(..., weights_only=True)``: a file from a stranger cannot run code
(anything else in it is refused before any of it is used). It carries the
model weights, the run config as a plain dict, the tokenizer vocabulary (so
``eval``/``predict`` need no other file) and, for ``last.pt``, the optimizer,
scheduler and grad-scaler state, the position in the data stream and every RNG
state (numpy's as a tensor, Python's as a tuple of ints).

Turning any model source (this file, a model folder, a released ``.pth``, a Hub id)
back into a model is :func:`rexfast.models.loading.load_model_source`'s job, and
:func:`rexfast.engine.loading.load_model`'s with a run config; ``load_model`` and
``Loaded`` are re-exported here for older imports.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..io import atomic_write
from ..models.loading import CHECKPOINT_FORMAT as FORMAT
from ..models.loading import CheckpointError, read_training_checkpoint


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`rexfast.io.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- RNG state as safe values
def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (readable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- reading
def load(path: str | os.PathLike) -> dict:
    """A rexfast training checkpoint, read with weights_only=True, with one clear error for anything else."""
    return read_training_checkpoint(path)


def load_weights(model: torch.nn.Module, state: dict, source) -> None:
    """Strict ``load_state_dict``; a CheckpointError lists the missing, unexpected or misshaped keys."""
    from rexfast.models.base import load_state_strict

    try:
        load_state_strict(model, state, source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


from .loading import Loaded, load_model  # noqa: E402 (re-exported for older imports)

__all__ = ["FORMAT", "CheckpointError", "atomic_save", "rng_state", "set_rng_state", "load",
           "load_weights", "Loaded", "load_model"]
