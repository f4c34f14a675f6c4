"""The glue between a run configuration and the data, tokenizer and model layers.

Everything the trainer, evaluator, predictor and demo need from the layers
below goes through here, so they never depend on a dataset's or a model's
constructor details.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, DataConfig

MODELS = ("cgformer",)


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
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer vocabulary ids are not contiguous from 0")
    return [token for token, _ in ordered]


def tokenizer_from_vocab(vocab: list[str], data_cfg: DataConfig):
    """Rebuild the checkpoint's tokenizer from its stored vocabulary."""
    from rexfast.data import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="rexfast-vocab-") as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return load_tokenizer(path)


# ----------------------------------------------------------------------------- data
def task_of(data_cfg: DataConfig) -> str:
    from rexfast.data import DATASETS

    if data_cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {data_cfg.dataset!r}; expected one of {sorted(DATASETS)}")
    return "gres" if data_cfg.dataset in ("grefcoco", "synthetic") else "res"


def build_dataset(data_cfg: DataConfig, split: str, *, train: bool, tokenizer):
    from rexfast.data import ReferringDataset

    task_of(data_cfg)  # validates the name
    return ReferringDataset(
        data_cfg.root, data_cfg.dataset, split, image_root=data_cfg.image_root, image_size=data_cfg.image_size,
        tokenizer=tokenizer, max_tokens=data_cfg.max_tokens, train=train,
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


def original_image(item: dict) -> np.ndarray:
    """The sample's image as uint8 (H, W, 3) at its original resolution."""
    from PIL import Image

    with Image.open(item["image_path"]) as img:
        return np.asarray(img.convert("RGB"))


def sentence_of(item: dict) -> str:
    return item["sentence"]


def update_metrics(meter, pred: torch.Tensor, gt: torch.Tensor, item: dict) -> None:
    from rexfast.metrics import GRESMetrics

    if isinstance(meter, GRESMetrics):
        meter.update(pred, gt, no_target=bool(item.get("no_target", gt.sum() == 0)))
    else:
        meter.update(pred, gt)


def inference_item(image: np.ndarray, text: str, tokenizer, data_cfg: DataConfig) -> dict:
    """A sample for ``collate`` from a uint8 (H,W,3) image and a sentence,
    preprocessed exactly as the evaluation data is."""
    from rexfast.data import tokenize
    from rexfast.data.datasets import preprocess_image

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty sentence")
    ids, mask = tokenize(tokenizer, text, data_cfg.max_tokens)
    return {"image": preprocess_image(image, data_cfg.image_size), "input_ids": ids, "attention_mask": mask,
            "sentence": text}


def generate_synthetic_data(data_cfg: DataConfig, *, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Path:
    from rexfast.data import generate_synthetic

    root = Path(data_cfg.root)
    generate_synthetic(root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=data_cfg.image_size)
    return root


# ----------------------------------------------------------------------------- model
def _bert_spec(preset_bert: Any, tokenizer, has_weights: bool) -> Any:
    """A randomly initialised BERT gets the tokenizer's vocabulary size (the
    synthetic vocabulary is tiny); pretrained weights must match the tokenizer."""
    from rexfast.models.text import bert_config

    cfg = bert_config(preset_bert)
    size = len(vocab_of(tokenizer))
    if cfg.vocab_size == size:
        return preset_bert
    if has_weights:
        raise ValueError(f"the tokenizer has {size} tokens but the BERT weights expect {cfg.vocab_size}")
    return {**cfg.to_dict(), "vocab_size": size}


def build_model(cfg: Config, tokenizer) -> torch.nn.Module:
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    from rexfast.models import CGFormer, CGFormerConfig

    options: dict[str, Any] = dict(cfg.model.options or {})
    options.setdefault("image_size", cfg.data.image_size)
    if cfg.model.ops_backend:
        options["ops_backend"] = cfg.model.ops_backend
    if cfg.model.bert_weights:
        options["bert_weights"] = cfg.model.bert_weights
    model_cfg = CGFormerConfig.preset(cfg.model.preset, **options)
    bert = _bert_spec(model_cfg.bert, tokenizer, model_cfg.bert_weights is not None)
    if bert is not model_cfg.bert:
        model_cfg.bert = bert
    return CGFormer(model_cfg)


def describe(model: torch.nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({params / 1e6:.2f} M parameters)"


__all__ = [
    "build_tokenizer", "vocab_of", "tokenizer_from_vocab", "task_of", "build_dataset", "collate", "original_mask",
    "original_image", "sentence_of", "update_metrics", "inference_item", "generate_synthetic_data", "build_model",
    "describe",
]

