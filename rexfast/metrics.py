"""RES and GRES segmentation metrics, following the official evaluation code.

RES (CGFormer ``engine/engine.py``, ``validate``/``inference``)::

    I = |pred ∧ gt|, U = |pred ∨ gt|, IoU = I / (U + 1e-6)
    mIoU = mean IoU,  oIoU = ΣI / ΣU
    P@X  = mean(IoU > X)   -- strict ">", X = torch.arange(0.5, 1.0, 0.1) in float32

(LAVT's evaluation uses ``iou >= X`` with IoU = I/U; we follow CGFormer, whose
released numbers rexfast reproduces. With the +1e-6 in the denominator an IoU
can never equal a threshold exactly, so the two rarely differ in practice.)

GRES (ReLA ``gres_model/evaluation/refer_evaluation.py``), "positive" = no-target:

* no-target GT, predicted no-target (TP): IoU 1, adds nothing to ΣI/ΣU;
* no-target GT, predicted a mask (FN): IoU 0, ΣU += |pred|;
* target GT, predicted no-target (FP): I = 0, ΣU += U, IoU = 0;
* target GT, predicted a mask (TN): IoU = I/U (0 when U = 0), ΣI += I, ΣU += U;
* gIoU = mean IoU over all samples, cIoU = ΣI/ΣU;
* N-acc = TP/(TP+FN), T-acc = TN/(TN+FP);
* Pr@X = #(target samples with IoU >= X) / #target samples, X ∈ {.7, .8, .9}
  (">=" here, as in the official code).

A predicted no-target is an empty predicted mask (rexfast's models output one
mask; an explicit ``pred_no_target`` may be given to :meth:`GRESMetrics.update`).

Everything is reported in percent. Where the official code divides by zero we
report 0.0: cIoU/oIoU when ΣU = 0, Pr@X when there are no target samples, and
T-acc/N-acc when a denominator is zero. When there are no no-target samples at
all the official code reports T-acc = N-acc = 0; we do the same. (The official
code gives T-acc/N-acc as fractions; we scale them to percent like the rest.)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

try:  # torch is optional here: metrics also accept numpy arrays
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = ["RESMetrics", "GRESMetrics", "format_table", "intersection_union"]

# CGFormer's thresholds are torch.arange(0.5, 1.0, 0.1) in float32; comparing a
# float64 IoU with them promotes them to float64, i.e. these exact values.
# (torch computes start + k * step in double, then rounds to float32.)
RES_THRESHOLDS = tuple(float(np.float32(0.5 + 0.1 * k)) for k in range(5))
RES_THRESHOLD_NAMES = ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9")
GRES_THRESHOLDS = (0.7, 0.8, 0.9)
GRES_THRESHOLD_NAMES = ("Pr@0.7", "Pr@0.8", "Pr@0.9")


def _as_bool_array(x, name: str) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {tuple(x.shape)}")
    if x.dtype != np.bool_:
        if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
            if x.size and not np.isin(np.unique(x), (0, 1)).all():
                raise ValueError(f"{name} must be boolean or 0/1 valued; threshold logits before calling update()")
            x = x.astype(bool)
        else:
            raise TypeError(f"{name} must be a boolean mask, got dtype {x.dtype}")
    return x


def intersection_union(pred, gt) -> tuple[int, int]:
    """(|pred ∧ gt|, |pred ∨ gt|) of two (H, W) boolean masks of the same shape."""
    p = _as_bool_array(pred, "pred")
    g = _as_bool_array(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: pred {tuple(p.shape)} vs gt {tuple(g.shape)}")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


class RESMetrics:
    """mIoU, oIoU and P@{0.5..0.9} (percent), CGFormer's definitions."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ious: list[float] = []
        self.total_i = 0
        self.total_u = 0

    def update(self, pred, gt) -> float:
        """Add one sample; returns its IoU (a fraction)."""
        i, u = intersection_union(pred, gt)
        iou = i / (u + 1e-6)
        self.ious.append(iou)
        self.total_i += i
        self.total_u += u
        return iou

    @property
    def count(self) -> int:
        return len(self.ious)

    def compute(self) -> dict:
        n = len(self.ious)
        ious = np.asarray(self.ious, dtype=np.float64)
        out = {
            "mIoU": 100.0 * float(ious.mean()) if n else 0.0,
            "oIoU": 100.0 * self.total_i / self.total_u if self.total_u else 0.0,
        }
        for name, thr in zip(RES_THRESHOLD_NAMES, RES_THRESHOLDS):
            out[name] = 100.0 * float((ious > thr).mean()) if n else 0.0
        out["count"] = n
        return out


