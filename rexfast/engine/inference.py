"""Inference as the official evaluations do it, for any registered model; used by
the evaluator, :class:`rexfast.Segmenter` and the demo.

The model's ``predict`` gives the mask probability at its input size and, with a
no-target head, the no-target probability. The probability map is resized to
each sample's evaluation size (bicubic, align_corners=True, as CGFormer's
``engine.inference``; a no-op when the sizes already agree) and thresholded at
``mask_threshold``. Two thresholds, because they decide two different things:

* a pixel is in the mask where its probability exceeds ``mask_threshold``;
* a sample is "no target" where its no-target probability exceeds
  ``no_target_threshold`` (the **head** rule). Its thresholded mask is kept as is
  (the GRES metrics count its pixels in the union, as ReLA's evaluator does) and
  :attr:`SamplePrediction.shown_mask` is the empty mask a user sees.

Without a no-target head an empty mask is the no-target prediction (the **empty
mask** rule); a model whose ``empty_mask_says_no_target`` is true (its config sets
``no_target_if_empty``: the demo presets, never the released ones) also says "no target"
where its thresholded mask is empty, as it would without a head — an empty mask names
nothing. Both thresholds default to 0.5, what the authors' evaluators use (CGFormer:
probability > 0.5; ReLA: the argmax of two classes, i.e. softmax probability > 0.5).

The decision is made in one place, :func:`decide_no_target`, which returns it with the rule
that made it and why in words (:class:`NoTargetDecision`); :class:`rexfast.Segmentation`, the
CLI and the web page only show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.5
NO_TARGET_THRESHOLD = 0.5
HEAD, EMPTY_MASK = "head", "empty_mask"  # which rule said "no target"


@dataclass(frozen=True)
class NoTargetDecision:
    """Whether an answer is "no target", the rule that said so, and why in words."""

    no_target: bool
    reason: Optional[str]  # HEAD or EMPTY_MASK; None for a target
    why: str  # for "no target": the rule and the numbers that decided it; "" for a target


def decide_no_target(*, mask_empty: bool, no_target_prob: Optional[float], no_target_threshold: float,
                     mask_threshold: float, empty_mask_says_no_target: bool) -> NoTargetDecision:
    """The one no-target decision (see the module docstring): the head's probability above
    ``no_target_threshold`` (the head rule); else an empty thresholded mask for a model without
    a head, or for one whose ``empty_mask_says_no_target`` is true (the empty-mask rule)."""
    if no_target_prob is not None and no_target_prob > no_target_threshold:
        return NoTargetDecision(True, HEAD, f"the no-target head's probability {no_target_prob:.3f} exceeds the "
                                            f"no-target threshold {no_target_threshold:g}")
    if mask_empty and (no_target_prob is None or empty_mask_says_no_target):
        if no_target_prob is None:
            rule = "this model has no no-target head, so an empty mask is its no-target answer"
        else:
            rule = (f"the no-target head's probability {no_target_prob:.3f} does not exceed the no-target threshold "
                    f"{no_target_threshold:g}, but this model also says no target for an empty mask")
        return NoTargetDecision(True, EMPTY_MASK, f"no pixel's mask probability exceeds the mask threshold "
                                                  f"{mask_threshold:g} ({rule})")
    return NoTargetDecision(False, None, "")


@dataclass
class SamplePrediction:
    mask: torch.Tensor  # (H, W) bool at the requested size: the thresholded probability
    decision: NoTargetDecision  # "no target" or not, and why
    no_target_prob: Optional[float]  # the no-target head's probability; None without one
    probability: Optional[torch.Tensor] = None  # (H, W) float32 mask probability at the requested size
    internals: object = None  # with explain=True: the model's record for this sample (rexfast.models.explain)

    @property
    def no_target(self) -> bool:
        """The prediction says nothing is referred."""
        return self.decision.no_target

    @property
    def reason(self) -> Optional[str]:
        """Why "no target": HEAD or EMPTY_MASK; None for a target."""
        return self.decision.reason

    @property
    def shown_mask(self) -> torch.Tensor:
        """What to show or write: empty when the prediction is "no target"."""
        return torch.zeros_like(self.mask) if self.no_target else self.mask


def check_threshold(value, name: str) -> float:
    """A threshold strictly inside (0, 1): TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
    return float(value)


@torch.no_grad()
def predict_batch(model, batch: dict, sizes: list[tuple[int, int]], *, mask_threshold: float = MASK_THRESHOLD,
                  no_target_threshold: float = NO_TARGET_THRESHOLD, amp_dtype=None,
                  sample_seeds: Optional[Sequence[int]] = None, explain: bool = False) -> list[SamplePrediction]:
    """Predictions for a collated batch, one per sample, at the given (H, W) sizes.
    ``sample_seeds`` (one int per sample) goes to ``model.predict`` for a model that draws
    noise at inference: each sample's noise then comes from its own seed, so its answer does
    not depend on the batch it is in. ``explain=True`` runs ``model.explain`` instead (the
    same answer, from the same forward pass) and keeps each sample's internals."""
    device = batch["image"].device
    extra = {} if sample_seeds is None else {"sample_seeds": list(sample_seeds)}
    internals = [None] * len(sizes)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if explain:
            pred, record = model.explain(batch["image"], batch["input_ids"], batch["attention_mask"], **extra)
            internals = record.split()
        else:
            pred = model.predict(batch["image"], batch["input_ids"], batch["attention_mask"], **extra)
    probs = pred.mask.float()
    empty_rule = bool(model.empty_mask_says_no_target)
    out = []
    for i, (h, w) in enumerate(sizes):
        p = probs[i : i + 1, None]
        if tuple(p.shape[-2:]) != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True)
        prob = p[0, 0]
        mask = prob > mask_threshold
        nt_prob = None if pred.no_target is None else float(pred.no_target[i])
        decision = decide_no_target(mask_empty=not bool(mask.any()), no_target_prob=nt_prob,
                                    no_target_threshold=no_target_threshold, mask_threshold=mask_threshold,
                                    empty_mask_says_no_target=empty_rule)
        out.append(SamplePrediction(mask=mask, decision=decision, no_target_prob=nt_prob, probability=prob,
                                    internals=internals[i]))
    return out


__all__ = ["MASK_THRESHOLD", "NO_TARGET_THRESHOLD", "HEAD", "EMPTY_MASK", "NoTargetDecision", "SamplePrediction",
           "check_threshold", "decide_no_target", "predict_batch"]
