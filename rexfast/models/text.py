"""Text encoder: a ``transformers`` BertModel without its pooler.

Nothing is ever downloaded: the model is built from a ``BertConfig`` (the
bert-base-uncased values by default) and its weights, if any, come from a local
folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), a
state-dict file, or an in-memory state dict. The released CGFormer fine-tunes
BERT (its own learning rate, 5e-5) and drops the pooler (``pooler = None``), so
the checkpoint has no pooler keys; we build BertModel with
``add_pooling_layer=False`` to match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from ..io import safe_torch_load

# bert-base-uncased (what the released model uses)
BERT_BASE_UNCASED = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02,
)
# a few-layer BERT with the same vocabulary (so the bert-base tokenizer works) for tests and demos
BERT_TINY = dict(BERT_BASE_UNCASED, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
# twice as wide, for the CPU demo, where the text encoder is trained from scratch
BERT_SMALL = dict(BERT_TINY, hidden_size=64, num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
BERT_PRESETS = {"bert-base-uncased": BERT_BASE_UNCASED, "small": BERT_SMALL, "tiny": BERT_TINY}


def bert_config(spec: Union[str, Mapping, "object", None] = "bert-base-uncased"):
    """A ``transformers.BertConfig`` from a preset name, a dict of fields, or a
    local folder holding ``config.json``."""
    from transformers import BertConfig

    if spec is None:
        spec = "bert-base-uncased"
    if isinstance(spec, BertConfig):
        return spec
    if isinstance(spec, Mapping):
        return BertConfig(**dict(spec))
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) in BERT_PRESETS:
            return BertConfig(**BERT_PRESETS[str(spec)])
        path = Path(spec)
        if path.is_dir() and (path / "config.json").is_file():
            return BertConfig.from_json_file(str(path / "config.json"))
        raise ValueError(
            f"bert config {spec!r}: not a preset ({sorted(BERT_PRESETS)}) nor a local folder with config.json "
            "(models are never downloaded)"
        )
    raise TypeError(f"bert config must be a preset name, dict, BertConfig or folder, got {type(spec).__name__}")


def bert_for_vocab(spec, vocab_size: int, *, has_weights: bool):
    """The BERT spec for a tokenizer of ``vocab_size`` tokens: unchanged when it
    already fits; a randomly initialised BERT is resized to the vocabulary (the
    synthetic one is tiny); pretrained weights that do not fit are an error."""
    cfg = bert_config(spec)
    if cfg.vocab_size == vocab_size:
        return spec
    if has_weights:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the BERT weights expect {cfg.vocab_size}")
    return {**cfg.to_dict(), "vocab_size": vocab_size}


def build_bert(config=None, weights: Union[str, os.PathLike, Mapping[str, Tensor], None] = None):
    """BertModel (no pooler) from ``config`` (see :func:`bert_config`), with
    optional local ``weights``. A folder passed as ``config`` also supplies the
    weights when ``weights`` is None."""
    from transformers import BertModel

    if weights is None and isinstance(config, (str, os.PathLike)) and Path(config).is_dir():
        weights = config
    cfg = bert_config(config)
    model = BertModel(cfg, add_pooling_layer=False)
    if weights is not None:
        load_bert_weights(model, weights)
    return model


_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _read_state_dict(source) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {source}")
    if not path.is_file():
        raise FileNotFoundError(f"BERT weights not found: {source}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_torch_load(path, "BERT weights")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return dict(state)


def load_bert_weights(model, source) -> None:
    """Load BERT weights strictly. Accepts HF ``BertModel`` / ``BertForXxx``
    layouts (``bert.`` prefix, pooler and heads dropped) and old-style
    ``LayerNorm.gamma/beta`` names; any other unknown or missing key raises."""
    raw = _read_state_dict(source)
    state = {}
    for key, value in raw.items():
        if key.startswith("bert."):
            key = key[len("bert."):]
        elif key.startswith(("cls.", "classifier.", "qa_outputs.")):
            continue  # task heads of BertFor* checkpoints
        if key.startswith("pooler.") or key.endswith(_IGNORED_SUFFIXES):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        state[key] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shapes:
        raise ValueError(
            "BERT weights do not match the configured BertModel:\n"
            f"  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  shape mismatch: {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in bad_shapes]}"
        )
    model.load_state_dict(state, strict=True)


def encode_text(bert, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states (B, L, hidden)."""
    return bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


__all__ = ["BERT_BASE_UNCASED", "BERT_SMALL", "BERT_TINY", "bert_config", "bert_for_vocab", "build_bert", "load_bert_weights", "encode_text"]
