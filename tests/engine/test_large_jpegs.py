"""Large JPEGs given as paths are decoded at a reduced size for the model (PIL's ``draft``,
:func:`rexfast.io.decode_image`), and everything the user gets back stays at the file's own
size: the mask, the probability, the RLE, the overlay. PNGs and training/evaluation data
decode in full; ``keep_image=True`` decodes the full image besides, for the overlay, without
changing the model's input; the pixel limit refuses from the header first. Images given as
paths are turned as their EXIF orientation says (the stored pixels stay what datasets read).

The agreement bounds come from measurements (README, "Large JPEGs"): on this test's image the
reduced decode moves the model input by at most 3/255 (mean 0.18/255); without the box that
lines the reduced image up with the full one, by 16/255."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rexfast import Segmenter
from rexfast.data.datasets import preprocess_image
from rexfast.io import DRAFT_MARGIN, decode_image, load_image
from rexfast.models.base import Prediction, ReferringModel
from rexfast.models.preprocessing import Preprocessing


S = 64  # the model input side: a JPEG of at least 4 S = 256 per side is decoded at a reduced size
WIDTH, HEIGHT = 1027, 771  # not multiples of 8: the decoder rounds a partial block up to a whole pixel
PIXEL = (0.0, 0.0, 0.0), (1 / 255,) * 3  # preprocess_image's mean and std for a tensor in 0-255 units


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, sharp-edged discs and sensor-like grain (sigma 6): the detail a
    reduced decode averages away differently from a full decode and a resize."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    base = np.stack([128 + 100 * np.sin(6 * x + 1), 128 + 100 * np.cos(5 * y), 128 + 80 * np.sin(4 * (x + y))], -1)
    for _ in range(6):
        cx, cy, r = g.uniform(0, 1), g.uniform(0, 0.75), g.uniform(0.03, 0.12)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = g.integers(0, 256, 3)
    base += g.normal(0, 6, base.shape).astype(np.float32)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "photo.jpg"
    photo_like(WIDTH, HEIGHT).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def seg():
    """A tiny ReLA with random weights (these tests compare two decodes, not quality)."""
    import dataclasses

    from rexfast.models import registry
    from rexfast.models.text import bert_for_vocab
    from rexfast.models.tokenizer import tokenizer_from_vocab

    tokenizer = tokenizer_from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue", "circle",
                                      "square", "a", "small", "shape"])
    entry = registry.get("rela")
    cfg = entry.config_class.preset("tiny")
    cfg = dataclasses.replace(cfg, bert=bert_for_vocab(cfg.bert, len(tokenizer.get_vocab()), has_weights=False))
    torch.manual_seed(0)
    return Segmenter(entry.model_class(cfg).eval(), tokenizer, Preprocessing(image_size=S))


# ----------------------------------------------------------------------------- rexfast.io
def test_a_large_jpeg_is_decoded_reduced_and_reports_its_own_size(jpeg):
    reduced = decode_image(jpeg, min_side=DRAFT_MARGIN * S)  # 128: 771 // 128 = 6, so scale 1/4
    assert reduced.reduced and reduced.original_size == (WIDTH, HEIGHT)
    assert reduced.image.size == (257, 193) and reduced.image.mode == "RGB"  # ceil(1027 / 4), ceil(771 / 4)
    assert reduced.box == (0, 0, WIDTH / 4, HEIGHT / 4)
    full = decode_image(jpeg)
    assert not full.reduced and full.box is None and full.image.size == full.original_size == (WIDTH, HEIGHT)
    # the smallest scale that keeps min_side: 771 // 300 = 2, so 1/2, not 1/4 (193 < 300)
    assert decode_image(jpeg, min_side=300).image.size == (514, 386)
    # no scale keeps twice min_side on the short side: decoded in full
    assert not decode_image(jpeg, min_side=HEIGHT // 2 + 1).reduced
    assert np.array_equal(np.asarray(load_image(jpeg)), np.asarray(full.image))


def test_other_formats_are_decoded_in_full(jpeg, tmp_path):
    png = tmp_path / "photo.png"
    load_image(jpeg).save(png)
    decoded = decode_image(png, min_side=DRAFT_MARGIN * S)
    assert not decoded.reduced and decoded.image.size == decoded.original_size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-4, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("128", TypeError), (128.0, TypeError)])
def test_min_side_is_checked(jpeg, bad, error):
    """A wrong type is a TypeError, a bad value of the right type a ValueError (the project's rule)."""
    with pytest.raises(error, match="min_side must be a positive int or None") as raised:
        decode_image(jpeg, min_side=bad)
    assert type(raised.value) is error
    with pytest.raises(TypeError, match="exif_transpose must be True or False"):
        decode_image(jpeg, exif_transpose=1)


def test_the_pixel_limit_refuses_a_large_jpeg_before_decoding(tmp_path, monkeypatch, seg):
    """A JPEG whose header says 12000x9000 over 900 bytes of data: refused by the limit, from
    the header, with and without a reduced decode and through the Segmenter: PIL's decoding
    (``ImageFile.load``) is never entered. With the limit raised it is, at 1/8."""
    from PIL import ImageFile

    path = tmp_path / "claims_12000x9000.jpg"
    photo_like(64, 48).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") + (12000).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    decodes = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decodes.append(im.size) or original_load(im))
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", str(10**8))
    for call in (lambda: decode_image(path, min_side=128), lambda: decode_image(path), lambda: seg(path, "red")):
        with pytest.raises(ValueError, match=r"is 12000x9000 pixels, more than 100000000 \(REXFAST_MAX_IMAGE_PIXELS\)"):
            call()
    assert decodes == []
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", str(2 * 10**8))
    assert decode_image(path, min_side=128).original_size == (12000, 9000)
    assert decodes and set(decodes) == {(1500, 1125)}  # decoded at 1/8 (convert() enters load() again: a no-op)


# ----------------------------------------------------------------------------- the front door
def test_masks_come_back_at_the_original_size(jpeg, seg):
    result = seg(jpeg, "the red circle")
    assert result.mask.shape == result.probability.shape == (HEIGHT, WIDTH)
    assert result.rle()["size"] == [HEIGHT, WIDTH]
    assert result.image == jpeg  # the path, not the reduced image: overlay() decodes in full when asked
    assert result.overlay().size == (WIDTH, HEIGHT)
    item = seg.processor(jpeg, "the red circle")
    assert item["original_size"] == (HEIGHT, WIDTH) and "original_image" not in item
    reduced = decode_image(jpeg, min_side=DRAFT_MARGIN * S)
    expected = preprocess_image(reduced.image, S, seg.preprocessing.mean, seg.preprocessing.std, box=reduced.box)
    assert torch.equal(item["image"], expected)
    # a batch of paths, one image with several sentences: the same sizes
    assert [r.mask.shape for r in seg([jpeg, jpeg], ["red", "the blue square"])] == [(HEIGHT, WIDTH)] * 2


def test_keep_image_adds_the_full_image_and_the_switch_decodes_in_full(jpeg, seg):
    full = load_image(jpeg)
    expected = preprocess_image(full, S, seg.preprocessing.mean, seg.preprocessing.std)
    item = seg.processor(jpeg, "the red circle", keep_image=True)
    assert item["original_image"].size == (WIDTH, HEIGHT) and item["original_size"] == (HEIGHT, WIDTH)
    assert np.array_equal(np.asarray(item["original_image"]), np.asarray(full))
    # the model's input is the reduced decode's, as without keep_image: the picture changes no answer
    assert torch.equal(item["image"], seg.processor(jpeg, "the red circle")["image"])
    assert not torch.equal(item["image"], expected)
    seg.processor.reduce_large_jpegs = False
    try:
        assert torch.equal(seg.processor(jpeg, "red")["image"], expected)
        assert seg(jpeg, "red").image.size == (WIDTH, HEIGHT)  # the decoded image itself, as for a small file
    finally:
        seg.processor.reduce_large_jpegs = True
    with pytest.raises(TypeError, match="reduce_large_jpegs must be True or False"):
        type(seg.processor)(seg.tokenizer, seg.preprocessing, reduce_large_jpegs="yes")


def test_batch_prediction_reads_paths_reduced_also_when_overlays_are_saved(jpeg, seg):
    from rexfast.data.pairs import Pair
    from rexfast.engine.batch_predict import _PairInputs

    pair = Pair(index=0, id="p", image=jpeg, text="the red circle", where="line 1", source_image=str(jpeg))
    plain = _PairInputs([pair], seg.processor, keep_image=False)[0]["inputs"]
    overlays = _PairInputs([pair], seg.processor, keep_image=True)[0]["inputs"]
    assert plain["original_size"] == overlays["original_size"] == (HEIGHT, WIDTH)
    assert "original_image" not in plain and overlays["original_image"].size == (WIDTH, HEIGHT)
    assert torch.equal(plain["image"], seg.processor(jpeg, "red")["image"])
    assert torch.equal(plain["image"], overlays["image"])


# ----------------------------------------------------------------------------- agreement with the full decode
class RedderThanGreen(ReferringModel):
    """A deterministic stand-in for a trained model (a random one's mask is everything or noise):
    the probability that a pixel is redder than green, sigmoid((R - G) / 4 levels), a boundary
    about as steep as a trained model's."""

    model_type = "test-redder-than-green"

    def __init__(self, preprocessing):
        super().__init__()
        self.mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)

    def predict(self, images, input_ids, attention_mask, sample_seeds=None):
        rgb = (images * self.std + self.mean) * 255
        return Prediction(mask=torch.sigmoid((rgb[:, 0] - rgb[:, 1]) / 4), no_target=None)


