"""bf16 against fp32 with trained weights: the GRES metrics of ``rexfast.optimize(model,
precision=...)`` for both precisions on a checkpoint's held-out split, the share of pixels
whose decision agrees, and the no-target decisions that agree. A model that draws Gumbel noise at
eval (the CGFormer demo preset, ``eval_noise=True``) gets the same torch seed before each
precision's pass, so both draw the same noise and only the precision differs.

    python benchmarks/bf16_agreement.py runs/demo/train/best.pt [more checkpoints] [--split test]

(``rexfast demo`` writes such a checkpoint; its config names the synthetic data.) Prints one
JSON object per checkpoint and records a row each into the ``bf16_agreement`` suite
(``benchmarks/.results/``, or ``benchmarks/results/`` with ``REXFAST_BENCH_RECORD=1`` from a
clean tree: device, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import rexfast
from rexfast.data import collate, eval_mask, task_of
from rexfast.engine import builders
from rexfast.engine.loading import load_model
from rexfast.engine.evaluator import evaluate
from rexfast.engine.inference import predict_batch

sys.path.insert(0, str(Path(__file__).parent))
import bench_utils  # noqa: E402


def agreement(checkpoint: str, split: str, batch_size: int) -> dict:
    loaded = load_model(checkpoint)
    dataset = builders.build_dataset(loaded.config.data, split, train=False, tokenizer=loaded.tokenizer)
    task = task_of(loaded.config.data.dataset)
    models = {p: rexfast.optimize(loaded.model, precision=p) for p in ("fp32", "bf16")}
    out = {"checkpoint": checkpoint, "model": loaded.config.model.name, "seed": loaded.config.train.seed,
           "split": split, "fp32_modules": list(models["bf16"].optimization.fp32_modules)}
    for precision, model in models.items():
        torch.manual_seed(0)  # a model that draws Gumbel noise at eval (CGFormer demo) draws the same for both
        out[precision] = evaluate(model, dataset, task=task, batch_size=batch_size, device="cpu")
    same = total = nt_same = n = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset.get(i, None) for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate(items, "cpu")
            sizes = [tuple(eval_mask(item).shape[-2:]) for item in items]
            answers = []
            for precision in ("fp32", "bf16"):
                torch.manual_seed(start)  # the same noise seeds for both precisions, batch by batch
                answers.append(predict_batch(models[precision], batch, sizes))
            for a, b in zip(*answers):
                same += int((a.mask == b.mask).sum())
                total += a.mask.numel()
                nt_same += int(a.no_target == b.no_target)
                n += 1
    out.update(pixel_agreement=same / total, no_target_decisions_equal=nt_same, samples=n,
               metric_delta_bf16_minus_fp32={k: out["bf16"][k] - out["fp32"][k] for k in out["fp32"]
                                             if isinstance(out["fp32"][k], float)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    bench_utils.results_dir()  # with REXFAST_BENCH_RECORD=1: refuse a dirty tree before the work, not after
    for checkpoint in args.checkpoints:
        row = agreement(checkpoint, args.split, args.batch_size)
        print(json.dumps(row, indent=1), flush=True)
        bench_utils.record("bf16_agreement", {"device_type": "cpu", **row})
    bench_utils.write_results()


if __name__ == "__main__":
    main()
