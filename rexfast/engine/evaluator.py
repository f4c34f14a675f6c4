"""Evaluation: predictions at each image's original resolution, RES/GRES metrics.

As in the official CGFormer evaluation (``engine.inference``), the model runs
at its input size, the mask probabilities (sigmoid of the logits) are resized
to the original image size (bicubic, align_corners=True) and thresholded at
0.5; an empty predicted mask is a no-target prediction (GRES).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import builders, checkpoint


@torch.no_grad()
def predict_masks(model, batch: dict, sizes: list[tuple[int, int]], threshold: float = 0.5, amp_dtype=None):
    """Boolean masks, one per sample, at the given (H, W) sizes."""
    device = batch["image"].device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(batch["image"], batch["input_ids"], batch["attention_mask"])
    probs = logits.float().sigmoid()
    masks = []
    for i, (h, w) in enumerate(sizes):
        resized = F.interpolate(probs[i : i + 1], size=(h, w), mode="bicubic", align_corners=True)
        masks.append(resized[0, 0] > threshold)
    return masks


@torch.no_grad()
def evaluate(model, dataset, *, task: str, batch_size: int = 8, device="cpu", amp_dtype=None, threshold=0.5,
             max_samples: int | None = None, progress: bool = False) -> dict:
    from rexfast.metrics import GRESMetrics, RESMetrics

    was_training = model.training
    model.eval()
    meter = GRESMetrics() if task == "gres" else RESMetrics()
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    starts = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", dynamic_ncols=True)
    for start in starts:
        items = [dataset.get(i, None) for i in range(start, min(start + batch_size, count))]
        batch = builders.collate(items, device)
        gts = [builders.original_mask(item) for item in items]
        preds = predict_masks(model, batch, [tuple(g.shape[-2:]) for g in gts], threshold, amp_dtype)
        for pred, gt, item in zip(preds, gts, items):
            builders.update_metrics(meter, pred.cpu(), gt.bool(), item)
    if was_training:
        model.train()
    return meter.compute()


def evaluate_checkpoint(path, *, split=None, overrides=(), out=None, batch_size=8, device="auto",
                        max_samples=None) -> dict:
    """Load a rexfast checkpoint and evaluate it; optionally write the metrics as JSON."""
    from .config import Config, apply_overrides

    ckpt = checkpoint.load(path)
    cfg = Config.from_dict(apply_overrides(ckpt["config"], list(overrides)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = builders.tokenizer_from_vocab(ckpt["vocab"], cfg.data)
    model = builders.build_model(cfg, tokenizer)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    split = split or cfg.data.val_split
    dataset = builders.build_dataset(cfg.data, split, train=False, tokenizer=tokenizer)
    metrics = evaluate(model, dataset, task=builders.task_of(cfg.data), batch_size=batch_size, device=device,
                       max_samples=max_samples, progress=True)
    metrics = {"checkpoint": str(path), "dataset": cfg.data.dataset, "split": split, **metrics}
    if out:
        write_json_atomic(metrics, out)
    return metrics


def write_json_atomic(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
