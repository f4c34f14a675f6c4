"""A run configuration → the new objects it describes: its tokenizer, its dataset splits,
its synthetic data and its untrained model.

The trainer, the evaluator and the demo start a run from a :class:`~rexfast.engine.config.Config`;
these functions read its fields and hand them, as plain arguments, to the layers that do the
work (:mod:`rexfast.models.tokenizer`, :class:`rexfast.data.ReferringDataset`,
:func:`rexfast.data.generate_synthetic`, the model registry :mod:`rexfast.models.registry`).
A model that already exists (a folder, a checkpoint, released weights) is loaded by
:mod:`rexfast.engine.loading` instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import Config, DataConfig


def _vocab_path(data_cfg: DataConfig) -> Path:
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer)
    if data_cfg.dataset.startswith("synthetic"):
        return Path(data_cfg.root) / "vocab.txt"
    raise ValueError(
        f"data.tokenizer is not set: point it at a local bert-base-uncased vocab.txt or model folder for "
        f"{data_cfg.dataset!r} (rexfast never downloads)"
    )


def build_tokenizer(data_cfg: DataConfig):
    """The tokenizer ``data.tokenizer`` names (the synthetic datasets: ``<data.root>/vocab.txt``)."""
    from rexfast.models.tokenizer import load_tokenizer

    return load_tokenizer(_vocab_path(data_cfg))


def build_dataset(data_cfg: DataConfig, split: str, *, train: bool, tokenizer, targets_only: bool = False):
    """The configured dataset split; ``targets_only``: the ground truth only, to score
    predictions (no tokenizer; see :class:`rexfast.data.ReferringDataset`)."""
    from rexfast.data import ReferringDataset

    return ReferringDataset(
        data_cfg.root, data_cfg.dataset, split, image_root=data_cfg.image_root, image_size=data_cfg.image_size,
        tokenizer=tokenizer, max_tokens=data_cfg.max_tokens, train=train, mask_resize=data_cfg.mask_resize,
        eval_resolution=data_cfg.eval_resolution, no_target_repeat=data_cfg.no_target_repeat if train else 1,
        targets_only=targets_only,
    )


def generate_synthetic_data(data_cfg: DataConfig, *, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Path:
    """Write the synthetic dataset into ``data.root`` at ``data.image_size``; returns the root."""
    from rexfast.data import generate_synthetic

    root = Path(data_cfg.root)
    generate_synthetic(root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=data_cfg.image_size)
    return root


def _model_class(cfg: Config):
    from rexfast.models import registry

    return registry.get(cfg.model.name).model_class


def check_input_size(cfg: Config) -> None:
    """The input size must suit the model (e.g. a multiple of 32 for the Swin backbones)."""
    multiple = getattr(_model_class(cfg), "input_multiple", 1)
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
    from rexfast.models.tokenizer import vocab_of

    model_cfg = cfg.model.config
    bert = bert_for_vocab(model_cfg.bert, len(vocab_of(tokenizer)), has_weights=model_cfg.bert_weights is not None)
    if bert is not model_cfg.bert:
        model_cfg = dataclasses.replace(model_cfg, bert=bert)
    cfg.model.config = model_cfg
    return _model_class(cfg)(model_cfg, **cfg.model.runtime)


__all__ = ["build_tokenizer", "build_dataset", "generate_synthetic_data", "check_input_size", "build_model"]