def test_the_reduced_decode_gives_nearly_the_full_decodes_input_and_mask(jpeg, seg, tmp_path):
    full = preprocess_image(load_image(jpeg), S, *PIXEL)
    reduced = decode_image(jpeg, min_side=DRAFT_MARGIN * S)
    diff = (preprocess_image(reduced.image, S, *PIXEL, box=reduced.box) - full).abs()
    assert diff.max() <= 4 and diff.mean() <= 0.25  # measured 3 and 0.18 (0-255 units)
    unaligned = (preprocess_image(reduced.image, S, *PIXEL) - full).abs()
    assert unaligned.max() >= 8  # measured 16: the box is what lines the two up

    # The mask at 1027x771 is the 64x64 probability resized, so a boundary moves by ~16 pixels per
    # input pixel: a change of one level in the input moves it visibly. Measured: 99.63% of the
    # pixels agree with the full decode's mask (60% of the image in the mask); saving the same
    # image again at JPEG quality 95 gives 99.80%.
    redder = Segmenter(RedderThanGreen(seg.preprocessing), seg.tokenizer, seg.preprocessing)
    ours = redder(jpeg, "red")
    redder.processor.reduce_large_jpegs = False
    theirs = redder(jpeg, "red")
    assert ours.mask.shape == theirs.mask.shape == (HEIGHT, WIDTH)
    assert 0.4 < theirs.mask.mean() < 0.8
    assert (ours.mask == theirs.mask).mean() >= 0.995


