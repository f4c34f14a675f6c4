"""ms_deform_attn's op spec for the parity harness: input construction and edge cases.

Bilinear sampling is continuous in the location, but its location gradient
jumps wherever x = loc_x·W_l − 0.5 (or y) crosses an integer (a new pair of
taps takes over; the map border x = −1 / x = W_l is such a line too). A float32
kernel rounds x·W_l − 0.5 differently from the float64 reference, so a random
location within rounding error of such a line could legitimately get the other
one-sided derivative. Random cases therefore keep every coordinate at least
``MIN_FRACTION`` (in pixel units, computed in float64 from the exact rounded
inputs) away from integers, nudging the few that are not. Half-precision
locations need no nudge: their x·W_l − 0.5 is exact in float32.

The edge cases do the opposite on purpose: locations exactly on pixel centres,
on the map border (loc ∈ {0, 1}) and on the half-pixel edges (x = −1: a weight-0
tap and a zero location gradient; x = W_l: no tap), all exactly representable (power-of-two map sizes) so that every backend and the
reference compute the same taps; far outside and ±inf locations; NaN/±inf in
every input; B = 0 and Q = 0. Every backend must give what the reference gives.
"""

from __future__ import annotations

import torch

from harness import Case, OpSpec
from rexfast.ops import ms_deform_attn, ms_deform_attn_reference
from rexfast.ops.ms_deform_attn import BACKENDS

MIN_FRACTION = 1e-3  # pixel units; float32 rounding of x·W − 0.5 is ~1e-5 at W = 128

# (B, Q, M heads, D, P points, H_0, W_0, H_1, W_1, ...): L = 1…4, P = 1…8,
# non-square levels, odd D, heads 1…8. (Flat integer tuples: the generic GPU
# parity tests seed with sum(shape).)
PARITY_SHAPES = [
    (2, 37, 3, 8, 4, 6, 9, 3, 5),
    (1, 40, 8, 32, 4, 15, 15, 8, 8, 4, 4),
    (2, 13, 2, 5, 1, 7, 3),
    (1, 29, 4, 16, 8, 5, 6, 9, 4, 2, 2, 11, 3),
    (3, 9, 1, 33, 2, 4, 4, 2, 8),
    (1, 17, 2, 64, 3, 1, 7, 6, 1, 3, 3),
]
LAYOUTS = ("contiguous", "strided")


def levels_of(shape) -> list[tuple[int, int]]:
    """The (H_l, W_l) of a parity shape (B, Q, M, D, P, H_0, W_0, H_1, W_1, ...)."""
    return list(zip(shape[5::2], shape[6::2]))


def level_tensors(levels, device="cpu"):
    """(spatial_shapes, level_start_index) int64 for a list of (H, W)."""
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes.to(device), starts.to(device)


def pixel_coordinates(loc: torch.Tensor, levels) -> torch.Tensor:
    """x·W_l − 0.5, y·H_l − 0.5 in float64 for locations (..., L, P, 2)."""
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float64)  # (L, 2) as (W, H)
    return loc.double() * size[:, None, :] - 0.5


def keep_off_grid_lines(loc: torch.Tensor, levels, dtype) -> torch.Tensor:
    """Nudge (float32/float64) locations whose pixel coordinate is within MIN_FRACTION of an integer."""
    if dtype not in (torch.float32, torch.float64):
        return loc.to(dtype)
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float64)[:, None, :]
    loc = loc.double()
    for _ in range(5):
        px = pixel_coordinates(loc.to(dtype), levels)
        frac = px - px.floor()
        bad = (frac < MIN_FRACTION) | (frac > 1 - MIN_FRACTION)
        if not bad.any():
            return loc.to(dtype)
        loc = torch.where(bad, loc + 3 * MIN_FRACTION / size, loc)
    raise AssertionError("could not keep the sampling locations off the pixel grid lines")


