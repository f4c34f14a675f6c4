"""``ms_deform_attn`` in plain PyTorch: the truth every fused backend is tested against.

Multi-scale deformable attention (Deformable DETR; ReLA's pixel decoder): for
every batch item b, query q and head h,

    out[b, q, h, :] = Σ_l Σ_p  a[b,q,h,l,p] · sample_l(value[b, level l, h, :], loc[b,q,h,l,p])

where level l is the (H_l, W_l) map ``value[b, start_l : start_l + H_l·W_l, h, :]``
(row-major, y then x) and ``sample_l`` is bilinear interpolation at the pixel
coordinates x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5 (loc in [0, 1], (0, 0) the
top-left corner of the map: ``grid_sample(align_corners=False)`` at 2·loc − 1),
with zero padding: of the four corner taps (⌊x⌋ + {0,1}, ⌊y⌋ + {0,1}), each one
outside the map contributes 0 and is never read.

This module writes the sampling out as explicit corner gathers (no grid_sample),
so that every rule below is visible in the code; autograd through
:func:`ms_deform_attn_reference` defines the gradients the kernels reproduce.

Non-finite inputs and borders (every backend matches these exactly):

* A tap is inside when its integer corner lies in [0, W_l−1] × [0, H_l−1]; an
  inside tap is read and multiplied by its bilinear weight even when that weight
  is 0 (a location on a pixel centre, or on the half-pixel edge x = −1, whose
  tap x = 0 has weight 0), so a NaN or ±inf value at an inside tap makes the
  sample NaN/±inf (0·inf = NaN), as ``grid_sample`` computes it (the official
  CUDA kernel does too, except at x = −1 or y = −1, where it reads nothing). A
  value outside every tap never matters.
* loc_x = 0 is x = −0.5 and loc_x = 1 is x = W_l − 0.5: half of the sample comes
  from the edge column, half is padding. x ≤ −1 or x ≥ W_l (and the same in y) is fully outside:
  the sample is 0 (for finite values) and its location gradient 0 — at x = −1
  exactly too, where the weight-0 tap x = 0 is still read (the rule above) but
  the sample is 0 on the whole ray x ≤ −1, so the location gradient there is the
  left-hand derivative, 0 in both components, as in the official kernel (which
  skips every point with x ≤ −1 or y ≤ −1); ``grid_sample`` gives the one-sided
  right-hand derivative of the weight-0 tap instead.
* ±inf (or huge) locations are outside the map: sample 0, location gradient 0
  (``grid_sample`` gives NaN there; the official CUDA kernel 0, as here).
* A NaN location (x or y) samples NaN in every channel — a broken offset must not
  vanish silently (``grid_sample`` gives NaN too; the official CUDA kernel 0). It
  reads no value: its location gradient is 0 and it adds nothing to the value
  gradient; its attention-weight gradient is NaN.
* Every point's sample is multiplied by its attention weight, also a sample that
  is 0 because it lies outside the map: a NaN or ±inf weight makes that output
  NaN (0·inf), as the official CPU path (grid_sample, then the weighted sum) does.
* Gradients: d/d value at an inside tap is a·w_tap·g (finite unless a or g is not);
  d/d loc comes only from inside taps: W_l·Σ_taps (∂w_tap/∂x)·a·(g·v_tap), with the
  derivative of ⌊x⌋ taken as 0 (so at an integer x the derivative is the
  right-hand one, as in grid_sample and the official kernel), except at
  x = −1 or y = −1, where d/d loc = (0, 0) (see above); d/d a = g·sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (dx, dy): x0y0, x1y0, x0y1, x1y1


def _levels(spatial_shapes: Tensor, level_start_index: Tensor):
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    return shapes, starts


def sample_level(value_l: Tensor, height: int, width: int, loc: Tensor) -> Tensor:
    """Bilinear, zero-padded samples of one level.

    value_l (B, H_l·W_l, M, D) for M heads; loc (B, Q, M, P, 2) as (x, y) in map units of [0, 1].
    Returns (B, Q, M, P, D): NaN where the location is NaN (see the module docstring).
    """
    B, _, M, D = value_l.shape
    Q, P = loc.shape[1], loc.shape[3]
    x = loc[..., 0] * width - 0.5  # (B, Q, M, P) pixel coordinates
    y = loc[..., 1] * height - 0.5
    # On the half-pixel edge x = −1 or y = −1 the location gets no gradient (the
    # sample is 0 for all x ≤ −1: the left-hand derivative, see the module docstring).
    edge = (x == -1) | (y == -1)
    x, y = torch.where(edge, x.detach(), x), torch.where(edge, y.detach(), y)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    # (B, M, H_l·W_l, D): one gather table per (batch, head)
    table = value_l.permute(0, 2, 1, 3)
    sample = value_l.new_zeros(B, Q, M, P, D)
    for dx, dy in CORNERS:
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
        # Each weight factor is masked on its own: the gradient of an outside tap
        # is then exactly 0 (a masked product would pass 0·NaN back from a NaN y).
        wx = torch.where(inside, fx if dx else 1 - fx, 0.0)
        wy = torch.where(inside, fy if dy else 1 - fy, 0.0)
        # outside taps read row 0 (masked below); integer arithmetic, exact for any map size
        flat = torch.where(inside, cy, 0.0).long() * width + torch.where(inside, cx, 0.0).long()
        index = flat.permute(0, 2, 1, 3).reshape(B, M, Q * P, 1).expand(B, M, Q * P, D)
        tap = table.gather(2, index).reshape(B, M, Q, P, D).permute(0, 2, 1, 3, 4)
        tap = torch.where(inside.unsqueeze(-1), tap, 0.0)
        sample = sample + (wx * wy).unsqueeze(-1) * tap
    nan_loc = torch.isnan(x) | torch.isnan(y)
    return torch.where(nan_loc.unsqueeze(-1), float("nan"), sample)


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention; see the module docstring.

    value (B, S, M, D), spatial_shapes (L, 2) int64 rows (H_l, W_l), level_start_index (L,) int64,
    sampling_locations (B, Q, M, L, P, 2) as (x, y), attention_weights (B, Q, M, L, P).
    Returns (B, Q, M·D) in value's dtype (computed in it: pass float64 for the truth).
    """
    B, _, M, D = value.shape
    Q = sampling_locations.shape[1]
    shapes, starts = _levels(spatial_shapes, level_start_index)
    out = value.new_zeros(B, Q, M, D)
    for lvl, ((height, width), start) in enumerate(zip(shapes, starts)):
        value_l = value[:, start:start + height * width]
        sample = sample_level(value_l, height, width, sampling_locations[:, :, :, lvl])  # (B, Q, M, P, D)
        out = out + (attention_weights[:, :, :, lvl].unsqueeze(-1) * sample).sum(dim=3)
    return out.reshape(B, Q, M * D)