def test_predict_full_decode_turns_the_reduced_decode_off(jpeg, seg, tmp_path, monkeypatch):
    """``predict --pairs ... --full-decode``: the segmenter decodes every JPEG in full, and the run
    file records it (a rerun without the flag is a different run: its masks may move a pixel)."""
    import json

    from rexfast import cli
    from rexfast.engine import batch_predict
    from rexfast.engine.segmenter import Segmenter as SegmenterClass

    seen = []

    def fake_from_pretrained(source, **kw):
        seen.append(kw)
        return seg

    monkeypatch.setattr(SegmenterClass, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(batch_predict, "source_fingerprint", lambda source: "test")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(jpeg), "text": "the red circle", "id": "a"}) + "\n")
    out = tmp_path / "out"
    try:
        assert cli.main(["predict", "--checkpoint", "model", "--pairs", str(pairs), "--out-dir", str(out), "--workers", "0",
                         "--full-decode", "--no-progress", "--device", "cpu"]) == 0
        assert seen and seg.processor.reduce_large_jpegs is False
        assert json.loads((out / batch_predict.RUN_FILE).read_text())["full_decode"] is True
        row = json.loads((out / batch_predict.PREDICTIONS_FILE).read_text().splitlines()[0])
        assert row["id"] == "a" and "error" not in row
    finally:
        seg.processor.reduce_large_jpegs = True
    assert cli.main(["predict", "--checkpoint", "model", "--pairs", str(pairs), "--out-dir", str(tmp_path / "reduced"),
                     "--workers", "0", "--no-progress", "--device", "cpu"]) == 0
    assert seg.processor.reduce_large_jpegs is True
    assert json.loads((tmp_path / "reduced" / batch_predict.RUN_FILE).read_text())["full_decode"] is False


