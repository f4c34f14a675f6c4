"""Synthetic referring-segmentation scenes, written in the real gRefCOCO / RefCOCO formats.

Each image shows 2–5 coloured shapes (circle, square, triangle, star; red,
green, blue, yellow, purple; small or large) on a grey, plain or lightly
textured background. Shapes are drawn in order, so later shapes occlude
earlier ones; every annotation is the shape's *visible* pixels, exactly (no
anti-aliasing: a pixel belongs to a shape iff the shape's colour is there).
Placement keeps at least half of every shape visible.

Expressions, from a small regular grammar (``expr_type`` in each ref):

* ``single``       "the red circle", "the large star", "the green shape"
* ``relation``     "the shape left of the blue square", "the shapes above the red circle"
* ``superlative``  "the largest shape", "the leftmost shape"
* ``counting``     "the two circles", "both red shapes"
* ``multi``        "all red shapes", "every circle"
* ``compound``     "the red circle and the blue square"
* ``except``       "every shape except the star"
* ``no_target``    deceptive, ~15–20% of expressions: an absent combination of
  present attributes ("the purple circle" beside a purple square and a red
  circle), an absent attribute ("all yellow shapes"), or an empty relation.

Written under ``<root>/synthetic/``: ``images/*.png``, ``instances.json``
(COCO style, compressed-RLE segmentations), ``grefs(unc).json`` (gRefCOCO
format, every expression) and ``refs(unc).p`` (RefCOCO format, the
single-target expressions only); plus ``<root>/vocab.txt``, a WordPiece
vocabulary that covers every word of the grammar.
"""

from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..io import atomic_write_bytes
from .masks import encode_mask

__all__ = ["generate", "COLORS", "KINDS", "SIZES", "EXPR_TYPES", "LEXICON", "SPECIAL_TOKENS", "render_scene"]

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (225, 200, 35),
    "purple": (145, 60, 185),
}
KINDS = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "lowest")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
EXPR_TYPES = ("single", "relation", "superlative", "counting", "multi", "compound", "except", "no_target")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LEXICON = tuple(sorted(
    {"the", "all", "every", "both", "and", "except", "shape", "shapes", "of"}
    | set(COLORS) | set(SIZES) | set(KINDS) | {k + "s" for k in KINDS}
    | {w for r in RELATIONS for w in r.split()} | set(SUPERLATIVES) | set(NUMBERS.values())
))

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    rgb: tuple
    full: np.ndarray  # (S, S) bool, the whole shape
    visible: Optional[np.ndarray] = None  # (S, S) bool, after occlusion by later shapes

    @property
    def area(self) -> int:
        return int(self.visible.sum())

    @property
    def centroid(self) -> tuple:
        ys, xs = np.nonzero(self.visible)
        return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


# ----------------------------------------------------------------------------- geometry

