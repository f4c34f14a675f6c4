"""Single-image prediction: a mask PNG and an overlay PNG for one sentence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import builders, checkpoint
from .evaluator import predict_masks

OVERLAY_COLOUR = np.array([255, 0, 255], dtype=np.float32)  # magenta: unlike any scene colour


def load_image(path) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


class Predictor:
    """Loads a rexfast checkpoint once; call with (PIL image, sentence) → bool mask (H, W)."""

    def __init__(self, checkpoint_path, device="auto"):
        from .config import Config

        ckpt = checkpoint.load(checkpoint_path)
        self.cfg = Config.from_dict(ckpt["config"])
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.tokenizer = builders.tokenizer_from_vocab(ckpt["vocab"], self.cfg.data)
        self.model = builders.build_model(self.cfg, self.tokenizer)
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image, text: str, threshold: float = 0.5) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text is empty: say what to segment, e.g. --text \"the red circle\"")
        batch = builders.collate([builders.inference_item(image, text, self.tokenizer, self.cfg.data)], self.device)
        (mask,) = predict_masks(self.model, batch, [(image.height, image.width)], threshold)
        return mask.cpu().numpy()


def overlay(image, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * OVERLAY_COLOUR
    return pixels.clip(0, 255).astype(np.uint8)


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def predict_to_files(checkpoint_path, image_path, text, *, out_dir=".", threshold=0.5, device="auto") -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty: say what to segment, e.g. --text \"the red circle\"")
    image = load_image(image_path)  # fail fast, before loading the model
    predictor = Predictor(checkpoint_path, device=device)
    mask = predictor(image, text, threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    _save_png_atomic((mask * 255).astype(np.uint8), mask_path)
    _save_png_atomic(overlay(image, mask), overlay_path)
    return [str(mask_path), str(overlay_path)]