def _source_is(monkeypatch, segmenter) -> None:
    """Every ``--checkpoint`` loads ``segmenter`` (the CLI's own code runs around it)."""
    from rexfast.engine import batch_predict
    from rexfast.engine.segmenter import Segmenter as SegmenterClass

    monkeypatch.setattr(SegmenterClass, "from_pretrained", staticmethod(lambda source, **kw: segmenter))
    monkeypatch.setattr(batch_predict, "source_fingerprint", lambda source: "test")


def _predict_pairs(pairs, out, *flags) -> None:
    from rexfast import cli

    assert cli.main(["predict", "--checkpoint", "model", "--pairs", str(pairs), "--out-dir", str(out), "--workers", "0",
                     "--no-progress", "--device", "cpu", *flags]) == 0


def test_save_overlays_changes_no_prediction(seg, tmp_path, monkeypatch):
    """``--save-overlays`` only adds PNGs: on a JPEG large enough to be decoded reduced (its
    shorter side 1500 >= 4 S = 256: at 1/8 here) predictions.jsonl is byte-identical with and
    without it, and so computed as the run file's ``full_decode: false`` says (a full decode
    gives other bytes, so the comparison can fail)."""
    import json

    from rexfast.engine import batch_predict

    big = tmp_path / "big.jpg"
    photo_like(2000, 1500, seed=1).save(big, quality=90)
    assert decode_image(big, min_side=DRAFT_MARGIN * S).image.size == (250, 188)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "big.jpg", "text": "the red circle", "id": "big"}) + "\n")
    _source_is(monkeypatch, seg)
    _predict_pairs(pairs, tmp_path / "plain")
    _predict_pairs(pairs, tmp_path / "overlays", "--save-overlays")
    try:
        _predict_pairs(pairs, tmp_path / "full", "--full-decode")
    finally:
        seg.processor.reduce_large_jpegs = True
    lines = {name: (tmp_path / name / batch_predict.PREDICTIONS_FILE).read_bytes() for name in ("plain", "overlays", "full")}
    assert lines["overlays"] == lines["plain"]
    assert lines["full"] != lines["plain"]
    run = json.loads((tmp_path / "overlays" / batch_predict.RUN_FILE).read_text())
    assert run["full_decode"] is False and run["save_overlays"] is True
    with Image.open(tmp_path / "overlays" / "overlays" / "big.png") as overlay:
        assert overlay.size == (2000, 1500)  # drawn on the full image


def test_image_takes_full_decode_as_what_it_does_anyway(seg, tmp_path, monkeypatch, capsys):
    """``predict --image`` always decodes in full: ``--full-decode`` is accepted and changes
    nothing; the batch forms' other flags are one error naming them, in good grammar."""
    from rexfast import cli

    _source_is(monkeypatch, seg)
    image = tmp_path / "small.jpg"
    photo_like(300, 280).save(image, quality=90)
    outputs = {}
    for name, flags in (("plain", []), ("full", ["--full-decode"])):
        assert cli.main(["predict", "--checkpoint", "model", "--image", str(image), "--text", "the red circle",
                         "--out-dir", str(tmp_path / name), "--device", "cpu", *flags]) == 0
        outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
    assert outputs["full"] == outputs["plain"] and len(outputs["plain"]) == 2
    capsys.readouterr()
    for flags, says in ((["--save-masks"], "--save-masks belongs to the batch forms"),
                        (["--save-masks", "--skip-bad"], "--save-masks, --skip-bad belong to the batch forms")):
        assert cli.main(["predict", "--checkpoint", "model", "--image", str(image), "--text", "red", *flags]) == 2
        assert capsys.readouterr().err.strip() == f"rexfast: error: {says} (--pairs, --images)"


