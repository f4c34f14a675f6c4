"""Full-size inference on a CPU: the authors' way (fp32 eager, every op on its PyTorch
reference) against ``rexfast.optimize`` in fp32, bf16 and bf16 + ``torch.compile``, and
onnxruntime on the exported graph; side by side, one process. B = 1, 480², 20-token
sentences, random weights (speed does not depend on the values).

Models: CGFormer released (Swin-B, BERT-base), ReLA released (Swin-B) and ReLA R50.
Variants per model:
- ``reference``: ``ops_backend="reference"`` (CGFormer also ``fused=False``; ReLA region masks
  resampled per level as released), fp32, eager, ``torch.no_grad()``;
- ``autocast_bf16``: that reference model under ``torch.autocast("cpu", bfloat16)``;
- ``rexfast_fp32`` / ``rexfast_bf16``: ``rexfast.optimize(reference, precision=...)``;
- ``rexfast_bf16_compile``: ``optimize(..., compile=True)``; the first call (compilation) is
  recorded as ``warmup_s``. Only with ``REXFAST_BENCH_CPU_COMPILE=1`` (or a comma-separated list of
  model names; minutes of compilation per model on 2 cores);
- ``onnxruntime``: ``rexfast.export.export_onnx`` (decomposed, fp32) run by onnxruntime's CPU
  provider; only with ``REXFAST_BENCH_ORT=1`` (or a list of model names: each export takes minutes
  and ~8 GB).

Each row: median ms of ``REXFAST_BENCH_ROUNDS`` (default 3) rounds after one warm-up, the rounds
interleaved across the variants; the peak resident memory above the pre-call level during a timed call (``/proc/self/statm``
sampled every 2 ms: tracemalloc does not see torch's allocations), speed-up vs the
reference, and for bf16 the logits' relative error and the mask agreement with the
``rexfast_fp32`` output (% of pixels with the same decision).

On a CPU with AMX the rows go to the suite ``cpu_inference-amx`` (``results/cpu_inference-amx-cpu.json``),
elsewhere to ``cpu_inference``, so that a run on one kind of CPU does not replace the other's;
every file records the CPU's model name and bf16 flags. ``REXFAST_BENCH_THREADS=n`` sets torch's
thread count for the run (default: torch's, one per core).

``REXFAST_BENCH_LAYOUTS=1`` adds ``rexfast_fp32_nchw`` / ``rexfast_bf16_nchw``
(``optimize(..., channels_last=False)``). Every row records the 1-minute load average: the
benchmark machine is shared, and a second tenant on 2 cores doubles every time.

Also measured in the same run: the bf16 and fp32 matmul ceilings (4096², the machine's
best case) and the achieved TFLOP/s of CGFormer's mask-head convolutions (3×3 512→512 at
240² and 480², NHWC), and the demo presets' training step (B = 16, 64²) in fp32 vs bf16
autocast. ``REXFAST_BENCH_PROFILE=1`` writes torch.profiler top-operator tables
(reference fp32, autocast, rexfast bf16) to ``benchmarks/.results/profile-*.txt``.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from bench_utils import SCRATCH_DIR, PeakRSS, Timing, median_ms, record

def _suite() -> str:
    from rexfast.engine.precision import cpu_bf16_support

    return "cpu_inference-amx" if cpu_bf16_support() == "AMX-BF16" else "cpu_inference"


SUITE = _suite()
if os.environ.get("REXFAST_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["REXFAST_BENCH_THREADS"]))
SIZE, TOKENS = 480, 20
ROUNDS = int(os.environ.get("REXFAST_BENCH_ROUNDS", "3"))


def _inputs(b=1, size=SIZE):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(1000, 30000, (b, TOKENS), generator=g)
    mask = torch.ones(b, TOKENS, dtype=torch.long)
    mask[:, 12:] = 0
    return images, ids, mask


def _reference(name: str):
    from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig

    torch.manual_seed(0)
    if name == "cgformer":
        return CGFormer(CGFormerConfig.released(), ops_backend="reference", fused=False).eval()
    config = ReLAConfig.released() if name == "rela_swinb" else ReLAConfig.r50()
    return ReLA(config, ops_backend="reference", region_masks_at_key_resolution=False).eval()


def _logits(out) -> torch.Tensor:
    return out["logits" if "logits" in out else "mask_logits"].float()


def _decisions(name, logits):
    # CGFormer: sigmoid > 0.5; ReLA: target logit > background logit (its argmax)
    return logits[:, 0] > 0 if logits.shape[1] == 1 else logits[:, 1] > logits[:, 0]


def _profile_table(fn, path, title):
    from torch.profiler import profile

    with profile() as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"## {title}\n\n{table}\n\n")


MODELS = ["cgformer", "rela_swinb", "rela_r50"]


def _enabled(variable: str, name: str) -> bool:
    """``1``: for every model; or a comma-separated list of model names."""
    value = os.environ.get(variable, "")
    return value == "1" or name in value.split(",")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cpu_inference_full_size(benchmark, tmp_path, name):
    import rexfast

    images, ids, mask = _inputs()
    reference = _reference(name)
    profiling = os.environ.get("REXFAST_BENCH_PROFILE") == "1"
    profile_path = SCRATCH_DIR / f"profile-{name}.txt"
    if profiling and profile_path.exists():
        profile_path.unlink()

    def run(model, autocast=False):
        def fn():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model.inference_outputs(images, ids, mask)
        return fn

    # Every variant is built and warmed up first; the timed rounds then interleave the
    # variants, so that a second tenant on the shared cores slows them all alike.
    fns, extra = {"reference": run(reference), "autocast_bf16": run(reference, autocast=True)}, {}
    fp32 = rexfast.optimize(reference, precision="fp32")
    fns["rexfast_fp32"] = run(fp32)
    extra["rexfast_fp32"] = {"folded_batchnorms": fp32.optimization.folded_batchnorms}
    bf16 = rexfast.optimize(reference, precision="bf16")
    fns["rexfast_bf16"] = run(bf16)
    extra["rexfast_bf16"] = {"fp32_modules": ",".join(bf16.optimization.fp32_modules) or None}
    if os.environ.get("REXFAST_BENCH_LAYOUTS") == "1":  # the NCHW variants: what channels-last buys
        for prec in ("fp32", "bf16"):
            fns[f"rexfast_{prec}_nchw"] = run(rexfast.optimize(reference, precision=prec, channels_last=False))
    if _enabled("REXFAST_BENCH_CPU_COMPILE", name):
        fns["rexfast_bf16_compile"] = run(rexfast.optimize(reference, precision="bf16", compile=True))
    if _enabled("REXFAST_BENCH_ORT", name):
        from rexfast.export import export_onnx

        import onnxruntime as ort

        path = tmp_path / f"{name}.onnx"
        # the same weights run the default (fused) way: CGFormer's unfused mask head
        # (a grouped conv with one group per sample) does not export
        exportable = type(reference)(reference.config)
        exportable.load_state_dict(reference.state_dict())
        started = time.perf_counter()
        export_onnx(exportable.eval(), path, image_size=SIZE, mode="decomposed", verify=False)
        del exportable
        extra["onnxruntime"] = {"export_s": time.perf_counter() - started}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        feed = {"images": images.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        fns["onnxruntime"] = lambda: dict(zip(names, (torch.from_numpy(a) for a in session.run(None, feed))))
        gc.collect()

    outputs, warmup_s, peaks, times = {}, {}, {}, {v: [] for v in fns}
    for variant, fn in fns.items():
        started = time.perf_counter()
        outputs[variant] = {k: v.float() for k, v in fn().items()}  # the warm-up (for compile: the compilation)
        warmup_s[variant] = time.perf_counter() - started
        print(f"[{name}] {variant}: warm-up {warmup_s[variant]:.1f} s", flush=True)
    loads = []
    for r in range(ROUNDS):
        for variant, fn in fns.items():
            with PeakRSS() as peak:
                started = time.perf_counter()
                fn()
                times[variant].append((time.perf_counter() - started) * 1e3)
            peaks[variant] = max(peaks.get(variant, 0.0), peak.mib)
            print(f"[{name}] round {r}: {variant} {times[variant][-1]:.0f} ms (+{peak.mib:.0f} MiB)", flush=True)
        loads.append(os.getloadavg()[0])
    if profiling:
        for variant in ("reference", "autocast_bf16", "rexfast_bf16"):
            _profile_table(fns[variant], profile_path, f"{name} {variant}")

    base = _logits(outputs["rexfast_fp32"])
    ref_ms = Timing(times["reference"])
    for variant in fns:
        timing = Timing(times[variant])
        got = _logits(outputs[variant])
        rel = float((got.double() - base.double()).norm() / base.double().norm())
        agree = float((_decisions(name, got) == _decisions(name, base)).float().mean())
        record(SUITE, {"device_type": "cpu", "model": name, "batch": 1, "image": SIZE, "variant": variant,
                       **timing.fields("fwd"), "peak_rss_MiB": peaks[variant], "warmup_s": warmup_s[variant],
                       **extra.get(variant, {}), "speedup_vs_reference": float(ref_ms) / float(timing),
                       "logits_rel_err_vs_rexfast_fp32": rel, "mask_agreement_vs_rexfast_fp32": agree,
                       "torch_threads": torch.get_num_threads(), "loadavg_1min_per_round": loads})
    benchmark.extra_info.update({v: float(Timing(t)) for v, t in times.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _matmul_tflops(dtype, n=4096, rounds=3):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ms = median_ms(lambda: a @ b, "cpu", rounds=rounds, warmup=1)
    return 2 * n**3 / float(ms) / 1e9


@pytest.mark.slow
def test_cpu_mask_head_convolutions_vs_matmul_ceiling(benchmark):
    """CGFormer's two mask-head 3×3 convs (512→512 at 240² and 480², ~1.36 TFLOP at 480² input):
    achieved TFLOP/s, next to a large matmul in the same dtype (the ceiling)."""
    row = {"device_type": "cpu", "model": "cgformer mask-head convs", "variant": "ceilings"}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        row[f"matmul_4096_{tag}_TFLOPs"] = _matmul_tflops(dtype)
        for side in (240, 480):
            conv = torch.nn.Conv2d(512, 512, 3, padding=1).to(dtype).to(memory_format=torch.channels_last).eval()
            x = torch.randn(1, 512, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ms = median_ms(lambda: conv(x), "cpu", rounds=3, warmup=1)
            row[f"conv3x3_{side}_{tag}_ms"] = float(ms)
            row[f"conv3x3_{side}_{tag}_TFLOPs"] = 2 * 512 * 512 * 9 * side * side / float(ms) / 1e9
    row["bf16_native"] = __import__("rexfast").info()["cpu_native_bf16"]
    record(SUITE, row)
    print(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("name", ["rela", "cgformer"])
def test_cpu_demo_training_step_fp32_vs_bf16(benchmark, name):
    """The demo preset's training step (B = 16, 64², the demo's batch and size): reference
    backends fp32, rexfast fp32, rexfast bf16 autocast (what ``train.precision=bf16`` runs)."""
    from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig

    torch.manual_seed(0)
    if name == "rela":
        fused = ReLA(ReLAConfig.demo())
        ref = ReLA(ReLAConfig.demo(), ops_backend="reference", region_masks_at_key_resolution=False)
    else:
        fused = CGFormer(CGFormerConfig.demo(no_target_head=True))
        ref = CGFormer(CGFormerConfig.demo(no_target_head=True), ops_backend="reference", fused=False)
    ref.load_state_dict(fused.state_dict())
    images, ids, mask = _inputs(b=16, size=64)
    targets = (torch.rand(16, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.7).float()

    def step(model, amp):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                _, losses = model(images, ids, mask, targets=targets)
            sum(losses.values()).backward()
            for p in model.parameters():
                p.grad = None
        return fn

    row = {"device_type": "cpu", "model": f"{name} demo", "batch": 16, "image": 64, "variant": "train_step"}
    for variant, model, amp in (("reference_fp32", ref, False), ("rexfast_fp32", fused, False),
                                ("rexfast_bf16", fused, True)):
        model.train()
        row.update(median_ms(step(model, amp), "cpu", rounds=5, warmup=2).fields(variant))
        print(f"[{name} demo train] {variant}: {row[f'{variant}_ms']:.0f} ms", flush=True)
    row["bf16_speedup_vs_reference_fp32"] = row["reference_fp32_ms"] / row["rexfast_bf16_ms"]
    row["bf16_speedup_vs_rexfast_fp32"] = row["rexfast_fp32_ms"] / row["rexfast_bf16_ms"]
    record(SUITE, row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cpu_training_step_full_size(benchmark, name):
    """The released architectures' training step on this CPU: B = 2, 480², forward with the
    losses, backward and AdamW; reference backends fp32 (the authors' way), rexfast fp32,
    rexfast bf16 autocast, and with ``REXFAST_BENCH_TRAIN_COMPILE=1`` (or a comma-separated list
    of model names; minutes of compilation each) rexfast bf16 autocast under ``torch.compile``.
    Each variant runs in a process of its own (``benchmarks/cpu_train_step.py``) so that its
    peak resident memory (``ru_maxrss``) is its own. ``REXFAST_BENCH_TRAIN_ROUNDS`` timed steps
    after one warm-up (default 2: a CGFormer reference step takes about a minute on 2 cores)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rounds = int(os.environ.get("REXFAST_BENCH_TRAIN_ROUNDS", "2"))
    script = Path(__file__).with_name("cpu_train_step.py")
    row = {"device_type": "cpu", "model": name, "batch": 2, "image": SIZE, "variant": "train_step"}
    variants = ["reference_fp32", "rexfast_fp32", "rexfast_bf16"]
    if _enabled("REXFAST_BENCH_TRAIN_COMPILE", name):
        variants.append("rexfast_bf16_compile")
    for variant in variants:
        done = subprocess.run([sys.executable, str(script), name, variant, str(rounds)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(Timing(got["times_ms"]).fields(variant))
        row[f"{variant}_peak_rss_MiB"] = got["peak_rss_MiB"]
        row[f"{variant}_step_rss_MiB"] = got["peak_rss_MiB"] - got["rss_before_first_step_MiB"]
        row[f"{variant}_warmup_s"] = got["warmup_s"]
        print(f"[{name} train B=2] {variant}: {row[f'{variant}_ms']:.0f} ms, peak {got['peak_rss_MiB']:.0f} MiB",
              flush=True)
    for variant in variants[1:]:
        row[f"{variant}_speedup_vs_reference"] = row["reference_fp32_ms"] / row[f"{variant}_ms"]
        row[f"{variant}_peak_vs_reference"] = row[f"{variant}_peak_rss_MiB"] / row["reference_fp32_peak_rss_MiB"]
    row["loadavg_1min"] = os.getloadavg()[0]
    record("cpu_training", row)  # a file of its own: a training-only run must not replace the inference rows
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
