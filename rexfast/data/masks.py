"""COCO segmentations → boolean masks.

Accepted forms of ``segmentation``: a list of polygons ``[[x0, y0, x1, y1, …], …]``,
an uncompressed RLE ``{"size": [h, w], "counts": [int, …]}`` or a compressed RLE
``{"size": [h, w], "counts": str | bytes}``. Several polygons of one object and
several objects (gRefCOCO multi-target) are merged by union.

A segmentation comes from a stranger's ``instances.json``, so everything is
checked before any C code sees it, and anything wrong is one ValueError:

- **RLE** is parsed and decoded here, in Python and numpy, never by pycocotools:
  its C decoder writes past its buffer when the run lengths of a compressed
  string do not add up to h·w (a 38-byte string ended the process with glibc's
  ``free(): invalid next size``). The run lengths must be non-negative and sum to
  exactly h·w, and the size must be the image's.
- **Polygons** are rasterised by pycocotools (imported on first use), which walks
  every edge in 1/5-pixel steps and holds 16 bytes per step: a vertex at x = 3e6
  on a 4×4 image raised the peak resident memory by 229 MB (452 MB in the issue's
  report), and one at 1e9, past its 32-bit integers, ran into the OOM killer at 24 GB.
  Coordinates must be finite and within ±1e8, and the outline at most
  :data:`MAX_POLYGON_STEPS` steps (about 840,000 pixels long), else the polygon
  is refused. Polygons are not clipped to the image instead: clipping to the
  image enlarged by 1, 2 or 10 pixels (Sutherland–Hodgman) changed pycocotools'
  raster of 23% of 9,000 random convex polygons, by one pixel mostly, since the
  new vertex and the edge slope round differently.
- **The mask size** h·w is at most :func:`rexfast.io.max_image_pixels`, as for an
  image.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional

import numpy as np

from ..io import max_image_pixels

__all__ = ["segmentation_to_rle", "decode_segmentation", "annotations_to_mask", "encode_mask",
           "rle_counts_from_string", "MAX_POLYGON_STEPS", "MAX_POLYGON_VERTICES"]

# pycocotools holds 16 bytes per 1/5-pixel step of a polygon's outline (two int arrays of
# the points, then two of the column crossings): 2**22 steps is at most 67 MB.
MAX_POLYGON_STEPS = 1 << 22
MAX_POLYGON_VERTICES = 1 << 20  # over every polygon of one segmentation
# pycocotools stores 5·x in a C int and subtracts two of them: |x| <= 1e8 keeps that exact
_MAX_COORD = 1e8
_RLE_CHUNKS = 7  # 6-bit characters per run length: 35 bits, more than any h·w allowed


def _mask_utils():
    """pycocotools.mask, imported when a polygon is rasterised (or a mask encoded)."""
    try:
        from pycocotools import mask
    except ImportError as e:
        raise ImportError("rasterising COCO polygons needs pycocotools: pip install pycocotools") from e
    return mask


def _image_size(height, width, what: str = "image") -> tuple[int, int]:
    """(height, width) as ints: whole numbers >= 1 whose product is at most
    :func:`rexfast.io.max_image_pixels`."""
    out = []
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                math.isfinite(v) and float(v).is_integer()) or v < 1:
            raise ValueError(f"{what} {name} must be a whole number >= 1, got {_brief(v)}")
        out.append(int(v))
    limit = max_image_pixels()
    if out[0] * out[1] > limit:
        raise ValueError(f"{what} size {out[0]}x{out[1]} is more than {limit} pixels "
                         "(REXFAST_MAX_IMAGE_PIXELS)")
    return out[0], out[1]


def _brief(v) -> str:
    """A short description of a value from a file, for an error message: never the
    repr of a large or deeply nested structure."""
    if isinstance(v, (bool, float, type(None))) or (isinstance(v, int) and v.bit_length() < 64):
        return repr(v)
    if isinstance(v, (str, bytes)):
        return repr(v[:40]) + ("…" if len(v) > 40 else "")
    if isinstance(v, (list, tuple, dict)):
        return f"a {type(v).__name__} of {len(v)} items"
    return f"a {type(v).__name__}"


# ----------------------------------------------------------------------------- RLE
def rle_counts_from_string(counts: bytes | str, n_pixels: int) -> list[int]:
    """The run lengths of a COCO compressed RLE string.

    Format (COCO's ``maskApi``): each run length is a little-endian sequence of
    5-bit chunks, one character per chunk, ``chr(48 + chunk)``; bit 0x20 of the
    character's value says that another chunk follows, and in the last chunk bit
    0x10 is the sign, extended over the higher bits. From the fourth run on, a
    value is stored as the difference to the run two before it (runs alternate
    between 0s and 1s, so runs of the same kind are alike):
    ``count[i] = value[i] + count[i-2]`` for ``i >= 3``.

    Every character must lie in '0'..'o' (48..111), a value may take at most 7
    characters, the string may not end inside a value, and there are at most
    ``n_pixels + 1`` runs (the sum is checked by the caller)."""
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError("compressed RLE counts hold a non-ASCII character")
        counts = counts.encode("ascii")
    if len(counts) > _RLE_CHUNKS * (n_pixels + 1):
        raise ValueError(f"compressed RLE counts are {len(counts)} characters long, more than "
                         f"{_RLE_CHUNKS} per pixel of a {n_pixels}-pixel mask")
    out: list[int] = []
    value = shift = 0
    for pos, byte in enumerate(counts):
        chunk = byte - 48
        if not 0 <= chunk < 64:
            raise ValueError(f"compressed RLE counts hold {bytes([byte])!r} at offset {pos}; "
                             "every character must be one of '0'..'o'")
        value |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:  # more chunks follow
            if shift >= 5 * _RLE_CHUNKS:
                raise ValueError(f"compressed RLE count at offset {pos} is longer than {_RLE_CHUNKS} characters")
            continue
        if chunk & 0x10:
            value -= 1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
        value = shift = 0
    if shift:
        raise ValueError("compressed RLE counts end inside a run length")
    return out


def _check_counts(counts, height: int, width: int, kind: str) -> np.ndarray:
    """Run lengths as int64, each in 0..h·w (so their sum cannot overflow) and summing to h·w."""
    n = height * width
    arr = np.asarray(counts, dtype=np.int64)  # a parsed value is below 2**62 in magnitude
    if arr.size and not 0 <= int(arr.min()) <= int(arr.max()) <= n:
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise ValueError(f"{kind} RLE has a run length of {bad}, outside 0..{n}")
    total = int(arr.sum()) if arr.size else 0
    if total != n:
        raise ValueError(f"{kind} RLE counts sum to {total}, expected {n} ({height}x{width})")
    return arr


def _uncompressed_counts(counts: list, height: int, width: int) -> np.ndarray:
    if len(counts) > height * width + 1:
        raise ValueError(f"uncompressed RLE has {len(counts)} runs, more than the {height * width} pixels + 1")
    if any(isinstance(c, bool) for c in counts):
        raise ValueError("uncompressed RLE counts must be a flat list of whole numbers, not booleans")
    try:
        arr = np.asarray(counts)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iuf" or (
            arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all())):
        raise ValueError("uncompressed RLE counts must be a flat list of whole numbers")
    if arr.size and (float(arr.max()) > height * width or float(arr.min()) < 0):
        bad = arr.max() if float(arr.max()) > height * width else arr.min()
        raise ValueError(f"uncompressed RLE has a run length of {bad}, outside 0..{height * width}")
    return _check_counts(arr.astype(np.int64), height, width, "uncompressed")


def _check_rle(segm: dict, height: int, width: int) -> np.ndarray:
    """The checked run lengths of an RLE segmentation of an (height, width) image."""
    if "counts" not in segm or "size" not in segm:
        raise ValueError(f"RLE segmentation needs 'counts' and 'size', got keys {sorted(map(str, segm))[:8]}")
    size = segm["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and float(s).is_integer()
            for s in size)):
        raise ValueError(f"RLE size must be [height, width], got {_brief(size)}")
    if [int(s) for s in size] != [height, width]:
        raise ValueError(f"RLE size {[int(s) for s in size]} does not match the image size {[height, width]}")
    counts = segm["counts"]
    if isinstance(counts, list):
        return _uncompressed_counts(counts, height, width)
    if not isinstance(counts, (str, bytes, bytearray)):
        raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    return _check_counts(rle_counts_from_string(bytes(counts) if not isinstance(counts, str) else counts,
                                                height * width), height, width, "compressed")


def _decode_counts(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of checked run lengths: runs alternate 0, 1, 0, …
    over the pixels in column-major order."""
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.ascontiguousarray(np.repeat(values, counts).reshape(width, height).T)


def _encode_string(counts: np.ndarray) -> str:
    """The compressed RLE string of run lengths (the inverse of :func:`rle_counts_from_string`)."""
    out = bytearray()
    cl = [int(c) for c in counts]
    for i, c in enumerate(cl):
        x = c - cl[i - 2] if i > 2 else c
        while True:
            chunk = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not chunk & 0x10) or (x == -1 and chunk & 0x10))
            out.append(48 + (chunk | (0x20 if more else 0)))
            if not more:
                break
    return out.decode("ascii")


