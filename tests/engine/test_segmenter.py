"""``rexfast.Segmenter``: the one-call API against the model's own ``predict``, batches
against one-by-one calls, the two thresholds, RLE, the picklable processor, and every
bad input naming its argument. Models are tiny or demo presets with random weights (no
training needed: these tests compare paths, not quality)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rexfast import Segmentation, Segmenter
from rexfast.engine.inference import NoTargetDecision
from rexfast.models.preprocessing import Preprocessing

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue", "green", "circle", "square", "left",
         "right", "of", "a", "shape", "big", "small"]
TEXTS = ["the red circle", "a blue square", "the green circle left of the red square", "red", "the small shape"]


@pytest.fixture(scope="module")
def tokenizer():
    from rexfast.models.tokenizer import tokenizer_from_vocab

    return tokenizer_from_vocab(VOCAB)


def build(name: str, preset: str, tokenizer, **overrides):
    """A registered model of ``preset`` with its text encoder sized to the test vocabulary."""
    from rexfast.models import registry
    from rexfast.models.text import bert_for_vocab

    entry = registry.get(name)
    cfg = entry.config_class.preset(preset, **overrides)
    cfg = dataclasses.replace(cfg, bert=bert_for_vocab(cfg.bert, len(tokenizer.get_vocab()), has_weights=False))
    torch.manual_seed(0)
    return entry.model_class(cfg).eval()


def images(count: int = 5):
    """uint8 RGB images of different, non-square sizes (the outputs must come back at each one's size)."""
    g = np.random.default_rng(0)
    sizes = [(45, 37), (64, 64), (30, 80), (50, 50), (33, 71)]
    return [g.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


def gap_threshold(probability: np.ndarray) -> float:
    """A mask threshold near the median probability that lies in the widest gap between
    neighbouring values there, so that float rounding (~1e-7) cannot move a pixel across it."""
    values = np.unique(probability.ravel())
    mid = len(values) // 2
    window = values[max(0, mid - 50): mid + 50]
    k = int(np.diff(window).argmax())
    return float((window[k] + window[k + 1]) / 2)


# ----------------------------------------------------------------------------- the same numbers as model.predict
@pytest.mark.parametrize("name", ["cgformer", "rela"])
def test_segmenter_gives_model_predict_numbers(tokenizer, name):
    """On the processor's tensors, ``model.predict`` → bicubic resize to the image → thresholds
    is exactly what the Segmenter returns (probability, mask, no-target decision)."""
    model = build(name, "tiny", tokenizer)
    seg = Segmenter(model, tokenizer, Preprocessing(image_size=64))
    image = images(1)[0]
    item = seg.processor(image, "the red circle")
    assert item["image"].shape == (3, 64, 64) and item["input_ids"].shape == (20,)
    assert item["original_size"] == (45, 37)
    with torch.no_grad():
        pred = model.predict(item["image"][None], item["input_ids"][None], item["attention_mask"][None])
    prob = F.interpolate(pred.mask[:, None].float(), size=(45, 37), mode="bicubic", align_corners=True)[0, 0]
    threshold = gap_threshold(prob.numpy())
    result = seg(image, "the red circle", mask_threshold=threshold)
    assert isinstance(result, Segmentation) and result.text == "the red circle"
    assert result.probability.dtype == np.float32 and result.mask.dtype == np.bool_
    assert result.mask.shape == result.probability.shape == (45, 37)
    assert np.array_equal(result.probability, prob.numpy())
    expected = prob.numpy() > threshold
    nt = None if pred.no_target is None else float(pred.no_target[0])
    assert result.no_target_prob == nt
    if nt is not None:
        assert result.no_target == (nt > 0.5)
    if not result.no_target:
        assert np.array_equal(result.mask, expected) and 0 < expected.sum() < expected.size
    assert np.array_equal(result.raw_mask, expected)


# ----------------------------------------------------------------------------- batch == one by one
@pytest.mark.parametrize("name,preset,size", [("rela", "demo", 64), ("cgformer", "demo", 128)])
def test_a_batch_answers_as_one_by_one_calls(tokenizer, name, preset, size):
    """The demo presets (CGFormer's draws Gumbel noise at inference) give the same masks in
    batches of 2 and 5 as in one call per pair, and the same again on a second run whatever
    torch's global RNG holds."""
    model = build(name, preset, tokenizer)
    seg = Segmenter(model, tokenizer, Preprocessing(image_size=size))
    imgs = images(5)
    alone = [seg(image, text) for image, text in zip(imgs, TEXTS)]
    thresholds = [gap_threshold(r.probability) for r in alone]
    alone = [seg(image, text, mask_threshold=t) for image, text, t in zip(imgs, TEXTS, thresholds)]
    for batch_size in (2, 5):
        torch.manual_seed(batch_size)  # the global RNG must not matter
        batched = seg(imgs, TEXTS, batch_size=batch_size)
        for a, b, t in zip(alone, batched, thresholds):
            assert b.text == a.text and b.mask.shape == a.mask.shape
            np.testing.assert_allclose(b.probability, a.probability, atol=1e-5, rtol=0)
            assert np.array_equal(b.probability > t, a.probability > t)
            assert b.no_target == a.no_target and b.no_target_reason == a.no_target_reason
            if a.no_target_prob is not None:
                assert b.no_target_prob == pytest.approx(a.no_target_prob, abs=1e-6)
    assert any(0 < (r.probability > t).sum() < r.probability.size for r, t in zip(alone, thresholds))


def test_one_image_many_sentences_and_one_sentence_many_images(tokenizer):
    model = build("rela", "tiny", tokenizer)
    seg = Segmenter(model, tokenizer, Preprocessing(image_size=64))
    image = images(1)[0]
    many = seg(image, TEXTS[:3])
    assert [r.text for r in many] == TEXTS[:3]
    for r, text in zip(many, TEXTS[:3]):  # a batch of 3 against one call each: float rounding apart
        np.testing.assert_allclose(r.probability, seg(image, text).probability, atol=1e-5, rtol=0)
    imgs = images(3)
    over = seg(imgs, "the red circle", batch_size=2)
    assert [r.mask.shape for r in over] == [im.shape[:2] for im in imgs]


def test_images_as_pil_array_or_path_give_the_same_answer(tokenizer, tmp_path):
    model = build("rela", "tiny", tokenizer)
    seg = Segmenter(model, tokenizer, Preprocessing(image_size=64))
    array = images(1)[0]
    path = tmp_path / "scene.png"
    Image.fromarray(array).save(path)
    answers = [seg(source, "the blue square") for source in (array, Image.fromarray(array), path, str(path),
                                                              Image.fromarray(array).convert("RGBA"))]
    for other in answers[1:]:
        assert np.array_equal(other.probability, answers[0].probability)


# ----------------------------------------------------------------------------- thresholds
def test_the_two_thresholds_decide_two_things(tokenizer):
    """The issue's case: most pixels above a low mask threshold and a no-target probability of
    0.48. One threshold of 0.1 for both said "no target" with an empty mask; split, the mask
    threshold 0.1 keeps the pixels and the head (0.48 ≤ 0.5) says there is a target."""
    from rexfast.engine.inference import EMPTY_MASK, HEAD, predict_batch
    from rexfast.models.base import Prediction

    class Fixed(torch.nn.Module):
        def __init__(self, mask, nt, if_empty=False):
            super().__init__()
            self.mask, self.nt, self.empty_mask_says_no_target = mask, nt, if_empty

        def predict(self, images, input_ids, attention_mask):
            return Prediction(mask=self.mask, no_target=self.nt)

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 32, 32, generator=g) * 0.3  # in [0, 0.3)
    above = int((probs > 0.1).sum())
    batch = {"image": torch.zeros(1, 3, 32, 32), "input_ids": torch.zeros(1, 4, dtype=torch.long),
             "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    nt = torch.tensor([0.48])
    (old,) = predict_batch(Fixed(probs, nt), batch, [(32, 32)], mask_threshold=0.1, no_target_threshold=0.1)
    assert old.no_target and old.reason == HEAD and not old.shown_mask.any()
    (split,) = predict_batch(Fixed(probs, nt), batch, [(32, 32)], mask_threshold=0.1, no_target_threshold=0.5)
    assert not split.no_target and split.reason is None and int(split.shown_mask.sum()) == above
    (empty,) = predict_batch(Fixed(probs, nt, if_empty=True), batch, [(32, 32)])  # nothing above 0.5
    assert empty.no_target and empty.reason == EMPTY_MASK
    (headless,) = predict_batch(Fixed(probs, None), batch, [(32, 32)])
    assert headless.no_target and headless.reason == EMPTY_MASK and headless.no_target_prob is None


def test_the_explanation_names_the_rule_that_decided(tokenizer):
    """The decision is made once, with its reason (decide_no_target); the result only shows it."""
    from rexfast.engine.inference import decide_no_target

    def result(prob, empty_rule=True):
        mask = np.zeros((4, 4), bool)
        decision = decide_no_target(mask_empty=True, no_target_prob=prob, no_target_threshold=0.5, mask_threshold=0.5,
                                    empty_mask_says_no_target=empty_rule)
        return Segmentation(mask=mask, probability=np.full((4, 4), 0.2, np.float32), decision=decision,
                            no_target_prob=prob, text="x", mask_threshold=0.5, no_target_threshold=0.5)

    head = result(0.91)
    assert head.no_target_reason == "head" and head.explanation.startswith("no target")
    assert "no-target head's probability 0.910 exceeds the no-target threshold 0.5" in head.explanation
    empty = result(0.3)
    assert empty.no_target_reason == "empty_mask" and "mask threshold 0.5 " in empty.explanation
    assert "0.300 does not exceed the no-target threshold 0.5" in empty.explanation
    assert "no no-target head" in result(None, empty_rule=False).explanation
    target = result(0.3, empty_rule=False)  # the head says target and an empty mask is no answer for this model
    assert not target.no_target and target.no_target_reason is None and target.explanation.startswith("0 of 16")


def test_thresholds_are_defaults_of_from_pretrained_and_of_each_call(tokenizer):
    model = build("rela", "tiny", tokenizer)
    seg = Segmenter(model, tokenizer, Preprocessing(image_size=64), mask_threshold=0.3, no_target_threshold=0.9)
    image = images(1)[0]
    r = seg(image, "red")
    assert (r.mask_threshold, r.no_target_threshold) == (0.3, 0.9)
    assert np.array_equal(r.raw_mask, r.probability > 0.3)
    r2 = seg(image, "red", mask_threshold=0.6, no_target_threshold=0.2)
    assert (r2.mask_threshold, r2.no_target_threshold) == (0.6, 0.2) and r2.no_target and r2.no_target_reason == "head"


# ----------------------------------------------------------------------------- results
def test_rle_decodes_to_the_mask_and_overlay_paints_it(tokenizer):
    from pycocotools import mask as mask_utils

    g = np.random.default_rng(1)
    mask = np.zeros((45, 37), bool)
    mask[5:30, 3:20] = True
    mask ^= g.random((45, 37)) < 0.05  # ragged: many runs
    image = images(1)[0]
    result = Segmentation(mask=mask, probability=mask.astype(np.float32), decision=NoTargetDecision(False, None, ""),
                          no_target_prob=0.1, text="x", mask_threshold=0.5, no_target_threshold=0.5,
                          image=Image.fromarray(image))
    rle = result.rle()
    assert rle["size"] == [45, 37] and isinstance(rle["counts"], str)
    assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool),
                          mask)
    over = np.asarray(result.overlay())
    assert over.shape == image.shape and over.dtype == np.uint8
    assert np.array_equal(over[~mask], image[~mask]) and not np.array_equal(over[mask], image[mask])
    # and from a real call: the RLE of the returned mask
    seg = Segmenter(build("rela", "tiny", tokenizer), tokenizer, Preprocessing(image_size=64))
    real = seg(image, "the red circle", no_target_threshold=0.9)  # (random weights: keep the mask)
    decoded = mask_utils.decode({"size": real.rle()["size"], "counts": real.rle()["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), real.mask) and real.mask.any()
    assert real.overlay().size == (37, 45)


def test_processor_pickles_and_segment_items_runs_a_dataloader_batch(tokenizer, tmp_path):
    """The processor crosses into DataLoader worker processes; their items run as one batch
    with the same answers as direct calls."""
    seg = Segmenter(build("rela", "tiny", tokenizer), tokenizer, Preprocessing(image_size=64))
    paths = []
    for i, array in enumerate(images(4)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    processor = pickle.loads(pickle.dumps(seg.processor))
    assert processor(paths[0], "red")["input_ids"].tolist() == seg.processor(paths[0], "red")["input_ids"].tolist()

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return seg.processor(paths[i], TEXTS[i])

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=4, num_workers=1, collate_fn=list)
    (items,) = list(loader)
    results = seg.segment_items(items)
    direct = seg([str(p) for p in paths], TEXTS[:4], batch_size=4)
    for a, b in zip(results, direct):
        assert np.array_equal(a.probability, b.probability) and a.text == b.text
    assert results[0].image is None
    with pytest.raises(ValueError, match="pass overlay"):
        results[0].overlay()
    assert results[0].overlay(Image.open(paths[0])).size == Image.open(paths[0]).size


def test_reduce_large_jpegs_takes_only_true_or_false(tokenizer):
    """README tells users to set the attribute: a value that is no bool ("no", 0) is refused
    instead of being kept and read as true; the processor still pickles with the setting."""
    seg = Segmenter(build("rela", "tiny", tokenizer), tokenizer, Preprocessing(image_size=64))
    assert seg.processor.reduce_large_jpegs is True
    for bad in ("no", 0, None, 1.0):
        with pytest.raises(TypeError, match=f"reduce_large_jpegs must be True or False, got {bad!r}"):
            seg.processor.reduce_large_jpegs = bad
        assert seg.processor.reduce_large_jpegs is True  # unchanged
    seg.processor.reduce_large_jpegs = False
    assert pickle.loads(pickle.dumps(seg.processor)).reduce_large_jpegs is False


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_argument(tokenizer, tmp_path):
    seg = Segmenter(build("rela", "tiny", tokenizer), tokenizer, Preprocessing(image_size=64))
    image = images(1)[0]
    cases = [
        (ValueError, "images and texts must pair up: 2 images, 3 texts", lambda: seg([image, image], ["a", "b", "c"])),
        (ValueError, "texts is empty", lambda: seg(image, "   ")),
        (ValueError, r"texts\[1\] is empty", lambda: seg(image, ["red", ""])),
        (TypeError, "texts must be a str", lambda: seg(image, 3)),
        (ValueError, "texts is an empty list", lambda: seg(image, [])),
        (ValueError, "images is an empty list", lambda: seg([], "red")),
        (TypeError, "images must be a PIL image, a uint8", lambda: seg(42, "red")),
        (TypeError, "images must be a uint8 array", lambda: seg(image.astype(np.float32), "red")),
        (ValueError, r"images\[1\] must be an \(H, W, 3\) RGB array, got shape \(45, 37\)",
         lambda: seg([image, image[..., 0]], ["a", "b"])),
        (FileNotFoundError, "image not found", lambda: seg(tmp_path / "missing.png", "red")),
        (ValueError, "mask_threshold must lie strictly between 0 and 1", lambda: seg(image, "red", mask_threshold=1.0)),
        (ValueError, "no_target_threshold must lie strictly between 0 and 1",
         lambda: seg(image, "red", no_target_threshold=0)),
        (TypeError, "mask_threshold must be a number", lambda: seg(image, "red", mask_threshold="0.5")),
        (ValueError, "batch_size must be a positive int", lambda: seg(image, "red", batch_size=0)),
        (TypeError, "batch_size must be a positive int", lambda: seg(image, "red", batch_size=2.0)),
        (ValueError, "mask_threshold must lie strictly", lambda: Segmenter(seg.model, tokenizer, mask_threshold=-1)),
        (TypeError, "model must be a rexfast model", lambda: Segmenter(torch.nn.Linear(2, 2), tokenizer)),
        (ValueError, "items must be a non-empty list", lambda: seg.segment_items([])),
        (TypeError, r"items\[0\] is not a seg.processor", lambda: seg.segment_items([{"image": 1}])),
    ]
    for kind, message, call in cases:
        with pytest.raises(kind, match=message):
            call()
