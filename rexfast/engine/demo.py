"""``rexfast demo``: the whole job end to end on built-in synthetic GRES data.

1. generate a synthetic gRefCOCO-format dataset (train / val / held-out test);
2. evaluate the *untrained* model on the held-out split (the baseline);
3. train a small ReLA (``--model rela``, the default) or CGFormer with its
   no-target head (``--model cgformer``) on the CPU within a time budget (validating on a fixed
   subset of the val split every few minutes);
4. evaluate the best model on the same held-out split;
5. print both metric tables side by side, and write overlays and the training curve.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import collate, original_image, original_mask
from ..io import atomic_write_json, atomic_write_text, check_output_dir
from . import builders
from .loading import load_model
from .config import Config, DataConfig, TrainConfig, model_section, save_config
from .evaluator import evaluate
from .inference import predict_batch

FULL = dict(n_train=4000, n_val=200, n_test=400, image_size=64, batch_size=16, lr=1e-3)
QUICK = dict(n_train=96, n_val=16, n_test=32, image_size=32, batch_size=8, lr=1e-3)
QUICK_NOTE = ("[demo] --quick is a smoke test: it checks that every stage runs, not that the model learns. "
              "{steps} training steps on {n_train} images teach it next to nothing, so the 'trained' column "
              "is the untrained model moved a little at random, and on {n_test} test sentences it can as well "
              "come out lower. A full run (rexfast demo, 15 minutes of training) reaches gIoU about 60 "
              "(README, 'Try it').")
SHOWN_METRICS = ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9")
# the demo preset of each model and the training settings that differ per model
DEMO_MODELS = {"rela": dict(lr=1e-3), "cgformer": dict(lr=1e-3)}


def demo_config(out: Path, quick: bool, minutes: float, seed: int, model: str = "rela",
                precision: str = "fp32") -> Config:
    p = {**(QUICK if quick else FULL), **DEMO_MODELS[model]}
    data = DataConfig(dataset="synthetic", root=str(out / "data"), image_size=p["image_size"], max_tokens=20,
                      train_split="train", val_split="val")
    return Config(
        data=data,
        model=model_section({"name": model, "preset": "demo"}, data),
        train=TrainConfig(
            epochs=2 if quick else 1000, max_steps=6 if quick else None,
            time_budget_min=None if quick else minutes, batch_size=p["batch_size"], lr=p["lr"],
            weight_decay=1e-4, warmup_steps=0 if quick else 50, schedule="poly", clip_grad=1.0, amp="auto",
            precision=precision,
            seed=seed, log_every=1 if quick else 10, eval_every=1 if quick else 5, out_dir=str(out / "train"),
            device="cpu", metric="gIoU", eval_every_min=None if quick else 2.0, eval_subset=None if quick else 250,
        ),
    )


def _table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<8} {'untrained':>10} {'trained':>10}"]
    for key in SHOWN_METRICS:
        if key in before and key in after:
            lines.append(f"{key:<8} {before[key]:>10.2f} {after[key]:>10.2f}")
    return "\n".join(lines)


def _target_count(dataset, index: int) -> int:
    """How many objects sample ``index`` refers to (0: none), from the annotations (no image read)."""
    ref = dataset.refs[dataset.samples[index][0]]
    return 0 if dataset.index.is_no_target(ref) else len(dataset.index.ann_ids(ref))


def pick_examples(dataset, count: int) -> list[int]:
    """``count`` sample indices that take turns between one target, several targets and no
    target, each from an image not shown yet while there is one (in the split's order), so
    that the figures show each kind of answer on different scenes; fewer kinds when the split
    lacks one."""
    kinds = {"one": [], "several": [], "none": []}
    for i in range(len(dataset)):
        n = _target_count(dataset, i)
        kinds["none" if n == 0 else "one" if n == 1 else "several"].append(i)
    queues = [q for q in kinds.values() if q]
    picked: list[int] = []
    shown: set = set()
    count = min(count, len(dataset))
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                fresh = next((i for i in q if dataset.refs[dataset.samples[i][0]]["image_id"] not in shown), q[0])
                q.remove(fresh)
                shown.add(dataset.refs[dataset.samples[fresh][0]]["image_id"])
                picked.append(fresh)
    return picked


def _overlays(model, dataset, out_dir: Path, count: int, device) -> list[str]:
    """One figure per picked example (:func:`pick_examples`): image | truth | prediction."""
    from .plots import example_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for n, i in enumerate(pick_examples(dataset, count)):
        item = dataset.get(i, None)
        batch = collate([item], device)
        gt = original_mask(item).numpy().astype(bool)
        (pred,) = predict_batch(model, batch, [gt.shape])
        shown = pred.shown_mask.cpu().numpy().astype(bool)
        targets = _target_count(dataset, i)
        truth_label = "no target" if targets == 0 else f"{targets} target{'s' if targets > 1 else ''}"
        if pred.no_target:
            prob = "" if pred.no_target_prob is None else f" (p = {pred.no_target_prob:.2f})"
            pred_label = f"no target{prob}"
        elif gt.any():
            pred_label = f"IoU {(shown & gt).sum() / max(1, (shown | gt).sum()):.2f} with the truth"
        else:
            pred_label = f"a mask of {int(shown.sum())} pixels (should be none)"
        path = example_figure(original_image(item), gt, shown, item["sentence"], truth_label,
                              pred_label, out_dir / f"overlay_{n:03d}.png")
        written.append(str(path))
    return written


def run_demo(out_dir="runs/demo", quick=False, minutes=15.0, seed=0, progress=True, model="rela",
             precision="fp32", compile=False) -> dict:
    """``precision`` (fp32 | bf16 | auto) is the training precision (bf16: autocast) and the
    evaluations' (:func:`rexfast.optimize`); ``compile`` compiles the evaluated models."""
    from .optimize import optimize
    from .precision import check_precision, describe
    from .trainer import train

    check_precision(precision, "--precision")
    if model not in DEMO_MODELS:
        raise ValueError(f"--model must be one of {list(DEMO_MODELS)}, got {model!r}")
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    out = check_output_dir(out_dir, "--out")
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, quick, minutes, seed, model, precision)
    p = QUICK if quick else FULL
    started = time.perf_counter()
    print(f"[demo] generating synthetic GRES data in {cfg.data.root}")
    builders.generate_synthetic_data(cfg.data, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"], seed=seed)
    save_config(cfg, out / "config.yaml")

    tokenizer = builders.build_tokenizer(cfg.data)
    test_set = builders.build_dataset(cfg.data, "test", train=False, tokenizer=tokenizer)
    torch.manual_seed(seed)  # the same initial weights the trainer will start from
    untrained = builders.build_model(cfg, tokenizer)
    print(f"[demo] evaluating the untrained {model} on {len(test_set)} held-out expressions")
    print(f"[demo] precision: {describe(precision, 'cpu')}")
    before = evaluate(optimize(untrained, precision=precision, compile=compile), test_set, task="gres", batch_size=32,
                      device="cpu", progress=progress)

    print(f"[demo] training ({'quick' if quick else f'{minutes:g} min budget'})")
    summary = train(cfg, progress=progress)

    trained = optimize(load_model(summary["best_checkpoint"]).model, precision=precision, compile=compile)
    print(f"[demo] evaluating the trained {model} on the same {len(test_set)} expressions")
    after = evaluate(trained, test_set, task="gres", batch_size=32, device="cpu", progress=progress)

    table = _table(before, after)
    print("\n[demo] held-out synthetic test split (GRES metrics, %):\n" + table)
    if quick:
        print(QUICK_NOTE.format(steps=cfg.train.max_steps, n_train=p["n_train"], n_test=len(test_set)))
    overlays = _overlays(trained, test_set, out / "overlays", 4 if quick else 12, torch.device("cpu"))
    result = {
        "model": model, "precision": trained.optimization.precision, "untrained": before, "trained": after, "train": summary, "overlays": overlays,
        "training_curve": summary["training_curve"], "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "demo_metrics.json", result)
    atomic_write_text(out / "demo_table.txt", table + "\n")
    print(f"[demo] wrote {out / 'demo_metrics.json'}, {len(overlays)} overlays in {out / 'overlays'}, "
          f"{summary['training_curve']} ({result['seconds'] / 60:.1f} min)")
    import shlex

    print(f"[demo] see it in a browser (needs the serve extra): rexfast serve {shlex.quote(summary['best_model'])}")
    return result
