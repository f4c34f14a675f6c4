"""Shared benchmark plumbing (imported by the benchmark modules and conftest.py): timing, device ceilings, and JSON results.

Every benchmark module records rows with :func:`record`; at the end of the
session the rows are written as ``<suite>-<device>.json`` together with the
device name, torch/triton versions and the git commit, and a side-by-side table
is printed. By default they go to ``benchmarks/.results/`` (ignored by git), so
running the benchmarks leaves the tree clean; ``REXFAST_BENCH_RECORD=1`` writes
the tracked ``benchmarks/results/`` instead, and only from a clean tree (the
recorded commit must be the code that ran). Timings are medians with their
spread (min, max, quartiles): CUDA via ``triton.testing.do_bench``, CPU via
``time.perf_counter``.

Three switches serve ``benchmarks/run_device.sh``, whose one call on a lent GPU must
keep what it measured even when it is killed at its time limit:

``REXFAST_BENCH_ROWS=<file.jsonl>``
    every row is also appended to that file (one JSON object per line, flushed and
    fsynced) the moment it is recorded, so a kill loses at most the case in flight;
    the session-end JSON files are written as well.
``REXFAST_BENCH_DEADLINE=<unix time>``
    a benchmark that would start after it is skipped, with that reason (conftest.py).
``REXFAST_BENCH_DRY_RUN=1``
    the GPU benchmarks run on CPU at tiny shapes, Triton under its interpreter
    (``TRITON_INTERPRET=1``), ``torch.compile`` with dynamo's ``eager`` backend and
    every timing one call: seconds per case, so the script's every step is exercised
    without a GPU. The numbers mean nothing; the rows say ``dry_run``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"  # tracked: REXFAST_BENCH_RECORD=1 from a clean tree
SCRATCH_DIR = Path(__file__).parent / ".results"  # ignored: every other run
RECORD_ENV = "REXFAST_BENCH_RECORD"
ROWS_ENV = "REXFAST_BENCH_ROWS"
DRY_RUN_ENV = "REXFAST_BENCH_DRY_RUN"
_ROWS: dict[str, list[dict]] = defaultdict(list)
_CEILINGS: dict[str, dict] = {}


def dry_run() -> bool:
    """True under ``REXFAST_BENCH_DRY_RUN=1`` (see the module docstring)."""
    return os.environ.get(DRY_RUN_ENV) == "1"


def gpu_bench_device() -> str | None:
    """Where the GPU benchmarks run: ``"cuda"`` with a GPU, ``"cpu"`` in a dry run, else None (skip)."""
    if dry_run():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


GPU_BENCH_SKIP = "needs a CUDA device (or REXFAST_BENCH_DRY_RUN=1 for the tiny CPU rehearsal)"


def triton_variant_runs(device: str) -> bool:
    """Benchmark the Triton backend on ``device``: on CUDA, and on CPU only in a dry run
    (the interpreter: correct but thousands of times slower, meaningless as a timing)."""
    return device == "cuda" or dry_run()


MODEL_COMPILE_ENV = "REXFAST_BENCH_MODEL_COMPILE"


def model_compile_on_gpu() -> bool:
    """Whether the whole-model GPU benchmarks add a ``torch.compile`` variant (default yes;
    ``REXFAST_BENCH_MODEL_COMPILE=0`` leaves it out: compiling Swin-B + BERT forward and
    training step takes minutes, more than run_device.sh's one call can spare). Never in a dry run."""
    return os.environ.get(MODEL_COMPILE_ENV, "1") == "1" and not dry_run()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_bf16_flags() -> dict:
    """What the CPU offers bf16 (recorded with every row: AMX and AVX512-BF16 machines differ
    several-fold): torch's view (``rexfast.info``'s ``cpu_native_bf16``) and the kernel's
    ``/proc/cpuinfo`` flags."""
    from rexfast.engine.precision import cpu_bf16_support

    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu_native_bf16": cpu_bf16_support(),
            "cpu_flags_bf16": sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni"))}


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


class Timing(float):
    """A median in milliseconds (it behaves as that float) that keeps its spread."""

    def __new__(cls, samples):
        samples = sorted(float(x) for x in samples)
        n = len(samples)
        median = samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2])
        self = super().__new__(cls, median)
        self.min, self.max, self.n = samples[0], samples[-1], n
        self.q1, self.q3 = samples[(n - 1) // 4], samples[(3 * (n - 1)) // 4]
        return self

    def fields(self, prefix: str) -> dict:
        """``{prefix}_ms`` (the median) and its spread, for a result row."""
        return {f"{prefix}_ms": float(self), f"{prefix}_min_ms": self.min, f"{prefix}_max_ms": self.max,
                f"{prefix}_q1_ms": self.q1, f"{prefix}_q3_ms": self.q3, f"{prefix}_rounds": self.n}


def median_ms(fn, device: str, *, rounds: int = 7, warmup: int = 2) -> Timing:
    """Median wall time of ``fn()`` in milliseconds, with its spread (a dry run: one call)."""
    if dry_run():
        rounds, warmup = 1, 0
    if device == "cuda":
        import triton.testing

        return Timing(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(times)


def ceilings(device: str) -> dict:
    """The device's measured ceilings: copy bandwidth (GB/s, read+write bytes)
    and, on CUDA, bf16 matmul throughput (TFLOP/s). Measured once per session."""
    if device in _CEILINGS:
        return _CEILINGS[device]
    if device == "cuda":
        src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), "cuda")
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        mm_ms = median_ms(lambda: a @ b, "cuda")
        out = {"copy_GBps": 2 * src.numel() / ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}
    else:
        src = torch.randn(2**20 if dry_run() else 2**25)  # 128 MiB fp32, well past the caches
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), "cpu")
        out = {"copy_GBps": 2 * src.numel() * 4 / ms / 1e6}
    _CEILINGS[device] = out
    return out


