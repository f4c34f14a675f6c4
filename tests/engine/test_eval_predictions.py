"""``rexfast eval --save-predictions`` writes a predictions file and ``rexfast eval --predictions``
scores one: the table equals the model's own (GRES and RES, at the original and at the
input resolution, also where "no target" answers keep pixels), and missing, unknown, repeated or wrongly sized predictions are one
clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rexfast.cli import main
from rexfast.data.masks import encode_mask

METRIC_KEYS_SKIPPED = {"checkpoint", "predictions", "model", "precision"}


def _table(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in METRIC_KEYS_SKIPPED}


def _config(tmp_path, run, **data) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(json.dumps({"data": {"dataset": "synthetic", "root": str(run["root"]), "image_size": 32, **data}}))
    return str(path)


@pytest.mark.parametrize("dataset,resolution", [("synthetic", "original"), ("synthetic", "input"),
                                                ("synthetic_res", "original")])
def test_saved_predictions_score_to_the_models_own_table(tiny_cgformer_run, tmp_path, capsys, dataset, resolution):
    """The input-resolution case runs the model at 64² on the 32² images, so that the two
    resolutions differ."""
    run = tiny_cgformer_run
    size = 32 if resolution == "original" else 64
    sets = ["--set", f"data.dataset={dataset}", "--set", f"data.eval_resolution={resolution}",
            "--set", f"data.image_size={size}"]
    preds, model_table, file_table = tmp_path / "p.jsonl", tmp_path / "model.json", tmp_path / "file.json"
    assert main(["eval", "--checkpoint", str(run["best"]), "--split", "val", "--device", "cpu", *sets,
                 "--save-predictions", str(preds), "--out", str(model_table)]) == 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    from rexfast.data import ReferringDataset

    ds = ReferringDataset(run["root"], dataset, "val", targets_only=True, image_size=size,
                          eval_resolution=resolution)
    assert [r["id"] for r in lines] == [ds.sample_id(i) for i in range(len(ds))]  # the sentence ids, in order
    assert [r["id"] for r in lines] == [str(ds.refs[r]["sentences"][k]["sent_id"]) for r, k in ds.samples]
    for rec in lines:
        assert set(rec) == {"id", "image", "text", "height", "width", "no_target", "no_target_prob", "segmentation"}
        assert rec["segmentation"]["size"] == [rec["height"], rec["width"]]
        assert isinstance(rec["segmentation"]["counts"], str)
    assert [[r["height"], r["width"]] for r in lines] == [list(ds.target(i)["eval_mask"].shape) for i in range(len(ds))]
    assert {(r["height"], r["width"]) for r in lines} == {(32, 32) if resolution == "original" else (64, 64)}

    config = _config(tmp_path, run, dataset=dataset, eval_resolution=resolution, image_size=size)
    capsys.readouterr()
    assert main(["eval", "--predictions", str(preds), "--config", config, "--split", "val",
                 "--out", str(file_table)]) == 0
    printed = capsys.readouterr().out
    assert "gIoU" in printed if dataset == "synthetic" else "mIoU" in printed
    assert _table(file_table) == _table(model_table)


class _Guesser(torch.nn.Module):
    """A stand-in model with a no-target head that answers at random (seeded by its input):
    many "no target" answers keep pixels, the case where a file must keep the thresholded mask."""

    empty_mask_says_no_target = False

    def predict(self, images, input_ids, attention_mask):
        g = torch.Generator().manual_seed(int(input_ids.sum()) + int(1000 * images.abs().sum()))
        b, _, h, w = images.shape
        return SimpleNamespace(mask=torch.rand(b, h // 4, w // 4, generator=g), no_target=torch.rand(b, generator=g))


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_res"])
def test_a_file_of_no_target_answers_with_pixels_scores_to_the_same_table(tiny_cgformer_run, tmp_path, dataset):
    from rexfast.data import ReferringDataset
    from rexfast.engine.evaluator import evaluate, score_predictions

    run = tiny_cgformer_run
    ds = ReferringDataset(run["root"], dataset, "val", image_size=32)
    lines = []
    table = evaluate(_Guesser(), ds, task=ds.task, batch_size=5, lines=lines)
    recs = [json.loads(line) for line in lines]
    kept = [r for r in recs if r["no_target"] and r["segmentation"]["counts"] != encode_mask(
        np.zeros((r["height"], r["width"]), bool))["counts"]]
    assert len(kept) >= 3  # "no target" answers whose thresholded mask has pixels
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(lines))
    scored = score_predictions(path, _config(tmp_path, run, dataset=dataset), split="val")
    assert {k: v for k, v in scored.items() if k in table} == table
    if dataset == "synthetic":
        assert 0 < table["N-acc"] < 100 and 0 < table["T-acc"] < 100


def test_scoring_tells_missing_unknown_and_repeated_ids(tiny_cgformer_run, tmp_path):
    from rexfast.engine.evaluator import score_predictions

    run = tiny_cgformer_run
    preds = tmp_path / "p.jsonl"
    assert main(["eval", "--checkpoint", str(run["best"]), "--split", "val", "--device", "cpu",
                 "--save-predictions", str(preds)]) == 0
    lines = preds.read_text().splitlines()
    config = _config(tmp_path, run)
    n = len(lines)
    assert n >= 5

    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:-4]) + "\n")
    ids = [json.loads(line)["id"] for line in lines]
    with pytest.raises(ValueError, match=rf"4 of the {n} samples have no prediction \(ids '{ids[-4]}', "
                                         rf"'{ids[-3]}', '{ids[-2]}', \.\.\.\)"):
        score_predictions(short, config, split="val")
    # the first max_samples samples only: the same file is complete for them
    scored = score_predictions(short, config, split="val", max_samples=n - 4)
    assert scored["count"] == n - 4

    extra = tmp_path / "extra.jsonl"
    foreign = [json.dumps({**json.loads(lines[0]), "id": f"x{k}"}) for k in range(2)]
    extra.write_text("\n".join(lines[1:] + foreign) + "\n")
    with pytest.raises(ValueError, match=rf"1 of the {n} samples have no prediction \(ids '{ids[0]}'\); "
                                         r"2 predicted ids are not samples of synthetic val \(ids 'x0', 'x1'\)"):
        score_predictions(extra, config, split="val")

    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match=rf"line {n + 1}: id '{ids[0]}' repeats line 1"):
        score_predictions(repeated, config, split="val")

    wrong_size = tmp_path / "size.jsonl"
    first = json.loads(lines[0])
    first["segmentation"] = encode_mask(np.zeros((7, 9), bool))
    wrong_size.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"line 1: id '{ids[0]}' has a \[7, 9\] mask; the evaluation compares "
                                         r"masks of size \["):
        score_predictions(wrong_size, config, split="val")


def test_a_foreign_file_scores_with_integer_ids_and_no_no_target_field(tiny_cgformer_run, tmp_path):
    """Another tool's file: integer ids, uncompressed RLE, no ``no_target`` (an empty mask
    means "no target"): perfect predictions made from the ground truth score 100."""
    from rexfast.data import ReferringDataset
    from rexfast.engine.evaluator import score_predictions

    run = tiny_cgformer_run
    ds = ReferringDataset(run["root"], "synthetic", "val", targets_only=True, image_size=32)
    lines = []
    for i in range(len(ds)):
        t = ds.target(i)
        m = t["eval_mask"]
        counts, flat, current, n = [], m.flatten(order="F"), False, 0
        for v in flat:
            if v != current:
                counts.append(n)
                current, n = v, 0
            n += 1
        counts.append(n)
        lines.append(json.dumps({"id": int(t["id"]), "segmentation": {"size": list(m.shape), "counts": counts}}))
    path = tmp_path / "foreign.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = score_predictions(path, _config(tmp_path, run), split="val")
    assert table["gIoU"] == pytest.approx(100.0) and table["count"] == len(ds)
    # evaluated at a 64² input size, these masks at the images' own 32² are resized (nearest) as the GT is
    table = score_predictions(path, _config(tmp_path, run, image_size=64, eval_resolution="input"), split="val")
    assert table["gIoU"] == pytest.approx(100.0) and table["cIoU"] == pytest.approx(100.0)


def test_eval_flag_mistakes_are_one_error_line(tiny_cgformer_run, tmp_path, capsys):
    """In-process (each check comes before any model or dataset loads), and once through a real process."""
    run = tiny_cgformer_run

    def one_error(*args) -> str:
        capsys.readouterr()
        try:
            code = main(["eval", *map(str, args)])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("rexfast: error:"), err
        return err[0]

    assert "--checkpoint M" in one_error("--split", "val")
    assert "needs --config" in one_error("--predictions", tmp_path / "p.jsonl")
    assert "predictions file not found" in one_error("--predictions", tmp_path / "p.jsonl", "--config",
                                                     _config(tmp_path, run))
    assert one_error("--predictions", tmp_path / "p.jsonl", "--config", _config(tmp_path, run), "--save-predictions",
                     tmp_path / "x.jsonl").endswith("; --save-predictions belongs to evaluating a model")
    assert one_error("--predictions", tmp_path / "p.jsonl", "--config", _config(tmp_path, run), "--checkpoint",
                     run["best"], "--compile").endswith("; --checkpoint, --compile belong to evaluating a model")
    assert "--config goes with --predictions" in one_error("--checkpoint", run["best"], "--config",
                                                           _config(tmp_path, run))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "segmentation": {"size": [4, 4], "counts": "0"}}\n[1, 2]\n')
    assert "line 2: not a JSON object" in one_error("--predictions", bad, "--config", _config(tmp_path, run))
    folder = tmp_path / "a_folder"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "rexfast", "eval", "--checkpoint", str(run["best"]),
                           "--save-predictions", str(folder)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is a folder" in lines[0], proc.stderr
