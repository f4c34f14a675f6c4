"""Loading (and writing) the released CGFormer checkpoint format.

The released ``train.py`` saves ``{"model_state_dict": model.module.state_dict(),
"optimizer": ..., "epoch": ..., ...}``; copies saved from the DDP wrapper carry
``module.`` prefixes. rexfast's module names reproduce the released ones, so the
key map is the identity after stripping those prefixes:

    official key (after ``module.``)          rexfast key
    backbone.*                                 backbone.*        (MultiModalSwinTransformer)
    decoder.*                                  decoder.*         (Decoder)
    text_encoder.*                             text_encoder.*    (transformers BertModel, no pooler)

The only keys tolerated without a counterpart are BERT buffers that newer or
older ``transformers`` versions store (``embeddings.position_ids``,
``embeddings.token_type_ids``) and pooler weights (the released model sets
``pooler = None``; we build BERT without one). Every other unknown or missing
key, and every shape mismatch, raises a ``ValueError`` that lists them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

# official -> rexfast renames (none needed: the module tree reproduces the released names)
KEY_MAP: dict[str, str] = {}
IGNORED_KEY_PATTERNS = (
    re.compile(r"^text_encoder\.embeddings\.(position_ids|token_type_ids)$"),
    re.compile(r"^text_encoder\.pooler\."),
)


def read_checkpoint(checkpoint: Union[str, os.PathLike, Mapping], *, weights_only: bool = True) -> dict[str, Tensor]:
    """The model state dict of a released checkpoint (file or loaded object),
    unwrapped from ``model_state_dict`` / ``state_dict`` / ``model`` and with
    every ``module.`` prefix removed."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # noqa: BLE001 - re-raised with the remedy
            if not weights_only:
                raise
            raise ValueError(
                f"{path} could not be read with weights_only=True ({exc}). If you trust the file, call "
                "read_checkpoint(path, weights_only=False) and pass the result to CGFormer.from_official."
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
        out[KEY_MAP.get(key, key)] = value
    return out


def _ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED_KEY_PATTERNS)


def config_from_state_dict(state: Mapping[str, Tensor], **overrides):
    """Infer a :class:`CGFormerConfig` from the weights' shapes: Swin width,
    depths, heads and window; BERT size; token count and width; the image size
    the positional embeddings were built for. PWAM head counts leave no trace in
    the weights: the released value (8) is assumed."""
    from .cgformer import CGFormerConfig
    from .swin import SwinConfig
    from .text import BERT_BASE_UNCASED

    def need(key):
        if key not in state:
            raise ValueError(f"cannot infer the architecture: checkpoint has no {key!r}")
        return state[key]

    embed_dim = need("backbone.patch_embed.proj.weight").shape[0]
    depths, heads = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"backbone\.layers\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"cannot infer the architecture: no blocks in backbone stage {i}")
        depths.append(max(blocks) + 1)
        heads.append(need(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table").shape[1])
    table = need("backbone.layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
    window = (int(round(math.sqrt(table))) + 1) // 2
    swin = SwinConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window)

    hidden = need("text_encoder.embeddings.word_embeddings.weight").shape[1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k))}
    bert = dict(
        BERT_BASE_UNCASED,
        vocab_size=state["text_encoder.embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1 if layers else 0,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=need("text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=need("text_encoder.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=need("text_encoder.embeddings.token_type_embeddings.weight").shape[0],
    )
    if bert == BERT_BASE_UNCASED:
        bert = "bert-base-uncased"
    tokens = need("decoder.tokens.weight")
    pe_rows = need("decoder.layers.0.positional_embedding").shape[0]
    image_size = int(round(math.sqrt(pe_rows))) * 16
    base = dict(swin=swin, bert=bert, num_tokens=tokens.shape[0], token_dim=tokens.shape[1], image_size=image_size)
    if "decoder.sentence_proj.weight" in state:
        base["variant"] = "paper"
        base["contrastive_weight"] = 0.1
    base.update(overrides)
    return CGFormerConfig(**base)


def check_keys(model: torch.nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state restricted to loadable keys; raises listing every unknown,
    missing or mis-shaped key."""
    expected = model.state_dict()
    kept = {k: v for k, v in state.items() if not (_ignored(k) and k not in expected)}
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    shapes = sorted(
        (k, tuple(kept[k].shape), tuple(expected[k].shape))
        for k in set(kept) & set(expected)
        if tuple(kept[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        lines = ["the checkpoint does not match the CGFormer architecture:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            lines.append(f"  shape mismatches (key, checkpoint, model): {shapes}")
        raise ValueError("\n".join(lines))
    return kept


def load_official(checkpoint, config=None, *, weights_only: bool = True, **overrides):
    """Build a CGFormer for ``checkpoint`` (architecture inferred unless
    ``config`` is given) and load it strictly. Returns the model in eval mode."""
    from .cgformer import CGFormer

    state = read_checkpoint(checkpoint, weights_only=weights_only)
    if config is None:
        config = config_from_state_dict(state, **overrides)
    elif overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)
    model = CGFormer(config)
    kept = check_keys(model, state)
    model.load_state_dict(kept, strict=True)
    return model.eval()


def to_official_state_dict(model: torch.nn.Module, *, ddp_prefix: bool = False) -> dict:
    """The released on-disk layout: ``{"model_state_dict": {...}}`` with the
    official key names (``module.``-prefixed when ``ddp_prefix``)."""
    inverse = {v: k for k, v in KEY_MAP.items()}
    prefix = "module." if ddp_prefix else ""
    state = {prefix + inverse.get(k, k): v for k, v in model.state_dict().items()}
    return {"model_state_dict": state}


__all__ = ["KEY_MAP", "read_checkpoint", "config_from_state_dict", "check_keys", "load_official",
           "to_official_state_dict"]
