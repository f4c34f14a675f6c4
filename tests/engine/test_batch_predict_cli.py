"""``rexfast predict --pairs / --images``: one predictions.jsonl per run, equal to the model's
one-by-one answers; killed (SIGKILL) and run again it ends byte-equal to an uninterrupted run;
under torchrun (2 ranks, gloo) the merged file equals a single-process run; every bad input is
one ``rexfast: error:`` line, exit 2, nothing written, before the model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _rexfast(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rexfast", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600, **kw)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def setup(tiny_cgformer_run, tmp_path_factory):
    """A pairs file of n rows over the tiny run's synthetic images (ids = row numbers)."""
    root = tmp_path_factory.mktemp("pairs")
    images = sorted((tiny_cgformer_run["root"] / "synthetic" / "images").glob("*.png"))[:6]
    (root / "imgs").mkdir()
    for k, path in enumerate(images):
        (root / "imgs" / f"{k}.png").write_bytes(path.read_bytes())
    texts = ["the red circle", "the blue square", "all shapes", "the green triangle left of the circle",
             "the small square", "nothing purple"]

    def pairs_file(name: str, n: int) -> Path:
        path = root / name
        path.write_text("".join(json.dumps({"image": f"imgs/{k % 6}.png", "text": texts[(k * 5) % 6]}) + "\n"
                                for k in range(n)))
        return path

    return {"best": tiny_cgformer_run["best"], "root": root, "pairs_file": pairs_file, "texts": texts}


def _predict(setup, *args):
    return _rexfast("predict", "--checkpoint", setup["best"], "--precision", "fp32", "--no-progress", *args)


def test_pairs_file_gives_the_one_by_one_answers(setup, tmp_path):
    from rexfast.data.masks import decode_segmentation
    from rexfast.engine.segmenter import Segmenter

    pairs = setup["pairs_file"]("p8.jsonl", 8)
    out = tmp_path / "out"
    proc = _ok(_predict(setup, "--pairs", pairs, "--out-dir", out, "--batch-size", "3", "--workers", "1",
                        "--save-masks", "--save-overlays"))
    assert proc.stdout.startswith("rexfast predict: 8 pairs (8 predicted): ") and "pairs/s" in proc.stdout
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [str(k) for k in range(8)]
    seg = Segmenter.from_pretrained(setup["best"], device="cpu", precision="fp32")
    for k, rec in enumerate(recs):
        image = setup["root"] / "imgs" / f"{k % 6}.png"
        alone = seg(image, rec["text"])
        assert rec["image"] == f"imgs/{k % 6}.png" and [rec["height"], rec["width"]] == list(alone.size)
        assert rec["no_target"] == alone.no_target and rec["no_target_prob"] == pytest.approx(alone.no_target_prob,
                                                                                                abs=1e-6)
        assert np.array_equal(decode_segmentation(rec["segmentation"], rec["height"], rec["width"]), alone.raw_mask)
        shown = np.asarray(Image.open(out / "masks" / f"{k}.png"))
        assert np.array_equal(shown > 0, alone.mask)
        assert (out / "overlays" / f"{k}.png").is_file()
    assert f"{sum(r['no_target'] for r in recs)} no target, 0 errors" in proc.stdout


def test_a_folder_with_one_sentence(setup, tmp_path):
    out = tmp_path / "out"
    _ok(_predict(setup, "--images", setup["root"] / "imgs", "--text", "the red circle", "--out-dir", out,
                 "--workers", "0"))
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"{k}.png" for k in range(6)]
    assert {r["text"] for r in recs} == {"the red circle"}


def test_killed_and_rerun_ends_equal_to_an_uninterrupted_run(setup, tmp_path):
    """A real SIGKILL mid-run, then a torn half line appended (what a crash inside a write
    leaves); the rerun drops it, skips the pairs already there and predicts the rest."""
    n = 240
    pairs = setup["pairs_file"]("p240.jsonl", n)
    whole = tmp_path / "whole"
    _ok(_predict(setup, "--pairs", pairs, "--out-dir", whole, "--batch-size", "1", "--workers", "0"))
    expected = (whole / "predictions.jsonl").read_bytes()
    assert expected.count(b"\n") == n

    out = tmp_path / "out"
    args = ["--pairs", pairs, "--out-dir", out, "--batch-size", "1", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "rexfast", "predict", "--checkpoint", str(setup["best"]),
                             "--precision", "fp32", "--no-progress", *map(str, args)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if target.is_file() and target.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = target.read_bytes()
    done = killed.count(b"\n")
    assert 20 <= done < n, f"the run was not killed mid-way ({done} of {n} lines)"
    assert expected.startswith(killed[: killed.rfind(b"\n") + 1])  # whole lines, in order
    with open(target, "ab") as f:  # a crash inside a write
        f.write(expected.splitlines(keepends=True)[done][:37])

    rerun = _ok(_predict(setup, *args))
    assert target.read_bytes() == expected
    assert f"{n} pairs ({n - done} predicted, {done} already done)" in rerun.stdout
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "predictions.run.json"]

    again = _ok(_predict(setup, *args))  # complete: nothing predicted, nothing changed
    assert f"{n} pairs (0 predicted, {n} already done)" in again.stdout and target.read_bytes() == expected
    # other arguments into the same folder are refused, and leave it as it was
    line = _one_error(_predict(setup, *args, "--mask-threshold", "0.3"))
    assert "other arguments (mask_threshold: 0.5 then, 0.3 now)" in line and "--overwrite" in line
    assert target.read_bytes() == expected


