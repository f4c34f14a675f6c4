"""COCO segmentations → boolean masks (pycocotools).

Accepted forms of ``segmentation``: a list of polygons ``[[x0, y0, x1, y1, …], …]``,
an uncompressed RLE ``{"size": [h, w], "counts": [int, …]}`` or a compressed RLE
``{"size": [h, w], "counts": str | bytes}``. Several polygons of one object and
several objects (gRefCOCO multi-target) are merged by union.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["segmentation_to_rle", "decode_segmentation", "annotations_to_mask", "encode_mask"]


def segmentation_to_rle(segm, height: int, width: int) -> dict:
    """One compressed RLE for a COCO segmentation of an (height, width) image."""
    height, width = int(height), int(width)
    if isinstance(segm, (list, tuple)):
        if len(segm) == 0:
            raise ValueError("empty polygon list in segmentation")
        if all(isinstance(v, (int, float)) for v in segm):  # a single flat polygon
            segm = [list(segm)]
        polys = []
        for poly in segm:
            if not isinstance(poly, (list, tuple)) or not all(isinstance(v, (int, float)) for v in poly):
                raise ValueError(f"segmentation polygon must be a list of numbers, got {type(poly).__name__}")
            if len(poly) % 2:
                raise ValueError(f"segmentation polygon has an odd number of coordinates ({len(poly)})")
            if len(poly) >= 6:  # fewer than 3 points: no area (ReLA's loader drops these too)
                polys.append([float(v) for v in poly])
        if not polys:
            raise ValueError("segmentation has no polygon with at least 3 points")
        rles = mask_utils.frPyObjects(polys, height, width)
        return mask_utils.merge(rles)
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"RLE segmentation needs 'counts' and 'size', got keys {sorted(segm)}")
        size = [int(s) for s in segm["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match the image size {[height, width]}")
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(int(c) for c in counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
            return mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if not isinstance(counts, (bytes, bytearray)):
            raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
        return {"size": size, "counts": bytes(counts)}
    raise ValueError(f"unsupported segmentation type {type(segm).__name__} (expected polygons or RLE)")


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of one COCO segmentation."""
    rle = segmentation_to_rle(segm, height, width)
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice, not ours
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.any(axis=2)
    return np.ascontiguousarray(m.astype(bool))


def annotations_to_mask(anns: Iterable[Optional[dict]], height: int, width: int,
                        size: Optional[tuple] = None) -> np.ndarray:
    """Union of the annotations' masks; ``None`` entries (no target) add nothing.

    With ``size = (h, w)`` the mask is made at that size as detectron2's
    ``Resize`` transform makes it for ReLA: polygon vertices scaled by
    (w / width, h / height) and rasterised at (h, w); RLE masks decoded at the
    original size and resized with nearest neighbour."""
    out_h, out_w = (int(height), int(width)) if size is None else (int(size[0]), int(size[1]))
    out = np.zeros((out_h, out_w), dtype=bool)
    for ann in anns:
        if ann is None:
            continue
        if "segmentation" not in ann:
            raise ValueError(f"annotation {ann.get('id')} has no 'segmentation'")
        try:
            segm = ann["segmentation"]
            if size is None:
                out |= decode_segmentation(segm, height, width)
            elif isinstance(segm, (list, tuple)):
                polys = [segm] if segm and all(isinstance(v, (int, float)) for v in segm) else segm
                sx, sy = out_w / float(width), out_h / float(height)
                scaled = [[float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)] for poly in polys]
                out |= decode_segmentation(scaled, out_h, out_w)
            else:
                from PIL import Image

                full = decode_segmentation(segm, height, width).astype(np.uint8)
                out |= np.asarray(Image.fromarray(full).resize((out_w, out_h), Image.NEAREST), dtype=bool)
        except ValueError as e:
            raise ValueError(f"annotation {ann.get('id')}: {e}") from None
    return out


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of a (H, W) bool mask, JSON-ready (counts as str)."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    rle = mask_utils.encode(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")}
