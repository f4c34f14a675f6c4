"""Evaluation: RES/GRES metrics of a model on a dataset split, as the official
evaluations compute them (see :mod:`rexfast.engine.inference` and
:mod:`rexfast.metrics`): predictions at each image's original resolution, and
for a model with a no-target head its no-target decision handed to the GRES
metrics.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import collate, eval_mask, task_of
from ..data.predictions import prediction_record, record_line
from ..io import atomic_write_bytes, atomic_write_json, check_output_file
from . import builders
from .loading import load_model
from .inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD, predict_batch
from .device import resolve_device


@torch.no_grad()
def evaluate(model, dataset, *, task: str, batch_size: int = 8, device="cpu", amp_dtype=None,
             mask_threshold: float = MASK_THRESHOLD, no_target_threshold: float = NO_TARGET_THRESHOLD,
             max_samples: int | None = None, progress: bool = False, lines: list | None = None) -> dict:
    """The metric table of ``model`` on the first ``max_samples`` samples of ``dataset`` (all by default),
    at the evaluators' thresholds (0.5 and 0.5; see :mod:`rexfast.engine.inference`).

    ``lines``: a list to which each sample's predictions-file line is appended (see
    :func:`evaluate_checkpoint`'s ``save_predictions``; needs ``dataset.sample_id``)."""
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
            batch = collate(items, device)
            gts = [eval_mask(item) for item in items]
            preds = predict_batch(model, batch, [tuple(g.shape[-2:]) for g in gts], mask_threshold=mask_threshold,
                                  no_target_threshold=no_target_threshold, amp_dtype=amp_dtype)
            for offset, (pred, gt, item) in enumerate(zip(preds, gts, items)):
                if lines is not None:  # the thresholded mask, also for "no target": the metrics count it
                    lines.append(record_line(prediction_record(
                        dataset.sample_id(start + offset), item["image_path"], item["sentence"],
                        pred.mask.cpu().numpy(), pred.no_target, pred.no_target_prob)))
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
                        max_samples=None, tokenizer=None, precision="fp32", compile=False, progress=True,
                        save_predictions=None) -> dict:
    """Evaluate a training checkpoint or a model folder, run as :func:`rexfast.optimize`
    prepares it (``precision``: fp32 | bf16 | auto; fp32 by default, so that the table is the
    model's reference numbers); optionally write the metrics as JSON.

    ``save_predictions``: also write every prediction as a predictions file
    (:mod:`rexfast.data.predictions`; ``id`` = the dataset's sentence id, see
    :meth:`~rexfast.data.ReferringDataset.sample_id`). Each mask is the thresholded mask at
    the evaluation resolution the metrics compare (``height``/``width`` and the RLE size say
    which), kept even where ``no_target`` is true, because the GRES metrics count its pixels
    (ReLA's evaluator does); so :func:`score_predictions` of the file gives this same table."""
    from .optimize import optimize
    from .precision import check_precision

    check_precision(precision, "--precision")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be a positive integer, got {max_samples}")
    if out:
        check_output_file(out, "--out")
    if save_predictions:
        check_output_file(save_predictions, "--save-predictions")
    device = resolve_device(device)
    loaded = load_model(path, overrides=overrides, tokenizer=tokenizer, device=device)
    cfg = loaded.config
    split = split or cfg.data.val_split
    try:
        dataset = builders.build_dataset(cfg.data, split, train=False, tokenizer=loaded.tokenizer)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (data.root is {cfg.data.root}; point it elsewhere with "
                                "--set data.root=PATH)") from None
    model = optimize(loaded.model, precision=precision, compile=compile, runtime=loaded.runtime_overrides)
    lines = [] if save_predictions else None
    torch.manual_seed(0)  # a model that draws noise at inference (CGFormer eval_noise) scores the same every run
    metrics = evaluate(model, dataset, task=task_of(cfg.data.dataset), batch_size=batch_size, device=device,
                       max_samples=max_samples, progress=progress, lines=lines)
    kept = model.optimization.runtime  # runtime options --set pinned (e.g. every op on its reference)
    metrics = {"checkpoint": str(path), "model": cfg.model.name, "dataset": cfg.data.dataset, "split": split,
               "precision": model.optimization.precision,
               **({"runtime": ", ".join(f"{k}={v}" for k, v in kept.items())} if kept else {}), **metrics}
    if save_predictions:
        atomic_write_bytes(save_predictions, b"".join(lines))
    if out:
        atomic_write_json(out, metrics)
    return metrics