def make_case(shape, *, dtype=torch.float32, device="cpu", seed=0, layout="contiguous") -> Case:
    """A random case: locations uniform over [−0.15, 1.15] (some taps and points
    outside the maps), softmax attention weights, standard normal values.
    layout 'strided': value is a head/channel slice of a wider tensor (unit
    stride over D only) and the locations/weights are non-contiguous views."""
    B, Q, M, D, P = shape[:5]
    levels = levels_of(shape)
    L = len(levels)
    S = sum(h * w for h, w in levels)
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(B, S, M, D, generator=g)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g) * 1.3 - 0.15
    attn = torch.randn(B, Q, M, L * P, generator=g).softmax(-1).reshape(B, Q, M, L, P)
    loc = keep_off_grid_lines(loc, levels, dtype)
    value, attn = value.to(dtype), attn.to(dtype)
    if layout == "strided":
        wide = torch.randn(B, S, M, D + 3, generator=g).to(dtype)
        wide[..., 1:D + 1] = value
        value = wide[..., 1:D + 1]
        loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
        attn = attn.transpose(1, 2).contiguous().transpose(1, 2)
    shapes, starts = level_tensors(levels)
    to = lambda t: t.to(device)  # noqa: E731
    return Case((to(value), to(shapes), to(starts), to(loc), to(attn)), label=f"{shape} {layout}")


# ----------------------------------------------------------------------------- edge cases
EDGE_LEVELS = [(4, 8), (2, 2), (8, 4)]  # powers of two: every edge location below is exact


def _edge_base(seed=0, Q=24, M=2, D=8, P=4, levels=EDGE_LEVELS):
    g = torch.Generator().manual_seed(seed)
    L = len(levels)
    S = sum(h * w for h, w in levels)
    value = torch.randn(1, S, M, D, generator=g)
    loc = keep_off_grid_lines(torch.rand(1, Q, M, L, P, 2, generator=g), levels, torch.float32)
    attn = torch.randn(1, Q, M, L * P, generator=g).softmax(-1).reshape(1, Q, M, L, P)
    return value, loc, attn, levels, g


def _case(value, loc, attn, levels, dtype, device, label):
    shapes, starts = level_tensors(levels, device)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return Case((to(value), shapes, starts, to(loc), to(attn)), label=label)


def border_case(dtype, device):
    """Locations exactly on the map border (0, 1), on pixel centres and on the
    half-pixel edges x = −1 (a weight-0 tap, location gradient 0) and x = W (no
    tap), in x and y, per level."""
    value, loc, attn, levels, g = _edge_base()
    for lvl, (h, w) in enumerate(levels):
        xs = [0.0, 1.0, 0.5 / w, (w - 0.5) / w, -0.5 / w, (w + 0.5) / w, 1.5 / w, 2.0 / w]
        ys = [0.0, 1.0, 0.5 / h, (h - 0.5) / h, -0.5 / h, (h + 0.5) / h, 1.5 / h, 1.0 / h]
        for i, (x, y) in enumerate(zip(xs, ys)):
            loc[0, i, 0, lvl, i % 4] = torch.tensor([x, y])
            loc[0, i + 8, 1, lvl, (i + 1) % 4, 0] = x  # x on an edge, y random
            loc[0, i + 16, 0, lvl, (i + 2) % 4, 1] = y  # y on an edge, x random
    return _case(value, loc, attn, levels, dtype, device, "border")


def outside_case(dtype, device):
    """Far outside, huge, and ±inf locations (sample 0, location gradient 0)."""
    value, loc, attn, levels, g = _edge_base(seed=1)
    INF = float("inf")
    specials = [(-0.7, 0.5), (0.5, 1.9), (3.0, -2.0), (1e30, 0.5), (0.5, -1e30), (INF, 0.5), (0.5, -INF),
                (-INF, INF), (1.0 + 1e-6, 0.5)]
    for i, (x, y) in enumerate(specials):
        loc[0, i, i % 2, i % 3, i % 4] = torch.tensor([x, y])
    return _case(value, loc, attn, levels, dtype, device, "outside")


def nan_location_case(dtype, device):
    """NaN in x, in y, in both: the sample is NaN in every channel, nothing is read."""
    value, loc, attn, levels, g = _edge_base(seed=2)
    NAN = float("nan")
    loc[0, 3, 1, 0, 2, 0] = NAN
    loc[0, 7, 0, 2, 1, 1] = NAN
    loc[0, 11, 1, 1, 3] = NAN
    return _case(value, loc, attn, levels, dtype, device, "nan location")


