"""The example rows of the page: (image path, sentence) pairs a visitor can click.

* A model trained by ``rexfast demo``: the demo wrote its synthetic dataset beside the
  model (``<out>/data/synthetic/``, the model at ``<out>/train/best`` or ``best.pt``), so the
  rows are scenes of its held-out test split with one of their sentences each, every kind
  of expression in turn (one that names nothing included).
* ``--examples DIR``: the images in DIR (sorted by name); a sentence for ``photo.jpg`` may sit
  in ``photo.txt`` beside it (its first line), else the sentence box is left for the visitor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_EXAMPLES = 12
SYNTHETIC_GREFS = Path("synthetic") / "grefs(unc).json"


def demo_data_root(source, config=None) -> Optional[Path]:
    """The synthetic data root of a model ``rexfast demo`` trained, or None.

    Looked for where the demo puts it: ``<ancestor>/data`` of the model source (up to three
    folders up), then the run config's ``data.root`` when its dataset is synthetic."""
    candidates = []
    try:
        path = Path(source).resolve()
    except (TypeError, OSError):
        path = None
    if path is not None and path.exists():
        for ancestor in [path, *path.parents][:4]:
            candidates.append(ancestor / "data")
    data = getattr(config, "data", None)
    if data is not None and str(getattr(data, "dataset", "")).startswith("synthetic") and getattr(data, "root", None):
        candidates.append(Path(data.root))
    for root in candidates:
        if (root / SYNTHETIC_GREFS).is_file():
            return root
    return None


def demo_examples(root, *, limit: int = MAX_EXAMPLES, split: str = "test") -> list[tuple[str, str]]:
    """Up to ``limit`` (image, sentence) rows from a synthetic dataset's ``split``: one sentence
    per scene, the kinds of expression taken in turn so that every kind shows."""
    root = Path(root)
    grefs = json.loads((root / SYNTHETIC_GREFS).read_text())
    image_dir = root / "synthetic" / "images"
    by_type: dict[str, list[dict]] = {}
    for ref in grefs:
        if ref.get("split") == split and ref.get("sentences") and (image_dir / ref["file_name"]).is_file():
            by_type.setdefault(ref.get("expr_type", ""), []).append(ref)
    rows, used_images = [], set()
    queues = [list(refs) for _, refs in sorted(by_type.items())]
    while len(rows) < limit and any(queues):
        for queue in queues:
            while queue and queue[0]["file_name"] in used_images:
                queue.pop(0)
            if queue and len(rows) < limit:
                ref = queue.pop(0)
                used_images.add(ref["file_name"])
                rows.append((str(image_dir / ref["file_name"]), ref["sentences"][0]["sent"]))
    return rows


def folder_examples(folder, *, limit: int = MAX_EXAMPLES) -> list[tuple[str, str]]:
    """Up to ``limit`` (image, sentence) rows from the images in ``folder`` (see the module docstring);
    FileNotFoundError / ValueError for a folder that is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--examples folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--examples folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    rows = []
    for image in images[:limit]:
        sentence = ""
        side = image.with_suffix(".txt")
        if side.is_file():
            lines = side.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            sentence = lines[0].strip() if lines else ""
        rows.append((str(image), sentence))
    return rows


__all__ = ["demo_data_root", "demo_examples", "folder_examples", "IMAGE_SUFFIXES", "MAX_EXAMPLES"]