def _examples(ids: list, n: int = 3) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return f"{shown}, ..." if len(ids) > n else shown


def score_predictions(predictions, config=None, *, split=None, overrides=(), out=None,
                      max_samples=None) -> dict:
    """The RES/GRES metric table of a predictions file (rexfast's or any other tool's; see
    :mod:`rexfast.data.predictions`) on a dataset split, as :func:`evaluate_checkpoint`
    computes it for a model: the same samples (the first ``max_samples``, all by default),
    the same ground truth at the same evaluation resolution, the same metrics.

    ``config``: a config file whose ``data`` section names the dataset (``overrides`` as
    ``--set``). Every sample must have exactly one prediction, matched by id (the dataset's
    sentence id); missing ids or ids that are not samples of the split raise one ValueError
    naming a few and the count. A mask must come at the evaluation size, or at the image's
    original size when the evaluation is at the input size (``data.eval_resolution: input``),
    where it is resized with nearest neighbour, as the ground truth is; any other size is a
    ValueError. ``no_target`` missing or null means "the mask is empty"."""
    from PIL import Image

    from rexfast.data.predictions import prediction_mask, read_predictions
    from rexfast.metrics import GRESMetrics, RESMetrics

    from .config import load_config

    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"--max-samples must be a positive integer, got {max_samples}")
    if out:
        check_output_file(out, "--out")
    cfg = load_config(config, list(overrides))
    split = split or cfg.data.val_split
    records = read_predictions(predictions)
    try:
        dataset = builders.build_dataset(cfg.data, split, train=False, tokenizer=None, targets_only=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (data.root is {cfg.data.root}; point it elsewhere with "
                                "--set data.root=PATH)") from None
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    split_ids = [dataset.sample_id(i) for i in range(len(dataset))]
    known = set(split_ids)
    unknown = [pid for pid in records if pid not in known]
    missing = [pid for pid in split_ids[:count] if pid not in records]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {count} samples have no prediction (ids {_examples(missing)})")
    if unknown:
        problems.append(f"{len(unknown)} predicted ids are not samples of {cfg.data.dataset} {split} "
                        f"(ids {_examples(unknown)})")
    if problems:
        raise ValueError(f"predictions file {predictions}: {'; '.join(problems)}; ids are the dataset's sentence ids")
    task = task_of(cfg.data.dataset)
    meter = GRESMetrics() if task == "gres" else RESMetrics()
    for index in range(count):
        target = dataset.target(index)
        record = records[target["id"]]
        mask = prediction_mask(record)
        gt = target["eval_mask"]
        if mask.shape != gt.shape:
            if cfg.data.eval_resolution == "input" and mask.shape == target["orig_size"]:
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(gt.shape[::-1], Image.NEAREST),
                                  dtype=bool)
            else:
                sizes = f"{list(gt.shape)}" + ("" if cfg.data.eval_resolution == "original" else
                                               f" (or the image's {list(target['orig_size'])})")
                raise ValueError(f"predictions file {predictions}, line {record['_line']}: id {target['id']!r} has a "
                                 f"{list(mask.shape)} mask; the evaluation compares masks of size {sizes}")
        if task == "gres":
            meter.update(mask, gt, no_target=target["no_target"], pred_no_target=record.get("no_target"))
        else:
            meter.update(mask, gt)
    metrics = {"predictions": str(predictions), "dataset": cfg.data.dataset, "split": split, **meter.compute()}
    if out:
        atomic_write_json(out, metrics)
    return metrics


__all__ = ["evaluate", "evaluate_checkpoint", "score_predictions"]
