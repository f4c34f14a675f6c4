"""LAVT-style multimodal Swin Transformer: Swin stages, each followed by a
pixel-word attention module (PWAM) whose output is added back through a tanh gate.

Used by CGFormer and ReLA, whose released backbones are the same design with
two layouts (``SwinConfig.layout``), so each checkpoint loads key for key:

  ``cgformer``: ``layers.{i}.pwam_fusion`` and ``layers.{i}.pwam_gate`` (a gate in
  every stage, the last one unused), the released ``init_weights`` (trunc-normal
  Linears, the gates included);
  ``rela``: LAVT's names ``layers.{i}.fusion`` and ``layers.{i}.res_gate`` (no gate
  in the last stage), PyTorch's default initialisation (ReLA never calls
  ``init_weights``) with zero-initialised gates.

Shared: ``patch_embed``, ``layers.{i}.blocks.{j}``, ``layers.{i}.downsample``, ``norm{i}``.

Behaviour reproduced from the released backbone (it differs from the original
classification Swin in places):
- the window size is never shrunk for small feature maps; maps are zero-padded
  up to a multiple of the window and the padded zeros take part in attention
  (they are only masked in the shifted blocks, by the region mask);
- each stage *returns the PWAM output* (``x_residual``), normalised by
  ``norm{i}``, as its feature map; the gated sum continues to the next stage.
  The last stage's gated sum is therefore unused, and its ``pwam_gate`` never
  receives a gradient;
- the PWAM attention scales by ``key_channels ** -0.5`` (not the head size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import check_field_types
from ..layers import DropPath, Mlp, linear, merge_heads


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3  # released build_model value
    pwam_heads: tuple[int, ...] = (8, 8, 8, 8)  # released CGFormer config: mha '8-8-8-8' (ReLA: 1-1-1-1)
    fusion_drop: float = 0.0
    patch_size: int = 4
    layout: str = "cgformer"  # cgformer | rela: module names, last-stage gate, initialisation (module docstring)
    # The rela layout's gates start at exactly 0, and a two-layer gate whose both weights are 0 gets no
    # gradient, so they never train (as in the released ReLA). "random" starts them at trunc-normal(0.02),
    # as LAVT's init_weights does, so that training from scratch can use them.
    gate_init: str = "layout"  # layout | random

    def __post_init__(self):
        check_field_types(self)
        if self.layout not in LAYOUTS:
            raise ValueError(f"SwinConfig.layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.gate_init not in ("layout", "random"):
            raise ValueError(f"SwinConfig.gate_init must be layout or random, got {self.gate_init!r}")

    @property
    def num_features(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


# layout -> (PWAM module name, gate module name, gate in the last stage)
LAYOUTS = {"cgformer": ("pwam_fusion", "pwam_gate", True), "rela": ("fusion", "res_gate", False)}


# The four released backbones (model/__init__.py); window 12 is what the
# released checkpoints use (ImageNet-22k window-12 pretraining).
SWIN_PRESETS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def swin_config(name: str, **overrides) -> SwinConfig:
    """``swin_config("base", window_size=12)``: a named Swin-T/S/B/L configuration."""
    key = {"t": "tiny", "s": "small", "b": "base", "l": "large"}.get(name.lower(), name.lower())
    if key not in SWIN_PRESETS:
        raise ValueError(f"unknown Swin variant {name!r}; expected one of {sorted(SWIN_PRESETS)}")
    return SwinConfig(**{**SWIN_PRESETS[key], **overrides})


def _relative_position_index(window: int) -> Tensor:
    # index into the (2w-1)^2 bias table for every (query, key) pair of a window
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, w*w
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, w*w, w*w
    return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # persistent: the released checkpoints carry it
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x: (B·nW, w², C); mask: (nW, w², w²) additive, or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table.index_select(0, self.relative_position_index.view(-1))
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # 1, heads, n, n
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).expand(bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        bias = bias.to(q.dtype)
        # one fused attention call (softmax(q kᵀ·scale + bias) v), same math as the released code
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(merge_heads(out))


def window_partition(x: Tensor, w: int) -> Tensor:
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_token_index(h: int, w: int, window: int, shift: int, device=None) -> tuple[Tensor, Tensor]:
    """The released block's way into windows and back, as one gather each.

    The block zero-pads the (h, w) token map to (hp, wp), multiples of ``window``, rolls it by
    ``-shift`` on both axes and cuts it into windows (windows row-major, tokens row-major in each);
    afterwards it merges the windows, rolls back and crops. All of that moves data without
    arithmetic, so it is ``index_select`` with two index vectors, made by applying those same
    moves to index grids:

    - ``into`` (nW·window²,): the token numbers laid out as the (h, w) map, padded, rolled and
      cut into windows: the token each window position reads. Where the map needs padding the
      block puts one row of zeros *before* its tokens, so tokens are numbered 1 … h·w and the
      padding reads row 0 (a constant pad value: h·w would specialise a symbolic size);
      otherwise 0 … h·w−1;
    - ``back`` (h·w,): the window positions 0 … nW·window²−1 merged into the padded map, rolled
      back and cropped: the window position each token is read back from.

    One copy each way instead of the pad, the roll (a ``cat`` per axis), the window reshape and,
    after attention, their inverses: bit-identical values. Only pad, roll, reshape and slice (no
    integer division, whose ONNX form compares booleans, which TensorRT does not take), so it
    traces with symbolic h, w like :func:`shifted_window_mask`."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    padded = hp != h or wp != w
    grid = torch.arange(int(padded), h * w + int(padded), device=device).view(h, w)
    if padded:
        grid = F.pad(grid, (0, wp - w, 0, hp - h), value=0)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    into = grid.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1)
    positions = torch.arange(hp * wp, device=device).view(hp // window, wp // window, window, window)
    merged = positions.permute(0, 2, 1, 3).reshape(hp, wp)
    if shift:
        merged = torch.roll(merged, shifts=(shift, shift), dims=(0, 1))
    back = merged[:h, :w].reshape(-1)
    return into, back


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int, shift_mask: Optional[Tensor],
                index: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """x (B, h·w, C); ``index``: :func:`window_token_index` for this block's shift (the stage
        caches it; computed here when not given)."""
        b, length, c = x.shape
        ws = self.window_size
        if index is None:
            index = window_token_index(h, w, ws, self.shift_size, x.device)
        into, back = index
        shortcut = x
        x = self.norm1(x)
        if (-h) % ws or (-w) % ws:  # the padding: one zero token, row 0, that the padded cells gather
            x = torch.cat([x.new_zeros(b, 1, c), x], dim=1)
        windows = x.index_select(1, into).view(-1, ws * ws, c)
        windows = self.attn(windows, shift_mask if self.shift_size else None)
        x = windows.view(b, -1, c).index_select(1, back)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def shifted_window_mask(h: int, w: int, window: int, shift: int, device=None) -> Tensor:
    """Additive (nW, w², w²) mask keeping shifted-window attention inside the
    regions that were contiguous before the cyclic shift (0 inside, -100 across).

    The released code labels the padded (hp, wp) map with nine region ids by
    slice assignment over ``(0, -window), (-window, -shift), (-shift, None)`` in
    each axis (id = 3·row band + column band). The bands are computed here by
    comparison instead, the same ids for ``shift >= 1`` (the only case a mask is
    used for): no in-place slice writes, so the mask traces (torch.jit.trace,
    torch.export) and works with symbolic sizes."""
    if not 1 <= shift < window:
        raise ValueError(f"shifted_window_mask: the shift must lie in [1, window), got shift {shift}, window {window}")
    hp, wp = -(-h // window) * window, -(-w // window) * window

    def band(n):  # 0 before n - window, 1 in [n - window, n - shift), 2 from n - shift on
        i = torch.arange(n, device=device)
        return (i >= n - window).to(torch.float32) + (i >= n - shift).to(torch.float32)

    region = (band(hp)[:, None] * 3 + band(wp)[None, :])[None, :, :, None]  # 1, hp, wp, 1
    ids = window_partition(region, window).squeeze(-1)  # nW, w²
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # channel order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2] as in Swin
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # B, C, h, w
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2], x.shape[3]


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A kernel-1 Conv1d applied to channels-last (B, L, C) input as a matmul,
    avoiding the (B, C, L) transposes of the released code (same arithmetic)."""
    return linear(x, conv.weight.squeeze(-1), conv.bias)


def _instance_norm_tokens(x: Tensor, eps: float = 1e-5) -> Tensor:
    """InstanceNorm1d (no affine) over the token axis of (B, L, C) input."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


class SpatialImageLanguageAttention(nn.Module):
    """Each pixel attends over the words (padding masked with -1e4)."""

    def __init__(self, v_in_channels: int, l_in_channels: int, key_channels: int, value_channels: int,
                 out_channels: Optional[int] = None, num_heads: int = 1):
        super().__init__()
        out_channels = out_channels or value_channels
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f"PWAM: {num_heads} heads must divide key/value channels {key_channels}/{value_channels}")
        self.key_channels, self.value_channels, self.num_heads = key_channels, value_channels, num_heads
        # Sequential wrappers keep the released parameter names (f_key.0.weight, ...);
        # the InstanceNorm1d entries have no parameters and are applied explicitly.
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in_channels, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, 1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, 1), nn.InstanceNorm1d(out_channels))

    def forward(self, x: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        """x (B, HW, Cv); words (B, Nl, Cl); word_mask (B, Nl) float 0/1 -> (B, HW, out)."""
        b, hw, _ = x.shape
        nl, heads = words.shape[1], self.num_heads
        query = _instance_norm_tokens(_pointwise(self.f_query[0], x))
        key = _pointwise(self.f_key[0], words) * word_mask[..., None]
        value = _pointwise(self.f_value[0], words) * word_mask[..., None]
        query = query.reshape(b, hw, heads, -1).transpose(1, 2)  # B, h, HW, d
        key = key.reshape(b, nl, heads, -1).permute(0, 2, 3, 1)  # B, h, d, Nl
        value = value.reshape(b, nl, heads, -1).transpose(1, 2)  # B, h, Nl, dv
        sim = (query @ key) * self.key_channels**-0.5
        sim = sim + (1e4 * word_mask[:, None, None, :] - 1e4).to(sim.dtype)
        out = sim.softmax(dim=-1) @ value  # B, h, HW, dv
        out = out.transpose(1, 2).reshape(b, hw, self.value_channels)
        return _instance_norm_tokens(_pointwise(self.W[0], out))


class PWAM(nn.Module):
    """Pixel-word attention module: GELU(proj(x)) ⊙ attend(x, words), projected."""

    def __init__(self, dim: int, v_in_channels: int, l_in_channels: int, key_channels: int, value_channels: int,
                 num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels, l_in_channels, key_channels, value_channels, value_channels, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        vis = self.vis_project[2](F.gelu(_pointwise(self.vis_project[0], x)))
        lang = self.image_lang_att(x, words, word_mask)
        return self.project_mm[2](F.gelu(_pointwise(self.project_mm[0], vis * lang)))


class MMBasicLayer(nn.Module):
    """One Swin stage + PWAM + tanh gate (+ patch merging)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: Sequence[float], text_dim: int, pwam_heads: int, fusion_drop: float, downsample: bool,
                 layout: str = "cgformer", gate_init: str = "layout"):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                                 drop_path[i])
            for i in range(depth)
        ])
        fusion_name, gate_name, last_gate = LAYOUTS[layout]
        self._fusion_name = fusion_name
        self.add_module(fusion_name, PWAM(dim, dim, text_dim, dim, dim, num_heads=pwam_heads, dropout=fusion_drop))
        self._gate_name = gate_name if downsample or last_gate else None
        if self._gate_name:
            gate = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                 nn.Tanh())
            for linear in (gate[0], gate[2]):
                if gate_init == "random":
                    nn.init.trunc_normal_(linear.weight, std=0.02)
                elif layout == "rela":  # "initialize the gate to 0"
                    nn.init.zeros_(linear.weight)
            self.add_module(gate_name, gate)
        self.downsample = PatchMerging(dim) if downsample else None
        self._window_cache: dict = {}

    @property
    def fusion_module(self) -> nn.Module:
        return self._modules[self._fusion_name]

    @property
    def gate_module(self) -> Optional[nn.Module]:
        return self._modules[self._gate_name] if self._gate_name else None

    def _windows(self, h: int, w: int, x: Tensor) -> tuple:
        """(shift mask in x's dtype or None, window_token_index without and with the shift) for an
        (h, w) map: what every block of the stage shares. Cached for the last map size, device and
        dtype; made in the graph while tracing (h, w may be symbolic and cannot key a dict, and a
        cached tensor would be baked in as a constant). The mask's 0 and -100 are exact in bf16, so
        adding it to a bf16 relative bias in bf16 rounds as adding it in float32 did."""
        def make():
            shifts = len(self.blocks) >= 2 and self.shift_size > 0
            mask = shifted_window_mask(h, w, self.window_size, self.shift_size, x.device).to(x.dtype) if shifts else None
            plain = window_token_index(h, w, self.window_size, 0, x.device)
            shifted = window_token_index(h, w, self.window_size, self.shift_size, x.device) if shifts else None
            return mask, plain, shifted

        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return make()
        key = (int(h), int(w), str(x.device), x.dtype)
        if key not in self._window_cache:
            self._window_cache = {key: make()}
        return self._window_cache[key]

    def forward(self, x: Tensor, h: int, w: int, words: Tensor, word_mask: Tensor):
        mask, plain, shifted = self._windows(h, w, x)
        for blk in self.blocks:
            x = blk(x, h, w, mask, shifted if blk.shift_size else plain)
        residual = self.fusion_module(x, words, word_mask)
        if self.downsample is None:  # the last stage: the gated sum would go nowhere
            return residual, x, h, w
        x = x + self.gate_module(residual) * residual
        return residual, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class MultiModalSwinTransformer(nn.Module):
    """Returns the four stage features (B, C·2^i, H/2^(i+2), W/2^(i+2))."""

    def __init__(self, config: SwinConfig, text_dim: int = 768, in_chans: int = 3):
        super().__init__()
        self.config = config
        n = len(config.depths)
        if not (len(config.num_heads) == len(config.pwam_heads) == n):
            raise ValueError(f"Swin config: depths/num_heads/pwam_heads lengths differ: {config}")
        self.num_features = config.num_features
        self.patch_embed = PatchEmbed(config.patch_size, in_chans, config.embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        total = sum(config.depths)  # stochastic depth grows linearly over all blocks (plain floats: meta-safe)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(config.depths[:i])
            self.layers.append(MMBasicLayer(
                self.num_features[i], config.depths[i], config.num_heads[i], config.window_size, config.mlp_ratio,
                rates[start:start + config.depths[i]], text_dim, config.pwam_heads[i], config.fusion_drop,
                downsample=i < n - 1, layout=config.layout, gate_init=config.gate_init))
        for i in range(n):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        if config.layout == "cgformer":
            self.apply(_init_released)

    def fp32_modules(self) -> tuple[str, ...]:
        """The pixel–word attentions (each stage's PWAM ``image_lang_att``), as names under this
        module: under a bf16 model (``rexfast.optimize``) they keep float32 weights and math.
        In bf16 they move a trained model's masks more than the whole rest of the backbone
        does (a ReLA demo checkpoint's pixel agreement with fp32: 99.38% with them in bf16,
        99.90% with them in float32, the same as with the entire backbone in float32;
        benchmarks/README.md), for about 1–2% of the backbone's FLOPs (two C×C projections
        and a 20-word attention per stage, against ~24·depth C×C per token in its blocks)."""
        return tuple(f"layers.{i}.{layer._fusion_name}.image_lang_att" for i, layer in enumerate(self.layers))

    def forward(self, images: Tensor, words: Tensor, word_mask: Tensor) -> list[Tensor]:
        """images (B,3,H,W); words (B,Nl,Ct) token features; word_mask (B,Nl) 0/1."""
        x, h, w = self.patch_embed(images)
        word_mask = word_mask.to(words.dtype)
        outs = []
        for i, layer in enumerate(self.layers):
            residual, x, h_next, w_next = layer(x, h, w, words, word_mask)
            feat = getattr(self, f"norm{i}")(residual)
            outs.append(feat.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2))
            h, w = h_next, w_next
        return outs


def _init_released(m: nn.Module):
    # Released backbone.init_weights(): every Linear (the PWAM gates included,
    # which overrides their zero init) gets trunc_normal(0.02); LayerNorms 1/0;
    # the PWAM Conv1d layers keep PyTorch's default init.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


__all__ = ["SwinConfig", "SWIN_PRESETS", "LAYOUTS", "swin_config", "MultiModalSwinTransformer", "PWAM"]