def record(suite: str, row: dict) -> None:
    """Keep ``row`` for the session-end files and, with ``REXFAST_BENCH_ROWS``, append it there now."""
    if dry_run():
        row = {**row, "dry_run": True}
    _ROWS[suite].append(row)
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    lines = []
    if len(_ROWS[suite]) == 1:  # a suite's first row in this process: say where it ran, once
        device = row.get("device_type", "cpu")
        lines.append({"suite": suite, "environment": _environment(device, git_commit())})
    lines.append({"suite": suite, "row": row})
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- torch.compile baselines
def compile_fresh(fn, **kwargs):
    """``torch.compile(fn, **kwargs)`` after ``torch._dynamo.reset()``.

    Why: dynamo keys its cache on the code object, and every shape (× grad mode)
    of a ``dynamic=False`` baseline is one more entry. Run many shapes through the
    same lambda and, past ``recompile_limit`` (8), dynamo stops compiling and the
    "compile" rows silently time eager PyTorch. Resetting per benchmark case starts
    each from an empty cache; :func:`compile_stats` then reports how many times it
    compiled. In a dry run the backend is dynamo's ``eager`` (tracing and guards,
    no inductor: a CPU C++ compile would take minutes)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    if dry_run():
        kwargs = {**kwargs, "backend": "eager"}
    compiled = torch.compile(fn, **kwargs)
    compiled._rexfast_code = fn.__code__  # whose cache entries compile_stats counts
    compiled._rexfast_backend = kwargs.get("backend", "inductor")
    return compiled


def compile_stats(compiled) -> dict:
    """Row fields for a :func:`compile_fresh` baseline: how many cache entries dynamo
    holds for its function (one per compile: the first plus each recompile), the frames
    it compiled and the graphs it made since the reset, and the backend. A baseline
    whose top frame was never compiled ran eager: that is an error, not a row."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    entries = len(_debug_get_cache_entry_list(compiled._rexfast_code))
    if entries == 0:
        raise RuntimeError("the torch.compile baseline never compiled its function: its rows would time eager")
    return {"compile_backend": compiled._rexfast_backend, "compile_cache_entries": entries,
            "compile_recompiles": entries - 1, "compile_frames": int(counters["frames"]["ok"]),
            "compile_graphs": int(counters["stats"]["unique_graphs"])}


def no_silent_eager():
    """A context in which dynamo hitting its recompile limit raises instead of running eager."""
    import contextlib

    import torch._dynamo.config as dynamo_config

    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # newer, older spelling
        if hasattr(dynamo_config, name):
            return dynamo_config.patch(**{name: True})
    return contextlib.nullcontext()  # compile_stats still counts the entries


