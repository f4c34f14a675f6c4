"""Single-image prediction: ``<image>_mask.png`` and ``<image>_overlay.png`` for one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.datasets import check_image_size
from ..io import atomic_write_png, check_output_dir, load_image
from . import builders
from .checkpoint import load_model
from .device import resolve_device
from .inference import SamplePrediction, predict_batch
from .optimize import optimize
from .precision import check_precision

OVERLAY_COLOUR = np.array([255, 0, 255], dtype=np.float32)  # magenta: unlike any scene colour


class Predictor:
    """Loads a training checkpoint or a model folder once; call it with
    (PIL image, sentence) → :class:`~rexfast.engine.inference.SamplePrediction`
    at the image's resolution. The model runs as :func:`rexfast.optimize` prepares it
    (``precision``: fp32 | bf16 | auto; ``compile``: torch.compile, the first call compiles)."""

    def __init__(self, checkpoint_path, device="auto", *, tokenizer=None, overrides=(), precision="auto",
                 compile=False):
        check_precision(precision, "--precision")
        self.device = resolve_device(device)
        loaded = load_model(checkpoint_path, overrides=overrides, tokenizer_path=tokenizer, device=self.device)
        self.model = optimize(loaded.model, precision=precision, compile=compile)
        self.cfg, self.tokenizer = loaded.config, loaded.tokenizer
        self.precision = self.model.optimization.precision

    @torch.no_grad()
    def __call__(self, image, text: str, threshold: float = 0.5) -> SamplePrediction:
        item = builders.inference_item(image, text, self.tokenizer, self.cfg.data)
        batch = builders.collate([item], self.device)
        (pred,) = predict_batch(self.model, batch, [(image.height, image.width)], threshold=threshold)
        return pred


def overlay(image, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * OVERLAY_COLOUR
    return pixels.clip(0, 255).astype(np.uint8)


def predict_to_files(checkpoint_path, image_path, text, *, out_dir=".", threshold=0.5, device="auto",
                     tokenizer=None, precision="auto", compile=False) -> tuple[list[str], SamplePrediction]:
    """Write the mask and overlay PNGs (the mask is empty when the model says "no target")."""
    check_precision(precision, "--precision")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty: say what to segment, e.g. --text \"the red circle\"")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    out = check_output_dir(out_dir, "--out-dir")
    image = load_image(image_path)  # fail fast, before loading the model
    check_image_size(image, f"image {image_path}")
    predictor = Predictor(checkpoint_path, device=device, tokenizer=tokenizer, precision=precision, compile=compile)
    torch.manual_seed(0)  # a model that draws noise at inference (CGFormer eval_noise) answers the same every run
    pred = predictor(image, text, threshold)
    mask = pred.shown_mask.cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    atomic_write_png(mask_path, (mask * 255).astype(np.uint8))
    atomic_write_png(overlay_path, overlay(image, mask))
    return [str(mask_path), str(overlay_path)], pred


__all__ = ["Predictor", "overlay", "predict_to_files"]
