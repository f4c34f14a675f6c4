"""The glue between a run configuration and the data, tokenizer and model layers.

The trainer, evaluator, predictor and demo get datasets, tokenizers and models
only from here, and models only through the registry
(:mod:`rexfast.models.registry`) and the protocol of :mod:`rexfast.models.base`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .config import Config, DataConfig


# ----------------------------------------------------------------------------- tokenizer
def _default_vocab(data_cfg: DataConfig) -> Path:
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer)
    if data_cfg.dataset.startswith("synthetic"):
        return Path(data_cfg.root) / "vocab.txt"
    raise ValueError(
        f"data.tokenizer is not set: point it at a local bert-base-uncased vocab.txt or model folder for "
        f"{data_cfg.dataset!r} (rexfast never downloads)"
    )


def build_tokenizer(data_cfg: DataConfig):
    from rexfast.data import load_tokenizer

    return load_tokenizer(_default_vocab(data_cfg))


def vocab_of(tokenizer) -> list[str]:
    """The vocabulary in id order; stored in checkpoints so eval/predict need no vocab file."""
    from rexfast.models.tokenizer import vocab_of as _vocab_of

    return _vocab_of(tokenizer)


def tokenizer_from_vocab(vocab: list[str]):
    """Rebuild a checkpoint's tokenizer from its stored vocabulary."""
    from rexfast.models.tokenizer import tokenizer_from_vocab as _from_vocab

    return _from_vocab(vocab)


# ----------------------------------------------------------------------------- data
def task_of(data_cfg: DataConfig) -> str:
    """"res" or "gres", from the dataset's spec."""
    from rexfast.data import DATASETS

    if data_cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {data_cfg.dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[data_cfg.dataset].task


def build_dataset(data_cfg: DataConfig, split: str, *, train: bool, tokenizer, targets_only: bool = False):
    """The configured dataset split; ``targets_only``: the ground truth only, to score
    predictions (no tokenizer; see :class:`rexfast.data.ReferringDataset`)."""
    from rexfast.data import ReferringDataset

    task_of(data_cfg)  # validates the name
    return ReferringDataset(
        data_cfg.root, data_cfg.dataset, split, image_root=data_cfg.image_root, image_size=data_cfg.image_size,
        tokenizer=tokenizer, max_tokens=data_cfg.max_tokens, train=train, mask_resize=data_cfg.mask_resize,
        eval_resolution=data_cfg.eval_resolution, no_target_repeat=data_cfg.no_target_repeat if train else 1,
        targets_only=targets_only,
    )


def collate(items: list[dict], device) -> dict[str, torch.Tensor]:
    """Stack samples into a batch on ``device``: image (B,3,S,S), input_ids and
    attention_mask (B,L), target (B,S,S)."""
    device = torch.device(device)
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "attention_mask": torch.stack([it["attention_mask"] for it in items]),
    }
    if all("target" in it for it in items):
        batch["target"] = torch.stack([it["target"].reshape(it["target"].shape[-2:]) for it in items])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def original_mask(item: dict) -> torch.Tensor:
    return torch.as_tensor(item["orig_mask"]).bool()


def eval_mask(item: dict) -> torch.Tensor:
    """The GT the evaluation compares with (see ``data.eval_resolution``)."""
    return torch.as_tensor(item.get("eval_mask", item["orig_mask"])).bool()


def original_image(item: dict) -> np.ndarray:
    """The sample's image as uint8 (H, W, 3) at its original resolution."""
    from rexfast.io import load_image

    return np.asarray(load_image(item["image_path"]))


def sentence_of(item: dict) -> str:
    return item["sentence"]