# ----------------------------------------------------------------------------- polygons
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _polygons(segm, height: int, width: int) -> list[list[float]]:
    """The checked polygons of a polygon segmentation (those with >= 3 points)."""
    if len(segm) == 0:
        raise ValueError("empty polygon list in segmentation")
    if all(_is_number(v) for v in segm):  # a single flat polygon
        segm = [segm]
    n_coords = 0
    for poly in segm:
        if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
            raise ValueError(f"segmentation polygon must be a list of numbers, got {_brief(poly)}")
        if len(poly) % 2:
            raise ValueError(f"segmentation polygon has an odd number of coordinates ({len(poly)})")
        n_coords += len(poly)
        if n_coords > 2 * MAX_POLYGON_VERTICES:
            raise ValueError(f"segmentation has more than {MAX_POLYGON_VERTICES} polygon vertices")
    polys = [np.asarray(p, dtype=np.float64) for p in segm if len(p) >= 6]  # < 3 points: no area (as ReLA)
    if not polys:
        raise ValueError("segmentation has no polygon with at least 3 points")
    steps = 0
    for p in polys:
        if not np.isfinite(p).all():
            raise ValueError("segmentation polygon has a NaN or infinite coordinate")
        far = float(np.abs(p).max())
        if far > _MAX_COORD:
            raise ValueError(f"segmentation polygon has a coordinate {far:g}, beyond the ±{_MAX_COORD:g} that "
                             f"pycocotools can rasterise (the image is {height}x{width})")
        # pycocotools' outline: vertices at int(5·v + 0.5) (C truncation), each edge walked in
        # max(|dx|, |dy|) + 1 steps
        q = np.trunc(5.0 * p + 0.5).astype(np.int64)
        x, y = q[0::2], q[1::2]
        steps += int(np.maximum(np.abs(x - np.roll(x, -1)), np.abs(y - np.roll(y, -1))).sum()) + len(x)
    if steps > MAX_POLYGON_STEPS:
        raise ValueError(f"segmentation polygon outline is {steps / 5:.0f} pixels long, more than "
                         f"{MAX_POLYGON_STEPS // 5} (is a vertex far outside the {height}x{width} image?)")
    return [p.tolist() for p in polys]


