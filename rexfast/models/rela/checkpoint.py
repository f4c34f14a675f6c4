"""Loading the released ReLA checkpoints (henghuiding/ReLA, detectron2 format).

A released file is ``{"model": state_dict, ...}`` (detectron2 adds bookkeeping
entries). rexfast's module names reproduce the released ones, so the keys load
as they are, strictly: every unknown, missing or misshaped key is listed in a
ValueError. Tolerated without a counterpart: BERT buffers that other
``transformers`` versions store (``embeddings.position_ids`` — the authors'
transformers 4.x saved it —, ``embeddings.token_type_ids``) and pooler weights.

``sem_seg_head.predictor.lang_weight``: the authors' loader never loads it (the
decoder overrides ``_load_from_state_dict`` without calling ``super()``, and this
scalar is its only direct parameter), so their evaluation always gates the word
attention with σ(0) = 0.5 whatever the file holds. :func:`load_official` does the
same by default, for the same masks as the authors' code; ``honour_lang_weight=True``
uses the saved value instead.

The architecture is read from the weights: the backbone (Swin widths, depths,
heads, window; or the ResNet depth), BERT's size, and the decoder's widths and
depth. Head counts leave no trace in the weights: they are known for the
released widths only (PWAM 1 head per stage; decoder 8 heads; deformable
attention 8 heads × 4 points); for other widths pass ``config=`` or the
call refuses instead of guessing.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..backbones.resnet import BLOCKS, ResNetConfig
from ..backbones.swin import SwinConfig
from ..official import (ADVICE, bert_from_state, build_for_state, check_keys, count_indices, given, merge_partial,
                        read_checkpoint, required)
from .config import ReLAConfig, rela_swin
from .model import ReLA

LANG_WEIGHT = "sem_seg_head.predictor.lang_weight"
_RELEASED_SWIN_WIDTHS = {96, 128}  # ReLA's Swin-T and Swin-B
_RELEASED_HIDDEN = 256  # decoder 8 heads; deformable attention 8 heads x 4 points


def config_from_state_dict(state: Mapping[str, Tensor], **overrides) -> ReLAConfig:
    """Infer a :class:`ReLAConfig` from the weights' shapes (see the module docstring)."""

    def need(key):
        return required(state, key)

    base: dict = {}
    if "backbone.patch_embed.proj.weight" in state:
        embed = need("backbone.patch_embed.proj.weight").shape[0]
        depths = tuple(count_indices(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
        heads = tuple(need(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table").shape[1]
                      for i in range(4))
        window = (int(round(math.sqrt(need("backbone.layers.0.blocks.0.attn.relative_position_bias_table")
                                      .shape[0]))) + 1) // 2
        if not given(overrides, "swin", "pwam_heads") and embed not in _RELEASED_SWIN_WIDTHS:
            raise ValueError(f"cannot infer the PWAM head counts of a {embed}-wide Swin from the weights (known for "
                             f"the released widths {sorted(_RELEASED_SWIN_WIDTHS)}): "
                             + ADVICE["pwam_heads"].format(h=1))
        base.update(backbone="swin", swin=SwinConfig(
            **{**vars(rela_swin("base")), "embed_dim": embed, "depths": depths, "num_heads": heads,
               "window_size": window}))
        overrides = merge_partial(overrides, "swin", base["swin"])
    elif "backbone.stem.conv1.weight" in state:
        counts = tuple(count_indices(state, rf"backbone\.res{i}\.(\d+)\.") for i in range(2, 6))
        depth = next((d for d, blocks in BLOCKS.items() if blocks == counts), None)
        if depth is None:
            raise ValueError(f"cannot infer the ResNet depth from its blocks per stage {counts}")
        base.update(backbone="resnet", swin=None, resnet=ResNetConfig(
            depth=depth, stem_channels=need("backbone.stem.conv1.weight").shape[0],
            res2_channels=need("backbone.res2.0.conv3.weight").shape[0]))
    else:
        raise ValueError("cannot infer the architecture: the checkpoint has neither a Swin nor a ResNet backbone")

    base["bert"], overrides = bert_from_state(state, overrides)

    p = "sem_seg_head.predictor."
    d = "sem_seg_head.pixel_decoder."
    queries, hidden_dim = need(p + "query_feat.weight").shape
    if not {"nheads", "enc_heads", "enc_points"} <= set(overrides) and hidden_dim != _RELEASED_HIDDEN:
        raise ValueError(f"cannot infer the attention head counts of a {hidden_dim}-wide decoder from the weights "
                         f"(known for the released 256): {ADVICE['decoder_heads']}")
    base.update(
        hidden_dim=hidden_dim, num_queries=queries, conv_dim=need(d + "adapter_1.weight").shape[0],
        mask_dim=need(d + "mask_features.weight").shape[0],
        # rexfast's 1/2-resolution mask step (not released) is there when its image stem is
        mask_stride=2 if d + "image_stem.weight" in state else 4,
        enc_layers=count_indices(state, re.escape(d) + r"transformer\.encoder\.layers\.(\d+)\."),
        enc_ffn=need(d + "transformer.encoder.layers.0.linear1.weight").shape[0] if
        d + "transformer.encoder.layers.0.linear1.weight" in state else 1024,
        dec_layers=count_indices(state, re.escape(p) + r"RIA_layers\.(\d+)\."),
        dim_feedforward=need(p + "transformer_ffn_layers.0.linear1.weight").shape[0],
    )
    base.update(overrides)
    return ReLAConfig(**base)


def load_official(checkpoint, config: Optional[ReLAConfig] = None, *, honour_lang_weight: bool = False,
                  **overrides) -> ReLA:
    """Build a ReLA for a released checkpoint (architecture inferred unless ``config``
    is given), load it strictly, and return it in eval mode. ``lang_weight`` keeps
    its initial 0 unless ``honour_lang_weight`` (see the module docstring). ``overrides``:
    config fields and runtime options (:class:`ReLARuntime`)."""
    model, kept = build_for_state(ReLA, read_checkpoint(checkpoint), config, overrides, config_from_state_dict)
    if not honour_lang_weight:
        kept[LANG_WEIGHT] = torch.zeros_like(model.state_dict()[LANG_WEIGHT])  # as the authors' loader leaves it
    model.load_state_dict(kept, strict=True)
    return model.eval()


def to_official_state_dict(model: torch.nn.Module) -> dict:
    """The released on-disk layout: ``{"model": state_dict}`` with the official key names."""
    return {"model": dict(model.state_dict())}


__all__ = ["config_from_state_dict", "check_keys", "load_official", "to_official_state_dict",
           "LANG_WEIGHT"]
