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
import re
from typing import Mapping

import torch
from torch import Tensor

from ..backbones.swin import SwinConfig
from ..official import (ADVICE, bert_from_state, build_for_state, check_keys, given, merge_partial, read_checkpoint,
                        required)
from .config import CGFormerConfig
from .model import CGFormer

# Head counts leave no trace in the weights. They are known for the released
# architectures only: PWAM uses 8 heads in every stage of every released
# backbone (config.yaml, mha '8-8-8-8'); BERT's: see rexfast.models.official.bert_from_state.
_RELEASED_SWIN_WIDTHS = {96, 128, 192}  # Swin-T/S, Swin-B, Swin-L


def config_from_state_dict(state: Mapping[str, Tensor], **overrides) -> CGFormerConfig:
    """Infer a :class:`CGFormerConfig` from the weights' shapes: Swin width,
    depths, heads and window; BERT size; token count and width; the image size
    the positional embeddings were built for. What the weights cannot tell —
    the PWAM and BERT head counts — is known for the released widths only; for
    any other width pass ``config=`` or ``swin=``/``bert=`` overrides (whole, or a
    partial dict such as ``swin={"pwam_heads": (4, 4, 4, 4)}`` completed from the
    weights), or the call refuses instead of guessing."""

    def need(key):
        return required(state, key)

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

    bert, overrides = bert_from_state(state, overrides)
    tokens = need("decoder.tokens.weight")
    pe_rows = need("decoder.layers.0.positional_embedding").shape[0]
    image_size = int(round(math.sqrt(pe_rows))) * 16
    base = dict(swin=swin, bert=bert, num_tokens=tokens.shape[0], token_dim=tokens.shape[1], image_size=image_size)
    if "decoder.sentence_proj.weight" in state:
        base["variant"] = "paper"
        base["contrastive_weight"] = 0.1
    base.update(overrides)
    return CGFormerConfig(**base)


def load_official(checkpoint, config=None, **overrides):
    """Build a CGFormer for ``checkpoint`` (architecture inferred unless
    ``config`` is given) and load it strictly. Returns the model in eval mode.
    ``overrides``: config fields and runtime options (:class:`CGFormerRuntime`)."""
    model, kept = build_for_state(CGFormer, read_checkpoint(checkpoint), config, overrides, config_from_state_dict)
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
