"""CGFormer end to end: rexfast (fused ops + exact fusions) vs the same model
with every op on the reference backend and no fusions vs torch.compile of that
reference model. Forward (eval, no grad) and a training step (forward with
losses + backward), median times and, on CUDA, peak memory.

CPU (always): a reduced configuration (Swin 32-wide, 2-2-2-2, tiny BERT,
128-dim tokens) at B=2, 128², fp32. torch.compile needs minutes of C++
compilation on a small CPU, so the CPU compile variant only runs with
``REXFAST_BENCH_CPU_COMPILE=1``.
CUDA (when present): the released configuration (Swin-B, BERT-base) at B=8,
480², bf16 autocast; the rexfast variant also uses channels_last.

Rows go to ``benchmarks/results/cgformer-<device>.json`` (see ``bench_utils``).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench_utils import (GPU_BENCH_SKIP, dry_run, gpu_bench_device, measure_and_record, model_batch,
                         model_compile_on_gpu, model_variants, pedantic_train_step)
from rexfast.models import CGFormer, CGFormerConfig
from rexfast.models.backbones.swin import SwinConfig

SUITE = "cgformer"


def reduced_config(**overrides) -> CGFormerConfig:
    swin = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                      pwam_heads=(2, 2, 2, 2))
    return CGFormerConfig(**{**dict(swin=swin, bert="tiny", token_dim=128, image_size=128), **overrides})


def _variants(config: CGFormerConfig, device: str, with_compile: bool, channels_last: bool):
    return model_variants(CGFormer, config, device, with_compile, dict(channels_last=channels_last),
                          dict(ops_backend="reference", fused=False))


def test_cgformer_cpu(benchmark):
    with_compile = os.environ.get("REXFAST_BENCH_CPU_COMPILE") == "1"
    config, size, b = reduced_config(), 128, 2
    models = _variants(config, "cpu", with_compile, channels_last=False)
    batch = model_batch(b, size, "cpu")
    measure_and_record(benchmark, SUITE, models, batch, "cpu", None,
                       "reduced (Swin 32, 2-2-2-2; tiny BERT; tokens 128)", rounds=3)
    pedantic_train_step(benchmark, models["rexfast"], batch, "cpu", None)


@pytest.mark.skipif(gpu_bench_device() is None, reason=GPU_BENCH_SKIP)
def test_cgformer_cuda_released_b8_480_bf16(benchmark):
    device = gpu_bench_device()
    if dry_run():  # the tiny preset, B=1, fp32 (CPU bf16 only adds oneDNN JIT time), on CPU
        config, size, b, label = CGFormerConfig.tiny(image_size=32), 32, 1, "tiny (dry run)"
    else:
        config, size, b, label = CGFormerConfig.released(), 480, 8, "released (Swin-B w12, BERT-base, 2 tokens)"
    models = _variants(config, device, with_compile=model_compile_on_gpu(), channels_last=True)
    batch = model_batch(b, size, device)
    amp = None if dry_run() else torch.bfloat16
    measure_and_record(benchmark, SUITE, models, batch, device, amp, label, rounds=2)
    pedantic_train_step(benchmark, models["rexfast"], batch, device, amp)
