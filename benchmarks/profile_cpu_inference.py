"""Where a full-size CPU forward spends its time: torch.profiler top-operator tables (self CPU
time) and the dtype-conversion counts (``aten::copy_``, ``aten::_to_copy``, ``aten::to``) of the
fp32 reference and of ``rexfast.optimize(precision=...)``, one forward each after a warm-up.

    python benchmarks/profile_cpu_inference.py [--models rela_swinb,rela_r50,cgformer]
        [--variants reference,rexfast_bf16] [--rows 12] [--threads N]

Same models and inputs as ``test_bench_cpu_inference.py`` (B = 1, 480², 20-token sentences,
random weights). Prints one markdown table per model and variant and writes them, with a JSON
copy, to ``benchmarks/.results/profile-cpu_inference.{md,json}``. The operator *counts* do not
depend on the machine's load; the times do, so quote times only from a quiet machine (the
1-minute load average is printed with each table).

It uses only APIs that older commits have too: to get the "before" table of a change, run this
file from the newer tree against the older package, e.g.
``PYTHONPATH=/path/to/old/checkout python benchmarks/profile_cpu_inference.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_utils import SCRATCH_DIR, device_name, git_commit  # noqa: E402
from test_bench_cpu_inference import MODELS, _inputs, _reference  # noqa: E402

VARIANTS = ("reference", "rexfast_fp32", "rexfast_bf16")
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to")


def _build(name: str, variant: str):
    import rexfast

    reference = _reference(name)
    if variant == "reference":
        return reference
    return rexfast.optimize(reference, precision=variant.removeprefix("rexfast_"))


def profile_one(model, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    images, ids, mask = _inputs()
    with torch.no_grad():
        model.inference_outputs(images, ids, mask)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.inference_outputs(images, ids, mask)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    by_name = {e.key: e for e in events}
    return {
        "total_self_cpu_ms": total_us / 1e3,
        "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "share": e.self_cpu_time_total / total_us, "calls": e.count} for e in top],
        "casts": {op: {"calls": by_name[op].count if op in by_name else 0,
                       "self_cpu_ms": by_name[op].self_cpu_time_total / 1e3 if op in by_name else 0.0}
                  for op in CASTS},
        "loadavg_1min": os.getloadavg()[0],
    }


def markdown(name: str, variant: str, got: dict) -> str:
    lines = [f"### {name} {variant}: {got['total_self_cpu_ms']:.0f} ms self CPU in total "
             f"(load {got['loadavg_1min']:.1f})", "", "| operator | self CPU ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['self_cpu_ms']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |" for r in got["top"]]
    lines.append("")
    lines.append("casts: " + ", ".join(f"`{op}` {c['calls']} calls ({c['self_cpu_ms']:.1f} ms)"
                                       for op, c in got["casts"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--variants", default="reference,rexfast_bf16",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rows", type=int, default=12, help="operators per table")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    models, variants = args.models.split(","), args.variants.split(",")
    for value, allowed, what in ((models, MODELS, "--models"), (variants, VARIANTS, "--variants")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}, choose from {list(allowed)}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be a positive integer")
        torch.set_num_threads(args.threads)
    import rexfast

    header = {"device": device_name("cpu"), "cpu_native_bf16": rexfast.info().get("cpu_native_bf16"),
              "torch": torch.__version__, "rexfast_path": str(Path(rexfast.__file__).parent),
              "git_commit_of_this_script": git_commit(), "torch_threads": torch.get_num_threads()}
    print(json.dumps(header), flush=True)
    results, text = {"environment": header, "profiles": {}}, []
    for name in models:
        for variant in variants:
            model = _build(name, variant)
            got = profile_one(model, args.rows)
            del model
            results["profiles"][f"{name} {variant}"] = got
            text.append(markdown(name, variant, got))
            print(text[-1], flush=True)
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    (SCRATCH_DIR / "profile-cpu_inference.md").write_text(json.dumps(header) + "\n\n" + "\n".join(text))
    (SCRATCH_DIR / "profile-cpu_inference.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
