"""ReLA's decoder (``MultiScaleMaskedReferringDecoder`` of henghuiding/ReLA, main branch).

Q region queries (ReLA: 100, tied to a √Q×√Q minimap) attend to the pixel
decoder's 1/32, 1/16, 1/8 maps in turn, ``dec_layers`` times (ReLA: 9):

    heads(Q):  R = LN(Q), E = MLP₃(R), region masks M_r = E·F_m, minimap X = W_x R (raw logits),
               target mask M = Σ_q X[q,a] M_r[q] (B, 2, H/4, W/4), no-target = mean_q MLP₂(R) (B, 2)
    layer i (level l = i mod 3, keys src_l + pos_l, mask from the previous heads' region masks):
        Q = LN(Q + RIA(Q + P, src_l + pos_l, src_l; blocked where sigmoid(M_r → level) < 0.5))
        i = 0:  Q = Q + rla_weight · σ(lang_weight) · LN(Q + RLA(Q, W_l·words, W_l·words))
        Q = LN(Q + MHA(Q + P, Q + P, Q));  Q = LN(Q + FFN(Q))

RIA is :func:`rexfast.ops.region_image_attention` (the mask is decided from the
region logits inside the op; a row that blocks every key is unblocked) and the
word attention :func:`rexfast.ops.region_language_attention` (no padding mask,
as released: the [PAD] words' BERT states take part). Parameters keep the
released names (``RIA_layers.{i}.multihead_attn.in_proj_weight``, …).

Exact savings over the released code (results equal up to rounding):
- between layers only the region masks are needed (they only become the next
  RIA mask, which carries no gradient): the minimap, target-mask and no-target
  heads run after the last layer only, and the region masks are computed
  without autograd;
- with ``region_masks_at_key_resolution`` the region logits for a level are
  E·interp(F_m → level) instead of interp(E·F_m → level): bilinear resampling is
  linear, so the two are equal, and the first costs Q·C per key instead of Q·C
  per mask-feature pixel plus the resampling of Q maps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import region_image_attention, region_language_attention
from ..layers import ReluMLP, linear, merge_heads
from .pixel_decoder import sine_position_embedding


class PackedAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) with the attention core left to the caller."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"hidden dim {embed_dim} must be divisible by the {num_heads} heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)  # the released layers re-initialise every matrix with xavier
        nn.init.zeros_(self.out_proj.bias)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, E) inputs -> q, k, v as (B, heads, N, E/heads)."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
            n = x.shape[1]
            return linear(x, w, b).view(x.shape[0], n, self.num_heads, -1).transpose(1, 2)

        return heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)

    def merge(self, out: Tensor) -> Tensor:
        """(B, heads, Q, d) -> out_proj of the concatenated heads (B, Q, E)."""
        return self.out_proj(merge_heads(out))


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = PackedAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = PackedAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q, k, v = self.self_attn.project(x + pos, x + pos, x)
        return self.norm(x + self.self_attn.merge(F.scaled_dot_product_attention(q, k, v)))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class ReferringDecoder(nn.Module):
    NUM_LEVELS = 3

    def __init__(self, hidden_dim: int, num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int,
                 mask_dim: int, text_dim: int, rla_weight: float, *, region_masks_at_key_resolution: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_heads, self.num_layers, self.num_queries = nheads, dec_layers, num_queries
        self.rla_weight = rla_weight
        self.region_masks_at_key_resolution = region_masks_at_key_resolution
        self.backend = backend
        self.RLA_vision = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.RIA_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.lang_proj = nn.Linear(text_dim, hidden_dim, bias=False)
        nn.init.zeros_(self.lang_proj.weight)
        self.lang_weight = nn.Parameter(torch.zeros(()))
        self.RLA_lang_att = CrossAttentionLayer(hidden_dim, nheads)
        self.level_embed = nn.Embedding(self.NUM_LEVELS, hidden_dim)
        self.minimap_embed = nn.Linear(hidden_dim, 2)
        self.nt_embed = ReluMLP(hidden_dim, hidden_dim, 2, 2)
        self.mask_embed = ReluMLP(hidden_dim, hidden_dim, mask_dim, 3)

    # -- heads -------------------------------------------------------------------
    def _region_logits(self, queries: Tensor, mask_features: Tensor, level_maps: Optional[Sequence[Tensor]],
                       level: int) -> Tensor:
        """Region logits for the RIA mask of ``level`` (no autograd: the mask carries no gradient)."""
        with torch.no_grad():
            embed = self.mask_embed(self.decoder_norm(queries))
            features = level_maps[level] if level_maps is not None else mask_features
            return torch.einsum("bqc,bchw->bqhw", embed, features)

    def heads(self, queries: Tensor, mask_features: Tensor) -> dict:
        """The final heads: target mask (B, 2, h, w), minimap (B, Q, 2), no-target (B, 2), region masks."""
        regions = self.decoder_norm(queries)
        embed = self.mask_embed(regions)
        minimap = self.minimap_embed(regions)
        target_embed = torch.einsum("bqa,bqc->bac", minimap, embed)
        return {
            "mask_logits": torch.einsum("bac,bchw->bahw", target_embed, mask_features),
            "minimap_logits": minimap,
            "nt_logits": self.nt_embed(regions).mean(dim=1),
            "region_embed": embed,
        }

    # -- forward -----------------------------------------------------------------
    def forward(self, features: Sequence[Tensor], mask_features: Tensor, words: Tensor) -> dict:
        """features: the [1/32, 1/16, 1/8] maps (B, C, h_l, w_l); mask_features (B, mask_dim, H/s, W/s)
        (s = 4 as released, 2 with ``mask_stride=2``);
        words (B, L, text_dim) BERT states."""
        b = mask_features.shape[0]
        shapes = [tuple(f.shape[-2:]) for f in features]
        srcs, poss = [], []
        for level, f in enumerate(features):
            pos = sine_position_embedding(f.shape[-2], f.shape[-1], f.shape[1] // 2, f.device).to(f.dtype)
            poss.append(pos.flatten(1).transpose(0, 1)[None])  # (1, h·w, C)
            srcs.append(f.flatten(2).transpose(1, 2) + self.level_embed.weight[level][None, None, :])
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        queries = self.query_feat.weight[None].expand(b, -1, -1)
        level_maps = None
        if self.region_masks_at_key_resolution:
            with torch.no_grad():  # F_m resampled to each key map once (bilinear is linear: interp(E·F) = E·interp(F))
                level_maps = [F.interpolate(mask_features, size=s, mode="bilinear", align_corners=False)
                              for s in shapes]
        region = self._region_logits(queries, mask_features, level_maps, 0)
        lang = None
        for i in range(self.num_layers):
            level = i % self.NUM_LEVELS
            queries = self._region_image_attention(i, queries, query_pos, srcs[level], poss[level], region,
                                                   shapes[level])
            if i == 0:
                if lang is None:
                    lang = self.lang_proj(words)
                attn = self.RLA_lang_att
                q, k, v = attn.multihead_attn.project(queries, lang, lang)
                att = attn.norm(queries + attn.multihead_attn.merge(
                    region_language_attention(q, k, v, None, backend=self.backend)))
                queries = queries + att * torch.sigmoid(self.lang_weight).to(att.dtype) * self.rla_weight
            queries = self.RLA_vision[i](queries, query_pos)
            queries = self.transformer_ffn_layers[i](queries)
            if i + 1 < self.num_layers:
                region = self._region_logits(queries, mask_features, level_maps, (i + 1) % self.NUM_LEVELS)
        return self.heads(queries, mask_features)

    def _region_image_attention(self, i, queries, query_pos, src, pos, region, key_size):
        layer = self.RIA_layers[i]
        q, k, v = layer.multihead_attn.project(queries + query_pos, src + pos, src)
        out = region_image_attention(q, k, v, region, (int(key_size[0]), int(key_size[1])), backend=self.backend)
        return layer.norm(queries + layer.multihead_attn.merge(out))


__all__ = ["ReferringDecoder", "PackedAttention"]
