"""Evaluation: RES/GRES metrics of a model on a dataset split, as the official
evaluations compute them (see :mod:`rexfast.engine.inference` and
:mod:`rexfast.metrics`): predictions at each image's original resolution, and
for a model with a no-target head its no-target decision handed to the GRES
metrics.
"""

from __future__ import annotations

import torch

from ..io import atomic_write_json, check_output_file
from . import builders
from .builders import load_model
from .inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD, predict_batch
from .device import resolve_device


@torch.no_grad()
def evaluate(model, dataset, *, task: str, batch_size: int = 8, device="cpu", amp_dtype=None,
             mask_threshold: float = MASK_THRESHOLD, no_target_threshold: float = NO_TARGET_THRESHOLD,
             max_samples: int | None = None, progress: bool = False) -> dict:
    """The metric table of ``model`` on the first ``max_samples`` samples of ``dataset`` (all by default),
    at the evaluators' thresholds (0.5 and 0.5; see :mod:`rexfast.engine.inference`)."""
    from rexfast.metrics import GRESMetrics, RESMetrics

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
    was_training = model.training
    model.eval()
    meter = GRESMetrics() if task == "gres" else RESMetrics()
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    starts = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", dynamic_ncols=True)
    try:
        for start in starts:
            items = [dataset.get(i, None) for i in range(start, min(start + batch_size, count))]
            batch = builders.collate(items, device)
            gts = [builders.eval_mask(item) for item in items]
            preds = predict_batch(model, batch, [tuple(g.shape[-2:]) for g in gts], mask_threshold=mask_threshold,
                                  no_target_threshold=no_target_threshold, amp_dtype=amp_dtype)
            for pred, gt, item in zip(preds, gts, items):
                if task == "gres":
                    meter.update(pred.mask.cpu(), gt, no_target=bool(item.get("no_target", not gt.any())),
                                 pred_no_target=pred.no_target)
                else:
                    meter.update(pred.mask.cpu(), gt)
    finally:
        if was_training:
            model.train()
    return meter.compute()


def evaluate_checkpoint(path, *, split=None, overrides=(), out=None, batch_size=8, device="auto",
                        max_samples=None, tokenizer=None, precision="fp32", compile=False, progress=True) -> dict:
    """Evaluate a training checkpoint or a model folder, run as :func:`rexfast.optimize`
    prepares it (``precision``: fp32 | bf16 | auto; fp32 by default, so that the table is the
    model's reference numbers); optionally write the metrics as JSON."""
    from .optimize import optimize
    from .precision import check_precision

    check_precision(precision, "--precision")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be a positive integer, got {max_samples}")
    if out:
        check_output_file(out, "--out")
    device = resolve_device(device)
    loaded = load_model(path, overrides=overrides, tokenizer=tokenizer, device=device)
    cfg = loaded.config
    split = split or cfg.data.val_split
    try:
        dataset = builders.build_dataset(cfg.data, split, train=False, tokenizer=loaded.tokenizer)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (data.root is {cfg.data.root}; point it elsewhere with "
                                "--set data.root=PATH)") from None
    model = optimize(loaded.model, precision=precision, compile=compile)
    torch.manual_seed(0)  # a model that draws noise at inference (CGFormer eval_noise) scores the same every run
    metrics = evaluate(model, dataset, task=builders.task_of(cfg.data), batch_size=batch_size, device=device,
                       max_samples=max_samples, progress=progress)
    metrics = {"checkpoint": str(path), "model": cfg.model.name, "dataset": cfg.data.dataset, "split": split,
               "precision": model.optimization.precision, **metrics}
    if out:
        atomic_write_json(out, metrics)
    return metrics


__all__ = ["evaluate", "evaluate_checkpoint"]
