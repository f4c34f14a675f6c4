"""``rexfast predict`` for one image and one sentence: a mask PNG and an overlay PNG,
named so that no two sentences on one image overwrite each other.

The files are ``<image stem>_<sentence slug>_<hash>_mask.png`` and ``…_overlay.png``:
the slug (the sentence in lower-case ASCII words, at most 40 characters) makes them
readable, the hash (the first 8 hex digits of the SHA-1 of the sentence) makes them
distinct for any two different sentences, and both are the same on every run.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from ..data.datasets import check_image_size
from ..io import atomic_write_png, check_output_dir, load_image
from .inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD, check_threshold
from .precision import check_precision
from .segmenter import Segmentation, Segmenter, overlay_pixels

SLUG_CHARS = 40


def sentence_slug(text: str) -> str:
    """The sentence as lower-case ASCII words joined by '-', cut at a word boundary to at
    most 40 characters ('' when it has no ASCII letter or digit)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > SLUG_CHARS:
            break
        slug = candidate
    return slug or (words[0][:SLUG_CHARS] if words else "")


def output_stem(image_path, text: str) -> str:
    """``<image stem>_<slug>_<hash8>``: stable, readable, distinct for distinct sentences."""
    digest = hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:8]
    slug = sentence_slug(text)
    return "_".join(part for part in (Path(image_path).stem, slug, digest) if part)


def predict_to_files(checkpoint_path, image_path, text, *, out_dir=".", mask_threshold=MASK_THRESHOLD,
                     no_target_threshold=NO_TARGET_THRESHOLD, device="auto", tokenizer=None, overrides=(),
                     precision="auto", compile=False, explain=False) -> tuple[list[str], Segmentation]:
    """Write the mask and overlay PNGs (the mask is empty when the model says "no target");
    with ``explain``, also ``…_explain.png``, the figure of what the model grouped
    (:mod:`rexfast.engine.explain_figure`). Every input is checked before the model loads.
    The image is always decoded in full (the overlay is drawn on it), turned as its EXIF
    orientation tag says: the mask is in the orientation a viewer shows."""
    check_precision(precision, "--precision")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty: say what to segment, e.g. --text \"the red circle\"")
    mask_threshold = check_threshold(mask_threshold, "--mask-threshold")
    no_target_threshold = check_threshold(no_target_threshold, "--no-target-threshold")
    out = check_output_dir(out_dir, "--out-dir")
    # fail fast, before loading the model; decoded in full (not at a reduced size, as a Segmenter
    # does for a large JPEG given as a path) because the overlay is drawn on the full image; turned
    # as its EXIF orientation says, as the Segmenter, the batch forms and the web page turn it
    image = load_image(image_path, exif_transpose=True)
    check_image_size(image, f"image {image_path}")
    segmenter = Segmenter.from_pretrained(checkpoint_path, device=device, tokenizer=tokenizer, overrides=overrides,
                                          precision=precision, compile=compile)
    result = segmenter(image, text, mask_threshold=mask_threshold, no_target_threshold=no_target_threshold,
                       explain=bool(explain))
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(image_path, text)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    atomic_write_png(mask_path, (result.mask * 255).astype(np.uint8))
    atomic_write_png(overlay_path, overlay_pixels(np.asarray(image), result.mask))
    written = [str(mask_path), str(overlay_path)]
    if explain:
        from .explain_figure import save_explain_figure

        written.append(str(save_explain_figure(result, out / f"{stem}_explain.png")))
    return written, result


def overlay(image, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """uint8 (H, W, 3): the image with the mask painted magenta (the demo's overlays)."""
    return overlay_pixels(np.asarray(image), mask, alpha=alpha)


__all__ = ["sentence_slug", "output_stem", "predict_to_files", "overlay"]
