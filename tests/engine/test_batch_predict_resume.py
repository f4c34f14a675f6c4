"""The batch-prediction engine's bookkeeping with a stand-in segmenter (a rule on the pixels,
no model): lines in pair order, resume after a torn line, the run file refusing other
arguments, parts merged, PNG names that never collide, error lines with skip_bad."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from rexfast.data.pairs import read_pairs
from rexfast.engine.batch_predict import RUN_FILE, file_stems, predict_pairs, run_arguments


class BrightProcessor:
    """Picklable per-sample preprocessing: the image (the engine passes its path, which a
    Segmenter's processor decodes) as an array, and the sentence."""

    def __call__(self, image, text, keep_image=False):
        from rexfast.io import load_image

        image = load_image(image)
        return {"pixels": np.asarray(image), "text": text, "original_image": image if keep_image else None}


@dataclass
class FakeSegmentation:
    mask: np.ndarray
    probability: np.ndarray
    no_target: bool
    no_target_prob: float
    text: str
    image: object

    @property
    def raw_mask(self):
        return self.probability > 0.5

    def rle(self):
        from rexfast.data.masks import encode_mask

        return encode_mask(self.mask)

    def overlay(self):
        pixels = np.asarray(self.image).copy()
        pixels[self.mask] = 255
        return Image.fromarray(pixels)


class FakeSegmenter:
    """Probability = red channel / 255; "no target" when the sentence says "nothing"."""

    processor = BrightProcessor()

    def __init__(self):
        self.calls = []

    def segment_items(self, items):
        self.calls.append(len(items))
        out = []
        for item in items:
            prob = item["pixels"][..., 0].astype(np.float32) / 255
            nt = "nothing" in item["text"]
            out.append(FakeSegmentation(np.zeros_like(prob, bool) if nt else prob > 0.5, prob, nt,
                                        0.9 if nt else 0.1, item["text"], item["original_image"]))
        return out


@pytest.fixture
def pairs_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(11):
        Image.fromarray(rng.integers(0, 256, (6 + k, 9, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        rows.append({"image": f"imgs/{k}.png", "text": "nothing here" if k % 4 == 3 else f"thing {k}",
                     "id": ["a", "A", "x/y", "x_y", ".hidden"][k] if k < 5 else None})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(pairs_file, out, segmenter=None, **kw):
    pairs = read_pairs(pairs_file, skip_bad=kw.get("skip_bad", False))
    args = run_arguments("fake-model", pairs, mask_threshold=kw.pop("mask_threshold", 0.5), no_target_threshold=0.5,
                         precision="fp32", save_masks=kw.get("save_masks", False),
                         save_overlays=kw.get("save_overlays", False), full_decode=kw.pop("full_decode", False))
    segmenter = segmenter or FakeSegmenter()
    kw.setdefault("workers", 0)
    return predict_pairs(pairs, out, lambda device: segmenter, args, progress=False, device="cpu", **kw), segmenter


def test_lines_in_pair_order_with_the_no_target_masks_kept(pairs_file, tmp_path):
    summary, seg = _run(pairs_file, tmp_path / "out", batch_size=4)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["id"] for r in recs] == ["a", "A", "x/y", "x_y", ".hidden", "5", "6", "7", "8", "9", "10"]
    assert seg.calls == [4, 4, 3]
    from rexfast.data.masks import decode_segmentation

    for k, r in enumerate(recs):
        image = np.asarray(Image.open(pairs_file.parent / "imgs" / f"{k}.png"))
        assert (r["height"], r["width"]) == image.shape[:2] and r["image"] == f"imgs/{k}.png"
        assert r["no_target"] == (k % 4 == 3) and r["no_target_prob"] == (0.9 if k % 4 == 3 else 0.1)
        # the thresholded mask, also where the answer is "no target"
        assert np.array_equal(decode_segmentation(r["segmentation"], *image.shape[:2]), image[..., 0] > 127)
    assert (summary.pairs, summary.predicted, summary.resumed, summary.no_target, summary.errors) == (11, 11, 0, 2, 0)
    assert "11 pairs (11 predicted): 2 no target, 0 errors" in summary.line()
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["pairs_digest"]


def test_a_torn_line_is_dropped_and_the_rest_resumed(pairs_file, tmp_path):
    whole = tmp_path / "whole"
    _run(pairs_file, whole, batch_size=3)
    expected = (whole / "predictions.jsonl").read_bytes()
    out = tmp_path / "out"
    _run(pairs_file, out, batch_size=3)
    lines = expected.splitlines(keepends=True)
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # a crash mid-line
    summary, seg = _run(pairs_file, out, batch_size=5)
    assert (out / "predictions.jsonl").read_bytes() == expected
    assert summary.resumed == 4 and summary.predicted == 7 and seg.calls == [5, 2]
    summary, seg = _run(pairs_file, out)  # complete: nothing to do, no model needed
    assert summary.predicted == 0 and seg.calls == [] and (out / "predictions.jsonl").read_bytes() == expected


def test_leftover_parts_are_merged_in_pair_order(pairs_file, tmp_path):
    """An interrupted 2-rank run left two parts; a single process finishes the gaps and merges."""
    whole = tmp_path / "whole"
    _run(pairs_file, whole)
    lines = (whole / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    out = tmp_path / "out"
    _run(pairs_file, out)
    (out / "predictions.jsonl").unlink()
    (out / "predictions.rank0.jsonl").write_bytes(b"".join(lines[:3]))
    (out / "predictions.rank1.jsonl").write_bytes(b"".join(lines[5:8]) + b'{"id": "8", "tor')
    summary, seg = _run(pairs_file, out)
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", RUN_FILE]
    assert (out / "predictions.jsonl").read_bytes() == b"".join(lines)
    assert summary.resumed == 6 and summary.predicted == 5


def test_other_arguments_are_refused_unless_overwrite(pairs_file, tmp_path):
    out = tmp_path / "out"
    _run(pairs_file, out)
    before = (out / "predictions.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"other arguments \(mask_threshold: 0.5 then, 0.4 now\).*--overwrite"):
        _run(pairs_file, out, mask_threshold=0.4)
    with pytest.raises(ValueError, match=r"save_masks: false then, true now"):
        _run(pairs_file, out, save_masks=True)
    pairs_file.write_text(pairs_file.read_text() + json.dumps({"image": "imgs/0.png", "text": "more"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs_digest"):
        _run(pairs_file, out)
    assert (out / "predictions.jsonl").read_bytes() == before
    summary, _ = _run(pairs_file, out, mask_threshold=0.4, overwrite=True)
    assert summary.predicted == 12 and summary.resumed == 0
    assert json.loads((out / RUN_FILE).read_text())["mask_threshold"] == 0.4

    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="no predictions.run.json describes"):
        _run(pairs_file, other)


def test_a_run_file_from_before_a_key_was_recorded(pairs_file, tmp_path):
    """A folder written before ``full_decode`` was recorded decoded every JPEG in full: a missing
    key stands for true, so ``--full-decode`` continues it and a run without it is told why.
    One written before ``exif_transpose`` read the images as stored: no flag repeats that, and
    the refusal says so."""
    out = tmp_path / "out"
    _run(pairs_file, out, full_decode=True)
    lines = (out / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:4]))  # stopped after 4 pairs
    run = json.loads((out / RUN_FILE).read_text())
    old = {k: v for k, v in run.items() if k not in ("full_decode", "exif_transpose")}
    (out / RUN_FILE).write_text(json.dumps({k: v for k, v in run.items() if k != "full_decode"}))
    with pytest.raises(ValueError, match=r"full_decode: true \(not recorded: an earlier rexfast, which decoded every "
                                         r"JPEG in full: --full-decode continues it\) then, false now\); a rerun must "
                                         r"repeat them"):
        _run(pairs_file, out)
    summary, _ = _run(pairs_file, out, full_decode=True)
    assert summary.resumed == 4 and summary.predicted == 7
    assert (out / "predictions.jsonl").read_bytes() == b"".join(lines)

    (out / RUN_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"exif_transpose: false \(not recorded: an earlier rexfast, which read every "
                                         r"image as stored\) then, true now\): an earlier rexfast read the images as "
                                         r"stored; this one turns them .*; choose another --out-dir, or pass "
                                         r"--overwrite to start over$"):
        _run(pairs_file, out, full_decode=True)
    assert (out / "predictions.jsonl").read_bytes() == b"".join(lines)


def test_png_names_never_collide_and_show_the_shown_mask(pairs_file, tmp_path):
    out = tmp_path / "out"
    _run(pairs_file, out, save_masks=True, save_overlays=True, workers=1)
    stems = file_stems(read_pairs(pairs_file))
    assert stems["5"] == "5" and stems["x/y"].startswith("x_y-") and stems["x_y"].startswith("x_y-")  # twins
    assert stems["x/y"] != stems["x_y"]
    assert stems["a"].startswith("a-") and stems["A"].startswith("A-") and stems[".hidden"].startswith(".hidden-")
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert len(names) == 11 and len({n.casefold() for n in names}) == 11
    assert sorted(p.name for p in (out / "overlays").iterdir()) == names
    no_target = np.asarray(Image.open(out / "masks" / f"{stems['x_y']}.png"))  # row 3, "nothing here"
    assert no_target.shape == (9, 9) and not no_target.any()  # the mask as shown: empty
    image = np.asarray(Image.open(pairs_file.parent / "imgs" / "5.png"))
    mask5 = np.asarray(Image.open(out / "masks" / "5.png"))
    assert set(np.unique(mask5)) <= {0, 255} and np.array_equal(mask5 > 0, image[..., 0] > 127)
    overlay5 = np.asarray(Image.open(out / "overlays" / "5.png"))
    assert overlay5.shape == image.shape and np.array_equal(overlay5[~(mask5 > 0)], image[~(mask5 > 0)])


def test_skip_bad_writes_error_lines_in_place(pairs_file, tmp_path):
    (pairs_file.parent / "imgs" / "6.png").unlink()
    with pytest.raises(ValueError, match=r"1 of the 11 rows is bad; the first, line 7: image not found"):
        _run(pairs_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary, seg = _run(pairs_file, tmp_path / "out", skip_bad=True, batch_size=4)
    recs = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs][6] == "6" and set(recs[6]) == {"id", "image", "text", "error"}
    assert "image not found" in recs[6]["error"] and recs[6]["image"] == "imgs/6.png"
    assert seg.calls == [4, 3, 3] and summary.errors == 1


def test_an_image_broken_after_the_check_stops_the_run_but_keeps_the_lines(pairs_file, tmp_path, monkeypatch):
    from rexfast.engine import batch_predict

    pairs = read_pairs(pairs_file)
    (pairs_file.parent / "imgs" / "5.png").write_bytes(b"broken")
    args = run_arguments("fake-model", pairs, mask_threshold=0.5, no_target_threshold=0.5, precision="fp32")
    with pytest.raises(ValueError, match=r"line 6: cannot read image .*5.png.*\(the 5 lines before it are kept: "):
        predict_pairs(pairs, tmp_path / "out", lambda d: FakeSegmenter(), args, batch_size=4, workers=0,
                      progress=False, device="cpu")
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 5
    assert batch_predict.RUN_FILE in {p.name for p in (tmp_path / "out").iterdir()}
    (pairs_file.parent / "imgs" / "0.png").write_bytes(b"broken")  # none before it
    with pytest.raises(ValueError, match=r"line 1: cannot read image .*0.png.*\(this run wrote no line before it: "):
        predict_pairs(pairs, tmp_path / "none", lambda d: FakeSegmenter(), args, batch_size=4, workers=0,
                      progress=False, device="cpu")



def test_a_truncated_jpeg_passes_the_header_check_and_is_found_during_the_run(pairs_file, tmp_path):
    """Only the header is read up front: a JPEG cut in half passes, then stops the run when it
    is decoded, keeping the line before it (said in the singular); rerun with skip_bad, it is
    an error line and the rest is predicted."""
    import io

    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data, "JPEG")
    (pairs_file.parent / "imgs" / "1.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    pairs = read_pairs(pairs_file)
    assert not pairs.bad
    args = run_arguments("fake-model", pairs, mask_threshold=0.5, no_target_threshold=0.5, precision="fp32")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"line 2: cannot read image .*1.png: image file is truncated .*"
                                         r"\(the 1 line before it is kept: fix it and run again to continue, or "
                                         r"pass --skip-bad\)$"):
        predict_pairs(pairs, out, lambda d: FakeSegmenter(), args, batch_size=4, workers=0, progress=False,
                      device="cpu")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    summary = predict_pairs(pairs, out, lambda d: FakeSegmenter(), args, batch_size=4, workers=0, progress=False,
                            device="cpu", skip_bad=True)
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 11 and "truncated" in recs[1]["error"] and summary.resumed == 1 and summary.errors == 1

@pytest.mark.parametrize("cpus, workers", [({0}, 1), ({0, 1, 2, 3}, 2)])
def test_default_workers_follow_the_cpus_this_process_may_use(pairs_file, tmp_path, monkeypatch, cpus, workers):
    """``--workers`` defaults to min(2, the CPUs of the process's affinity mask): under
    ``taskset -c 0`` one decoding process, not two on one core."""
    import os

    from rexfast.engine import batch_predict

    seen = []
    batches = batch_predict._batches
    monkeypatch.setattr(batch_predict, "_batches", lambda dataset, batch_size, n: seen.append(n) or
                        batches(dataset, batch_size, 0))  # decoded here: the count is what is tested
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus, raising=False)
    _run(pairs_file, tmp_path / "out", workers=None)
    assert seen == [workers]
