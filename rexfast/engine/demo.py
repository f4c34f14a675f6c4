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

from ..io import atomic_write_json, atomic_write_text, check_output_dir
from . import builders
from .builders import load_model
from .config import Config, DataConfig, TrainConfig, model_section, save_config
from .evaluator import evaluate
from .inference import predict_batch

FULL = dict(n_train=4000, n_val=200, n_test=400, image_size=64, batch_size=16, lr=1e-3)
QUICK = dict(n_train=96, n_val=16, n_test=32, image_size=32, batch_size=8, lr=1e-3)
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


def _overlays(model, dataset, out_dir: Path, count: int, device) -> list[str]:
    from PIL import Image, ImageDraw

    from .predictor import overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(dataset))):
        item = dataset.get(i, None)
        batch = builders.collate([item], device)
        gt = builders.original_mask(item).numpy().astype(bool)
        (pred,) = predict_batch(model, batch, [gt.shape])
        image = builders.original_image(item)
        scale = max(1, 192 // max(gt.shape))
        tiles = [image, overlay(image, gt), overlay(image, pred.shown_mask.cpu().numpy())]
        canvas = Image.new("RGB", (3 * gt.shape[1] * scale + 20, gt.shape[0] * scale + 30), "white")
        for j, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((gt.shape[1] * scale, gt.shape[0] * scale), Image.NEAREST)
            canvas.paste(big, (j * (gt.shape[1] * scale + 10), 30))
        verdict = "  → no target" if pred.no_target else ""
        ImageDraw.Draw(canvas).text((2, 2), f"{builders.sentence_of(item)!r}   image | truth | prediction{verdict}",
                                    fill="black")
        path = out_dir / f"overlay_{i:03d}.png"
        canvas.save(path)
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
    before = evaluate(optimize(untrained, precision=precision, compile=compile), test_set, task="gres", batch_size=32, device="cpu")

    print(f"[demo] training ({'quick' if quick else f'{minutes:g} min budget'})")
    summary = train(cfg, progress=progress)

    trained = optimize(load_model(summary["best_checkpoint"]).model, precision=precision, compile=compile)
    after = evaluate(trained, test_set, task="gres", batch_size=32, device="cpu")

    table = _table(before, after)
    print("\n[demo] held-out synthetic test split (GRES metrics, %):\n" + table)
    overlays = _overlays(trained, test_set, out / "overlays", 4 if quick else 12, torch.device("cpu"))
    result = {
        "model": model, "precision": trained.optimization.precision, "untrained": before, "trained": after, "train": summary, "overlays": overlays,
        "training_curve": summary["training_curve"], "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "demo_metrics.json", result)
    atomic_write_text(out / "demo_table.txt", table + "\n")
    print(f"[demo] wrote {out / 'demo_metrics.json'}, {len(overlays)} overlays in {out / 'overlays'}, "
          f"{summary['training_curve']} ({result['seconds'] / 60:.1f} min)")
    return result