def _in_polygon(xx: np.ndarray, yy: np.ndarray, pts) -> np.ndarray:
    """Even-odd point-in-polygon test on pixel centres."""
    inside = np.zeros(xx.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > yy) != (y2 > yy)
        x_at = x1 + (yy - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xx < x_at)
    return inside


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside the shape."""
    out = np.zeros((size, size), dtype=bool)
    x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(size, int(np.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(size, int(np.ceil(cy + r)) + 1)
    if x0 < x1 and y0 < y1:  # every shape lies within its circumscribed square
        out[y0:y1, x0:x1] = _shape_window(kind, cx, cy, r, x0, x1, y0, y1)
    return out


def _shape_window(kind: str, cx: float, cy: float, r: float, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        s = 0.85 * r
        return (np.abs(xx - cx) <= s) & (np.abs(yy - cy) <= s)
    if kind == "triangle":
        pts = [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
        return _in_polygon(xx, yy, pts)
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return _in_polygon(xx, yy, pts)
    raise ValueError(f"unknown shape kind {kind!r}")


def _sample_shapes(rng: np.random.Generator, size: int) -> list:
    n_wanted = int(rng.integers(2, 6))
    shapes: list[Shape] = []
    used_rgb = set()
    attempts = 0
    while len(shapes) < n_wanted and attempts < 40 * n_wanted:
        attempts += 1
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        if shapes and rng.random() < 0.3:  # repeat an attribute: makes "all …" / counting natural
            color = shapes[int(rng.integers(len(shapes)))].color
        elif shapes and rng.random() < 0.3:
            kind = shapes[int(rng.integers(len(shapes)))].kind
        sz = SIZES[int(rng.integers(2))]
        r = size * (rng.uniform(0.08, 0.10) if sz == "small" else rng.uniform(0.15, 0.19))
        cx, cy = rng.uniform(r, size - r, size=2)
        full = shape_mask(kind, cx, cy, r, size)
        if full.sum() < 8:
            continue
        # keep >= 55% of every earlier shape visible
        ok = True
        cover = full.copy()
        for s in reversed(shapes):
            if (s.full & ~cover).sum() < 0.55 * s.full.sum():
                ok = False
                break
            cover |= s.full
        if not ok:
            continue
        base = np.array(COLORS[color])
        while True:
            rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
            if rgb not in used_rgb:
                break
        used_rgb.add(rgb)
        shapes.append(Shape(kind, color, sz, float(cx), float(cy), float(r), rgb, full))
    occluder = np.zeros((size, size), dtype=bool)
    for s in reversed(shapes):
        s.visible = s.full & ~occluder
        occluder |= s.full
    return shapes


def render_scene(rng: np.random.Generator, size: int):
    """(image uint8 (S, S, 3), shapes). Background pixels are grey (r == g == b)."""
    shapes = _sample_shapes(rng, size)
    level = int(rng.integers(70, 200))
    bg = np.full((size, size), level, dtype=np.int32)
    style = int(rng.integers(3))
    if style == 1:  # light noise
        bg += rng.integers(-6, 7, size=(size, size))
    elif style == 2:  # faint stripes
        period = int(rng.integers(4, 10))
        yy, xx = np.mgrid[0:size, 0:size]
        axis = xx if rng.random() < 0.5 else yy
        bg += np.where((axis // period) % 2 == 0, 5, -5)
    grey = np.clip(bg, 0, 255).astype(np.uint8)
    image = np.repeat(grey[:, :, None], 3, axis=2)
    for s in shapes:
        image[s.full] = s.rgb
    return image, shapes


# ----------------------------------------------------------------------------- language

def _desc_text(desc, plural=False) -> str:
    size, color, kind = desc
    noun = kind or "shape"
    if plural:
        noun += "s"
    return " ".join(w for w in (size, color, noun) if w)


def _matches(shape: Shape, desc) -> bool:
    size, color, kind = desc
    return (size is None or shape.size == size) and (color is None or shape.color == color) and (
        kind is None or shape.kind == kind)


def _all_descs():
    for size in (None,) + SIZES:
        for color in (None,) + tuple(COLORS):
            for kind in (None,) + KINDS:
                if (size, color, kind) != (None, None, None):
                    yield (size, color, kind)


_DESCS = tuple(_all_descs())


def _candidates(shapes: list, size: int, rng: np.random.Generator) -> dict:
    """expr_type → list of (target indices (tuple), sentences)."""
    n = len(shapes)
    match = {d: tuple(i for i, s in enumerate(shapes) if _matches(s, d)) for d in _DESCS}
    unique = {i: [d for d in _DESCS if match[d] == (i,)] for i in range(n)}
    cand = {t: [] for t in EXPR_TYPES}

    def pick(lst, k):
        if not lst:
            return []
        idx = rng.permutation(len(lst))[:k]
        return [lst[j] for j in sorted(idx)]

    # single
    for i in range(n):
        ds = pick(unique[i], 2)
        if ds:
            cand["single"].append(((i,), ["the " + _desc_text(d) for d in ds]))

    cents = [s.centroid for s in shapes]
    areas = [s.area for s in shapes]
    margin = 0.06 * size

    # relation (and empty relations for no-target)
    for a in range(n):
        ds = pick(unique[a], 1)
        if not ds:
            continue
        anchor = _desc_text(ds[0])
        for rel in RELATIONS:
            axis = 0 if rel in ("left of", "right of") else 1
            sign = -1 if rel in ("left of", "above") else 1
            ref = cents[a][axis]
            others = [j for j in range(n) if j != a]
            if any(abs(cents[j][axis] - ref) <= margin for j in others):
                continue  # ambiguous
            targets = tuple(j for j in others if sign * (cents[j][axis] - ref) > margin)
            if len(targets) == 0:
                cand["no_target"].append(((), [f"the shape {rel} the {anchor}", f"the shapes {rel} the {anchor}"]))
            elif len(targets) == 1:
                cand["relation"].append((targets, [f"the shape {rel} the {anchor}"]))
            else:
                cand["relation"].append((targets, [f"the shapes {rel} the {anchor}"]))

    # superlatives (clear margins only)
    if n >= 2:
        order = np.argsort(areas)
        if areas[order[-1]] >= 1.3 * areas[order[-2]]:
            cand["superlative"].append(((int(order[-1]),), ["the largest shape"]))
        if areas[order[0]] * 1.3 <= areas[order[1]]:
            cand["superlative"].append(((int(order[0]),), ["the smallest shape"]))
        for axis, (lo, hi) in ((0, ("leftmost", "rightmost")), (1, ("topmost", "lowest"))):
            order = np.argsort([c[axis] for c in cents])
            if cents[order[1]][axis] - cents[order[0]][axis] > margin:
                cand["superlative"].append(((int(order[0]),), [f"the {lo} shape"]))
            if cents[order[-1]][axis] - cents[order[-2]][axis] > margin:
                cand["superlative"].append(((int(order[-1]),), [f"the {hi} shape"]))

    # counting and multi-target, one candidate per distinct target set
    seen_count, seen_multi = {}, {}
    for d in _DESCS:
        m = match[d]
        if len(m) >= 2:
            seen_count.setdefault(m, []).append(d)
        if len(m) >= 1:
            seen_multi.setdefault(m, []).append(d)
    for m, ds in seen_count.items():
        d = ds[int(rng.integers(len(ds)))]
        sents = [f"the {NUMBERS[len(m)]} {_desc_text(d, plural=True)}"]
        if len(m) == 2:
            sents.append(f"both {_desc_text(d, plural=True)}")
        cand["counting"].append((m, sents))
    for m, ds in seen_multi.items():
        d = ds[int(rng.integers(len(ds)))]
        cand["multi"].append((m, [f"all {_desc_text(d, plural=True)}", f"every {_desc_text(d)}"]))
    cand["multi"].append((tuple(range(n)), ["all shapes", "every shape"]))

    # compound and except
    for a, b in itertools.permutations(range(n), 2):
        if unique[a] and unique[b]:
            da, db = pick(unique[a], 1)[0], pick(unique[b], 1)[0]
            cand["compound"].append((tuple(sorted((a, b))), [f"the {_desc_text(da)} and the {_desc_text(db)}"]))
    if n >= 3:
        for a in range(n):
            if unique[a]:
                da = pick(unique[a], 1)[0]
                rest = tuple(j for j in range(n) if j != a)
                cand["except"].append((rest, [f"every shape except the {_desc_text(da)}",
                                              f"all shapes except the {_desc_text(da)}"]))

    # deceptive no-target: absent combinations of present attribute values first
    present = {"size": {s.size for s in shapes}, "color": {s.color for s in shapes}, "kind": {s.kind for s in shapes}}
    deceptive, absent = [], []
    for d in _DESCS:
        if match[d]:
            continue
        size_, color, kind = d
        fields_present = (size_ is None or size_ in present["size"]) and (
            color is None or color in present["color"]) and (kind is None or kind in present["kind"])
        (deceptive if fields_present else absent).append(d)
    for pool in (deceptive, absent):
        for d in pick(pool, 2):
            cand["no_target"].append(((), ["the " + _desc_text(d), f"all {_desc_text(d, plural=True)}"]))
    return cand


_POSITIVE_WEIGHTS = {"single": 3.0, "relation": 2.0, "superlative": 1.0, "counting": 1.0, "multi": 1.5,
                     "compound": 1.0, "except": 1.0}


def _choose_expressions(cand: dict, rng: np.random.Generator, max_pos: int = 5) -> list:
    """[(expr_type, targets, sentences)]: up to max_pos positives, then one no-target."""
    pools = {t: list(rng.permutation(len(cand[t]))) for t in _POSITIVE_WEIGHTS}
    chosen, texts = [], set()
    while len(chosen) < max_pos:
        types = [t for t in _POSITIVE_WEIGHTS if pools[t]]
        if not types:
            break
        w = np.array([_POSITIVE_WEIGHTS[t] for t in types])
        t = types[int(rng.choice(len(types), p=w / w.sum()))]
        targets, sents = cand[t][int(pools[t].pop())]
        sents = [s for s in sents if s not in texts]
        if not sents:
            continue
        texts.update(sents)
        chosen.append((t, targets, sents))
    nt = [c for c in cand["no_target"] if c[1][0] not in texts]
    if nt:
        targets, sents = nt[int(rng.integers(len(nt)))]
        # two paraphrases 60% of the time: ~17% of the sentences (and of the refs) are no-target
        sents = [s for s in sents if s not in texts][: 2 if rng.random() < 0.6 else 1]
        chosen.append(("no_target", (), sents))
    return chosen


# ----------------------------------------------------------------------------- writer

def generate(root, *, n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 64) -> dict:
    """Write a synthetic GRES/RES dataset under ``<root>/synthetic/`` and ``<root>/vocab.txt``.

    Deterministic in ``seed``: each image depends only on (seed, split, its index in the split).
    ``n_*`` are numbers of images. Returns a summary dict (paths and counts).
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if int(image_size) < 24:
        raise ValueError(f"image_size must be >= 24, got {image_size}")
    size = int(image_size)
    root = Path(root)
    data_dir = root / "synthetic"
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    images, annotations, grefs, refs = [], [], [], []
    image_id, ann_id, ref_id, sent_id = 0, 1, 0, 0
    written = set()
    type_counts = {t: 0 for t in EXPR_TYPES}
    for split, count in (("train", int(n_train)), ("val", int(n_val)), ("test", int(n_test))):
        for idx in range(count):
            rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], idx])
            image, shapes = render_scene(rng, size)
            file_name = f"{split}_{idx:06d}.png"
            Image.fromarray(image).save(image_dir / file_name, compress_level=1)
            written.add(file_name)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            ann_ids = []
            for s in shapes:
                ys, xs = np.nonzero(s.visible)
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": KINDS.index(s.kind) + 1,
                    "segmentation": encode_mask(s.visible), "area": int(s.visible.sum()),
                    "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "iscrowd": 0,
                    "color": s.color, "size": s.size, "rgb": list(s.rgb),
                })
                ann_ids.append(ann_id)
                ann_id += 1
            for expr_type, targets, sents in _choose_expressions(_candidates(shapes, size, rng), rng):
                sentences = []
                for text in sents:
                    sentences.append({"tokens": text.split(), "raw": text, "sent": text, "sent_id": sent_id})
                    sent_id += 1
                t_ids = [ann_ids[i] for i in targets]
                cats = [KINDS.index(shapes[i].kind) + 1 for i in targets]
                gref = {
                    "ref_id": ref_id, "image_id": image_id, "split": split, "file_name": file_name,
                    "ann_id": t_ids if t_ids else [-1], "category_id": cats, "no_target": not t_ids,
                    "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences], "expr_type": expr_type,
                }
                grefs.append(gref)
                type_counts[expr_type] += 1
                if len(t_ids) == 1 and expr_type in ("single", "relation", "superlative"):
                    refs.append({
                        "ref_id": ref_id, "image_id": image_id, "split": split, "file_name": file_name,
                        "ann_id": t_ids[0], "category_id": cats[0], "sentences": sentences,
                        "sent_ids": gref["sent_ids"], "expr_type": expr_type,
                    })
                ref_id += 1
            image_id += 1
    for stale in image_dir.glob("*.png"):
        if stale.name not in written:
            stale.unlink()

    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(KINDS)]
    instances = {"info": {"description": "rexfast synthetic shapes", "seed": int(seed), "image_size": size},
                 "images": images, "annotations": annotations, "categories": categories}
    atomic_write_bytes(data_dir / "instances.json", json.dumps(instances).encode())
    atomic_write_bytes(data_dir / "grefs(unc).json", json.dumps(grefs).encode())
    atomic_write_bytes(data_dir / "refs(unc).p", pickle.dumps(refs, protocol=2))

    used = {w for g in grefs for s in g["sentences"] for w in s["tokens"]}
    unknown = used - set(LEXICON)
    if unknown:  # a grammar bug, never data-dependent
        raise AssertionError(f"synthetic expressions use words outside the lexicon: {sorted(unknown)}")
    vocab_path = root / "vocab.txt"
    atomic_write_bytes(vocab_path, ("\n".join(SPECIAL_TOKENS + LEXICON) + "\n").encode())

    n_sent = sum(len(g["sentences"]) for g in grefs)
    return {
        "root": str(root), "data_dir": str(data_dir), "vocab": str(vocab_path), "images": len(images),
        "annotations": len(annotations), "grefs": len(grefs), "refs": len(refs), "sentences": n_sent,
        "no_target_fraction": type_counts["no_target"] / max(1, len(grefs)), "expr_types": type_counts,
    }
