"""ReLA's pixel decoder: a multi-scale deformable-attention encoder over the 1/32, 1/16
and 1/8 maps, and one FPN step to the 1/4 mask features (Mask2Former's
``MSDeformAttnPixelDecoder`` as ReLA configures it).

    input_proj[l]: 1×1 conv + GroupNorm(32) for res5, res4, res3 (coarse to fine)
    tokens = Σ_l H_l·W_l (225 + 900 + 3600 = 4725 at 480²), position = sine PE + level_embed[l]
    enc_layers × [x = LN(x + MSDeformAttn(x + pos, ref, x)); x = LN(x + FFN(x))]   (post-norm, ReLU FFN)
    y_1/4 = layer_1(adapter_1(res2) + bilinear↑(y_1/8))   (adapter: 1×1 conv + GN; layer: 3×3 conv + GN + ReLU)
    mask_features = 1×1 conv (y_1/4); multi-scale features = [y_1/32, y_1/16, y_1/8]

``mask_stride=2`` (not released; off in every preset) adds one more FPN step to 1/2 whose lateral
comes from the image itself, since no backbone stage is finer than 1/4 (c = conv_dim / 2):

    y_1/2 = layer_0(image_stem(image) + bilinear↑(reduce_1(y_1/4)))
            (stem: 3×3 stride-2 conv + GroupNorm(gcd(32, c)) + ReLU, 3 → c; reduce: 1×1 conv, conv_dim → c;
             layer: the same, 3×3 conv, c → c)
    mask_features = 1×1 conv (y_1/2), c → mask_dim

so every region mask, and the target mask made of them, is predicted at half the input
size instead of a quarter: a 64² demo image's 13×13-pixel shape covers about 6×6 mask cells
instead of 3×3 (held-out ground truth resampled to 1/4 and back scores IoU 81.2; to 1/2: 93.8).
Trained as ``rexfast demo`` trains (15 minutes, seeds 0 and 1), it raises the held-out mIoU of the
target sentences by 5 (65.5 → 70.8, 68.3 → 73.5) and gIoU by 3, but lowers N-acc by 11 and 22:
the no-target head's scores pass 0.5 less often; see the README's demo section.

MSDeformAttn samples, per query, head, level and point, the value map at
ref + offset / (W_l, H_l) (reference points at the pixel centres), weighted by a
softmax over levels × points: :func:`rexfast.ops.ms_deform_attn`. Under autocast the whole
decoder runs in float32, as the authors' ``@autocast(enabled=False)`` and ``.float()`` make it
("deformable detr does not support half precision"): it computes in the dtype of its own
weights, so float32 weights under autocast, and bf16 weights when ``rexfast.optimize`` casts
the model to bf16. There the linear layers, GroupNorm and LayerNorm accumulate in float32
internally (oneDNN/AMX matmuls, torch's CPU norms), and ``ms_deform_attn`` samples in float32
from the bf16 values, locations and weights. A bf16 location is within 2⁻⁹ of the map's side of
the float32 one (0.12 px at the 60² level of a 480² image); against float32 locations it moved the
random-weight ReLA R50's decoder maps by about a tenth of the bf16 decoder's own error
(benchmarks/README.md, "bf16 locations").
Module names reproduce the released checkpoint's (``sem_seg_head.pixel_decoder.*``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import ms_deform_attn
from ..layers import ConvNormAct, c2_xavier_fill


def sine_position_embedding(h: int, w: int, num_feats: int, device, temperature: float = 10000.0,
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """DETR's normalised sine embedding of an (h, w) map without padding: (2·num_feats, h, w),
    computed in float32 and returned in ``dtype``.
    Channels: [y sin/cos interleaved, x sin/cos interleaved], positions (i + 1) / (n + ε) · 2π."""
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(p: Tensor) -> Tensor:  # (n,) -> (n, num_feats)
        v = p[:, None] / dim_t
        return torch.stack((v[:, 0::2].sin(), v[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(x)[None, :, :].expand(h, w, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (module names of the released checkpoint)."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, backend: Optional[str] = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR: offsets start on a ring of head directions, scaled by point index
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        """query (B, Q, C), reference_points (B|1, Q, L, 2), value_in (B, S, C) -> (B, Q, C)."""
        b, q, _ = query.shape
        s = value_in.shape[1]
        h, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(b, s, h, self.d_model // h)
        offsets = self.sampling_offsets(query).view(b, q, h, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, h, lv * p).softmax(-1).view(b, q, h, lv, p)
        normalizer = torch.tensor([[w_, h_] for h_, w_ in shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int, backend=None):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, pos, reference_points, spatial_shapes, level_start_index, shapes):
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, spatial_shapes, level_start_index, shapes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class Encoder(nn.Module):
    def __init__(self, layer_args: dict, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_layers))


class DeformableTransformer(nn.Module):
    """The encoder over the flattened levels (``transformer.*`` in the checkpoint)."""

    def __init__(self, d_model: int, n_heads: int, num_layers: int, d_ffn: int, n_levels: int, n_points: int,
                 backend=None):
        super().__init__()
        self.encoder = Encoder(dict(d_model=d_model, d_ffn=d_ffn, n_levels=n_levels, n_heads=n_heads,
                                    n_points=n_points, backend=backend), num_layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes, device, dtype: torch.dtype = torch.float32) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1]: (1, S, L, 2) as (x, y), computed in
        float32 and returned in ``dtype`` (once per forward, for every layer)."""
        refs = []
        for h, w in shapes:
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        ref = torch.cat(refs, 0)[None]  # (1, S, 2); valid ratios are 1 (no padding)
        return ref.to(dtype)[:, :, None].expand(-1, -1, len(shapes), -1)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list]:
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        x = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos = torch.cat([p.flatten(1).transpose(0, 1)[None] + self.level_embed[i].view(1, 1, -1)
                         for i, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=x.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        ref = self.reference_points(shapes, x.device, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, pos, ref, spatial_shapes, level_start_index, shapes)
        return x, shapes


class PixelDecoder(nn.Module):
    def __init__(self, feature_channels: Sequence[int], conv_dim: int, mask_dim: int, enc_layers: int,
                 enc_heads: int, enc_points: int, enc_ffn: int, backend: Optional[str] = None, mask_stride: int = 4):
        super().__init__()
        if mask_stride not in (2, 4):
            raise ValueError(f"mask_stride must be 4 (released) or 2, got {mask_stride!r}")
        self.mask_stride = mask_stride
        c2, c3, c4, c5 = feature_channels
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(32, conv_dim))
                                        for c in (c5, c4, c3))
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableTransformer(conv_dim, enc_heads, enc_layers, enc_ffn, 3, enc_points, backend)
        self.num_pos_feats = conv_dim // 2
        fine = conv_dim if mask_stride == 4 else conv_dim // 2
        self.mask_features = nn.Conv2d(fine, mask_dim, 1)
        c2_xavier_fill(self.mask_features)
        self.adapter_1 = ConvNormAct(c2, conv_dim, 1, bias=False, norm=nn.GroupNorm(32, conv_dim))
        self.layer_1 = ConvNormAct(conv_dim, conv_dim, 3, padding=1, bias=False, norm=nn.GroupNorm(32, conv_dim),
                                   activation=F.relu)
        c2_xavier_fill(self.adapter_1)
        c2_xavier_fill(self.layer_1)
        if mask_stride == 2:
            norm = lambda: nn.GroupNorm(math.gcd(32, fine), fine)  # noqa: E731
            self.image_stem = ConvNormAct(3, fine, 3, stride=2, padding=1, bias=False, norm=norm(), activation=F.relu)
            self.reduce_1 = nn.Conv2d(conv_dim, fine, 1)
            self.layer_0 = ConvNormAct(fine, fine, 3, padding=1, bias=False, norm=norm(), activation=F.relu)
            for conv in (self.image_stem, self.reduce_1, self.layer_0):
                c2_xavier_fill(conv)

    def forward(self, features: Sequence[Tensor], images: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
        """features res2..res5 (and, with ``mask_stride=2``, the normalised images (B, 3, H, W)) ->
        (mask features (B, mask_dim, H/s, W/s), [1/32, 1/16, 1/8] maps), s = ``mask_stride``."""
        if self.mask_stride == 2 and images is None:
            raise ValueError("PixelDecoder(mask_stride=2) needs the images: its 1/2 lateral is a stem on them")
        device_type = features[0].device.type
        dtype = self.mask_features.weight.dtype  # float32 under autocast; bf16 in an optimized bf16 model
        with torch.autocast(device_type, enabled=False):
            res2, res3, res4, res5 = (f.to(dtype) for f in features)
            srcs = [proj(x) for proj, x in zip(self.input_proj, (res5, res4, res3))]
            pos = [sine_position_embedding(x.shape[-2], x.shape[-1], self.num_pos_feats, x.device, dtype=dtype)
                   for x in (res5, res4, res3)]
            y, shapes = self.transformer(srcs, pos)
            b = y.shape[0]
            sizes = [h * w for h, w in shapes]
            maps = [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(y.split(sizes, 1), shapes)]
            lateral = self.adapter_1(res2)
            fine = self.layer_1(lateral + F.interpolate(maps[-1], size=lateral.shape[-2:], mode="bilinear",
                                                        align_corners=False))
            if self.mask_stride == 2:
                lateral = self.image_stem(images.to(dtype))
                fine = self.layer_0(lateral + F.interpolate(self.reduce_1(fine), size=lateral.shape[-2:],
                                                            mode="bilinear", align_corners=False))
            return self.mask_features(fine), maps


__all__ = ["PixelDecoder", "MSDeformAttn", "sine_position_embedding"]
