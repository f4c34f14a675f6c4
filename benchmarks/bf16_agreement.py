"""bf16 against fp32 with trained weights: the GRES metrics of ``rexfast.optimize(model,
precision=...)`` for both precisions on a checkpoint's held-out split, the share of pixels
whose decision agrees, and the no-target decisions that agree. A model that draws Gumbel noise at
eval (the CGFormer demo preset, ``eval_noise=True``) gets the same torch seed before each
precision's pass, so both draw the same noise and only the precision differs.

    python benchmarks/bf16_agreement.py runs/demo/train/best.pt [more checkpoints] [--split test]
        [--island sem_seg_head.pixel_decoder]

``--island NAME`` (repeatable) adds a third pass, ``bf16_island``: the bf16 model with NAME kept
in float32 as ``optimize`` keeps its own islands (float32 weights unrounded, floating inputs cast
up and outputs cast back at its boundary). That is how an island is judged: kept only where
its row agrees with fp32 better than the plain bf16 row by more than the targets allow.

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


def with_islands(model, bf16_model, names):
    """``bf16_model`` with the submodules ``names`` float32 again, as ``optimize`` keeps its islands."""
    from rexfast.engine.optimize import _CastInputs, _CastOutputs

    for name in names:
        island = bf16_model.get_submodule(name)
        island.float()
        island.load_state_dict(model.get_submodule(name).state_dict())  # the unrounded float32 weights
        island.register_forward_pre_hook(_CastInputs(), with_kwargs=True)
        island.register_forward_hook(_CastOutputs(torch.bfloat16))
    return bf16_model


def agreement(checkpoint: str, split: str, batch_size: int, islands=()) -> dict:
    loaded = load_model(checkpoint)
    dataset = builders.build_dataset(loaded.config.data, split, train=False, tokenizer=loaded.tokenizer)
    task = task_of(loaded.config.data.dataset)
    models = {p: rexfast.optimize(loaded.model, precision=p) for p in ("fp32", "bf16")}
    names = dict(loaded.model.named_modules())
    islands = [name for name in islands if name in names]  # a CGFormer has no pixel decoder: plain bf16 only
    if islands:
        models["bf16_island"] = with_islands(loaded.model, rexfast.optimize(loaded.model, precision="bf16"), islands)
    out = {"checkpoint": checkpoint, "model": loaded.config.model.name, "seed": loaded.config.train.seed,
           "split": split, "fp32_modules": list(models["bf16"].optimization.fp32_modules),
           "islands_of_bf16_island": list(islands)}
    for precision, model in models.items():
        torch.manual_seed(0)  # a model that draws Gumbel noise at eval (CGFormer demo) draws the same for both
        out[precision] = evaluate(model, dataset, task=task, batch_size=batch_size, device="cpu")
    variants = [v for v in models if v != "fp32"]
    same, nt_same, total, n = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0), 0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset.get(i, None) for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate(items, "cpu")
            sizes = [tuple(eval_mask(item).shape[-2:]) for item in items]
            answers = {}
            for precision in models:
                torch.manual_seed(start)  # the same noise seeds for every precision, batch by batch
                answers[precision] = predict_batch(models[precision], batch, sizes)
            for i, a in enumerate(answers["fp32"]):
                total += a.mask.numel()
                n += 1
                for v in variants:
                    same[v] += int((a.mask == answers[v][i].mask).sum())
                    nt_same[v] += int(a.no_target == answers[v][i].no_target)
    out.update(pixel_agreement=same["bf16"] / total, no_target_decisions_equal=nt_same["bf16"], samples=n,
               metric_delta_bf16_minus_fp32={k: out["bf16"][k] - out["fp32"][k] for k in out["fp32"]
                                             if isinstance(out["fp32"][k], float)})
    if islands:
        out.update(pixel_agreement_bf16_island=same["bf16_island"] / total,
                   no_target_decisions_equal_bf16_island=nt_same["bf16_island"],
                   metric_delta_bf16_island_minus_fp32={k: out["bf16_island"][k] - out["fp32"][k] for k in out["fp32"]
                                                        if isinstance(out["fp32"][k], float)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--island", action="append", default=[], metavar="NAME",
                        help="also measure bf16 with this submodule float32 (repeatable)")
    args = parser.parse_args()
    bench_utils.results_dir()  # with REXFAST_BENCH_RECORD=1: refuse a dirty tree before the work, not after
    for checkpoint in args.checkpoints:
        row = agreement(checkpoint, args.split, args.batch_size, args.island)
        print(json.dumps(row, indent=1), flush=True)
        bench_utils.record("bf16_agreement", {"device_type": "cpu", **row})
    bench_utils.write_results()


if __name__ == "__main__":
    main()
