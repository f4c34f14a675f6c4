"""The evaluator's path against an independent computation, and training under a time budget.

Evaluation (CGFormer's engine.inference, for a model without a no-target head):
mask probability → bicubic resize (align_corners=True) to the original size →
threshold 0.5 → an empty mask means "no target" → GRES metrics. Here the
probability maps are hand-made, the resize is re-implemented in numpy from its
definition (cubic convolution, A = −0.75, clamped taps) and the metrics are
counted by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rexfast.engine.evaluator import evaluate
from rexfast.models.base import Prediction


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _bicubic_align_corners(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent numpy version of torch's bicubic resize with align_corners=True."""
    in_h, in_w = img.shape

    def taps(out_n, in_n):
        rows = []
        for i in range(out_n):
            x = i * (in_n - 1) / (out_n - 1) if out_n > 1 else 0.0
            base = int(np.floor(x))
            frac = x - base
            rows.append([(min(max(base + k, 0), in_n - 1), _cubic(frac - k)) for k in (-1, 0, 1, 2)])
        return rows

    ty, tx = taps(out_h, in_h), taps(out_w, in_w)
    out = np.zeros((out_h, out_w))
    for i, row_taps in enumerate(ty):
        for j, col_taps in enumerate(tx):
            out[i, j] = sum(wy * wx * img[y, x] for y, wy in row_taps for x, wx in col_taps)
    return out


class _FixedModel(torch.nn.Module):
    """predict() returns hand-made probability maps, one per sample in order (no no-target head)."""

    empty_mask_says_no_target = False

    def __init__(self, probs):
        super().__init__()
        self.probs = probs
        self.calls = 0

    def predict(self, images, input_ids, attention_mask):
        b = images.shape[0]
        out = self.probs[self.calls:self.calls + b]
        self.calls += b
        return Prediction(mask=out, no_target=None)


class _Items:
    def __init__(self, gts, no_target):
        self.gts, self.no_target = gts, no_target

    def __len__(self):
        return len(self.gts)

    def get(self, i, seed=None):
        return {"image": torch.zeros(3, 32, 32), "input_ids": torch.zeros(20, dtype=torch.long),
                "attention_mask": torch.ones(20, dtype=torch.long), "orig_mask": torch.from_numpy(self.gts[i]),
                "no_target": self.no_target[i]}


def test_evaluator_path_matches_an_independent_computation():
    g = np.random.default_rng(0)
    h, w = 45, 37  # the original image size, not the 32² model input
    probs = np.zeros((4, 32, 32))
    probs[0, 4:20, 6:25] = 0.9  # a confident blob
    probs[1] = g.uniform(0.3, 0.7, (32, 32))  # values around the threshold
    probs[2] = 0.2  # nothing: predicted "no target"
    probs[3, 10:12, 10:12] = 0.8  # a small mask on a no-target sentence
    gts = [np.zeros((h, w), bool) for _ in range(4)]
    gts[0][8:30, 10:30] = True
    gts[1][20:40, 5:20] = True
    no_target = [False, False, True, True]

    metrics = evaluate(_FixedModel(torch.tensor(probs, dtype=torch.float32)), _Items(gts, no_target), task="gres",
                       batch_size=3)

    iou_sum, total_i, total_u = 0.0, 0, 0
    tp = fn = tn = fp = 0
    target_ious = []
    for p, gt, nt in zip(probs, gts, no_target):
        pred = _bicubic_align_corners(p, h, w) > 0.5
        pred_nt = not pred.any()
        inter, union = int((pred & gt).sum()), int((pred | gt).sum())
        if nt:
            if pred_nt:
                tp += 1
                iou_sum += 1.0
            else:
                fn += 1
                total_u += union
        else:
            if pred_nt:
                fp += 1
                inter = 0
            else:
                tn += 1
            iou = inter / union if union else 0.0
            iou_sum += iou
            total_i += inter
            total_u += union
            target_ious.append(iou)
    assert metrics["gIoU"] == pytest.approx(100 * iou_sum / 4)
    assert metrics["cIoU"] == pytest.approx(100 * total_i / total_u)
    assert metrics["N-acc"] == pytest.approx(100 * tp / (tp + fn))
    assert metrics["T-acc"] == pytest.approx(100 * tn / (tn + fp))
    assert metrics["Pr@0.7"] == pytest.approx(100 * np.mean([i >= 0.7 for i in target_ious]))
    assert (tp, fn, tn, fp) == (1, 1, 2, 0)  # the hand-made case exercises TP, FN and TN


