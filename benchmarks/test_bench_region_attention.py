"""ReLA's decoder attentions: the fused region_image_attention (RIA) and
region_language_attention (RLA) backends vs the authors' official path in eager and
under torch.compile, side by side in one run.

Official path (written here from the authors' decoder, as it runs there):
  RIA  F.interpolate(region logits → key map, bilinear, align_corners=False),
       sigmoid < 0.5 → a boolean mask repeated per head (B·H, Q, S), rows that block
       everything unblocked, then nn.MultiheadAttention's core with that mask as
       F.multi_head_attention_forward computes it for need_weights=True (the
       decoder's call): the mask as an additive −inf float tensor, q·√(1/d),
       baddbmm, softmax, bmm — and the head-averaged weights the layer also returns
       (the decoder discards them; eager computes them anyway, compile may not).
  RLA  the same core over the words with no mask (the authors' main branch).
In- and out-projections are outside both ops and left out everywhere.

Shapes (the issue's): RIA batch 2, 8 heads, 100 queries, 60×60 keys, d = 32, region
logits 120², fp32; RLA batch 2, 8 heads, 100 queries × 20 words, d = 32, fp32. Region
logits are smooth per-query blobs (a few keys allowed per query, as a trained
model's region masks look). CPU: fp32. CUDA (when present): fp32 and bf16.

``REXFAST_BENCH_THREADS=n`` sets torch's thread count for the run (default: torch's);
on a machine shared with other work, one thread shows the kernels without the
cross-thread wake-ups that contention makes expensive for every variant.

Each variant reports the median forward and forward+backward time (rounds
interleaved across the variants, so machine load hits all of them alike; Python's
garbage collector paused while timing, as timeit does) and its speed-up over eager
and over torch.compile. The torch.compile baseline is compiled afresh per case and
records its recompiles (``bench_utils.compile_fresh``). In a dry run
(``REXFAST_BENCH_DRY_RUN=1``) the CUDA cases run on CPU at tiny shapes.
"""

from __future__ import annotations

import gc
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from bench_utils import (GPU_BENCH_SKIP, compile_fresh, compile_stats, dry_run, gpu_bench_device, median_ms,
                         no_silent_eager, record, triton_variant_runs)
from rexfast.ops import region_image_attention, region_language_attention
from rexfast.ops.region_attention.region_image_attention import BACKENDS as RIA_BACKENDS
from rexfast.ops.region_attention.region_language_attention import BACKENDS as RLA_BACKENDS

SUITE = "region_attention"
RIA_SHAPE = (2, 8, 100, 60, 60, 32, 120, 120)  # B, H, Q, kh, kw, d, mh, mw
RLA_SHAPE = (2, 8, 100, 20, 32)  # B, H, Q, S, d
ROUNDS = 15
TINY_RIA_SHAPE = (1, 2, 8, 6, 6, 16, 12, 12)  # a dry run's stand-ins
TINY_RLA_SHAPE = (1, 2, 8, 5, 16)


# ----------------------------------------------------------------------------- the official path
def official_ria(q, k, v, region_logits, key_size):
    B, H, Q, d = q.shape
    S = k.shape[2]
    mask = F.interpolate(region_logits, size=key_size, mode="bilinear", align_corners=False)
    mask = (mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, H, 1, 1).flatten(0, 1) < 0.5).bool().detach()
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return _mha_core(q.reshape(B * H, Q, d), k.reshape(B * H, S, d), v.reshape(B * H, S, d), mask, B, H)


def official_rla(q, k, v):
    B, H, Q, d = q.shape
    S = k.shape[2]
    return _mha_core(q.reshape(B * H, Q, d), k.reshape(B * H, S, d), v.reshape(B * H, S, d), None, B, H)


def _mha_core(q, k, v, bool_mask, B, H):
    """F.multi_head_attention_forward's need_weights=True core (dropout 0)."""
    BH, Q, d = q.shape
    q_scaled = q * math.sqrt(1.0 / float(d))
    if bool_mask is not None:
        float_mask = torch.zeros_like(bool_mask, dtype=q.dtype).masked_fill_(bool_mask, float("-inf"))
        weights = torch.baddbmm(float_mask, q_scaled, k.transpose(-2, -1))
    else:
        weights = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = weights.softmax(dim=-1)
    out = torch.bmm(weights, v)
    weights.view(B, H, Q, -1).mean(dim=1)  # the layer's returned (head-averaged) weights, discarded by the decoder
    return out.view(B, H, Q, d)


