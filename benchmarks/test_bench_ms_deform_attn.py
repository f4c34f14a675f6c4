"""ms_deform_attn: fused backends vs the official grid_sample path (eager and
torch.compile), side by side.

Shapes: ReLA's pixel decoder (batch 2, levels 15², 30², 60² → S = Q = 4725
queries, 8 heads, D = 32, 4 points, fp32; bf16 as well on CUDA). Two location
patterns: "rela" (each query samples around its own position on every level,
offsets of a few pixels, as the trained MSDeformAttn does: gathers are local)
and "uniform" (uniform over [0, 1]: gathers are random). Each variant reports
the median forward and forward+backward time, speed-ups over the eager and the
compiled grid_sample path, and the achieved bandwidth for the bytes the op must
move against the device's measured copy bandwidth. The torch.compile baseline is
compiled afresh per case and records its recompiles (``bench_utils.compile_fresh``).
In a dry run (``REXFAST_BENCH_DRY_RUN=1``) the CUDA cases run on CPU at tiny shapes.

The official path is written here from the official semantics (Deformable
DETR's ``ms_deform_attn_core_pytorch``, ReLA's CPU fallback): one
``F.grid_sample(bilinear, zeros, align_corners=False)`` per level at 2·loc − 1,
then the attention-weighted sum over levels and points.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench_utils import (GPU_BENCH_SKIP, ceilings, compile_fresh, compile_stats, dry_run, gpu_bench_device, median_ms,
                         no_silent_eager, record, triton_variant_runs)
from rexfast.ops import ms_deform_attn
from rexfast.ops.ms_deform_attn import BACKENDS

SUITE = "ms_deform_attn"
LEVELS = ((15, 15), (30, 30), (60, 60))
RELA = dict(B=2, M=8, D=32, P=4)
TINY_LEVELS = ((3, 3), (6, 6))  # a dry run's stand-in: 45 queries, 2 heads, D = 8, 2 points
TINY = dict(B=1, M=2, D=8, P=2)


def grid_sample_path(value, levels, loc, attn):
    """The official semantics: grid_sample per level, weighted sum (eager torch)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    per_level = value.split([h * w for h, w in levels], dim=1)
    grids = 2 * loc - 1
    samples = []
    for lvl, (h, w) in enumerate(levels):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B·M, Q, P, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attn.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(B, M * D, Q)
    return out.transpose(1, 2).contiguous()


def _inputs(pattern, device, dtype, *, B, M, D, P, levels=LEVELS):
    g = torch.Generator().manual_seed(0)
    L = len(levels)
    S = sum(h * w for h, w in levels)
    Q = S  # encoder self-attention: every pixel of every level is a query
    value = torch.randn(B, S, M, D, generator=g)
    attn = torch.randn(B, Q, M, L * P, generator=g).softmax(-1).reshape(B, Q, M, L, P)
    if pattern == "uniform":
        loc = torch.rand(B, Q, M, L, P, 2, generator=g)
    else:
        # reference point = the query's pixel centre (normalised, the same on every level), plus
        # MSDeformAttn's initial offsets (head direction × (p + 1) pixels) and N(0, 1) pixel noise
        ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                    indexing="xy"), -1).reshape(-1, 2) for h, w in levels])
        theta = torch.arange(M) * (2 * math.pi / M)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # (M, 2)
        offsets = direction[:, None, None, :] * (torch.arange(P) + 1.0)[None, None, :, None]  # (M, 1, P, 2)
        offsets = offsets + torch.randn(B, Q, M, L, P, 2, generator=g)
        size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (L, 2) as (W, H)
        loc = ref[None, :, None, None, None, :] + offsets / size[None, None, None, :, None, :]
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    to = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return to(value), to(shapes), to(starts), to(loc), to(attn)


def min_bytes(value, loc, attn, backward):
    """Bytes the op cannot avoid moving: forward reads value, locations, weights and
    writes the output; backward reads the output gradient, value, locations and
    weights again and writes their three gradients."""
    e = value.element_size()
    B, S, M, D = value.shape
    Q = loc.shape[1]
    n_value, n_loc, n_attn, n_out = value.numel(), loc.numel(), attn.numel(), B * Q * M * D
    fwd = e * (n_value + n_loc + n_attn + n_out)
    return fwd + (e * (n_out + 2 * (n_value + n_loc + n_attn)) if backward else 0)


