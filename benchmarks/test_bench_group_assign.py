"""group_assign: fused backends vs the eager reference vs torch.compile, side by side.

CPU (always): the issue's target shape B=8, N=2, P=3600, C=D=512 fp32, and
B=2 at N ∈ {2, 8, 32} (P=3600) and P ∈ {900, 14400} (N=8). CUDA (when present): B=8, N ∈ {2, 8, 32},
P ∈ {900, 3600, 14400}, C=D=512, bf16, the target shape first. Each shape reports every variant's
median forward and forward+backward time, the speed-up over eager and over
torch.compile, and the achieved bandwidth for the bytes the op must move
against the device's measured copy bandwidth.

The torch.compile baseline is compiled afresh for every shape (``bench_utils.compile_fresh``)
and its row records how often dynamo compiled it; hitting the recompile limit is an
error. Before, 9 shapes × 2 grad modes ran through one compiled lambda, and after
dynamo's limit of 8 entries the "compile" rows silently timed eager PyTorch.
In a dry run (``REXFAST_BENCH_DRY_RUN=1``) the CUDA cases run on CPU at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from bench_utils import (GPU_BENCH_SKIP, ceilings, compile_fresh, compile_stats, dry_run, gpu_bench_device, median_ms,
                         no_silent_eager, record, triton_variant_runs)
from rexfast.ops import group_assign, group_assign_reference
from rexfast.ops.group_assign import BACKENDS

SUITE = "group_assign"
# the target shape, then B=2 across the token counts and, at N=8, the pixel counts
CPU_SHAPES = [(8, 2, 3600, 512, 512)] + [(2, n, 3600, 512, 512) for n in (2, 8, 32)] + [
    (2, 8, p, 512, 512) for p in (900, 14400)]
# the target shape first: run_device.sh may run out of time before the last
GPU_SHAPES = [(8, 2, 3600, 512, 512)] + [(8, n, p, 512, 512) for n in (2, 8, 32) for p in (900, 3600, 14400)
                                         if (n, p) != (2, 3600)]


def tiny(shape):
    """A dry run's stand-in for a GPU shape: same N, P/100 pixels, C = D = 32, B ≤ 2."""
    B, N, P, C, D = shape
    return min(B, 2), N, max(1, P // 100), 32, 32


def min_bytes(B, N, P, C, D, elt, backward):
    """Bytes the op cannot avoid moving: forward reads k, v and writes assign, out;
    backward re-reads k, v, reads dassign, writes dk, dv (q/dq/out/dout are tiny)."""
    fwd = elt * (B * P * C + B * P * D + B * N * P + B * N * D)
    if not backward:
        return fwd
    return fwd + elt * (2 * B * P * C + 2 * B * P * D + B * N * P)


def _inputs(shape, device, dtype):
    B, N, P, C, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, C, generator=g).to(device, dtype)
    k = torch.randn(B, P, C, generator=g).to(device, dtype)
    v = torch.randn(B, P, D, generator=g).to(device, dtype)
    tau = torch.tensor([0.5], device=device)
    return q, k, v, tau


def _variants(device, with_compile=True):
    ref = lambda q, k, v, t: group_assign_reference(q, k, v, t)  # noqa: E731
    out = {"eager": ref}
    if with_compile:
        out["compile"] = compile_fresh(ref, dynamic=False)
    for name in ("cpu", "cuda", "triton"):
        if name in BACKENDS.available(device) and (name != "triton" or triton_variant_runs(device)):
            out[name] = lambda q, k, v, t, _n=name: group_assign(q, k, v, t, backend=_n)
    return out


def _run(shape, device, dtype):
    q, k, v, tau = _inputs(shape, device, dtype)
    leaves = [t.requires_grad_(True) for t in (q, k, v, tau)]
    rows = {}
    variants = _variants(device)
    with no_silent_eager():
        for name, fn in variants.items():
            def forward():
                with torch.no_grad():
                    return fn(q, k, v, tau)

            def forward_backward():
                out, assign = fn(*leaves)
                # grads of out.sum() + assign.sum(): autograd.grad, so nothing accumulates in .grad
                return torch.autograd.grad((out, assign), leaves, (torch.ones_like(out), torch.ones_like(assign)))

            rows[name] = (median_ms(forward, device), median_ms(forward_backward, device))
    compiled = compile_stats(variants["compile"])  # no_grad and grad: 2 entries expected
    ceiling = ceilings(device)["copy_GBps"]
    elt = torch.empty((), dtype=dtype).element_size()
    for name, (fwd_ms, fb_ms) in rows.items():
        gbps = min_bytes(*shape, elt, True) / fb_ms / 1e6
        record(SUITE, {
            "device_type": device,
            "shape_BNPCD": "x".join(map(str, shape)),
            "dtype": str(dtype).replace("torch.", ""),
            "variant": name,
            **fwd_ms.fields("fwd"),
            **fb_ms.fields("fwd_bwd"),
            "fwd_bwd_speedup_vs_eager": rows["eager"][1] / fb_ms,
            "fwd_bwd_speedup_vs_compile": rows["compile"][1] / fb_ms,
            "fwd_speedup_vs_eager": rows["eager"][0] / fwd_ms,
            "fwd_bwd_GBps": gbps,
            "fraction_of_copy_bw": gbps / ceiling,
            **(compiled if name == "compile" else {}),
        })
    return rows


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}N{}P{}C{}D{}".format(*s))
def test_group_assign_cpu(benchmark, shape):
    rows = _run(shape, "cpu", torch.float32)
    # pytest-benchmark's own table times the fused CPU forward+backward.
    q, k, v, tau = (t.requires_grad_(True) for t in _inputs(shape, "cpu", torch.float32))
    best = "cpu" if "cpu" in rows else "eager"
    fn = _variants("cpu", with_compile=False)[best]

    def step():
        out, assign = fn(q, k, v, tau)
        torch.autograd.grad((out, assign), (q, k, v, tau), (torch.ones_like(out), torch.ones_like(assign)))

    benchmark.extra_info.update({k: {"fwd_ms": a, "fwd_bwd_ms": b} for k, (a, b) in rows.items()})
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(gpu_bench_device() is None, reason=GPU_BENCH_SKIP)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}N{}P{}C{}D{}".format(*s))
def test_group_assign_cuda(benchmark, shape):
    device = gpu_bench_device()
    shape = tiny(shape) if dry_run() else shape
    rows = _run(shape, device, torch.bfloat16)
    benchmark.extra_info.update({k: {"fwd_ms": a, "fwd_bwd_ms": b} for k, (a, b) in rows.items()})
    q, k, v, tau = (t.requires_grad_(True) for t in _inputs(shape, device, torch.bfloat16))
    variants = _variants(device, with_compile=False)
    fn = variants.get("triton") or variants["eager"]
    benchmark.pedantic(lambda: fn(q, k, v, tau)[0].sum().backward(), rounds=3, iterations=1, warmup_rounds=1)
