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


def _in_process(capsys, setup, *args):
    """``rexfast predict ...`` through cli.main in this process (no interpreter start-up), on one
    thread as the subprocesses (OMP_NUM_THREADS=1), so that their floats agree bit for bit:
    (exit code, stdout, stderr)."""
    import torch

    from rexfast.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["predict", "--checkpoint", str(setup["best"]), "--precision", "fp32", "--no-progress",
                     *map(str, args)])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs_file_gives_the_one_by_one_answers(setup, tmp_path, capsys):
    from rexfast.data.masks import decode_segmentation
    from rexfast.engine.segmenter import Segmenter

    pairs = setup["pairs_file"]("p8.jsonl", 8)
    out = tmp_path / "out"
    code, stdout, _ = _in_process(capsys, setup, "--pairs", pairs, "--out-dir", out, "--batch-size", "3",
                                  "--workers", "1", "--save-masks", "--save-overlays")
    assert code == 0 and stdout.startswith("rexfast predict: 8 pairs (8 predicted): ") and "pairs/s" in stdout
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
    assert f"{sum(r['no_target'] for r in recs)} no target, 0 errors" in stdout


def test_a_folder_with_one_sentence(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = _in_process(capsys, setup, "--images", setup["root"] / "imgs", "--text", "the red circle",
                             "--out-dir", out, "--workers", "0")
    assert code == 0
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"{k}.png" for k in range(6)]
    assert {r["text"] for r in recs} == {"the red circle"}


def test_killed_and_rerun_ends_equal_to_an_uninterrupted_run(setup, tmp_path, capsys):
    """A real SIGKILL mid-run, then a torn half line appended (what a crash inside a write
    leaves); the rerun drops it, skips the pairs already there and predicts the rest."""
    n = 120
    pairs = setup["pairs_file"]("p120.jsonl", n)
    whole = tmp_path / "whole"
    assert _in_process(capsys, setup, "--pairs", pairs, "--out-dir", whole, "--batch-size", "1", "--workers", "0")[0] == 0
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
        if target.is_file() and target.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = target.read_bytes()
    done = killed.count(b"\n")
    assert 10 <= done < n, f"the run was not killed mid-way ({done} of {n} lines)"
    assert expected.startswith(killed[: killed.rfind(b"\n") + 1])  # whole lines, in order
    with open(target, "ab") as f:  # a crash inside a write
        f.write(expected.splitlines(keepends=True)[done][:37])

    code, stdout, _ = _in_process(capsys, setup, *args)
    assert code == 0 and target.read_bytes() == expected
    assert f"{n} pairs ({n - done} predicted, {done} already done)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "predictions.run.json"]

    code, stdout, _ = _in_process(capsys, setup, *args)  # complete: nothing predicted, nothing changed
    assert f"{n} pairs (0 predicted, {n} already done)" in stdout and target.read_bytes() == expected
    # other arguments into the same folder are refused, and leave it as it was
    code, _, err = _in_process(capsys, setup, *args, "--mask-threshold", "0.3")
    assert code == 2 and "other arguments (mask_threshold: 0.5 then, 0.3 now)" in err and "--overwrite" in err
    assert target.read_bytes() == expected


def test_torchrun_two_ranks_merge_to_the_single_process_file(setup, tmp_path, capsys):
    pairs = setup["pairs_file"]("p8.jsonl", 8)
    single, multi = tmp_path / "single", tmp_path / "multi"
    flags = ["--pairs", pairs, "--batch-size", "2", "--workers", "0"]
    assert _in_process(capsys, setup, *flags, "--out-dir", single)[0] == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "rexfast", "predict", "--checkpoint", str(setup["best"]), "--precision", "fp32",
                           "--no-progress", "--device", "cpu", *map(str, flags), "--out-dir", str(multi)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (multi / "predictions.jsonl").read_bytes() == (single / "predictions.jsonl").read_bytes()
    assert sorted(p.name for p in multi.iterdir()) == ["predictions.jsonl", "predictions.run.json"]  # parts removed
    assert proc.stdout.count("rexfast predict: 8 pairs (8 predicted)") == 1  # rank 0 only


def test_skip_bad_writes_error_lines_and_goes_on(setup, tmp_path, capsys):
    path = setup["root"] / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "imgs/0.png", "text": "the red circle", "id": "ok-1"},
        {"image": "imgs/missing.png", "text": "x", "id": "gone"},
        {"image": "imgs/1.png", "text": "", "id": "empty"},
        {"image": "imgs/2.png", "text": "the blue square", "id": "ok-2"},
    ]))
    out = tmp_path / "out"
    code, _, err = _in_process(capsys, setup, "--pairs", path, "--out-dir", out)
    assert code == 2 and "2 of the 4 rows are bad; the first, line 2: image not found" in err and not out.exists()
    code, stdout, _ = _in_process(capsys, setup, "--pairs", path, "--out-dir", out, "--skip-bad")
    assert code == 0
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["ok-1", "gone", "empty", "ok-2"]
    assert "segmentation" in recs[0] and "segmentation" in recs[3]
    assert recs[1] == {"id": "gone", "image": "imgs/missing.png", "text": "x", "error": recs[1]["error"]}
    assert "image not found" in recs[1]["error"] and recs[2]["error"] == "the text is empty"
    assert "2 errors" in stdout


def test_bad_inputs_are_one_error_line_with_nothing_written(setup, tmp_path, capsys):
    """In-process (every check comes before the model loads), and once through a real process."""
    from rexfast.cli import main

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
        (["--pairs", good, "--out-dir", out, "--mask-threshold", "1.5"], "--mask-threshold must lie strictly"),
    ]
    for args, message in cases:
        capsys.readouterr()
        try:
            code = main(["predict", "--checkpoint", str(setup["best"]), *map(str, args)])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("rexfast: error:") and message in err[0], (args, err)
    missing_model = _rexfast("predict", "--checkpoint", tmp_path / "no-model.pt", "--pairs", good, "--out-dir", out)
    assert "not found" in _one_error(missing_model)
    assert not out.exists()
