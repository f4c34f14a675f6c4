"""RES / GRES metrics against hand-computed values and the official formulas."""

import numpy as np
import pytest
import torch

from rexfast.metrics import GRESMetrics, RESMetrics, format_table


def mask(shape, pixels):
    m = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def row(n, length=10):
    """(1, length) mask with the first n pixels set."""
    m = np.zeros((1, length), dtype=bool)
    m[0, :n] = True
    return m


# ----------------------------------------------------------------------------- RES

def test_res_hand_computed():
    m = RESMetrics()
    # I=2, U=6
    gt = row(4, 10)
    pred = np.zeros((1, 10), dtype=bool)
    pred[0, 2:6] = True
    assert m.update(pred, gt) == pytest.approx(2 / 6, abs=1e-6)
    # perfect: I=U=4
    m.update(torch.from_numpy(row(4)), torch.from_numpy(row(4)))
    # I=3, U=5 -> IoU just below 0.6 because of the +1e-6 in the denominator
    m.update(row(3), row(5))
    out = m.compute()
    ious = [2 / (6 + 1e-6), 4 / (4 + 1e-6), 3 / (5 + 1e-6)]
    assert out["count"] == 3
    assert out["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert out["oIoU"] == pytest.approx(100 * 9 / 15)
    assert out["P@0.5"] == pytest.approx(100 * 2 / 3)
    assert out["P@0.6"] == pytest.approx(100 * 1 / 3)  # 0.59999988 is not > 0.6
    assert out["P@0.7"] == pytest.approx(100 * 1 / 3)
    assert out["P@0.9"] == pytest.approx(100 * 1 / 3)
    assert set(out) == {"mIoU", "oIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "count"}


@pytest.mark.parametrize("n_inter,n_union,expected", [
    (5, 10, {"P@0.5": 0.0}),            # 0.49999995 > 0.5 is False
    (6, 10, {"P@0.5": 100.0, "P@0.6": 0.0}),
    (9, 10, {"P@0.8": 100.0, "P@0.9": 0.0}),
    (10, 10, {"P@0.9": 100.0}),
    (71, 100, {"P@0.7": 100.0, "P@0.8": 0.0}),
])
def test_res_thresholds_are_strict(n_inter, n_union, expected):
    m = RESMetrics()
    m.update(row(n_inter, n_union), row(n_union, n_union))
    out = m.compute()
    for k, v in expected.items():
        assert out[k] == v, k


def official_res(preds, gts):
    """CGFormer's engine.inference arithmetic, transcribed for the test."""
    iou_list, I, U = [], 0.0, 0.0
    for pred, mask_ in zip(preds, gts):
        inter = np.logical_and(pred, mask_)
        union = np.logical_or(pred, mask_)
        I += np.sum(inter)
        U += np.sum(union)
        iou_list.append(np.sum(inter) / (np.sum(union) + 1e-6))
    iou_list = torch.from_numpy(np.stack(iou_list))
    prec = [(iou_list > t).float().mean().item() for t in torch.arange(0.5, 1.0, 0.1)]
    return 100 * iou_list.mean().item(), 100 * I / U, [100 * p for p in prec]


def test_res_matches_official_formulas_on_random_masks():
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(200):
        g = rng.random((12, 12)) < rng.uniform(0.05, 0.6)
        p = g.copy()
        flip = rng.random((12, 12)) < rng.uniform(0.0, 0.4)
        p ^= flip
        gts.append(g)
        preds.append(p)
    m = RESMetrics()
    for p, g in zip(preds, gts):
        m.update(p, g)
    out = m.compute()
    miou, oiou, prec = official_res(preds, gts)
    assert out["mIoU"] == pytest.approx(miou, abs=1e-4)
    assert out["oIoU"] == pytest.approx(oiou, abs=1e-9)
    for name, p in zip(["P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"], prec):
        assert out[name] == pytest.approx(p, abs=1e-4), name


def test_res_empty_gt_and_pred_scores_zero_and_empty_meter():
    m = RESMetrics()
    assert m.compute() == {"mIoU": 0.0, "oIoU": 0.0, "P@0.5": 0.0, "P@0.6": 0.0, "P@0.7": 0.0,
                           "P@0.8": 0.0, "P@0.9": 0.0, "count": 0}
    m.update(np.zeros((3, 3), bool), np.zeros((3, 3), bool))
    out = m.compute()
    assert out["mIoU"] == 0.0 and out["oIoU"] == 0.0 and out["count"] == 1


# ----------------------------------------------------------------------------- GRES

EMPTY = np.zeros((1, 10), dtype=bool)


def test_gres_no_target_gt_no_target_pred():  # true positive
    m = GRESMetrics()
    assert m.update(EMPTY, EMPTY) == 1.0
    out = m.compute()
    assert out["gIoU"] == 100.0
    assert out["cIoU"] == 0.0  # nothing accumulated: official code would divide by zero
    assert out["N-acc"] == 100.0
    assert out["T-acc"] == 0.0  # TN + FP == 0
    assert out["Pr@0.7"] == 0.0  # no target samples
    assert out["count"] == 1 and out["no_target_count"] == 1


def test_gres_no_target_gt_with_predicted_mask():  # false negative
    m = GRESMetrics()
    assert m.update(row(3), EMPTY) == 0.0
    m.update(row(4), row(4))  # a perfect target sample, so cIoU shows the union of the FN
    out = m.compute()
    assert out["gIoU"] == pytest.approx(50.0)
    assert out["cIoU"] == pytest.approx(100 * 4 / (3 + 4))
    assert out["N-acc"] == 0.0
    assert out["T-acc"] == 100.0
    assert out["Pr@0.9"] == 100.0


def test_gres_target_gt_predicted_empty():  # false positive
    m = GRESMetrics()
    assert m.update(EMPTY, row(4)) == 0.0
    m.update(EMPTY, EMPTY)
    out = m.compute()
    assert out["gIoU"] == pytest.approx(50.0)
    assert out["cIoU"] == 0.0  # I = 0, U = 4
    assert out["T-acc"] == 0.0
    assert out["N-acc"] == 100.0
    assert out["Pr@0.7"] == 0.0


def test_gres_target_gt_with_mask():  # true negative
    m = GRESMetrics()
    pred = np.zeros((1, 10), dtype=bool)
    pred[0, 2:6] = True
    assert m.update(pred, row(4)) == pytest.approx(2 / 6)
    out = m.compute()
    assert out["gIoU"] == pytest.approx(100 * 2 / 6)
    assert out["cIoU"] == pytest.approx(100 * 2 / 6)
    # the official code reports both accuracies as 0 when the split has no no-target sample
    assert out["N-acc"] == 0.0 and out["T-acc"] == 0.0
    assert out["no_target_count"] == 0


def test_gres_all_four_combinations_together():
    m = GRESMetrics()
    pred = np.zeros((1, 10), dtype=bool)
    pred[0, 2:6] = True
    m.update(EMPTY, EMPTY)          # TP: IoU 1
    m.update(row(3), EMPTY)         # FN: IoU 0, U += 3
    m.update(EMPTY, row(4))         # FP: IoU 0, U += 4
    m.update(pred, row(4))          # TN: I = 2, U = 6
    out = m.compute()
    assert out["gIoU"] == pytest.approx(100 * (1 + 0 + 0 + 1 / 3) / 4)
    assert out["cIoU"] == pytest.approx(100 * 2 / 13)
    assert out["N-acc"] == pytest.approx(50.0)
    assert out["T-acc"] == pytest.approx(50.0)
    assert out["Pr@0.7"] == 0.0
    assert out["count"] == 4 and out["no_target_count"] == 2
    assert set(out) == {"gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "count", "no_target_count"}


@pytest.mark.parametrize("inter,union,expected", [
    (7, 10, (100.0, 0.0, 0.0)),   # IoU exactly 0.7 counts: ReLA uses >=
    (8, 10, (100.0, 100.0, 0.0)),
    (9, 10, (100.0, 100.0, 100.0)),
    (6, 10, (0.0, 0.0, 0.0)),
])
def test_gres_precision_uses_greater_equal(inter, union, expected):
    m = GRESMetrics()
    m.update(row(inter, union), row(union, union))
    m.update(EMPTY[:, :union], EMPTY[:, :union])  # a no-target sample does not enter Pr@
    out = m.compute()
    assert (out["Pr@0.7"], out["Pr@0.8"], out["Pr@0.9"]) == expected


def test_gres_explicit_flags():
    m = GRESMetrics()
    # an explicit no-target prediction zeroes the intersection even with a mask
    assert m.update(row(4), row(4), pred_no_target=True) == 0.0
    out = m.compute()
    assert out["gIoU"] == 0.0 and out["cIoU"] == 0.0  # I forced to 0, U = 4
    m.update(EMPTY[:, :4], EMPTY[:, :4])
    out = m.compute()
    assert out["T-acc"] == 0.0 and out["N-acc"] == 100.0  # the first sample was a false positive
    with pytest.raises(ValueError, match="no_target=True"):
        m.update(EMPTY, row(2), no_target=True)


def test_gres_empty_meter():
    out = GRESMetrics().compute()
    assert all(v == 0 for v in out.values())


def test_gres_matches_official_formulas_on_random_masks():
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(300):
        gt_nt = rng.random() < 0.3
        g = np.zeros((8, 8), bool) if gt_nt else rng.random((8, 8)) < 0.4
        p = np.zeros((8, 8), bool) if rng.random() < 0.3 else (g ^ (rng.random((8, 8)) < 0.2))
        samples.append((p, g, gt_nt))
    m = GRESMetrics()
    for p, g, nt in samples:
        m.update(p, g, no_target=nt)
    out = m.compute()
    # ReLA's ReferEvaluator.evaluate, transcribed (pred_nt = empty predicted mask)
    acc_iou = acc_i = acc_u = 0.0
    tp = tn = fp = fn = 0
    pr = {0.7: 0, 0.8: 0, 0.9: 0}
    not_empty = 0
    for p, g, gt_nt in samples:
        pred_nt = not p.any()
        I, U = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
        if gt_nt:
            if pred_nt:
                tp += 1
                acc_iou += 1
            else:
                fn += 1
                acc_u += U
        else:
            if pred_nt:
                fp += 1
                I = 0
            else:
                tn += 1
            iou = 0.0 if U == 0 else I / U
            acc_iou += iou
            acc_i += I
            acc_u += U
            not_empty += 1
            for t in pr:
                pr[t] += iou >= t
    assert out["gIoU"] == pytest.approx(100 * acc_iou / len(samples))
    assert out["cIoU"] == pytest.approx(100 * acc_i / acc_u)
    assert out["T-acc"] == pytest.approx(100 * tn / (tn + fp))
    assert out["N-acc"] == pytest.approx(100 * tp / (tp + fn))
    for t in pr:
        assert out[f"Pr@{t}"] == pytest.approx(100 * pr[t] / not_empty)


# ----------------------------------------------------------------------------- input checks, table

@pytest.mark.parametrize("meter", [RESMetrics, GRESMetrics])
def test_bad_inputs(meter):
    m = meter()
    with pytest.raises(ValueError, match="shapes differ"):
        m.update(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="2-D"):
        m.update(np.zeros((1, 2, 3), bool), np.zeros((1, 2, 3), bool))
    with pytest.raises(ValueError, match="0/1"):
        m.update(torch.rand(4, 4) * 3, torch.zeros(4, 4, dtype=torch.bool))
    # 0/1 integer masks are accepted
    m.update(torch.ones(2, 2, dtype=torch.int64), np.ones((2, 2), np.uint8))
    assert m.compute()["count"] == 1


def test_format_table():
    m = GRESMetrics()
    m.update(row(4), row(4))
    text = format_table(m.compute())
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert len({len(line) for line in lines}) == 1  # aligned
    body = {line.split()[0]: line.split()[1] for line in lines[2:]}
    assert body["gIoU"] == "100.00"
    assert body["count"] == "1"
    assert body["no_target_count"] == "0"
    assert format_table({}) == "(no metrics)"
    assert format_table({"x": 1.0}, title="T").splitlines()[0] == "T"
