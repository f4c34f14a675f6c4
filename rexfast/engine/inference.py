"""Inference as the official evaluations do it, for any registered model; used by
the evaluator, the predictor and the demo.

The model's ``predict`` gives the mask probability at its input size and, with a
no-target head, the no-target probability. The probability map is resized to
each sample's evaluation size (bicubic, align_corners=True, as CGFormer's
``engine.inference``; a no-op when the sizes already agree) and thresholded. A
sample whose no-target probability exceeds the threshold is predicted "no
target"; its thresholded mask is kept as is (the GRES metrics count its pixels
in the union, as ReLA's evaluator does) and :attr:`SamplePrediction.shown_mask`
is the empty mask a user sees. Without a no-target head an empty mask is the
no-target prediction; a model whose config sets ``no_target_if_empty`` (the demo
presets; never the released ones) also says "no target" where its thresholded
mask is empty, as it would without a head — an empty mask names nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class SamplePrediction:
    mask: torch.Tensor  # (H, W) bool at the requested size: the thresholded probability
    no_target: bool  # the prediction says nothing is referred
    no_target_prob: Optional[float]  # the no-target head's probability; None without one

    @property
    def shown_mask(self) -> torch.Tensor:
        """What to show or write: empty when the prediction is "no target"."""
        return torch.zeros_like(self.mask) if self.no_target else self.mask


@torch.no_grad()
def predict_batch(model, batch: dict, sizes: list[tuple[int, int]], *, threshold: float = 0.5,
                  amp_dtype=None) -> list[SamplePrediction]:
    """Predictions for a collated batch, one per sample, at the given (H, W) sizes."""
    device = batch["image"].device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = model.predict(batch["image"], batch["input_ids"], batch["attention_mask"])
    probs = pred.mask.float()
    out = []
    for i, (h, w) in enumerate(sizes):
        p = probs[i : i + 1, None]
        if tuple(p.shape[-2:]) != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True)
        mask = p[0, 0] > threshold
        nt_prob = None if pred.no_target is None else float(pred.no_target[i])
        if nt_prob is None:
            no_target = not bool(mask.any())
        else:
            no_target = nt_prob > threshold or (pred.no_target_if_empty and not bool(mask.any()))
        out.append(SamplePrediction(mask=mask, no_target=no_target, no_target_prob=nt_prob))
    return out


__all__ = ["SamplePrediction", "predict_batch"]