class GRESMetrics:
    """gIoU, cIoU, N-acc, T-acc and Pr@{0.7,0.8,0.9} (percent), ReLA's definitions."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.accum_iou = 0.0
        self.accum_i = 0
        self.accum_u = 0
        self.total = 0
        self.target_count = 0
        self.no_target_count = 0
        self.pr_count = {t: 0 for t in GRES_THRESHOLDS}
        self.tp = self.tn = self.fp = self.fn = 0

    def update(self, pred, gt, no_target: Optional[bool] = None, pred_no_target: Optional[bool] = None) -> float:
        """Add one sample; returns its IoU as counted in gIoU (a fraction).

        ``no_target`` defaults to ``gt`` being empty; ``pred_no_target`` to
        ``pred`` being empty.
        """
        p = _as_bool_array(pred, "pred")
        g = _as_bool_array(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred and gt shapes differ: pred {tuple(p.shape)} vs gt {tuple(g.shape)}")
        gt_nt = (not g.any()) if no_target is None else bool(no_target)
        if gt_nt and g.any():
            raise ValueError(f"no_target=True but the ground-truth mask has {int(g.sum())} pixels")
        pred_nt = (not p.any()) if pred_no_target is None else bool(pred_no_target)
        i = int(np.logical_and(p, g).sum())
        u = int(np.logical_or(p, g).sum())
        self.total += 1
        if gt_nt:
            self.no_target_count += 1
            if pred_nt:  # true positive
                self.tp += 1
                iou = 1.0
            else:  # false negative: the predicted pixels count in the union
                self.fn += 1
                iou = 0.0
                self.accum_u += u
            self.accum_iou += iou
            return iou
        if pred_nt:  # false positive
            self.fp += 1
            i = 0
        else:  # true negative
            self.tn += 1
        iou = 0.0 if u == 0 else i / u
        self.accum_iou += iou
        self.accum_i += i
        self.accum_u += u
        self.target_count += 1
        for t in GRES_THRESHOLDS:
            if iou >= t:
                self.pr_count[t] += 1
        return iou

    @property
    def count(self) -> int:
        return self.total

    def compute(self) -> dict:
        out = {
            "gIoU": 100.0 * self.accum_iou / self.total if self.total else 0.0,
            "cIoU": 100.0 * self.accum_i / self.accum_u if self.accum_u else 0.0,
        }
        if self.no_target_count > 0:
            out["N-acc"] = 100.0 * self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
            out["T-acc"] = 100.0 * self.tn / (self.tn + self.fp) if self.tn + self.fp else 0.0
        else:  # as the official code: both 0 when the split has no no-target samples
            out["N-acc"] = 0.0
            out["T-acc"] = 0.0
        for name, t in zip(GRES_THRESHOLD_NAMES, GRES_THRESHOLDS):
            out[name] = 100.0 * self.pr_count[t] / self.target_count if self.target_count else 0.0
        out["count"] = self.total
        out["no_target_count"] = self.no_target_count
        return out


def format_table(metrics: dict, title: Optional[str] = None) -> str:
    """A two-column aligned text table: floats with 2 decimals, other values as is."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            text = str(value)
        elif isinstance(value, (int, np.integer)):
            text = str(int(value))
        elif isinstance(value, (float, np.floating)):
            text = f"{float(value):.2f}"
        else:
            text = str(value)
        rows.append((str(key), text))
    if not rows:
        return "(no metrics)"
    kw = max(len("metric"), *(len(k) for k, _ in rows))
    vw = max(len("value"), *(len(v) for _, v in rows))
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'metric':<{kw}}  {'value':>{vw}}")
    lines.append(f"{'-' * kw}  {'-' * vw}")
    lines.extend(f"{k:<{kw}}  {v:>{vw}}" for k, v in rows)
    return "\n".join(lines)
