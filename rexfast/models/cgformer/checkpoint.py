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

from ..backbones.swin import SwinConfig
from ..base import state_dict_mismatch
from ..official import ADVICE, given, merge_partial, read_checkpoint
from ..text import BERT_BASE_UNCASED
from .config import CGFormerConfig
from .model import CGFormer

IGNORED_KEY_PATTERNS = (
    re.compile(r"^text_encoder\.embeddings\.(position_ids|token_type_ids)$"),
    re.compile(r"^text_encoder\.pooler\."),
)


def _ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED_KEY_PATTERNS)


# Head counts leave no trace in the weights. They are known for the released
# architectures only: PWAM uses 8 heads in every stage of every released
# backbone (config.yaml, mha '8-8-8-8'), and BERT-base/large use 64-wide heads.
_RELEASED_SWIN_WIDTHS = {96, 128, 192}  # Swin-T/S, Swin-B, Swin-L
_BERT_HEADS = {768: 12, 1024: 16}


def config_from_state_dict(state: Mapping[str, Tensor], **overrides) -> CGFormerConfig:
    """Infer a :class:`CGFormerConfig` from the weights' shapes: Swin width,
    depths, heads and window; BERT size; token count and width; the image size
    the positional embeddings were built for. What the weights cannot tell —
    the PWAM and BERT head counts — is known for the released widths only; for
    any other width pass ``config=`` or ``swin=``/``bert=`` overrides (whole, or a
    partial dict such as ``swin={"pwam_heads": (4, 4, 4, 4)}`` completed from the
    weights), or the call refuses instead of guessing."""

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
    if not given(overrides, "swin", "pwam_heads") and embed_dim not in _RELEASED_SWIN_WIDTHS:
        raise ValueError(
            f"cannot infer the PWAM head counts of a {embed_dim}-wide Swin from the weights (they are known only "
            f"for the released widths {sorted(_RELEASED_SWIN_WIDTHS)}): {ADVICE['pwam_heads'].format(h=8)}")
    swin = SwinConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window)
    overrides = merge_partial(overrides, "swin", swin)

    hidden = need("text_encoder.embeddings.word_embeddings.weight").shape[1]
    if not given(overrides, "bert", "num_attention_heads") and hidden not in _BERT_HEADS:
        raise ValueError(
            f"cannot infer the attention heads of a {hidden}-wide BERT from the weights (known for hidden sizes "
            f"{sorted(_BERT_HEADS)}): {ADVICE['bert_heads']}")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k))}
    bert = dict(
        BERT_BASE_UNCASED,
        vocab_size=state["text_encoder.embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1 if layers else 0,
        num_attention_heads=_BERT_HEADS.get(hidden, 1),
        intermediate_size=need("text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=need("text_encoder.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=need("text_encoder.embeddings.token_type_embeddings.weight").shape[0],
    )
    overrides = merge_partial(overrides, "bert", bert)
    bert = overrides.pop("bert", bert)
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
    problem = state_dict_mismatch(model, kept)
    if problem:
        raise ValueError(f"the checkpoint does not match the {type(model).__name__} architecture: {problem}")
    return kept


def load_official(checkpoint, config=None, **overrides):
    """Build a CGFormer for ``checkpoint`` (architecture inferred unless
    ``config`` is given) and load it strictly. Returns the model in eval mode.
    ``overrides``: config fields and runtime options (:class:`CGFormerRuntime`)."""
    state = read_checkpoint(checkpoint)
    options, overrides = CGFormer.runtime_class.split(overrides)
    if config is None:
        config = config_from_state_dict(state, **overrides)
    elif overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)
    model = CGFormer(config, **options)
    kept = check_keys(model, state)
    model.load_state_dict(kept, strict=True)
    return model.eval()


def to_official_state_dict(model: torch.nn.Module, *, ddp_prefix: bool = False) -> dict:
    """The released on-disk layout: ``{"model_state_dict": {...}}`` with the
    official key names (``module.``-prefixed when ``ddp_prefix``)."""
    prefix = "module." if ddp_prefix else ""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    return {"model_state_dict": state}


__all__ = ["read_checkpoint", "config_from_state_dict", "check_keys", "load_official",
           "to_official_state_dict"]