# ----------------------------------------------------------------------------- the reference backend
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The ``reference`` backend's forward: computed in float32 (float64 for float64 inputs)."""
    compute = _compute_dtype(value.dtype)
    out = ms_deform_attn_reference(value.to(compute), spatial_shapes, level_start_index,
                                   sampling_locations.to(compute), attention_weights.to(compute))
    return out.to(value.dtype)


def reference_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights):
    """The ``reference`` backend's backward: the closed-form gradient the kernels
    implement (see :mod:`.op`), computed with tensor ops in float32 (float64 for
    float64 inputs). The parity tests hold it to autograd through
    :func:`ms_deform_attn_reference`."""
    compute = _compute_dtype(value.dtype)
    dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    value, loc, attn = (t.to(compute) for t in (value, sampling_locations, attention_weights))
    B, S, M, D = value.shape
    Q, P = loc.shape[1], loc.shape[4]
    g = grad_output.to(compute).reshape(B, Q, M, 1, D)
    shapes, starts = _levels(spatial_shapes, level_start_index)
    grad_value = torch.zeros(B, M, S, D, dtype=compute, device=value.device)
    grad_loc = torch.zeros_like(loc)
    grad_attn = torch.zeros_like(attn)
    for lvl, ((height, width), start) in enumerate(zip(shapes, starts)):
        table = value[:, start:start + height * width].permute(0, 2, 1, 3)  # (B, M, HW, D)
        a = attn[:, :, :, lvl]  # (B, Q, M, P)
        gs = g * a.unsqueeze(-1)  # d sample = a·g, (B, Q, M, P, D)
        x = loc[:, :, :, lvl, :, 0] * width - 0.5
        y = loc[:, :, :, lvl, :, 1] * height - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        fx, fy = x - x0, y - y0
        sample = torch.zeros_like(gs)
        gfx = torch.zeros_like(x)
        gfy = torch.zeros_like(y)
        for dx, dy in CORNERS:
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            wx = torch.where(inside, fx if dx else 1 - fx, 0.0)
            wy = torch.where(inside, fy if dy else 1 - fy, 0.0)
            flat = torch.where(inside, cy, 0.0).long() * width + torch.where(inside, cx, 0.0).long()
            index = flat.permute(0, 2, 1, 3).reshape(B, M, Q * P, 1).expand(B, M, Q * P, D)
            tap = table.gather(2, index).reshape(B, M, Q, P, D).permute(0, 2, 1, 3, 4)
            tap = torch.where(inside.unsqueeze(-1), tap, 0.0)
            sample = sample + (wx * wy).unsqueeze(-1) * tap
            # value: a·w·g into the tap's row (outside taps add an exact 0 to row 0)
            contrib = torch.where(inside.unsqueeze(-1), (wx * wy).unsqueeze(-1) * gs, 0.0)
            grad_value[:, :, start:start + height * width].scatter_add_(
                2, index, contrib.permute(0, 2, 1, 3, 4).reshape(B, M, Q * P, D))
            # location: ∂w/∂fx = ±wy, ∂w/∂fy = ±wx, times a·(g·tap), inside taps only
            t = (gs * tap).sum(-1)
            gfx = gfx + torch.where(inside, (1.0 if dx else -1.0) * (wy * t), 0.0)
            gfy = gfy + torch.where(inside, (1.0 if dy else -1.0) * (wx * t), 0.0)
        sample = torch.where((torch.isnan(x) | torch.isnan(y)).unsqueeze(-1), float("nan"), sample)
        grad_attn[:, :, :, lvl] = (g * sample).sum(-1)
        edge = (x == -1) | (y == -1)  # the half-pixel edge: no location gradient
        grad_loc[:, :, :, lvl, :, 0] = torch.where(edge, 0.0, gfx * width)
        grad_loc[:, :, :, lvl, :, 1] = torch.where(edge, 0.0, gfy * height)
    grad_value = grad_value.permute(0, 2, 1, 3).contiguous()
    return tuple(gr.to(dt) for gr, dt in zip((grad_value, grad_loc, grad_attn), dtypes))


__all__ = ["ms_deform_attn_reference", "sample_level", "reference_forward", "reference_backward", "CORNERS"]