def _environment(device: str, commit: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import rexfast

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "torch_threads": torch.get_num_threads(),
        **(cpu_bf16_flags() if device == "cpu" else {}),
        "rexfast_backends": rexfast.info().get(f"backends_{device}"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def results_dir() -> Path:
    """Where this session's results go (see the module docstring)."""
    if os.environ.get(RECORD_ENV) != "1":
        return SCRATCH_DIR
    commit = git_commit()
    if commit.endswith("-dirty") or commit == "unknown":
        raise RuntimeError(f"{RECORD_ENV}=1 records into benchmarks/results/ only from a clean tree "
                           f"(commit {commit}): commit or stash first")
    return RESULTS_DIR


# ----------------------------------------------------------------------------- memory
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms in a thread
    (torch ops release the GIL)."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


# ----------------------------------------------------------------------------- whole models
def model_batch(b: int, size: int, device, *, no_target_sample: bool = False):
    """A fixed random batch ``(images, input_ids, attention_mask, targets)``: B×3×size² images,
    20 token ids of which 12 are real, targets of ~30% foreground (all empty for sample 0 with
    ``no_target_sample``, for a GRES model's no-target loss)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(1000, 30000, (b, 20), generator=g)
    mask = torch.ones(b, 20, dtype=torch.long)
    mask[:, 12:] = 0
    targets = (torch.rand(b, size, size, generator=g) > 0.7).float()
    if no_target_sample:
        targets[0] = 0
    return tuple(t.to(device) for t in (images, ids, mask, targets))


def model_variants(model_class, config, device, with_compile: bool, fused_options: dict, reference_options: dict):
    """The variants a model benchmark compares, all with the same weights: ``rexfast`` (built
    with ``fused_options``), ``reference`` (``reference_options``: every op on the reference
    backend, no fusions) and, ``with_compile``, ``compile`` (torch.compile of the reference)."""
    torch.manual_seed(0)
    fused = model_class(config, **fused_options).to(device)
    out = {"rexfast": fused}
    for name in ("reference", "compile") if with_compile else ("reference",):
        model = model_class(config, **reference_options).to(device)
        model.load_state_dict(fused.state_dict())
        out[name] = torch.compile(model) if name == "compile" else model
    return out


def measure_models(models, batch, device, amp_dtype, rounds):
    """Forward (eval, no grad) and training-step medians of each model variant on one batch
    ``(images, input_ids, attention_mask, targets)``; on CUDA also peak memory."""
    images, ids, mask, targets = batch
    autocast = lambda: torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    results = {}
    for name, model in models.items():
        def forward():
            with torch.no_grad(), autocast():
                return model(images, ids, mask)

        def train_step():
            with autocast():
                _, losses = model(images, ids, mask, targets=targets)
            sum(losses.values()).backward()
            for p in model.parameters():
                p.grad = None

        row = {}
        for mode, fn in (("fwd", forward), ("train", train_step)):
            model.train(mode == "train")
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                fn()  # also the compile warm-up
                torch.cuda.synchronize()
                row[f"{mode}_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
                row.update(median_ms(fn, device).fields(mode))
            else:
                row.update(median_ms(fn, device, rounds=rounds, warmup=1).fields(mode))
                row[f"{mode}_peak_MiB"] = None  # no allocator statistics on CPU
        results[name] = row
    return results


def measure_and_record(benchmark, suite, models, batch, device, amp_dtype, label, rounds):
    """:func:`measure_models` on ``batch``, its rows recorded under ``suite`` (config ``label``; the
    batch size and image side read from the images) and attached to ``benchmark``; returns them."""
    results = measure_models(models, batch, device, amp_dtype, rounds=rounds)
    images = batch[0]
    dtype = "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    record_model_rows(suite, results, device, label, images.shape[0], images.shape[-1], dtype)
    benchmark.extra_info.update(results)
    return results


def pedantic_train_step(benchmark, model, batch, device, amp_dtype):
    """pytest-benchmark's own timing of ``model``'s training step (forward with losses under
    ``amp_dtype`` autocast, or none, then backward) on ``batch``; one round in a dry run."""
    images, ids, mask, targets = batch
    model.train()

    def step():
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, losses = model(images, ids, mask, targets=targets)
        sum(losses.values()).backward()
        for p in model.parameters():
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=1 if dry_run() else 3, iterations=1, warmup_rounds=0 if dry_run() else 1)


def record_model_rows(suite, results, device, label, batch_size, size, dtype):
    """One row per variant, with its speed-ups over the "reference" (and "compile") variant."""
    for name, row in results.items():
        out = {"device_type": device, "config": label, "batch": batch_size, "image": size, "dtype": dtype,
               "variant": name, **row}
        for mode in ("fwd", "train"):
            out[f"{mode}_speedup_vs_reference"] = results["reference"][f"{mode}_ms"] / row[f"{mode}_ms"]
            if "compile" in results:
                out[f"{mode}_speedup_vs_compile"] = results["compile"][f"{mode}_ms"] / row[f"{mode}_ms"]
            peak, ref_peak = row.get(f"{mode}_peak_MiB"), results["reference"].get(f"{mode}_peak_MiB")
            if peak is not None and ref_peak:
                out[f"{mode}_peak_vs_reference"] = peak / ref_peak
        record(suite, out)


def write_results():
    if not _ROWS:
        return
    target = results_dir()
    # The commit is read once, before the first file is written: writing one suite's
    # file into the tracked folder would make the tree look dirty for the next suite.
    commit = git_commit()
    target.mkdir(parents=True, exist_ok=True)
    for suite, rows in _ROWS.items():
        device = rows[0].get("device_type", "cpu")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", "cuda-" + device_name("cuda") if device == "cuda" else "cpu").strip("-")
        payload = {"suite": suite, "environment": _environment(device, commit), "ceilings": _CEILINGS.get(device), "rows": rows}
        path = target / f"{suite}-{slug.lower()}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\n[{suite}] results written to {path}")
        keys = [k for k in rows[0] if k != "device_type" and not re.search(r"_(q1|q3|min|max)_ms$|_rounds$", k)]
        print("  " + " | ".join(keys))
        for row in rows:
            print("  " + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                    for k in keys))
