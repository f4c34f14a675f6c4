"""Multimodal Swin backbone: the channels-last rewrites equal the released
(B, C, L) formulation, shifted-window masking (equal to the released slice
construction, traceable, no cache while tracing), shapes, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rexfast.models.backbones.swin import (
    PWAM,
    MultiModalSwinTransformer,
    SwinConfig,
    WindowAttention,
    shifted_window_mask,
    swin_config,
    window_partition,
    window_token_index,
)


def window_reverse(windows, w, h, wd):
    """The released inverse of window_partition (the blocks now gather back with window_token_index)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)


def released_windows(x, h, w, window, shift):
    """The released block's way into windows: zero-pad (B, h, w, C) to multiples of the window,
    roll by -shift, cut into windows; and the way back (merge, roll back, crop)."""
    pad_b, pad_r = (-h) % window, (-w) % window
    padded = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    rolled = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2)) if shift else padded
    windows = window_partition(rolled, window)

    def back(windows):
        merged = window_reverse(windows, window, h + pad_b, w + pad_r)
        merged = torch.roll(merged, shifts=(shift, shift), dims=(1, 2)) if shift else merged
        return merged[:, :h, :w, :]

    return windows, back


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 2), (8, 8, 4, 0), (3, 6, 3, 1), (2, 2, 4, 2), (5, 11, 4, 2),
                                              (30, 30, 12, 6), (30, 30, 12, 0), (15, 15, 12, 6), (60, 60, 12, 6),
                                              (7, 9, 7, 3), (1, 1, 2, 1), (1, 1, 2, 0), (12, 7, 5, 4)])
def test_window_token_index_is_the_released_pad_roll_and_partition(h, w, window, shift):
    x = torch.randn(2, h, w, 5)
    into, back = window_token_index(h, w, window, shift)
    windows, released_back = released_windows(x, h, w, window, shift)
    tokens = x.reshape(2, h * w, 5)
    if (-h) % window or (-w) % window:  # the zero padding token, row 0
        tokens = torch.cat([torch.zeros(2, 1, 5), tokens], dim=1)
    assert torch.equal(tokens.index_select(1, into).view(-1, window * window, 5), windows)
    out = torch.randn_like(windows)  # what attention writes into the windows
    assert torch.equal(out.view(2, -1, 5).index_select(1, back), released_back(out).reshape(2, h * w, 5))


def test_swin_block_equals_the_released_pad_roll_partition_forward():
    # One shifted block on a map that needs padding, fp32 and bf16: bit-identical to the released
    # forward (norm, pad, roll, window attention with the shift mask, merge, roll back, crop, MLP).
    from rexfast.models.backbones.swin import SwinTransformerBlock, shifted_window_mask

    torch.manual_seed(0)
    block = SwinTransformerBlock(16, 2, window_size=4, shift_size=2, mlp_ratio=2.0, drop_path=0.0).eval()
    h, w = 7, 10
    for dtype in (torch.float32, torch.bfloat16):
        block.to(dtype)
        x = torch.randn(2, h * w, 16).to(dtype)
        mask = shifted_window_mask(h, w, 4, 2).to(dtype)
        with torch.no_grad():
            windows, back = released_windows(block.norm1(x).view(2, h, w, 16), h, w, 4, 2)
            y = x + back(block.attn(windows, mask)).reshape(2, h * w, 16)
            want = y + block.mlp(block.norm2(y))
            assert torch.equal(block(x, h, w, mask), want)