# ----------------------------------------------------------------------------- inputs
def region_blobs(B, Q, mh, mw, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(mh, dtype=torch.float32)[:, None]
    xx = torch.arange(mw, dtype=torch.float32)[None, :]
    cy, cx = torch.rand(B, Q, 1, 1, generator=g) * mh, torch.rand(B, Q, 1, 1, generator=g) * mw
    radius = (0.15 + 0.35 * torch.rand(B, Q, 1, 1, generator=g)) * max(mh, mw)
    dist2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    return 4.0 * (1.0 - dist2) + 0.5 * torch.randn(B, Q, mh, mw, generator=g)


def _qkv(B, H, Q, S, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for shape in ((B, H, Q, d), (B, H, S, d), (B, H, S, d))]


def _fused(backends, device):
    return [n for n in ("cpu", "cuda", "triton") if n in backends.available(device)
            and (n != "triton" or triton_variant_runs(device))]


# ----------------------------------------------------------------------------- timing
def _interleaved_medians(fns: dict, device: str, rounds: int = ROUNDS) -> dict:
    """Median ms of each fn, the rounds interleaved across fns (CPU); CUDA: do_bench."""
    if device == "cuda":
        return {name: median_ms(fn, "cuda") for name, fn in fns.items()}
    if dry_run():
        rounds = 2
    for fn in fns.values():  # warm up (and compile)
        fn()
        fn()
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()  # as timeit does: a collection of torch.compile's many objects is not the op's time
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _run(op: str, device: str, dtype: torch.dtype, ria_shape=RIA_SHAPE, rla_shape=RLA_SHAPE):
    if os.environ.get("REXFAST_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["REXFAST_BENCH_THREADS"]))
    if op == "ria":
        B, H, Q, kh, kw, d, mh, mw = ria_shape
        q, k, v = _qkv(B, H, Q, kh * kw, d, device, dtype)
        logits = region_blobs(B, Q, mh, mw).to(device)
        eager = lambda q, k, v: official_ria(q, k, v, logits, (kh, kw))  # noqa: E731
        fused = {n: (lambda q, k, v, _n=n: region_image_attention(q, k, v, logits, (kh, kw), backend=_n))
                 for n in _fused(RIA_BACKENDS, device)}
        shape = "B{}H{}Q{}keys{}x{}d{}R{}x{}".format(*ria_shape)
    else:
        B, H, Q, S, d = rla_shape
        q, k, v = _qkv(B, H, Q, S, d, device, dtype)
        eager = official_rla
        fused = {n: (lambda q, k, v, _n=n: region_language_attention(q, k, v, backend=_n))
                 for n in _fused(RLA_BACKENDS, device)}
        shape = "B{}H{}Q{}S{}d{}".format(*rla_shape)
    variants = {"eager": eager, "compile": compile_fresh(eager, dynamic=False), **fused}
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run

    def forward_backward(fn):
        def run():
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return run

    with no_silent_eager():
        fwd = _interleaved_medians({n: forward(fn) for n, fn in variants.items()}, device)
        fb = _interleaved_medians({n: forward_backward(fn) for n, fn in variants.items()}, device)
    compiled = compile_stats(variants["compile"])
    for name in variants:
        record(SUITE, {
            "device_type": device,
            "op": op,
            "shape": shape,
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "variant": name,
            "fwd_ms": fwd[name],
            "fwd_bwd_ms": fb[name],
            "fwd_speedup_vs_eager": fwd["eager"] / fwd[name],
            "fwd_speedup_vs_compile": fwd["compile"] / fwd[name],
            "fwd_bwd_speedup_vs_eager": fb["eager"] / fb[name],
            "fwd_bwd_speedup_vs_compile": fb["compile"] / fb[name],
            **(compiled if name == "compile" else {}),
        })
    return fwd, fb


@pytest.mark.parametrize("op", ["ria", "rla"])
def test_region_attention_cpu(benchmark, op):
    fwd, fb = _run(op, "cpu", torch.float32)
    benchmark.extra_info.update({n: {"fwd_ms": fwd[n], "fwd_bwd_ms": fb[n]} for n in fwd})
    backends = RIA_BACKENDS if op == "ria" else RLA_BACKENDS
    best = "cpu" if "cpu" in backends.available("cpu") else "reference"
    B, H, Q, kh, kw, d, mh, mw = RIA_SHAPE
    if op == "ria":
        q, k, v = (t.requires_grad_(True) for t in _qkv(B, H, Q, kh * kw, d, "cpu", torch.float32))
        logits = region_blobs(B, Q, mh, mw)
        fn = lambda: region_image_attention(q, k, v, logits, (kh, kw), backend=best)  # noqa: E731
    else:
        q, k, v = (t.requires_grad_(True) for t in _qkv(*RLA_SHAPE[:4], RLA_SHAPE[4], "cpu", torch.float32))
        fn = lambda: region_language_attention(q, k, v, backend=best)  # noqa: E731

    def step():
        out = fn()
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(gpu_bench_device() is None, reason=GPU_BENCH_SKIP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["ria", "rla"])
def test_region_attention_cuda(benchmark, op, dtype):
    shapes = (TINY_RIA_SHAPE, TINY_RLA_SHAPE) if dry_run() else (RIA_SHAPE, RLA_SHAPE)
    fwd, fb = _run(op, gpu_bench_device(), dtype, *shapes)
    benchmark.extra_info.update({n: {"fwd_ms": fwd[n], "fwd_bwd_ms": fb[n]} for n in fwd})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
