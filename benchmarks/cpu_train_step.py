"""One full-size training-step measurement in a process of its own (run by
``test_bench_cpu_inference.py::test_cpu_training_step_full_size``), so that its peak resident
memory is the variant's own and not the high-water mark of whatever ran before it.

    python benchmarks/cpu_train_step.py MODEL VARIANT ROUNDS

MODEL: cgformer | rela_swinb | rela_r50 (released architectures, random weights, B = 2, 480²).
VARIANT: reference_fp32 (every op on its PyTorch reference, CGFormer ``fused=False``, ReLA's
region masks resampled per level: the authors' way) | rexfast_fp32 | rexfast_bf16 (rexfast's
backends under ``torch.autocast("cpu", bfloat16)``: what ``train.precision=bf16`` runs) |
rexfast_bf16_compile (the same with the model's forward under ``torch.compile``; the warm-up
step, which compiles forward and backward, is reported as ``warmup_s``).
A step is forward with the losses, backward and an AdamW step over the model's
``param_groups``. Prints one JSON line: the step times (ms, after one warm-up step), the
resident memory before the first step and the process's peak (``ru_maxrss``), in MiB.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

BATCH, SIZE, TOKENS = 2, 480, 20
VARIANTS = ("reference_fp32", "rexfast_fp32", "rexfast_bf16", "rexfast_bf16_compile")


def build(name: str, variant: str):
    from rexfast.engine.config import TrainConfig
    from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig

    torch.manual_seed(0)
    reference = variant == "reference_fp32"
    if name == "cgformer":
        kwargs = dict(ops_backend="reference", fused=False) if reference else {}
        model = CGFormer(CGFormerConfig.released(), **kwargs)
    else:
        config = ReLAConfig.released() if name == "rela_swinb" else ReLAConfig.r50()
        kwargs = dict(ops_backend="reference", region_masks_at_key_resolution=False) if reference else {}
        model = ReLA(config, **kwargs)
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(TrainConfig(lr=1e-5, weight_decay=0.05)), lr=1e-5)
    return model, optimizer


def main(name: str, variant: str, rounds: int) -> dict:
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {VARIANTS}, got {variant!r}")
    model, optimizer = build(name, variant)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), generator=g)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[:, 12:] = 0
    targets = (torch.rand(BATCH, SIZE, SIZE, generator=g) > 0.7).float()
    amp = variant.startswith("rexfast_bf16")
    forward = torch.compile(model) if variant == "rexfast_bf16_compile" else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            _, losses = forward(images, ids, mask, targets=targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with open("/proc/self/statm") as f:
        before_mib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    times = []
    for i in range(rounds + 1):  # the first step is the warm-up (it also allocates AdamW's state)
        started = time.perf_counter()
        step()
        if i:
            times.append((time.perf_counter() - started) * 1e3)
        else:
            warmup_s = time.perf_counter() - started
        print(f"[{name} train B={BATCH}] {variant} step {i}: {(time.perf_counter() - started):.1f} s",
              file=sys.stderr, flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"times_ms": times, "warmup_s": warmup_s, "rss_before_first_step_MiB": before_mib, "peak_rss_MiB": peak_mib,
            "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
