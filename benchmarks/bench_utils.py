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
_ROWS: dict[str, list[dict]] = defaultdict(list)
_CEILINGS: dict[str, dict] = {}


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
    """Median wall time of ``fn()`` in milliseconds, with its spread."""
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
        src = torch.randn(2**25)  # 128 MiB fp32, well past the caches
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), "cpu")
        out = {"copy_GBps": 2 * src.numel() * 4 / ms / 1e6}
    _CEILINGS[device] = out
    return out


def record(suite: str, row: dict) -> None:
    _ROWS[suite].append(row)


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
