"""From samples to a model batch, and back to what a sample shows.

A sample is a dict as :class:`rexfast.data.ReferringDataset` or the engine's
``Segmenter.processor`` makes it: ``image`` (3, S, S), ``input_ids`` and
``attention_mask`` (L,), and for a dataset sample ``target`` and the masks and
image path the evaluation and the figures read.
"""

from __future__ import annotations

import numpy as np
import torch

from ..io import load_image

__all__ = ["collate", "original_mask", "eval_mask", "original_image"]


def collate(items: list[dict], device) -> dict[str, torch.Tensor]:
    """Stack samples into a batch on ``device``: image (B,3,S,S), input_ids and
    attention_mask (B,L), target (B,S,S)."""
    device = torch.device(device)
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "attention_mask": torch.stack([it["attention_mask"] for it in items]),
    }
    if all("target" in it for it in items):
        batch["target"] = torch.stack([it["target"].reshape(it["target"].shape[-2:]) for it in items])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def original_mask(item: dict) -> torch.Tensor:
    """The sample's ground truth at its image's own size, as bool (H, W)."""
    return torch.as_tensor(item["orig_mask"]).bool()


def eval_mask(item: dict) -> torch.Tensor:
    """The GT the evaluation compares with (see ``ReferringDataset``'s ``eval_resolution``)."""
    return torch.as_tensor(item.get("eval_mask", item["orig_mask"])).bool()


def original_image(item: dict) -> np.ndarray:
    """The sample's image as uint8 (H, W, 3) at its original resolution, as stored (the
    annotations' orientation: no EXIF turn)."""
    return np.asarray(load_image(item["image_path"], exif_transpose=False))