# ----------------------------------------------------------------------------- API
def segmentation_to_rle(segm, height: int, width: int) -> dict:
    """One compressed RLE (``{"size": [h, w], "counts": bytes}``, as pycocotools
    writes it) for a COCO segmentation of an (height, width) image."""
    height, width = _image_size(height, width)
    if isinstance(segm, (list, tuple)):
        polys = _polygons(segm, height, width)
        mask_utils = _mask_utils()
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segm, dict):
        counts = _check_rle(segm, height, width)
        return {"size": [height, width], "counts": _encode_string(counts).encode("ascii")}
    raise ValueError(f"unsupported segmentation type {type(segm).__name__} (expected polygons or RLE)")


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of one COCO segmentation."""
    height, width = _image_size(height, width)
    if isinstance(segm, dict):
        return _decode_counts(_check_rle(segm, height, width), height, width)
    rle = segmentation_to_rle(segm, height, width)
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice, not ours
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        m = _mask_utils().decode(rle)
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
    height, width = _image_size(height, width)
    out_h, out_w = (height, width) if size is None else _image_size(size[0], size[1], "mask")
    out = np.zeros((out_h, out_w), dtype=bool)
    for ann in anns:
        if ann is None:
            continue
        if not isinstance(ann, dict):
            raise ValueError(f"an annotation must be an object, got {_brief(ann)}")
        if "segmentation" not in ann:
            raise ValueError(f"annotation {_brief(ann.get('id'))} has no 'segmentation'")
        try:
            segm = ann["segmentation"]
            if size is None:
                out |= decode_segmentation(segm, height, width)
            elif isinstance(segm, (list, tuple)):
                _polygons(segm, height, width)  # checked at the original size first
                polys = [segm] if all(_is_number(v) for v in segm) else segm
                sx, sy = out_w / float(width), out_h / float(height)
                scaled = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)] for poly in polys]
                out |= decode_segmentation(scaled, out_h, out_w)
            else:
                from PIL import Image

                full = decode_segmentation(segm, height, width).astype(np.uint8)
                out |= np.asarray(Image.fromarray(full).resize((out_w, out_h), Image.NEAREST), dtype=bool)
        except ValueError as e:
            raise ValueError(f"annotation {_brief(ann.get('id'))}: {e}") from None
    return out


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of a (H, W) bool mask, JSON-ready (counts as str), the string
    pycocotools' ``encode`` writes."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    flat = m.astype(bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges)
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])  # runs start with 0s
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _encode_string(counts.astype(np.int64))}