def test_window_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, window_size=3, num_heads=2)
    x = torch.randn(4, 9, 8)  # batch 2 × 2 windows
    mask = shifted_window_mask(3, 6, 3, 1)  # 2 windows
    out = attn(x, mask)
    # explicit: softmax(q kᵀ·scale + relative bias + mask) v
    qkv = attn.qkv(x).reshape(4, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(9, 9, 2).permute(2, 0, 1)
    logits = (q @ k.transpose(-2, -1) + bias).view(2, 2, 2, 9, 9) + mask[None, :, None]
    ref = attn.proj((logits.view(4, 2, 9, 9).softmax(-1) @ v).transpose(1, 2).reshape(4, 9, 8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_relative_position_index_range_and_symmetry():
    attn = WindowAttention(dim=4, window_size=4, num_heads=1)
    idx = attn.relative_position_index
    assert idx.shape == (16, 16) and idx.min() == 0 and idx.max() == 48
    assert (idx.diagonal() == 24).all()  # zero offset sits in the table's centre


def test_shifted_window_mask_blocks_only_across_regions():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window never wraps around
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()


def released_shift_mask(h, w, window, shift):
    """The released construction: nine region ids written by slice assignment."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    region = torch.zeros(1, hp, wp, 1)
    count = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bounds:
        for wsl in bounds:
            region[:, hs, wsl, :] = count
            count += 1
    ids = window_partition(region, window).squeeze(-1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 2), (3, 6, 3, 1), (2, 2, 4, 2), (4, 4, 4, 2), (5, 11, 4, 2),
                                              (30, 30, 12, 6), (15, 15, 12, 6), (7, 9, 7, 3), (1, 1, 2, 1), (12, 7, 5, 4)])
def test_shifted_window_mask_equals_the_released_slice_construction(h, w, window, shift):
    mask = shifted_window_mask(h, w, window, shift)
    ref = released_shift_mask(h, w, window, shift)
    assert mask.dtype == ref.dtype == torch.float32
    assert torch.equal(mask, ref)


def test_shifted_window_mask_refuses_a_shift_it_cannot_make():
    with pytest.raises(ValueError, match="shift"):
        shifted_window_mask(8, 8, 4, 0)


def _stage_one(window=4):
    torch.manual_seed(0)
    cfg = SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=window,
                     pwam_heads=(1, 1, 2, 2))
    net = MultiModalSwinTransformer(cfg, text_dim=12).eval()

    class StageOne(torch.nn.Module):  # patch embedding + the first (shifted-window) stage
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images, words):
            x, h, w = self.net.patch_embed(images)
            residual, *_ = self.net.layers[0](x, h, w, words, torch.ones(words.shape[:2]))
            return residual

    return StageOne().eval()


def test_shift_mask_is_recomputed_while_tracing_not_taken_from_the_cache():
    stage = _stage_one()
    layer = stage.net.layers[0]
    words = torch.randn(1, 5, 12)
    with torch.no_grad():
        stage(torch.randn(1, 3, 32, 32), words)  # caches the 8×8 mask
        assert list(layer._window_cache) == [(8, 8, "cpu", torch.float32)]
        images = torch.randn(1, 3, 48, 48)  # a 12×12 map: the traced graph must make its own mask
        traced = torch.jit.trace(stage, (images, words), check_trace=False)
        assert list(layer._window_cache) == [(8, 8, "cpu", torch.float32)], "tracing must not touch the cache"
        torch.testing.assert_close(traced(images, words), stage(images, words), rtol=0, atol=0)


def test_torch_export_with_symbolic_image_size_makes_the_mask_in_the_graph():
    # The cache used to key a dict with the (symbolic) map size: unhashable under torch.export.
    stage = _stage_one()
    words = torch.randn(2, 5, 12)
    side = torch.export.Dim("side32", min=2, max=8)
    ep = torch.export.export(stage, (torch.randn(2, 3, 64, 64), words), dynamic_shapes=({2: 32 * side, 3: 32 * side},
                                                                                         None))
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(images, words), stage(images, words), rtol=1e-5, atol=1e-6)


def test_pwam_matches_conv1d_instance_norm_formulation():
    """The (B, L, C) matmul rewrite equals Conv1d + InstanceNorm1d on (B, C, L)."""
    torch.manual_seed(0)
    dim, text_dim, heads = 16, 12, 4
    pwam = PWAM(dim, dim, text_dim, dim, dim, num_heads=heads).eval()
    x, words = torch.randn(2, 30, dim), torch.randn(2, 7, text_dim)
    word_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7], dtype=torch.float32)
    out = pwam(x, words, word_mask)

    att = pwam.image_lang_att
    xt, lt, m = x.transpose(1, 2), words.transpose(1, 2), word_mask[:, None, :]
    query = att.f_query(xt).transpose(1, 2)  # Conv1d + InstanceNorm1d
    key, value = att.f_key(lt) * m, att.f_value(lt) * m
    query = query.reshape(2, 30, heads, dim // heads).permute(0, 2, 1, 3)
    key = key.reshape(2, heads, dim // heads, 7)
    value = value.reshape(2, heads, dim // heads, 7)
    sim = (query @ key) * dim**-0.5 + (1e4 * m[:, None] - 1e4)
    lang = (sim.softmax(-1) @ value.transpose(-1, -2)).permute(0, 2, 1, 3).reshape(2, 30, dim)
    lang = att.W(lang.transpose(1, 2))
    ref = pwam.project_mm(pwam.vis_project(xt) * lang).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_backbone_feature_shapes_non_square_and_padding():
    torch.manual_seed(0)
    cfg = SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3, pwam_heads=(1, 1, 2, 2))
    net = MultiModalSwinTransformer(cfg, text_dim=12).eval()
    images = torch.randn(2, 3, 64, 96)  # maps 16×24 … 2×3: every stage pads to the window
    feats = net(images, torch.randn(2, 5, 12), torch.ones(2, 5))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name,embed,depth3", [("tiny", 96, 6), ("small", 96, 18), ("base", 128, 18), ("large", 192, 18)])
def test_swin_presets(name, embed, depth3):
    cfg = swin_config(name, window_size=12)
    assert cfg.embed_dim == embed and cfg.depths[2] == depth3 and cfg.window_size == 12
    with pytest.raises(ValueError, match="unknown Swin variant"):
        swin_config("huge")
