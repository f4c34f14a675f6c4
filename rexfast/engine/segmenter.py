"""``rexfast.Segmenter``: segment what a sentence names in your own images, in one call.

::

    from rexfast import Segmenter

    seg = Segmenter.from_pretrained("runs/demo/train/best")       # folder, best.pt, released .pth, Hub id
    result = seg("photo.jpg", "the dog on the left")               # PIL image, uint8 (H, W, 3) array or path
    result.mask, result.no_target, result.overlay().save("overlay.png")
    results = seg([img1, img2], ["the red circle", "the blue square"], batch_size=8)   # pairs
    results = seg(img1, ["the red circle", "the blue square"])                          # one image, many sentences

A :class:`Segmentation` holds the mask at the image's own size, the probability map,
the no-target decision, which rule made it, and how to draw or encode it.

What a call does, in the order the authors' evaluation does it (:mod:`rexfast.engine.inference`):
the image is resized to the model's input size and normalised, the sentence tokenized
(:class:`Processor`, the model folder's ``preprocessor_config.json``), the model's
``predict`` gives the mask probability at the input size and the no-target probability,
the probability map is resized (bicubic) to the image's size and thresholded at
``mask_threshold``, and the answer is "no target" where the no-target probability exceeds
``no_target_threshold`` or, for a model without a no-target head (or with
``no_target_if_empty``), where the mask is empty.

A model that draws noise at inference (CGFormer with ``eval_noise``, the demo preset)
draws each sample's noise from the Segmenter's ``seed``: the same answer on every run, and
the same answer in a batch as alone. In fp32 a batch gives the masks of one call per pair
(the probabilities agree to float rounding, ~1e-6); in bf16 (``precision="auto"`` on a CPU
with native bf16) the rounding depends on the batch, so a pixel right at a threshold can
differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD, NoTargetDecision, check_threshold, predict_batch
from .loading import load_model

OVERLAY_COLOUR = (255, 0, 255)  # magenta: unlike any common scene colour


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class Segmentation:
    """One answer: what ``text`` names in one image.

    ``mask``: bool (H, W) at the image's own size, empty when the answer is "no target".
    ``probability``: float32 (H, W), the model's mask probability resized to the image.
    ``decision``: whether the answer is "no target", the rule that said so and why
    (:class:`rexfast.engine.inference.NoTargetDecision`, decided once, where the model ran);
    ``no_target`` and ``no_target_reason`` read it.
    ``no_target_prob``: the no-target head's probability (None for a model without one).
    ``internals``: with ``explain=True``, what the model grouped to reach this answer
    (:class:`rexfast.models.explain.TokenGrouping` for CGFormer, :class:`~rexfast.models.explain.RegionMinimap`
    for ReLA; :func:`rexfast.engine.explain_figure.explain_figure` draws it); None otherwise.
    """

    mask: np.ndarray
    probability: np.ndarray
    decision: NoTargetDecision
    no_target_prob: Optional[float]
    text: str
    mask_threshold: float
    no_target_threshold: float
    # the PIL image it was computed on, when kept (overlay() draws on it); for a large JPEG given as a
    # path and decoded at reduced size for the model, its path (overlay() decodes it in full when asked)
    image: object = None
    internals: object = None  # explain=True: the model's internals for this answer (rexfast.models.explain)

    @property
    def no_target(self) -> bool:
        """The model says nothing in the image matches the sentence."""
        return self.decision.no_target

    @property
    def no_target_reason(self) -> Optional[str]:
        """Which rule said "no target": ``"head"`` (the no-target probability exceeds
        ``no_target_threshold``) or ``"empty_mask"`` (no pixel exceeds ``mask_threshold``: a
        model without a no-target head, or one trained with ``no_target_if_empty``); None for a
        target."""
        return self.decision.reason

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return tuple(self.mask.shape)

    @property
    def raw_mask(self) -> np.ndarray:
        """``probability > mask_threshold`` even where the answer is "no target": the pixels the
        GRES metrics count in the union (ReLA's evaluator keeps them)."""
        return self.probability > self.mask_threshold

    @property
    def explanation(self) -> str:
        """One sentence saying what was found, and for "no target" which rule decided it."""
        h, w = self.size
        if not self.no_target:
            pixels = int(self.mask.sum())
            return f"{pixels} of {h * w} pixels ({100.0 * pixels / (h * w):.1f}%) match the sentence"
        return f"no target (nothing in the image matches the sentence; the mask is empty): {self.decision.why}"

    def overlay(self, image=None, *, colour=OVERLAY_COLOUR, alpha: float = 0.6):
        """The image with the mask painted over it in ``colour`` (magenta by default) as a PIL image.
        ``image`` defaults to the one the result was computed on (for a large JPEG given as a
        path, the path: decoded in full here)."""
        from PIL import Image

        image = self.image if image is None else image
        if image is None:
            raise ValueError("image is needed: this result does not hold the image it was computed on "
                             "(results of segment_items() keep none), pass overlay(image)")
        pixels = np.asarray(_as_pil(image, "image").convert("RGB"), dtype=np.float32)
        if pixels.shape[:2] != self.mask.shape:
            raise ValueError(f"image is {pixels.shape[1]}×{pixels.shape[0]} but the mask is "
                             f"{self.mask.shape[1]}×{self.mask.shape[0]} (width × height)")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        return Image.fromarray(overlay_pixels(pixels, self.mask, alpha=float(alpha), colour=colour))

    def rle(self) -> dict:
        """The mask as a COCO compressed RLE, ``{"size": [h, w], "counts": str}``, as
        ``pycocotools.mask.encode`` writes it (``pycocotools.mask.decode`` gives the mask back)."""
        from rexfast.data.masks import encode_mask  # pycocotools, imported only when needed

        return encode_mask(self.mask)

    def __repr__(self) -> str:
        nt = "None" if self.no_target_prob is None else f"{self.no_target_prob:.3f}"
        return (f"Segmentation(text={self.text!r}, size={self.size}, pixels={int(self.mask.sum())}, "
                f"no_target={self.no_target}, no_target_prob={nt}, no_target_reason={self.no_target_reason!r})")


def overlay_pixels(pixels, mask: np.ndarray, *, alpha: float = 0.6, colour=OVERLAY_COLOUR) -> np.ndarray:
    """uint8 (H, W, 3): ``pixels`` with ``colour`` blended in at ``alpha`` where ``mask`` is set."""
    out = np.asarray(pixels, dtype=np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- inputs
def _check_array(image: np.ndarray, name: str) -> None:
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 array (values 0-255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must be an (H, W, 3) RGB array, got shape {tuple(image.shape)}")


def _check_image(image, name: str) -> None:
    """The cheap checks, before any work: the type, an array's dtype and shape, that a path is a file."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        _check_array(image, name)
    elif isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image} ({name})")
    elif not isinstance(image, Image.Image):
        _as_pil(image, name)  # the TypeError naming what is accepted


def _as_pil(image, name: str = "image"):
    """An RGB PIL image from a PIL image, a uint8 (H, W, 3) array or a path (a file is turned
    as its EXIF orientation says, as viewers and the web page show it; PIL images and arrays
    are used as they are)."""
    from PIL import Image

    from ..io import load_image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        _check_array(image, name)
        return Image.fromarray(np.ascontiguousarray(image))
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, exif_transpose=True)
    raise TypeError(f"{name} must be a PIL image, a uint8 (H, W, 3) numpy array or a path, got "
                    f"{type(image).__name__}")


def _check_text(text, name: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: say what to segment, e.g. \"the red circle\"")
    return text


def _check_each(values, many: bool, check, name: str, noun: str) -> None:
    """``check`` ``values`` (named ``name``), or each of them (``name[i]``) when ``many``: a list
    that must not be empty (it would give no answer; ``noun`` says what to give)."""
    if not many:
        check(values, name)
        return
    if not values:
        raise ValueError(f"{name} is an empty list: give at least one {noun}")
    for i, value in enumerate(values):
        check(value, f"{name}[{i}]")


class Processor:
    """Image + sentence → the model's inputs, as training preprocessed them (picklable: use it
    in DataLoader workers).

    ``processor(image, text)`` → ``{"image": float32 (3, S, S), "input_ids": int64 (L,),
    "attention_mask": int64 (L,), "original_size": (h, w), "text": text}``; with
    ``keep_image=True`` also ``"original_image"`` (the RGB PIL image in full, for overlays).
    ``S`` and ``L`` are the preprocessing's ``image_size`` and ``max_tokens``.

    An image given as a path is turned as its EXIF orientation tag says (a phone photo stored
    4000x3000 and tagged "rotate 90°" is 3000x4000, as viewers and ``rexfast serve`` show it),
    so masks and ``original_size`` are in the orientation the user sees. PIL images and
    arrays are used as they are (``PIL.Image.open`` does not turn an image).

    A JPEG given as a path and at least ``4 S`` pixels on each side is decoded at a reduced
    size (the decoder's 1/2, 1/4 or 1/8 scale that keeps at least ``2 S`` =
    :data:`rexfast.io.DRAFT_MARGIN` ``S`` per side, :func:`rexfast.io.decode_image`): the model
    sees the image resized to ``S`` either way, and the reduced decode gives nearly the same
    input (README, "Large JPEGs") in a fraction of the time and memory. ``original_size`` is
    still the full image's size, so masks come back at the full size. ``keep_image=True`` (the
    image itself is wanted, for an overlay) decodes the full image besides, without changing
    the model's input: an option that only adds a picture never changes the answer.
    ``reduce_large_jpegs=False`` decodes in full for the model too."""

    def __init__(self, tokenizer, preprocessing, *, reduce_large_jpegs: bool = True):
        from rexfast.models.preprocessing import Preprocessing

        if tokenizer is None:
            raise ValueError("tokenizer is needed to turn sentences into token ids")
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"preprocessing must be a rexfast Preprocessing, got {type(preprocessing).__name__}")
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.reduce_large_jpegs = reduce_large_jpegs

    @property
    def reduce_large_jpegs(self) -> bool:
        """Whether a large JPEG given as a path is decoded at a reduced size (default True).
        Set it to turn that off (``processor.reduce_large_jpegs = False``, as README says);
        only True or False is taken: anything else is a TypeError, not a value read as true."""
        return self._reduce_large_jpegs

    @reduce_large_jpegs.setter
    def reduce_large_jpegs(self, value: bool) -> None:
        self._reduce_large_jpegs = _check_flag(value, "reduce_large_jpegs")

    def decode(self, image, name: str = "image", *, full: bool = False):
        """``image`` (a PIL image, a uint8 (H, W, 3) array or a path) as a
        :class:`rexfast.io.DecodedImage`: a path to a large JPEG is decoded at a reduced size
        unless ``full`` (or ``reduce_large_jpegs`` is off), and a path is turned as its EXIF
        orientation says; ``original_size`` is (width, height)."""
        from rexfast.data.datasets import MIN_IMAGE_SIDE

        from ..io import DecodedImage, DRAFT_MARGIN, decode_image

        if isinstance(image, DecodedImage):
            return image
        if isinstance(image, (str, os.PathLike)) and self.reduce_large_jpegs and not full:
            # never reduced below the smallest image rexfast segments (an input side under 4)
            min_side = max(DRAFT_MARGIN * self.preprocessing.image_size, MIN_IMAGE_SIDE)
            return decode_image(image, min_side=min_side, exif_transpose=True)
        pil = _as_pil(image, name)
        return DecodedImage(pil, pil.size)

    def image_tensor(self, image) -> torch.Tensor:
        """float32 (3, S, S): ``image`` (a PIL image, an array, a path or a :meth:`decode` result)
        resized and normalised as the model was trained."""
        from rexfast.data.datasets import check_image_size, preprocess_image

        spec = self.preprocessing
        decoded = self.decode(image)
        check_image_size(decoded.image)  # below 8x8 nothing referable fits (MIN_IMAGE_SIDE says why)
        return preprocess_image(decoded.image, spec.image_size, mean=spec.mean, std=spec.std, box=decoded.box)

    def text_tensors(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from rexfast.data.tokenize import tokenize

        return tokenize(self.tokenizer, _check_text(text), self.preprocessing.max_tokens)

    def __call__(self, image, text: str, *, keep_image: bool = False) -> dict:
        text = _check_text(text)
        decoded = self.decode(image)
        ids, mask = self.text_tensors(text)
        width, height = decoded.original_size
        item = {"image": self.image_tensor(decoded), "input_ids": ids, "attention_mask": mask,
                "original_size": (height, width), "text": text}
        if keep_image:
            # the model's input stays the decode above; a reduced one is no picture to draw on
            item["original_image"] = self.decode(image, full=True).image if decoded.reduced else decoded.image
        return item

    def __repr__(self) -> str:
        spec = self.preprocessing
        return f"Processor(image_size={spec.image_size}, max_tokens={spec.max_tokens}, vocab={len(self.tokenizer)})"


# ----------------------------------------------------------------------------- the segmenter
def _resolve_device(device) -> torch.device:
    """``None``/``"auto"`` or a device name, checked against this torch and machine (:mod:`.device`)."""
    from .device import resolve_device

    return resolve_device("auto" if device is None else device)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    return batch_size


class Segmenter:
    """A model with its tokenizer and preprocessing: call it with image(s) and sentence(s).

    Build one with :meth:`from_pretrained` (any model source), or from a model in memory:
    ``Segmenter(model, tokenizer, preprocessing)`` (the model is put in eval mode and used
    as it is). ``mask_threshold`` and ``no_target_threshold`` are the defaults of every
    call (0.5 and 0.5, the authors' evaluators'); ``seed`` draws the noise of a model that
    draws noise at inference. ``explain=True`` makes every call also return what the model
    grouped (:attr:`Segmentation.internals`; a call's ``explain=`` overrides it): the same
    answers, from the same forward pass; with ``explain=False`` nothing of it is computed
    or kept."""

    def __init__(self, model, tokenizer, preprocessing=None, *, mask_threshold: float = MASK_THRESHOLD,
                 no_target_threshold: float = NO_TARGET_THRESHOLD, seed: int = 0, config=None,
                 explain: bool = False):
        from rexfast.models.base import ReferringModel
        from rexfast.models.preprocessing import default_preprocessing

        if not isinstance(model, ReferringModel):
            raise TypeError(f"model must be a rexfast model (CGFormer, ReLA, ...), got {type(model).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model = model.eval()
        self.processor = Processor(tokenizer, preprocessing or default_preprocessing(model.config))
        self.mask_threshold = check_threshold(mask_threshold, "mask_threshold")
        self.no_target_threshold = check_threshold(no_target_threshold, "no_target_threshold")
        self.seed = seed
        self.explain = _check_flag(explain, "explain")
        self.config = config  # the run Config (from_pretrained), for callers that need data settings
        optimization = getattr(model, "optimization", None)
        self.precision = optimization.precision if optimization is not None else "fp32"

    @classmethod
    def from_pretrained(cls, source, *, device="auto", precision="auto", compile: bool = False, tokenizer=None,
                        overrides=(), mask_threshold: float = MASK_THRESHOLD,
                        no_target_threshold: float = NO_TARGET_THRESHOLD, seed: int = 0,
                        explain: bool = False) -> "Segmenter":
        """Load any model source: a model folder, a training checkpoint (``best.pt``), the
        authors' released ``.pth`` (with ``tokenizer=``), or a Hugging Face Hub id
        (:func:`rexfast.models.loading.load_model_source`), prepared by :func:`rexfast.optimize`
        (``precision``: fp32 | bf16 | auto, bf16 where the CPU has native bf16; ``compile``:
        torch.compile, the first call compiles). ``device``: auto (CUDA when there is one) | cpu |
        cuda[:N]. ``overrides``: ``section.key=value`` strings (``model.eval_noise=false``,
        ``data.image_size=480``); a runtime option among them (``model.ops_backend=reference``)
        is kept by ``rexfast.optimize``. The thresholds (and ``explain``) become the defaults of
        every call."""
        from .optimize import optimize
        from .precision import check_precision

        check_precision(precision, "precision")
        explain = _check_flag(explain, "explain")
        mask_threshold = check_threshold(mask_threshold, "mask_threshold")
        no_target_threshold = check_threshold(no_target_threshold, "no_target_threshold")
        device = _resolve_device(device)
        loaded = load_model(source, overrides=overrides, tokenizer=tokenizer, device=device)
        model = optimize(loaded.model, precision=precision, compile=compile, runtime=loaded.runtime_overrides)
        return cls(model, loaded.tokenizer, loaded.preprocessing, mask_threshold=mask_threshold,
                   no_target_threshold=no_target_threshold, seed=seed, config=loaded.config, explain=explain)

    # -- properties ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def preprocessing(self):
        return self.processor.preprocessing

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        spec = self.preprocessing
        return (f"Segmenter({type(self.model).__name__}, device={self.device.type}, precision={self.precision}, "
                f"input {spec.image_size}², mask_threshold={self.mask_threshold}, "
                f"no_target_threshold={self.no_target_threshold})")

    # -- running ------------------------------------------------------------------------------
    def _thresholds(self, mask_threshold, no_target_threshold) -> tuple[float, float]:
        mt = self.mask_threshold if mask_threshold is None else check_threshold(mask_threshold, "mask_threshold")
        nt = (self.no_target_threshold if no_target_threshold is None
              else check_threshold(no_target_threshold, "no_target_threshold"))
        return mt, nt

    @torch.no_grad()
    def segment_items(self, items: Sequence[dict], *, mask_threshold: Optional[float] = None,
                      no_target_threshold: Optional[float] = None,
                      explain: Optional[bool] = None) -> list[Segmentation]:
        """Run a list of :class:`Processor` outputs as one batch (what a DataLoader of
        ``seg.processor`` items yields, with ``collate_fn=list``)."""
        mt, nt = self._thresholds(mask_threshold, no_target_threshold)
        explain = self.explain if explain is None else _check_flag(explain, "explain")
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError("items must be a non-empty list of seg.processor(image, text) outputs")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"image", "input_ids", "attention_mask", "original_size",
                                                  "text"} <= set(item):
                raise TypeError(f"items[{i}] is not a seg.processor(image, text) output (a dict with image, "
                                "input_ids, attention_mask, original_size, text)")
        from rexfast.data import collate

        batch = collate(list(items), self.device)
        sizes = [tuple(int(v) for v in item["original_size"]) for item in items]
        preds = predict_batch(self.model, batch, sizes, mask_threshold=mt, no_target_threshold=nt,
                              sample_seeds=[self.seed] * len(items), explain=explain)
        return [Segmentation(mask=p.shown_mask.cpu().numpy(), probability=p.probability.cpu().numpy(),
                             decision=p.decision, no_target_prob=p.no_target_prob, text=item["text"],
                             mask_threshold=mt, no_target_threshold=nt,
                             image=item.get("original_image"), internals=p.internals)
                for p, item in zip(preds, items)]

    def __call__(self, images, texts, *, batch_size: int = 8, mask_threshold: Optional[float] = None,
                 no_target_threshold: Optional[float] = None, explain: Optional[bool] = None):
        """Segment what each sentence names.

        * ``seg(image, "text")`` → one :class:`Segmentation`;
        * ``seg(image, ["a", "b"])`` → a list, one per sentence (the image is decoded once);
        * ``seg([img1, img2], ["a", "b"])`` → a list, one per (image, sentence) pair;
        * ``seg([img1, img2], "a")`` → a list, the sentence on each image.

        An image is a PIL image, a uint8 (H, W, 3) array or a path. Pairs run ``batch_size``
        at a time; the answers are the same as one call per pair. ``explain`` (default: the
        Segmenter's) also returns the model's internals (:attr:`Segmentation.internals`)."""
        mt, nt = self._thresholds(mask_threshold, no_target_threshold)
        explain = self.explain if explain is None else _check_flag(explain, "explain")
        batch_size = _check_batch_size(batch_size)
        many_images = isinstance(images, (list, tuple))
        many_texts = isinstance(texts, (list, tuple))
        _check_each(images, many_images, _check_image, "images", "image")
        _check_each(texts, many_texts, _check_text, "texts", "sentence")
        if many_images and many_texts and len(images) != len(texts):
            raise ValueError(f"images and texts must pair up: {len(images)} images, {len(texts)} texts")
        count = len(images) if many_images else (len(texts) if many_texts else 1)
        image_list = list(images) if many_images else [images] * count
        text_list = list(texts) if many_texts else [texts] * count
        # an image that comes several times in a row (one image, many sentences) is decoded and resized once
        cached_key, cached = None, None
        results: list[Segmentation] = []
        for start in range(0, count, batch_size):
            items = []
            for index in range(start, min(start + batch_size, count)):
                image, text = image_list[index], text_list[index]
                key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
                if cached is None or key != cached_key:
                    decoded = self.processor.decode(image, f"images[{index}]" if many_images else "images")
                    # a reduced decode is no image to draw on: the result keeps the path, and overlay()
                    # decodes it in full only when it is asked for
                    shown = image if decoded.reduced else decoded.image
                    cached_key, cached = key, (decoded.original_size, shown, self.processor.image_tensor(decoded))
                (width, height), shown, tensor = cached
                ids, attention = self.processor.text_tensors(text)
                items.append({"image": tensor, "input_ids": ids, "attention_mask": attention,
                              "original_size": (height, width), "text": text, "original_image": shown})
            results.extend(self.segment_items(items, mask_threshold=mt, no_target_threshold=nt, explain=explain))
        return results if (many_images or many_texts) else results[0]


__all__ = ["Segmenter", "Segmentation", "Processor", "overlay_pixels", "OVERLAY_COLOUR"]