# ----------------------------------------------------------------------------- EXIF orientation
def _oriented(path, pixels: np.ndarray, orientation: int, **save) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **save)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_user_images_are_turned_as_their_exif_orientation_says(tmp_path, orientation):
    """``exif_transpose=True`` gives what PIL's ``ImageOps.exif_transpose`` and the web page
    (``rexfast serve``'s ``open_image``) give, in full and at a reduced size: the reduced
    image's box turns with it (the model input stays within the measured 3/255 of the full
    decode's; the unturned box is off by 12-20/255 for a flip, more for a quarter turn). The
    default reads the stored pixels."""
    from PIL import ImageOps

    from rexfast.serve.checks import open_image

    path = tmp_path / f"o{orientation}.jpg"
    _oriented(path, np.asarray(photo_like(WIDTH, HEIGHT)), orientation, quality=90)
    with Image.open(path) as im:
        stored, viewed = np.asarray(im.convert("RGB")), np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), stored)
    assert np.array_equal(np.asarray(load_image(path, exif_transpose=True)), viewed)
    assert np.array_equal(np.asarray(open_image(path)), viewed)
    turned = orientation >= 5
    size = (HEIGHT, WIDTH) if turned else (WIDTH, HEIGHT)
    reduced = decode_image(path, min_side=DRAFT_MARGIN * S, exif_transpose=True)
    assert reduced.reduced and reduced.original_size == size
    assert reduced.image.size == ((193, 257) if turned else (257, 193))
    full = preprocess_image(Image.fromarray(viewed), S, *PIXEL)
    diff = (preprocess_image(reduced.image, S, *PIXEL, box=reduced.box) - full).abs()
    assert diff.max() <= 4 and diff.mean() <= 0.25  # measured 3 and 0.18 for every orientation
    if orientation in (2, 3, 4):
        stored_box = decode_image(path, min_side=DRAFT_MARGIN * S).box
        assert reduced.box != stored_box
        assert (preprocess_image(reduced.image, S, *PIXEL, box=stored_box) - full).abs().max() >= 8


def test_predict_answers_in_the_orientation_a_viewer_shows(seg, tmp_path, monkeypatch):
    """A JPEG stored 48x32 and tagged orientation 6 (shown 32x48): ``predict --image`` and
    ``--pairs`` answer at 32x48, exactly as for the already-turned pixels (a PNG of them); a
    large one decoded reduced answers at its turned size too, and the run file says so."""
    import json

    from rexfast import cli
    from rexfast.data.masks import decode_segmentation
    from rexfast.engine import batch_predict

    _source_is(monkeypatch, seg)
    stored = np.asarray(photo_like(48, 32, seed=3))
    _oriented(tmp_path / "phone.jpg", stored, 6, quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg", exif_transpose=True))
    assert upright.shape == (48, 32, 3)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    _oriented(tmp_path / "big_phone.jpg", np.asarray(photo_like(WIDTH, HEIGHT)), 6, quality=90)

    files = {}
    for name in ("phone.jpg", "upright.png"):
        out = tmp_path / f"single_{name}"
        assert cli.main(["predict", "--checkpoint", "model", "--image", str(tmp_path / name), "--text",
                         "the red circle", "--out-dir", str(out), "--device", "cpu"]) == 0
        files[name] = {p.name.split("_", 1)[1]: p.read_bytes() for p in out.iterdir()}
    assert files["phone.jpg"] == files["upright.png"] and len(files["phone.jpg"]) == 2
    for written in (tmp_path / "single_phone.jpg").iterdir():  # the mask and the overlay
        with Image.open(written) as png:
            assert png.size == (32, 48)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": name, "text": "the red circle", "id": name}) + "\n"
                             for name in ("phone.jpg", "upright.png", "big_phone.jpg")))
    _predict_pairs(pairs, tmp_path / "batch")
    records = [json.loads(line) for line in (tmp_path / "batch" / batch_predict.PREDICTIONS_FILE).read_text().splitlines()]
    phone, png, big = records
    assert (phone["height"], phone["width"]) == (48, 32) and phone["segmentation"]["size"] == [48, 32]
    assert {k: v for k, v in phone.items() if k not in ("id", "image")} == {
        k: v for k, v in png.items() if k not in ("id", "image")}
    assert (big["height"], big["width"]) == (WIDTH, HEIGHT)  # 1027 tall, 771 wide: as shown
    assert decode_segmentation(big["segmentation"], WIDTH, HEIGHT).shape == (WIDTH, HEIGHT)
    assert json.loads((tmp_path / "batch" / batch_predict.RUN_FILE).read_text())["exif_transpose"] is True
    # the Python API and its overlay agree
    result = seg(tmp_path / "big_phone.jpg", "the red circle")
    assert result.mask.shape == (WIDTH, HEIGHT) and result.overlay().size == (HEIGHT, WIDTH)
