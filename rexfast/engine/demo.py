"""``rexfast demo``: the whole job end to end on built-in synthetic GRES data.

1. generate a synthetic gRefCOCO-format dataset (train / val / held-out test);
2. evaluate the *untrained* model on the held-out split (the baseline);
3. train a small CGFormer on the CPU within a time budget;
4. evaluate the trained model on the same held-out split;
5. print both metric tables side by side, and write overlays and a training curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import builders
from .config import Config, DataConfig, ModelConfig, TrainConfig, save_config
from .evaluator import evaluate, predict_masks, write_json_atomic

FULL = dict(n_train=4000, n_val=200, n_test=400, image_size=64, batch_size=16, lr=1e-3)
QUICK = dict(n_train=96, n_val=16, n_test=32, image_size=32, batch_size=8, lr=1e-3)
SHOWN_METRICS = ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.9")


def demo_config(out: Path, quick: bool, minutes: float, seed: int) -> Config:
    p = QUICK if quick else FULL
    return Config(
        data=DataConfig(dataset="synthetic", root=str(out / "data"), image_size=p["image_size"], max_tokens=20,
                        train_split="train", val_split="val"),
        model=ModelConfig(name="cgformer", preset="demo"),
        train=TrainConfig(
            epochs=2 if quick else 1000, max_steps=6 if quick else None,
            time_budget_min=None if quick else minutes, batch_size=p["batch_size"], lr=p["lr"],
            weight_decay=1e-4, warmup_steps=0 if quick else 50, schedule="poly", clip_grad=1.0, amp="off",
            seed=seed, log_every=1 if quick else 10, eval_every=1 if quick else 5, out_dir=str(out / "train"),
            device="cpu", metric="gIoU",
        ),
    )


def _table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<8} {'untrained':>10} {'trained':>10}"]
    for key in SHOWN_METRICS:
        if key in before and key in after:
            lines.append(f"{key:<8} {before[key]:>10.2f} {after[key]:>10.2f}")
    return "\n".join(lines)


def _training_curve(log_path: Path, png_path: Path) -> None:
    """Loss per step (and eval gIoU) drawn with PIL, so the demo needs no plotting library."""
    from PIL import Image, ImageDraw

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["gIoU"]) for r in records if r.get("kind") == "eval" and "gIoU" in r]
    if not train:
        return
    width, height, pad = 640, 360, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    max_step = max(s for s, _ in train) or 1
    max_loss = max(v for _, v in train) or 1.0

    def xy(step, value, top):
        return pad + (width - 2 * pad) * step / max_step, height - pad - (height - 2 * pad) * value / top

    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.line([xy(s, v, max_loss) for s, v in train], fill=(30, 90, 200), width=2)
    if len(evals) > 1:
        draw.line([xy(s, v, 100.0) for s, v in evals], fill=(220, 60, 40), width=2)
    for s, v in evals:
        x, y = xy(s, v, 100.0)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 60, 40))
    draw.text((pad, 10), f"training loss (blue, max {max_loss:.2f}) and val gIoU (red, 0-100) vs step", fill="black")
    draw.text((width - pad - 60, height - pad + 10), f"step {max_step}", fill="black")
    img.save(png_path)


def _overlays(model, dataset, out_dir: Path, count: int, device) -> list[str]:
    from PIL import Image, ImageDraw

    from .predictor import overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(dataset))):
        item = dataset.get(i, None)
        batch = builders.collate([item], device)
        gt = builders.original_mask(item).numpy().astype(bool)
        (pred,) = predict_masks(model, batch, [gt.shape], 0.5)
        image = builders.original_image(item)
        scale = max(1, 192 // max(gt.shape))
        tiles = [image, overlay(image, gt), overlay(image, pred.cpu().numpy())]
        canvas = Image.new("RGB", (3 * gt.shape[1] * scale + 20, gt.shape[0] * scale + 30), "white")
        for j, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((gt.shape[1] * scale, gt.shape[0] * scale), Image.NEAREST)
            canvas.paste(big, (j * (gt.shape[1] * scale + 10), 30))
        ImageDraw.Draw(canvas).text((2, 2), f"{builders.sentence_of(item)!r}   image | truth | prediction",
                                    fill="black")
        path = out_dir / f"overlay_{i:03d}.png"
        canvas.save(path)
        written.append(str(path))
    return written


def run_demo(out_dir="runs/demo", quick=False, minutes=15.0, seed=0, progress=True) -> dict:
    from .trainer import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, quick, minutes, seed)
    p = QUICK if quick else FULL
    started = time.perf_counter()
    print(f"[demo] generating synthetic GRES data in {cfg.data.root}")
    builders.generate_synthetic_data(cfg.data, n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"], seed=seed)
    save_config(cfg, out / "config.yaml")

    tokenizer = builders.build_tokenizer(cfg.data)
    test_set = builders.build_dataset(cfg.data, "test", train=False, tokenizer=tokenizer)
    torch.manual_seed(seed)  # the same initial weights the trainer will start from
    untrained = builders.build_model(cfg, tokenizer)
    print(f"[demo] evaluating the untrained model on {len(test_set)} held-out expressions")
    before = evaluate(untrained, test_set, task="gres", batch_size=32, device="cpu")

    print(f"[demo] training ({'quick' if quick else f'{minutes:g} min budget'})")
    summary = train(cfg, progress=progress)

    from .checkpoint import load

    best = load(summary["best_checkpoint"])
    trained = builders.build_model(cfg, tokenizer)
    trained.load_state_dict(best["model"])
    after = evaluate(trained, test_set, task="gres", batch_size=32, device="cpu")

    table = _table(before, after)
    print("\n[demo] held-out synthetic test split (GRES metrics, %):\n" + table)
    overlays = _overlays(trained, test_set, out / "overlays", 4 if quick else 12, torch.device("cpu"))
    _training_curve(Path(cfg.train.out_dir) / "log.jsonl", out / "training_curve.png")
    result = {
        "untrained": before, "trained": after, "train": summary, "overlays": overlays,
        "training_curve": str(out / "training_curve.png"), "seconds": time.perf_counter() - started,
    }
    write_json_atomic(result, out / "demo_metrics.json")
    (out / "demo_table.txt").write_text(table + "\n")
    print(f"[demo] wrote {out / 'demo_metrics.json'}, {len(overlays)} overlays in {out / 'overlays'}, "
          f"{out / 'training_curve.png'} ({result['seconds'] / 60:.1f} min)")
    return result