def _value_poke(fill):
    def make(dtype, device):
        """A non-finite value read by in-map taps, and one read only by a weight-0
        tap (a location on the neighbouring pixel centre: 0·inf = NaN)."""
        value, loc, attn, levels, g = _edge_base(seed=3)
        h, w = levels[0]
        value[0, 2 * w + 5, 1, 3] = fill  # level 0, pixel (y=2, x=5), head 1, channel 3
        loc[0, 4, 1, 0, 0] = torch.tensor([(4 + 0.5) / w, (2 + 0.5) / h])  # centre of (2, 4): taps x=4,5 y=2,3
        value[0, 1 * w + 0, 0, 6] = fill  # pixel (1, 0)
        loc[0, 9, 0, 0, 2] = torch.tensor([(0 + 0.25) / w, (1 + 0.5 + 0.25) / h])
        return _case(value, loc, attn, levels, dtype, device, f"value {fill}")
    return make


def _weight_poke(fill):
    def make(dtype, device):
        """A non-finite attention weight on an in-map point and on an out-of-map point (fill·0)."""
        value, loc, attn, levels, g = _edge_base(seed=4)
        attn[0, 5, 0, 1, 2] = fill
        attn[0, 12, 1, 2, 0] = fill
        loc[0, 12, 1, 2, 0] = torch.tensor([-0.8, 0.4])  # fully outside: sample 0
        return _case(value, loc, attn, levels, dtype, device, f"weight {fill}")
    return make


def single_level_point_case(dtype, device):
    value, loc, attn, levels, g = _edge_base(seed=5, P=1, levels=[(5, 3)])
    return _case(value, loc, attn, levels, dtype, device, "L=1 P=1")


def many_levels_points_case(dtype, device):
    value, loc, attn, levels, g = _edge_base(seed=6, P=8, levels=[(4, 8), (2, 2), (8, 4), (1, 16)])
    return _case(value, loc, attn, levels, dtype, device, "L=4 P=8")


def empty_case(which):
    def make(dtype, device):
        value, loc, attn, levels, g = _edge_base(seed=7)
        if which == "batch":
            value, loc, attn = value[:0], loc[:0], attn[:0]
        else:
            loc, attn = loc[:, :0], attn[:, :0]
        return _case(value, loc, attn, levels, dtype, device, f"empty {which}")
    return make


NAN, INF = float("nan"), float("inf")
EDGE_CASES = {
    "border": border_case,
    "outside": outside_case,
    "nan_location": nan_location_case,
    "nan_value": _value_poke(NAN),
    "inf_value": _value_poke(INF),
    "neg_inf_value": _value_poke(-INF),
    "nan_weight": _weight_poke(NAN),
    "inf_weight": _weight_poke(INF),
    "single_level_point": single_level_point_case,
    "four_levels_eight_points": many_levels_points_case,
    "empty_batch": empty_case("batch"),
    "empty_queries": empty_case("queries"),
}


def _work(shape) -> int:
    B, Q, M, D, P = shape[:5]
    return B * Q * M * D * P * len(levels_of(shape))


SPEC = OpSpec(
    name="ms_deform_attn",
    fn=ms_deform_attn,
    reference=ms_deform_attn_reference,
    backends=BACKENDS,
    make_case=make_case,
    shapes=PARITY_SHAPES,
    modes=tuple({"layout": layout} for layout in LAYOUTS),
    dtype_shapes=[(2, 37, 3, 8, 4, 6, 9, 3, 5), (1, 20, 4, 32, 4, 8, 8, 4, 4, 2, 2)],
    differentiable=(0, 3, 4),
    edge_cases=EDGE_CASES,
    dtypes={"triton": (torch.float32, torch.float16, torch.bfloat16),
            "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64)},
    too_slow=lambda backend, shape: backend == "triton" and _work(shape) > 400_000,
    output_names=("out",),
)

__all__ = ["SPEC", "make_case", "PARITY_SHAPES", "EDGE_CASES", "EDGE_LEVELS", "levels_of", "level_tensors",
           "keep_off_grid_lines", "pixel_coordinates", "MIN_FRACTION"]