class _HeadModel(torch.nn.Module):
    """predict() returns hand-made masks and no-target probabilities, with or without the
    no_target_if_empty rule."""

    def __init__(self, probs, nt, if_empty):
        super().__init__()
        self.probs, self.nt, self.empty_mask_says_no_target = probs, nt, if_empty

    def predict(self, images, input_ids, attention_mask):
        return Prediction(mask=self.probs, no_target=self.nt)


@pytest.mark.parametrize("if_empty", [False, True])
def test_no_target_if_empty_adds_empty_masks_to_the_heads_no_target_decisions(if_empty):
    """With a no-target head the head decides; ``no_target_if_empty`` (the demo presets) also
    calls an empty thresholded mask "no target" — and nothing else: a non-empty mask with a
    low head probability stays a target, a high head probability stays "no target"."""
    from rexfast.engine.inference import predict_batch

    probs = torch.zeros(4, 8, 8)
    probs[0, 2:4, 2:4] = 0.9  # a mask, head says target
    probs[1] = 0.4  # empty mask (below the threshold everywhere), head says target
    probs[2, 1, 1] = 0.6  # a one-pixel mask, head says no target
    nt = torch.tensor([0.1, 0.2, 0.8, 0.3])  # sample 3: empty mask, head says target
    batch = {"image": torch.zeros(4, 3, 8, 8), "input_ids": None, "attention_mask": None}
    preds = predict_batch(_HeadModel(probs, nt, if_empty), batch, [(8, 8)] * 4)
    assert [p.no_target for p in preds] == ([False, True, True, True] if if_empty else [False, False, True, False])
    assert [p.no_target_prob for p in preds] == pytest.approx(nt.tolist())  # the head's own probability
    assert [int(p.shown_mask.sum()) for p in preds] == [4, 0, 0, 0]
    # without a head an empty mask is the no-target decision whatever the flag says
    preds = predict_batch(_HeadModel(probs, None, if_empty), batch, [(8, 8)] * 4)
    assert [p.no_target for p in preds] == [False, True, False, True]


def test_evaluate_rejects_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch size"):
        evaluate(_FixedModel(torch.zeros(1, 32, 32)), _Items([np.zeros((4, 4), bool)], [True]), task="gres",
                 batch_size=0)


class _StepClock:
    """A stand-in for the trainer's ``time`` module: each ``perf_counter()`` call moves 0.5 s on,
    so the budget and the validation times count training steps, not this machine's load
    (under load one real step took longer than the whole validation interval)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.5
        return self.now


def test_time_budget_validates_on_a_fixed_subset_and_draws_the_curve(tmp_path, monkeypatch):
    from PIL import Image

    from rexfast.engine import builders, trainer
    from rexfast.engine.config import Config, DataConfig, TrainConfig, model_section
    from rexfast.engine.trainer import train

    monkeypatch.setattr(trainer, "time", _StepClock())

    data = DataConfig(dataset="synthetic", root=str(tmp_path / "data"), image_size=32)
    builders.generate_synthetic_data(data, n_train=16, n_val=6, n_test=2, seed=2)
    out = tmp_path / "run"
    cfg = Config(data=data, model=model_section({"name": "cgformer", "preset": "tiny"}, data),
                 train=TrainConfig(epochs=1000, batch_size=4, amp="off", device="cpu", out_dir=str(out), log_every=1,
                                   time_budget_min=0.15, eval_every_min=0.03, eval_subset=5))
    summary = train(cfg, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["subset"] for r in evals[:-1]] and all(r["subset"] == 5 and r["count"] == 5 for r in evals)
    assert len(evals) >= 2, "periodic validation did not run under the time budget"
    # the budget stops training at the first step that ends past it (a step and a validation cost 1.5 to 2.5 s of this clock)
    assert 0.15 * 60 <= summary["train_seconds"] < 0.15 * 60 + 3
    assert summary["best_step"] in [r["step"] for r in evals]
    with Image.open(out / "training_curve.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
