"""Readers for the REFER (RefCOCO/+/g, ReferIt) and G-REFER (gRefCOCO) annotation formats.

Layout (as in the official ``refer.py`` / ``grefer.py``)::

    <root>/<dataset>/refs(<split_by>).p     RefCOCO, RefCOCO+ (unc), RefCOCOg (umd, google), refclef (unc, berkeley)
    <root>/<dataset>/instances.json         COCO-style images / annotations / categories
    <root>/grefcoco/grefs(unc).json         gRefCOCO (a grefs(unc).p is read instead when present, like grefer.py)
    <root>/grefcoco/instances.json

A ref is ``{"ref_id", "image_id", "ann_id", "split", "sentences": [{"raw", "sent", "sent_id", "tokens"}], ...}``;
in gRefCOCO ``ann_id`` is a list and a no-target ref has ``ann_id == [-1]``
(and ``"no_target": True``).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .masks import annotations_to_mask

__all__ = ["ReferIndex", "load_refer", "load_grefer", "REFER_SPLIT_BYS", "GREFER_DATASETS"]

# folder name → the split_by values its annotations come in
REFER_SPLIT_BYS = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "synthetic": ("unc",),  # written by rexfast.data.synthetic.generate
}
GREFER_DATASETS = {"grefcoco": ("unc",), "synthetic": ("unc",)}

# split names the official REFER.getRefIds understands
_REFER_SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")

PathLike = Union[str, os.PathLike]


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON in {what} {path}: {e}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what REFER files hold: dicts, lists, tuples, strings (Python 2
    byte strings through latin-1), numbers, booleans, None, and sets. Any other
    global (a class or a function: what a hostile pickle uses to run code) is refused."""

    # (protocol-2 pickles name the module __builtin__; Unpickler maps it to builtins)
    ALLOWED = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")}

    def __init__(self, file, path: Path, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise ValueError(f"refusing to unpickle {self._path}: it holds a {module}.{name} object; REFER files hold "
                         "only builtin containers and scalars, and unpickling anything else could run code")

    def persistent_load(self, pid):
        raise ValueError(f"refusing to unpickle {self._path}: it holds a persistent reference")


def _read_pickle(path: Path, what: str):
    """A REFER pickle through :class:`_RestrictedUnpickler` (never a plain pickle.load)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    for encoding in ("ASCII", "latin1"):  # refs pickled by Python 2 hold byte strings
        try:
            with open(path, "rb") as f:
                return _RestrictedUnpickler(f, path, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except ValueError as e:
            if str(e).startswith("refusing to unpickle"):
                raise
            raise ValueError(f"corrupt pickle in {what} {path}: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001 - unpickling raises many exception types on bad input
            raise ValueError(f"corrupt pickle in {what} {path}: {type(e).__name__}: {e}") from None
    raise ValueError(f"corrupt pickle in {what} {path}: undecodable strings")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclass
class ReferIndex:
    """Refs plus the COCO-style instances they point into."""

    dataset: str
    split_by: str
    task: str  # "res" (REFER: one object per ref) | "gres" (G-REFER: any number, or none)
    refs_file: Path
    instances_file: Path
    refs: list
    images: dict = field(repr=False)
    anns: dict = field(repr=False)
    categories: dict = field(repr=False)

    @property
    def splits(self) -> list:
        seen = []
        for r in self.refs:
            if r["split"] not in seen:
                seen.append(r["split"])
        return seen

    def refs_for_split(self, split: str) -> list:
        """The refs of one split (official REFER semantics for testA/testB/test…)."""
        if not isinstance(split, str):
            raise ValueError(f"split must be a str, got {type(split).__name__}")
        available = self.splits
        if self.task == "gres" or split not in _REFER_SPLITS:
            if split not in available:
                raise ValueError(
                    f"unknown split {split!r} for {self.dataset} ({self.split_by}) in {self.refs_file}; "
                    f"available: {available}"
                )
            return [r for r in self.refs if r["split"] == split]
        if split in ("testA", "testB", "testC"):  # also testAB, testBC, ... as REFER.getRefIds does
            out = [r for r in self.refs if r["split"].startswith("test") and split[-1] in r["split"][4:]]
        elif split == "test":
            out = [r for r in self.refs if "test" in r["split"]]
        else:
            out = [r for r in self.refs if r["split"] == split]
        if not out:
            raise ValueError(
                f"split {split!r} has no refs for {self.dataset} ({self.split_by}) in {self.refs_file}; "
                f"available: {available}"
            )
        return out

    def ann_ids(self, ref: dict) -> list:
        """The ref's annotation ids; [] for a no-target ref. In G-REFER data the
        ``iscrowd`` annotations of a multi-target ref are left out, as the
        official gRefCOCO loader does (``if anno['iscrowd']: continue``)."""
        if ref.get("no_target", False):
            return []
        ids = [int(a) for a in _as_list(ref["ann_id"]) if int(a) != -1]
        if self.task == "gres":
            ids = [a for a in ids if not self.anns[a].get("iscrowd", 0)]
        return ids

    def is_no_target(self, ref: dict) -> bool:
        """A no-target ref (``ann_id == [-1]`` or ``no_target``); a target ref whose
        objects are all crowd annotations is still a target ref (with an empty mask)."""
        return bool(ref.get("no_target", False)) or all(int(a) == -1 for a in _as_list(ref["ann_id"]))

    def image_info(self, ref: dict) -> dict:
        return self.images[ref["image_id"]]

    def mask(self, ref: dict, size: Optional[tuple] = None) -> np.ndarray:
        """(H, W) bool mask: the union of the ref's objects (all False for no target);
        at ``size = (h, w)`` rasterised there from scaled polygons (see
        :func:`rexfast.data.masks.annotations_to_mask`)."""
        img = self.image_info(ref)
        anns = [self.anns[a] for a in self.ann_ids(ref)]
        return annotations_to_mask(anns, img["height"], img["width"], size=size)

    @staticmethod
    def sentences(ref: dict) -> list:
        """The ref's expressions (the ``raw`` text, as LAVT and ReLA tokenize it)."""
        return [s.get("raw", s.get("sent")) for s in ref["sentences"]]


def _index(dataset, split_by, task, refs, refs_file: Path, instances_file: Path) -> ReferIndex:
    inst = _read_json(instances_file, "instances file")
    if not isinstance(inst, dict) or not all(isinstance(inst.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"instances file {instances_file} must be an object with 'images' and 'annotations' lists")
    try:
        images = {img["id"]: img for img in inst["images"]}
        anns = {ann["id"]: ann for ann in inst["annotations"]}
        categories = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for img in images.values():
            int(img["height"]), int(img["width"]), str(img["file_name"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed entry in instances file {instances_file}: {type(e).__name__}: {e}") from None

    if not isinstance(refs, list):
        raise ValueError(f"refs file {refs_file} must hold a list of refs, got {type(refs).__name__}")
    seen_ids = set()
    for k, ref in enumerate(refs):
        where = f"ref #{k} in {refs_file}"
        if not isinstance(ref, dict):
            raise ValueError(f"{where} is not a dict")
        missing = [key for key in ("ref_id", "image_id", "ann_id", "split", "sentences") if key not in ref]
        if missing:
            raise ValueError(f"{where} lacks keys {missing}")
        if ref["ref_id"] in seen_ids:
            raise ValueError(f"{where}: duplicate ref_id {ref['ref_id']}")
        seen_ids.add(ref["ref_id"])
        if ref["image_id"] not in images:
            raise ValueError(f"{where}: image_id {ref['image_id']} is not in {instances_file}")
        ids = _as_list(ref["ann_id"])
        if task == "res" and (len(ids) != 1 or ids[0] == -1):
            raise ValueError(f"{where}: a REFER ref needs exactly one ann_id, got {ref['ann_id']!r}")
        for a in ids:
            if a != -1 and a not in anns:
                raise ValueError(f"{where}: ann_id {a} is not in {instances_file}")
            if a != -1 and anns[a]["image_id"] != ref["image_id"]:
                raise ValueError(f"{where}: ann_id {a} belongs to image {anns[a]['image_id']}, not {ref['image_id']}")
        sents = ref["sentences"]
        if not isinstance(sents, list) or not sents:
            raise ValueError(f"{where} has no sentences")
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("raw", s.get("sent")), str):
                raise ValueError(f"{where}: each sentence needs a 'raw' or 'sent' string")
    return ReferIndex(dataset, split_by, task, refs_file, instances_file, refs, images, anns, categories)


def load_refer(root: PathLike, dataset: str, split_by: str) -> ReferIndex:
    """RefCOCO / RefCOCO+ / RefCOCOg / refclef: ``<root>/<dataset>/refs(<split_by>).p`` + ``instances.json``."""
    if dataset not in REFER_SPLIT_BYS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; expected one of {sorted(REFER_SPLIT_BYS)}")
    if split_by not in REFER_SPLIT_BYS[dataset]:
        raise ValueError(f"unknown split_by {split_by!r} for {dataset}; expected one of {REFER_SPLIT_BYS[dataset]}")
    data_dir = Path(root) / dataset
    refs_file = data_dir / f"refs({split_by}).p"
    refs = _read_pickle(refs_file, "refs file")
    return _index(dataset, split_by, "res", refs, refs_file, data_dir / "instances.json")


def load_grefer(root: PathLike, dataset: str = "grefcoco", split_by: str = "unc") -> ReferIndex:
    """gRefCOCO: ``<root>/grefcoco/grefs(unc).json`` + ``instances.json``."""
    if dataset not in GREFER_DATASETS:
        raise ValueError(f"unknown G-REFER dataset {dataset!r}; expected one of {sorted(GREFER_DATASETS)}")
    if split_by not in GREFER_DATASETS[dataset]:
        raise ValueError(f"unknown split_by {split_by!r} for {dataset}; expected one of {GREFER_DATASETS[dataset]}")
    data_dir = Path(root) / dataset
    pickled = data_dir / f"grefs({split_by}).p"
    if pickled.is_file():
        refs_file, refs = pickled, _read_pickle(pickled, "grefs file")
    else:
        refs_file = data_dir / f"grefs({split_by}).json"
        refs = _read_json(refs_file, "grefs file")
    return _index(dataset, split_by, "gres", refs, refs_file, data_dir / "instances.json")
