"""The ecosystem's model format: a folder with ``config.json`` (the model's config
class as JSON, plus ``model_type``) and ``model.safetensors`` (the weights).

Reading it runs no code: JSON and safetensors hold only data. This is the format
to pass models around in; ``rexfast convert --official`` turns the authors'
released ``.pth`` files into it once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from ..io import atomic_write_bytes, atomic_write_json, check_output_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PathLike = Union[str, os.PathLike]


def save_pretrained(model, directory: PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a registered model (each atomically)."""
    from safetensors.torch import save

    directory = check_output_dir(directory, "model folder")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen: dict = {}
    for key, value in state.items():  # safetensors refuses tensors that share storage
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and ptr in seen:
            state[key] = value.clone()
        seen[ptr] = key
    from .. import __version__

    atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "pt", "model_type": model.model_type}))
    atomic_write_json(directory / CONFIG_FILE,
                      {"model_type": model.model_type, "rexfast_version": __version__, **model.config.to_dict()})
    return directory


def read_pretrained_config(directory: PathLike) -> tuple[str, dict]:
    """(model type, config fields) of a ``save_pretrained`` folder's ``config.json``."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder not found: {directory}")
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{directory} is not a rexfast model folder: {p.name} is missing")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {config_path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"{config_path} has no 'model_type' (a rexfast model folder's config.json names its model)")
    model_type = raw.pop("model_type")
    raw.pop("rexfast_version", None)
    return model_type, raw


def read_pretrained_weights(directory: PathLike) -> dict:
    """The state dict in a folder's ``model.safetensors`` (safetensors holds only tensors: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {weights_path}: {exc}") from None


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "save_pretrained", "read_pretrained_config", "read_pretrained_weights"]