def test_torchrun_two_ranks_merge_to_the_single_process_file(setup, tmp_path):
    pairs = setup["pairs_file"]("p8.jsonl", 8)
    single, multi = tmp_path / "single", tmp_path / "multi"
    flags = ["--pairs", pairs, "--batch-size", "2", "--workers", "0"]
    _ok(_predict(setup, *flags, "--out-dir", single))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rexfast", "predict", "--checkpoint", str(setup["best"]), "--precision", "fp32",
                           "--no-progress", "--device", "cpu", *map(str, flags), "--out-dir", str(multi)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (multi / "predictions.jsonl").read_bytes() == (single / "predictions.jsonl").read_bytes()
    assert sorted(p.name for p in multi.iterdir()) == ["predictions.jsonl", "predictions.run.json"]  # parts removed
    assert proc.stdout.count("rexfast predict: 8 pairs (8 predicted)") == 1  # rank 0 only


def test_skip_bad_writes_error_lines_and_goes_on(setup, tmp_path):
    path = setup["root"] / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "imgs/0.png", "text": "the red circle", "id": "ok-1"},
        {"image": "imgs/missing.png", "text": "x", "id": "gone"},
        {"image": "imgs/1.png", "text": "", "id": "empty"},
        {"image": "imgs/2.png", "text": "the blue square", "id": "ok-2"},
    ]))
    out = tmp_path / "out"
    line = _one_error(_predict(setup, "--pairs", path, "--out-dir", out))
    assert "2 of the 4 rows are bad; the first, line 2: image not found" in line and not out.exists()
    proc = _ok(_predict(setup, "--pairs", path, "--out-dir", out, "--skip-bad"))
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["ok-1", "gone", "empty", "ok-2"]
    assert "segmentation" in recs[0] and "segmentation" in recs[3]
    assert recs[1] == {"id": "gone", "image": "imgs/missing.png", "text": "x", "error": recs[1]["error"]}
    assert "image not found" in recs[1]["error"] and recs[2]["error"] == "the text is empty"
    assert "2 errors" in proc.stdout


def test_bad_inputs_are_one_error_line_with_nothing_written(setup, tmp_path):
    good = setup["pairs_file"]("p2.jsonl", 2)
    out = tmp_path / "out"
    cases = [
        (["--pairs", good, "--image", setup["root"] / "imgs" / "0.png", "--out-dir", out], "exactly one of --image"),
        (["--pairs", good, "--text", "x", "--out-dir", out], "--text goes with --image or --images"),
        (["--images", setup["root"] / "imgs", "--out-dir", out], "--images needs --text"),
        (["--pairs", good], "--pairs needs --out-dir"),
        (["--image", setup["root"] / "imgs" / "0.png", "--text", "x", "--batch-size", "4"], "--batch-size belong"),
        (["--pairs", tmp_path / "nope.jsonl", "--out-dir", out], "pairs file not found"),
        (["--images", tmp_path / "nope", "--text", "x", "--out-dir", out], "images folder not found"),
        (["--pairs", good, "--out-dir", out, "--batch-size", "0"], "expected a positive integer"),
        (["--pairs", good, "--out-dir", out, "--workers", "-1"], "expected a non-negative integer"),
        (["--pairs", good, "--out-dir", good], "exists and is not a folder"),
    ]
    for args, message in cases:
        line = _one_error(_predict(setup, *args))
        assert message in line, (args, line)
    missing_model = _rexfast("predict", "--checkpoint", tmp_path / "no-model.pt", "--pairs", good, "--out-dir", out)
    assert "not found" in _one_error(missing_model)
    assert not out.exists()
