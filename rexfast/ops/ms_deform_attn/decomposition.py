"""``ms_deform_attn`` at inference in plain PyTorch: the decomposition exporters lower to.

The reference (:mod:`.reference`) loops over the levels with Python ints taken
from ``spatial_shapes``; an exported graph holds ``spatial_shapes`` and
``level_start_index`` as tensors, so this form computes every level at once from
them: for every query, head, level, point and bilinear corner (dx, dy) ∈
{0,1}², the corner (⌊x⌋+dx, ⌊y⌋+dy) of x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5,
its flat row ``start_l + cy·W_l + cx`` in value (integer arithmetic), one gather
of all taps per (batch, head) — ``value[b, row, h, :]``, ONNX ``GatherND`` with
two batch dimensions — and the weighted sums

    sample = Σ_corners w_x·w_y·tap,   out[b, q, h] = Σ_l Σ_p a[b, q, h, l, p] · sample.

Every rule of the reference's docstring holds term for term (the same masks and
``where`` choices): a tap is read only inside the map, its weight is masked on
its own, outside taps contribute exact zeros, a NaN location samples NaN in
every channel, ±inf locations sample 0, a NaN/±inf attention weight makes its
output NaN. Only the order of the floating-point sums differs (corners, points
and levels are summed by reductions), within the fp32 tolerance.

Computed in float32 (float64 for float64 inputs); returns (B, Q, M·D) in
value's dtype. Tested against the reference and every backend; the onnxscript
function in :mod:`rexfast.export.onnx_functions` is this computation operation
for operation.
"""

from __future__ import annotations

import torch
from torch import Tensor

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ms_deform_attn_decomposition(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                 sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (B,S,M,D), spatial_shapes (L,2) int64 (H_l, W_l), level_start_index (L,) int64,
    sampling_locations (B,Q,M,L,P,2) as (x, y), attention_weights (B,Q,M,L,P) → (B, Q, M·D)."""
    compute = _compute_dtype(value.dtype)
    B, S, M, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    device = value.device
    # (B, M, Q, L, P, ·): the gather table is per (batch, head)
    loc = sampling_locations.to(compute).permute(0, 2, 1, 3, 4, 5)
    attn = attention_weights.to(compute).permute(0, 2, 1, 3, 4)
    shapes = spatial_shapes.to(device=device, dtype=torch.int64)
    starts = level_start_index.to(device=device, dtype=torch.int64).view(1, 1, 1, L, 1, 1)
    height_i = shapes[:, 0].view(1, 1, 1, L, 1, 1)
    width_i = shapes[:, 1].view(1, 1, 1, L, 1, 1)
    height, width = height_i.to(compute), width_i.to(compute)
    x = loc[..., 0:1] * width - 0.5  # (B, M, Q, L, P, 1) pixel coordinates
    y = loc[..., 1:2] * height - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    corner = torch.arange(4, device=device)  # the reference's corner order: x0y0, x1y0, x0y1, x1y1
    dx, dy = (corner % 2).to(compute), (corner // 2).to(compute)  # (4,): broadcast over the corner axis
    cx, cy = x0 + dx, y0 + dy  # (B, M, Q, L, P, 4)
    inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
    wx = torch.where(inside, torch.where(dx == 1, fx, 1 - fx), 0.0)
    wy = torch.where(inside, torch.where(dy == 1, fy, 1 - fy), 0.0)
    row = (starts + torch.where(inside, cy, 0.0).to(torch.int64) * width_i
           + torch.where(inside, cx, 0.0).to(torch.int64))  # outside taps read row `start_l` (masked below)
    table = value.to(compute).permute(0, 2, 1, 3)  # (B, M, S, D)
    flat = row.reshape(B, M, Q * L * P * 4)
    b_index = torch.arange(B, device=device).view(B, 1, 1)
    m_index = torch.arange(M, device=device).view(1, M, 1)
    taps = table[b_index, m_index, flat].reshape(B, M, Q, L, P, 4, D)  # GatherND, batch_dims = 2
    taps = torch.where(inside.unsqueeze(-1), taps, 0.0)
    sample = ((wx * wy).unsqueeze(-1) * taps).sum(dim=5)  # (B, M, Q, L, P, D)
    sample = torch.where(torch.isnan(x) | torch.isnan(y), float("nan"), sample)  # (B, M, Q, L, P, 1) mask
    out = (attn.unsqueeze(-1) * sample).sum(dim=(3, 4))  # (B, M, Q, D)
    return out.permute(0, 2, 1, 3).reshape(B, Q, M * D).to(value.dtype)


def decompose_registered(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         backend=None):
    """``rexfast::ms_deform_attn`` (its registered arguments) → the decomposition."""
    return ms_deform_attn_decomposition(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)


__all__ = ["ms_deform_attn_decomposition", "decompose_registered"]
