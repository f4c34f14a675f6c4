"""Checkpoints: atomic writes, exact resume, and one way back from a file to a model.

A training checkpoint (``last.pt``, ``best.pt``) is one ``torch.save`` file that
holds only tensors and plain Python values, so it is always read with
``torch.load(..., weights_only=True)``: a file from a stranger cannot run code
(anything else in it is refused before any of it is used). It carries the
model weights, the run config as a plain dict, the tokenizer vocabulary (so
``eval``/``predict`` need no other file) and, for ``last.pt``, the optimizer,
scheduler and grad-scaler state, the position in the data stream and every RNG
state (numpy's as a tensor, Python's as a tuple of ints).

:func:`load_model` rebuilds the model from a training checkpoint or from a
``save_pretrained`` folder (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..io import atomic_write, safe_torch_load

FORMAT = "rexfast-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`rexfast.data.io.atomic_write`)."""
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
def _read(path, what: str):
    """:func:`rexfast.io.safe_torch_load`, its errors as CheckpointError."""
    try:
        return safe_torch_load(path, what)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None


def load(path: str | os.PathLike) -> dict:
    """A rexfast training checkpoint, read with weights_only=True, with one clear error for anything else."""
    obj = _read(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a rexfast checkpoint (no '{FORMAT}' marker); the authors' released weights load with "
            "`rexfast convert --official` or CGFormer.from_official / ReLA.from_official"
        )
    for key, kind in (("config", dict), ("vocab", list), ("model", dict)):
        if not isinstance(obj.get(key), kind):
            raise CheckpointError(f"{path}: malformed rexfast checkpoint ('{key}' is missing or not a {kind.__name__})")
    return obj


def checkpoint_config(ckpt: dict, overrides=()):
    """The run Config stored in a checkpoint, with ``section.key=value`` overrides applied."""
    from .config import Config, apply_overrides

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in ckpt["config"].items()}
    return Config.from_dict(apply_overrides(raw, list(overrides)))


def load_weights(model: torch.nn.Module, state: dict, source) -> None:
    """Strict ``load_state_dict``; a CheckpointError lists the missing, unexpected or misshaped keys."""
    from rexfast.models.base import load_state_strict

    try:
        load_state_strict(model, state, source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


@dataclass
class Loaded:
    model: torch.nn.Module
    config: Any  # the run Config (data, model, train)
    tokenizer: Any


def load_model(path: str | os.PathLike, *, overrides=(), tokenizer_path: Optional[str] = None,
               device="cpu", require_tokenizer: bool = True) -> Loaded:
    """The model of a training checkpoint (``best.pt``/``last.pt``) or of a
    ``save_pretrained`` folder, in eval mode on ``device``, with its run config
    and tokenizer. A folder holds no tokenizer and no data config: they come from
    ``tokenizer_path`` / ``overrides`` (``data.*``); with ``require_tokenizer=False``
    (export, which feeds token ids) a folder loads without one (``tokenizer`` None)."""
    from . import builders
    from .config import Config, ModelSection, apply_overrides

    path = Path(path)
    if path.is_dir():
        from rexfast.models import registry
        from rexfast.models.pretrained import read_pretrained_config, read_pretrained_weights

        name, fields = read_pretrained_config(path)
        model_cfg = registry.get(name).config_class.from_dict(fields)
        state = read_pretrained_weights(path)
        raw = apply_overrides({"data": {}, "train": {}}, list(overrides))
        cfg = Config.from_dict({k: v for k, v in raw.items() if k != "model"})
        cfg.model = ModelSection(name=name, preset=type(model_cfg).PRESETS[0], config=model_cfg)
        tokenizer_file = tokenizer_path or cfg.data.tokenizer
        if not tokenizer_file and require_tokenizer:
            raise CheckpointError(f"{path} is a model folder and holds no tokenizer: pass --tokenizer (a local "
                                  "vocab.txt or BERT folder), or use the training checkpoint, which carries its vocabulary")
        tokenizer = None
        if tokenizer_file:
            cfg.data.tokenizer = str(tokenizer_file)
            tokenizer = builders.build_tokenizer(cfg.data)
        model = builders.model_class(cfg)(model_cfg)
        load_weights(model, state, path)
    else:
        ckpt = load(path)
        cfg = checkpoint_config(ckpt, overrides)
        tokenizer = builders.tokenizer_from_vocab(ckpt["vocab"])
        model = builders.build_model(cfg, tokenizer)
        load_weights(model, ckpt["model"], path)
    return Loaded(model.to(device).eval(), cfg, tokenizer)


__all__ = ["FORMAT", "CheckpointError", "atomic_save", "rng_state", "set_rng_state", "load",
           "checkpoint_config", "load_weights", "Loaded", "load_model"]