def _variants(device, levels, with_compile=True):
    eager = lambda v, s, i, l, a: grid_sample_path(v, levels, l, a)  # noqa: E731
    out = {"grid_sample": eager}
    if with_compile:
        compiled = compile_fresh(lambda v, l, a: grid_sample_path(v, levels, l, a), dynamic=False)
        out["grid_sample_compile"] = lambda v, s, i, l, a: compiled(v, l, a)
        out["grid_sample_compile"].compiled = compiled
    for name in ("cpu", "cuda", "triton"):
        if name in BACKENDS.available(device) and (name != "triton" or triton_variant_runs(device)):
            out[name] = lambda v, s, i, l, a, _n=name: ms_deform_attn(v, s, i, l, a, backend=_n)
    return out


def _run(pattern, device, dtype, sizes=RELA, levels=LEVELS):
    value, shapes, starts, loc, attn = _inputs(pattern, device, dtype, levels=levels, **sizes)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    rows = {}
    variants = _variants(device, levels)
    with no_silent_eager():
        for name, fn in variants.items():
            def forward():
                with torch.no_grad():
                    return fn(value, shapes, starts, loc, attn)

            def forward_backward():
                out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
                return torch.autograd.grad(out, leaves, torch.ones_like(out))  # nothing accumulates in .grad

            rows[name] = (median_ms(forward, device), median_ms(forward_backward, device))
    compiled = compile_stats(variants["grid_sample_compile"].compiled)
    ceiling = ceilings(device)["copy_GBps"]
    shape = f"B{sizes['B']} Q{loc.shape[1]} M{sizes['M']} D{sizes['D']} P{sizes['P']} L" + "+".join(
        f"{h}x{w}" for h, w in levels)
    for name, (fwd_ms, fb_ms) in rows.items():
        gbps = min_bytes(value, loc, attn, True) / fb_ms / 1e6
        record(SUITE, {
            "device_type": device,
            "shape": shape,
            "locations": pattern,
            "dtype": str(dtype).replace("torch.", ""),
            "variant": name,
            "fwd_ms": fwd_ms,
            "fwd_bwd_ms": fb_ms,
            "fwd_speedup_vs_eager": rows["grid_sample"][0] / fwd_ms,
            "fwd_bwd_speedup_vs_eager": rows["grid_sample"][1] / fb_ms,
            "fwd_bwd_speedup_vs_compile": rows["grid_sample_compile"][1] / fb_ms,
            "fwd_GBps": min_bytes(value, loc, attn, False) / fwd_ms / 1e6,
            "fwd_bwd_GBps": gbps,
            "fraction_of_copy_bw": gbps / ceiling,
            **(compiled if name == "grid_sample_compile" else {}),
        })
    return rows


@pytest.mark.parametrize("pattern", ["rela", "uniform"])
def test_ms_deform_attn_cpu(benchmark, pattern):
    rows = _run(pattern, "cpu", torch.float32)
    benchmark.extra_info.update({k: {"fwd_ms": a, "fwd_bwd_ms": b} for k, (a, b) in rows.items()})
    # pytest-benchmark's own table times the fused CPU forward+backward.
    value, shapes, starts, loc, attn = _inputs(pattern, "cpu", torch.float32, **RELA)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    best = "cpu" if "cpu" in rows else "grid_sample"
    fn = _variants("cpu", LEVELS, with_compile=False)[best]

    def step():
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(gpu_bench_device() is None, reason=GPU_BENCH_SKIP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["rela", "uniform"])
def test_ms_deform_attn_cuda(benchmark, pattern, dtype):
    device = gpu_bench_device()
    sizes, levels = (TINY, TINY_LEVELS) if dry_run() else (RELA, LEVELS)
    rows = _run(pattern, device, dtype, sizes, levels)
    benchmark.extra_info.update({k: {"fwd_ms": a, "fwd_bwd_ms": b} for k, (a, b) in rows.items()})
    value, shapes, starts, loc, attn = _inputs(pattern, device, dtype, levels=levels, **sizes)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    variants = _variants(device, levels, with_compile=False)
    fn = variants.get("triton") or variants["grid_sample"]
    benchmark.pedantic(lambda: fn(leaves[0], shapes, starts, leaves[1], leaves[2]).sum().backward(), rounds=3,
                       iterations=1, warmup_rounds=1)
