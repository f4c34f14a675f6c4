"""The ecosystem's model format: a self-contained folder.

=============================  ==============================================================
``config.json``                the model's config class as JSON, plus ``model_type``
``model.safetensors``          the weights
``vocab.txt``,                 the tokenizer, as ``transformers.BertTokenizer.from_pretrained``
``tokenizer_config.json``      reads it (absent in folders written before rexfast stored it)
``preprocessor_config.json``   input size, mean, std, resize rule, sentence length
                               (:mod:`rexfast.models.preprocessing`)
``README.md``                  a model card: what the model is, what it was trained on and
                               scored where known, how to load it
=============================  ==============================================================

Reading it runs no code: JSON, text and safetensors hold only data. This is the
format to pass models around in (a Hugging Face Hub repository holding these files
loads by its id); ``rexfast convert --official`` turns the authors' released
``.pth`` files into it once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

from .._version import __version__
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_dir
from .preprocessing import Preprocessing, default_preprocessing, write_preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PathLike = Union[str, os.PathLike]


def save_pretrained(model, directory: PathLike, *, tokenizer=None, preprocessing: Optional[Preprocessing] = None,
                    card: Optional[Mapping] = None) -> Path:
    """Write a model folder for a registered model, each file atomically: ``config.json``,
    ``model.safetensors``, ``preprocessor_config.json`` (``preprocessing``; by default the
    model config's input size, ImageNet normalisation, 20 tokens), ``README.md`` and, given
    a ``tokenizer``, ``vocab.txt`` + ``tokenizer_config.json``.

    ``card`` adds what only the caller knows to the model card, all keys optional:
    ``preset`` (str), ``trained_on`` (str: data, split, steps), ``metrics`` (name → value),
    ``metrics_on`` (str: where they were measured), ``dataset`` (the ``data.dataset`` name it
    evaluates on), ``source`` (str: what it was made from).
    """
    from safetensors.torch import save

    from .tokenizer import save_tokenizer

    if preprocessing is None:
        preprocessing = default_preprocessing(model.config)
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a rexfast Preprocessing, got {type(preprocessing).__name__}")
    if card is not None and not isinstance(card, Mapping):
        raise TypeError(f"card must be a mapping (preset, trained_on, metrics, metrics_on, source), got "
                        f"{type(card).__name__}")
    directory = check_output_dir(directory, "model folder")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen: dict = {}
    for key, value in state.items():  # safetensors refuses tensors that share storage
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and ptr in seen:
            state[key] = value.clone()
        seen[ptr] = key
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "pt", "model_type": model.model_type}))
    atomic_write_json(directory / CONFIG_FILE,
                      {"model_type": model.model_type, "rexfast_version": __version__, **model.config.to_dict()})
    write_preprocessing(preprocessing, directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    atomic_write_text(directory / CARD_FILE, model_card(model, directory, preprocessing=preprocessing,
                                                        tokenizer=tokenizer, card=dict(card or {})))
    return directory


def _number(value) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def model_card(model, directory: PathLike, *, preprocessing: Preprocessing, tokenizer=None, card: Mapping) -> str:
    """The folder's ``README.md``: a Hugging Face style front matter and what a user needs to
    know before using the model; nothing is stated that the caller did not pass or the model
    does not show."""
    from .base import count_parameters

    name = type(model).__name__
    params = count_parameters(model)
    size = preprocessing.image_size
    rows = [("model", f"{name} (`model_type: {model.model_type}`)")]
    if card.get("preset"):
        rows.append(("preset", f"`{card['preset']}`"))
    rows += [
        ("parameters", f"{params:,} ({params / 1e6:.2f} M)"),
        ("input", f"{size} × {size} RGB (whole image resized, {preprocessing.resize}), mean "
                  f"{list(preprocessing.mean)}, std {list(preprocessing.std)}; sentences cut to "
                  f"{preprocessing.max_tokens} tokens"),
        ("no-target head", "yes (GRES: it can answer that nothing matches)"
         if getattr(model.config, "no_target_head", True) else "no (an empty mask means no target)"),
        ("tokenizer", f"included (`vocab.txt`, {len(tokenizer.get_vocab())} tokens)" if tokenizer is not None else
         "not included: give one with `--tokenizer` (a local vocab.txt or BERT folder) / `tokenizer=`"),
    ]
    if card.get("trained_on"):
        rows.append(("trained on", str(card["trained_on"])))
    if card.get("source"):
        rows.append(("made from", str(card["source"])))
    rows.append(("written by", f"rexfast {__version__}"))
    lines = ["---", "library_name: rexfast", "pipeline_tag: image-segmentation",
             f"tags: [rexfast, referring-expression-segmentation, {model.model_type}]", "---", "",
             f"# {Path(directory).name}: {name} for referring expression segmentation", "",
             "Segments what a sentence names in an image (one object, several, or none).", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    metrics = {k: _number(v) for k, v in dict(card.get("metrics") or {}).items()}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    lines += ["## Measured metrics", ""]
    if metrics:
        if card.get("metrics_on"):
            lines += [f"Measured on {card['metrics_on']}:", ""]
        lines += ["| " + " | ".join(metrics) + " |", "|" + "---|" * len(metrics),
                  "| " + " | ".join(metrics.values()) + " |", ""]
    else:
        lines += ["None recorded with this folder.", ""]
    tok = "" if tokenizer is not None else ", tokenizer=\"path/to/vocab.txt\""
    tok_cli = "" if tokenizer is not None else " --tokenizer path/to/vocab.txt"
    lines += ["## Use it", "", "```python", "from rexfast import Segmenter", "",
              f"seg = Segmenter.from_pretrained(\"{directory}\"{tok})",
              "result = seg(\"photo.jpg\", \"the dog on the left\")   # PIL image, uint8 array or path",
              "result.mask, result.no_target, result.overlay().save(\"overlay.png\")", "```", "",
              "```bash",
              f"rexfast predict --checkpoint {directory}{tok_cli} --image photo.jpg --text \"the dog on the left\" "
              "--out-dir out/",
              f"rexfast eval --checkpoint {directory}{tok_cli} --split val --set data.dataset="
              f"{card.get('dataset') or 'DATASET'} --set data.root=path/to/data",
              f"rexfast export --checkpoint {directory} --out model.onnx", "```", "",
              "Every file here is data (JSON, text, safetensors): loading it runs no code.", ""]
    return "\n".join(lines)


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


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CARD_FILE", "save_pretrained", "model_card", "read_pretrained_config", "read_pretrained_weights"]