def generate_synthetic_data(data_cfg: DataConfig, *, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Path:
    from rexfast.data import generate_synthetic

    root = Path(data_cfg.root)
    generate_synthetic(root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=data_cfg.image_size)
    return root


# ----------------------------------------------------------------------------- model
def model_class(cfg: Config):
    from rexfast.models import registry

    return registry.get(cfg.model.name).model_class


def check_input_size(cfg: Config) -> None:
    """The input size must suit the model (e.g. a multiple of 32 for the Swin backbones)."""
    multiple = getattr(model_class(cfg), "input_multiple", 1)
    size = cfg.data.image_size
    if size <= 0 or size % multiple:
        raise ValueError(f"data.image_size must be a positive multiple of {multiple} for {cfg.model.name}, "
                         f"got {size}")


def build_model(cfg: Config, tokenizer) -> torch.nn.Module:
    """The configured model, its text encoder sized to the tokenizer when it is
    trained from scratch (the synthetic vocabulary is tiny). ``cfg.model.config``
    is updated to the config the model was built with, so a checkpoint of it
    rebuilds exactly."""
    from rexfast.models.text import bert_for_vocab

    model_cfg = cfg.model.config
    bert = bert_for_vocab(model_cfg.bert, len(vocab_of(tokenizer)), has_weights=model_cfg.bert_weights is not None)
    if bert is not model_cfg.bert:
        model_cfg = dataclasses.replace(model_cfg, bert=bert)
    cfg.model.config = model_cfg
    return model_class(cfg)(model_cfg, **cfg.model.runtime)


# ----------------------------------------------------------------------------- loading a model source
@dataclasses.dataclass
class Loaded:
    """A model ready for inference with its run config, tokenizer and preprocessing."""

    model: torch.nn.Module
    config: Config  # the run Config: a training checkpoint's own; for other sources data/train defaults
    tokenizer: object
    preprocessing: object  # rexfast.models.preprocessing.Preprocessing, after --set data.image_size / max_tokens
    source: object = None  # the rexfast.models.loading.LoadedModel it came from


def load_model(source, *, overrides=(), tokenizer=None, device="cpu", require_tokenizer: bool = True) -> Loaded:
    """Any model source (:func:`rexfast.models.loading.load_model_source`: a model folder, a
    training checkpoint, a released ``.pth`` with a tokenizer, a Hub id) with its run config.

    ``overrides`` are ``section.key=value`` strings: ``model.*`` replace model config fields
    before the weights load, ``data.*`` the data settings (``data.image_size`` and
    ``data.max_tokens`` also the preprocessing; ``data.tokenizer`` acts as ``tokenizer``).
    A training checkpoint brings its run config; other sources run at their stored
    preprocessing with the default data and train sections."""
    import copy
    import logging

    from rexfast.models.loading import load_model_source

    from .config import ModelSection, apply_overrides

    overrides = list(overrides or ())
    raw = apply_overrides({}, overrides)
    unknown = set(raw) - {"data", "model", "train"}
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)} in --set; expected data, model, train")
    model_over = raw.get("model") or {}
    if not isinstance(model_over, dict):
        raise ValueError(f"--set model=... must name a field, e.g. model.eval_noise=false; got {model_over!r}")
    fixed = sorted({"name", "preset"} & set(model_over))
    if fixed:
        raise ValueError(f"--set model.{fixed[0]} cannot change a trained model's architecture; set single fields "
                         "(model.FIELD=VALUE)")
    data_over = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    tokenizer = tokenizer or data_over.get("tokenizer")
    loaded = load_model_source(source, tokenizer=tokenizer, model_overrides=model_over, device=device,
                               require_tokenizer=require_tokenizer)
    if "image_size" not in data_over:  # (the one note: a folder without preprocessor_config.json)
        for note in loaded.notes:
            logging.getLogger("rexfast").warning(note)
    if loaded.run_config is not None:
        cfg = Config.from_dict(apply_overrides(copy.deepcopy(loaded.run_config), overrides))
    else:  # the model section is the loaded model's (its overrides are applied above)
        spec = loaded.preprocessing
        base = {"data": {"image_size": spec.image_size, "max_tokens": spec.max_tokens}}
        cfg = Config.from_dict(apply_overrides(base, [o for o in overrides if not o.startswith("model.")]))
    entry_presets = type(loaded.model.config).PRESETS
    cfg.model = ModelSection(name=loaded.model.model_type, preset=loaded.preset or entry_presets[0],
                             config=loaded.model.config, runtime=loaded.model.runtime.changed())
    if isinstance(tokenizer, (str, Path)):
        cfg.data.tokenizer = str(tokenizer)
    check_input_size(cfg)
    if cfg.data.max_tokens < 2:
        raise ValueError(f"data.max_tokens must be >= 2 (room for [CLS] and [SEP]), got {cfg.data.max_tokens}")
    preprocessing = loaded.preprocessing.replace(image_size=cfg.data.image_size, max_tokens=cfg.data.max_tokens)
    return Loaded(loaded.model, cfg, loaded.tokenizer, preprocessing, loaded)


__all__ = [
    "build_tokenizer", "vocab_of", "tokenizer_from_vocab", "task_of", "build_dataset", "collate", "original_mask", "eval_mask",
    "original_image", "sentence_of", "generate_synthetic_data", "model_class",
    "check_input_size", "build_model", "Loaded", "load_model",
]
