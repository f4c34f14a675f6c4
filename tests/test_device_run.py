"""benchmarks/run_device.sh and the benchmark plumbing it relies on, checked without a GPU.

The script's one call on a lent GPU is the only chance to measure there, so what can be
checked here is: its syntax and options, that every test file and benchmark case it names
exists (the old script pointed compute-sanitizer at a file that did not), that the rows file
survives a kill, that the torch.compile baselines cannot silently run eager, and that a
missing CUDA build fails instead of skipping. `.ci/run` also runs the whole script with
``--dry-run``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_device.sh"


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def _bench_utils():
    spec = importlib.util.spec_from_file_location("rexfast_bench_utils", ROOT / "benchmarks" / "bench_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the script
def test_script_parses_and_rejects_unknown_arguments():
    assert _run(["bash", "-n", str(SCRIPT)]).returncode == 0
    bad = _run(["bash", str(SCRIPT), "--bogus"])
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    assert "--dry-run" in _run(["bash", str(SCRIPT), "--help"]).stdout


def test_every_file_and_case_the_script_names_exists():
    listing = _run(["bash", str(SCRIPT), "--list"])
    assert listing.returncode == 0, listing.stderr
    entries = [line.split(" ", 1) for line in listing.stdout.splitlines()]
    kinds = {kind for kind, _ in entries}
    assert kinds == {"tests", "sanitizer", "bench", "model"}, kinds
    for kind, what in entries:
        path = what.split("::")[0].split(" -k ")[0]
        assert (ROOT / path).is_file(), f"{kind}: {path} does not exist"
    # the benchmark cases resolve to collected tests (a typo'd parameter id would only show on the GPU)
    cases = [what for kind, what in entries if kind in ("bench", "model")]
    collected = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *cases])
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert f"{len(cases)} tests collected" in collected.stdout, collected.stdout[-500:]


# ----------------------------------------------------------------------------- rows survive a kill
def test_rows_are_appended_as_they_are_recorded(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv("REXFAST_BENCH_ROWS", str(rows))
    bench = _bench_utils()
    bench.record("probe", {"device_type": "cpu", "variant": "a", "ms": 1.5})
    bench.record("probe", {"device_type": "cpu", "variant": "b", "ms": 2.5})
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [line.get("row", {}).get("variant") for line in lines] == [None, "a", "b"]
    assert lines[0]["environment"]["torch"] == torch.__version__
    # a kill mid-write leaves a cut line: the summary says so and keeps the rest
    with open(rows, "a") as f:
        f.write('{"suite": "probe", "row": {"varia')
    out = _run([sys.executable, "benchmarks/summarize.py", "--brief", str(rows)])
    assert out.returncode == 0, out.stderr
    assert "incomplete line" in out.stdout and "| a | 1.5 |" in out.stdout and "| b | 2.5 |" in out.stdout


# ----------------------------------------------------------------------------- compile baselines
def _toy(x):
    return (x * 2).sin().sum(-1)


def test_compile_fresh_compiles_every_shape(monkeypatch, fresh_dynamo):
    # More shapes than dynamo's recompile limit (8), each with and without grad, as the
    # group_assign benchmark runs them: each case starts from an empty cache and compiles twice.
    monkeypatch.setenv("REXFAST_BENCH_DRY_RUN", "1")  # dynamo's eager backend: tracing and guards, no C++
    bench = _bench_utils()
    for n in range(1, 11):
        compiled = bench.compile_fresh(_toy, dynamic=False)
        x = torch.randn(n, 3, requires_grad=True)
        with bench.no_silent_eager():
            with torch.no_grad():
                compiled(x)
            compiled(x).sum().backward()
        stats = bench.compile_stats(compiled)
        assert (stats["compile_cache_entries"], stats["compile_recompiles"]) == (2, 1), (n, stats)
        assert stats["compile_backend"] == "eager"


def test_one_compiled_function_over_many_shapes_fails_loudly(monkeypatch, fresh_dynamo):
    # The old benchmark's pattern: one compiled function for every shape. Past the limit dynamo
    # would have run eager without a word; under no_silent_eager it raises.
    monkeypatch.setenv("REXFAST_BENCH_DRY_RUN", "1")
    bench = _bench_utils()
    compiled = bench.compile_fresh(_toy, dynamic=False)
    with pytest.raises(Exception, match="(?i)limit"):
        with bench.no_silent_eager():
            for n in range(1, 12):
                compiled(torch.randn(n, 3))


def test_compile_stats_refuses_a_baseline_that_never_compiled(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("REXFAST_BENCH_DRY_RUN", "1")
    bench = _bench_utils()
    with pytest.raises(RuntimeError, match="never compiled"):
        bench.compile_stats(bench.compile_fresh(_toy, dynamic=False))


# ----------------------------------------------------------------------------- a CUDA-less build fails
class _NoGpuBackends:
    def available(self, device_type):
        return ["reference"]

    def why_unavailable(self, name, device_type):
        return "rexfast._C was built without CUDA"


def test_require_cuda_turns_a_missing_gpu_backend_into_a_failure(monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    try:
        from harness import require_backend
    finally:
        sys.path.pop(0)
    spec = type("Spec", (), {"name": "probe", "backends": _NoGpuBackends()})()
    monkeypatch.delenv("REXFAST_REQUIRE_CUDA", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_backend(spec, "cuda", "cuda")
    monkeypatch.setenv("REXFAST_REQUIRE_CUDA", "1")
    with pytest.raises(pytest.fail.Exception, match="built without CUDA"):
        require_backend(spec, "cuda", "cuda")


def test_require_cuda_stops_a_session_that_sees_no_gpu():
    env = {**os.environ, "REXFAST_REQUIRE_CUDA": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                "tests/ops/test_group_assign_gpu.py"], env=env)
    assert out.returncode == 4, out.stdout[-1000:] + out.stderr[-1000:]
    assert "sees no CUDA device" in out.stdout + out.stderr
