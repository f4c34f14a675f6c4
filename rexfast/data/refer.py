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

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Optional, Union

import numpy as np

from ..io import HASHABLE_SCALARS, RefusedOpcode, check_pickle
from .masks import _brief, _image_size, annotations_to_mask

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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int, deep nesting
        raise ValueError(f"corrupt JSON in {what} {path}: {type(e).__name__}: {e}") from None


# A refs file holds the text of some 10^5 refs (a RefCOCO-sized one written by Python is 17 MB): 1 GiB is not one.
MAX_PICKLE_BYTES = 1 << 30

# Opcodes a REFER file never holds: objects built from classes (INST, OBJ, NEWOBJ*, BUILD), the
# extension registry and persistent ids (ways to name code), and protocol-5 out-of-band buffers
# (BYTEARRAY8 with a forged length made the C unpickler raise SystemError under a memory limit).
_REFUSED_OPCODES = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4", "PERSID",
                              "BINPERSID", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"})


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles only what REFER files hold: dicts, lists, tuples, strings (Python 2
    byte strings through latin-1), numbers, booleans, None, and sets. Any other
    global (a class or a function: what a hostile pickle uses to run code) is refused.

    It is the pure-Python unpickler, whose memo is a dict (CPython's C unpickler
    sizes an array to the largest memo index). Dict keys and set items must be
    scalars: a pickle can share one tuple twice inside the next, 100 levels deep, and
    hashing such a key would take 2¹⁰⁰ steps. The sets it builds hold at most as
    many items in all as the file has bytes."""

    # (protocol-2 pickles name the module __builtin__; find_class maps it to builtins)
    ALLOWED = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")}
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path, budget: int, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path
        self._budget = budget  # set items left to build

    def _check_keys(self, keys, what):
        for k in keys:
            if not isinstance(k, HASHABLE_SCALARS):
                raise ValueError(f"refusing to unpickle {self._path}: a {what} is a {type(k).__name__}; REFER files "
                                 "key their dicts and fill their sets with strings and numbers only")

    def _spend(self, n: int) -> None:
        self._budget -= n
        if self._budget < 0:
            raise ValueError("its sets hold more items than the file has bytes")

    def _make_set(self, kind, items):
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"a {kind.__name__} is built from a {type(items).__name__}, not a list")
        self._spend(len(items))
        self._check_keys(items, "set item")
        return kind(items)

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            kind = set if name == "set" else frozenset
            return lambda items=(), /: self._make_set(kind, items)
        raise ValueError(f"refusing to unpickle {self._path}: it holds a {module}.{name} object; REFER files hold "
                         "only builtin containers and scalars, and unpickling anything else could run code")

    def persistent_load(self, pid):
        raise ValueError(f"refusing to unpickle {self._path}: it holds a persistent reference")

    def load_dict(self):
        items = self.pop_mark()
        self._check_keys(items[::2], "dict key")
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_setitem(self):
        self._check_keys(self.stack[-2:-1], "dict key")
        super().load_setitem()

    def load_setitems(self):
        self._check_keys(self.stack[::2], "dict key")
        super().load_setitems()

    def load_additems(self):
        self._spend(len(self.stack))
        self._check_keys(self.stack, "set item")
        super().load_additems()

    def load_frozenset(self):
        self._spend(len(self.stack))
        self._check_keys(self.stack, "set item")
        super().load_frozenset()


for _code, _method in ((pickle.DICT, _RestrictedUnpickler.load_dict), (pickle.SETITEM, _RestrictedUnpickler.load_setitem),
                       (pickle.SETITEMS, _RestrictedUnpickler.load_setitems),
                       (pickle.ADDITEMS, _RestrictedUnpickler.load_additems),
                       (pickle.FROZENSET, _RestrictedUnpickler.load_frozenset)):
    _RestrictedUnpickler.dispatch[_code[0]] = _method
del _code, _method


def _read_pickle(path: Path, what: str):
    """A REFER pickle through :func:`rexfast.io.check_pickle` and :class:`_RestrictedUnpickler`
    (never a plain pickle.load). Anything wrong is one ValueError naming the file.

    The scan and the pure-Python unpickler cost more than the C unpickler, once per
    dataset load: for a RefCOCO-sized refs file (17 MB, 4.6 M opcodes) on the project's
    2-core machine, 3.6 s against pickle.loads' 0.5 s when idle (pickletools.genops and
    pickle._Unpickler), 12.8 s against 6.0 s under a load of 8. Python 2 byte strings
    are decoded as latin-1, which reads ASCII text unchanged."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise ValueError(f"refusing to read {what} {path}: {size} bytes, more than a REFER file's "
                         f"{MAX_PICKLE_BYTES} limit")
    data = path.read_bytes()
    try:
        check_pickle(data, _REFUSED_OPCODES)
        return _RestrictedUnpickler(io.BytesIO(data), path, len(data), encoding="latin1").load()
    except RefusedOpcode as e:
        raise ValueError(f"refusing to unpickle {path}: {e}; REFER files hold only builtin containers and "
                         "scalars") from None
    except ValueError as e:
        if str(e).startswith("refusing to unpickle"):
            raise ValueError(str(e)) from None
        raise ValueError(f"corrupt pickle in {what} {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - unpickling raises many exception types on bad input
        raise ValueError(f"corrupt pickle in {what} {path}: {type(e).__name__}: {e}") from None


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


def _is_id(value) -> bool:
    """An id from a file: an int or a str, whose hash and comparison cost O(its size)
    (a pickled tuple that shares itself 60 levels deep would cost 2**60)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _check_instances(inst, instances_file: Path):
    """(images, anns, categories) by id, each entry checked for what the readers use."""
    if not isinstance(inst, dict) or not all(isinstance(inst.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"instances file {instances_file} must be an object with 'images' and 'annotations' lists")
    if not isinstance(inst.get("categories", []), list):
        raise ValueError(f"instances file {instances_file}: 'categories' must be a list")
    images, anns, categories = {}, {}, {}
    for k, img in enumerate(inst["images"]):
        where = f"image #{k} in instances file {instances_file}"
        if not isinstance(img, dict) or not all(key in img for key in ("id", "height", "width", "file_name")):
            raise ValueError(f"{where} must be an object with 'id', 'height', 'width' and 'file_name'")
        if not _is_id(img["id"]):
            raise ValueError(f"{where}: id must be an integer or a string, got {_brief(img['id'])}")
        _image_size(img["height"], img["width"], f"{where}:")
        name = img["file_name"]
        if (not isinstance(name, str) or not name or "\x00" in name or PurePath(name).is_absolute()
                or ".." in PurePath(name).parts):
            raise ValueError(f"{where}: file_name must be a relative path inside the image folder, got {_brief(name)}")
        images[img["id"]] = img
    for k, ann in enumerate(inst["annotations"]):
        where = f"annotation #{k} in instances file {instances_file}"
        if not isinstance(ann, dict) or not _is_id(ann.get("id")) or not _is_id(ann.get("image_id")):
            raise ValueError(f"{where} must be an object with an integer or string 'id' and 'image_id'")
        anns[ann["id"]] = ann
    for k, cat in enumerate(inst.get("categories", [])):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"category #{k} in instances file {instances_file} must be an object with an 'id' "
                             "and a 'name' string")
        categories[cat["id"]] = cat["name"]
    return images, anns, categories


def _index(dataset, split_by, task, refs, refs_file: Path, instances_file: Path) -> ReferIndex:
    images, anns, categories = _check_instances(_read_json(instances_file, "instances file"), instances_file)
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
        for key in ("ref_id", "image_id"):
            if not _is_id(ref[key]):
                raise ValueError(f"{where}: {key} must be an integer or a string, got {_brief(ref[key])}")
        if not isinstance(ref["split"], str):
            raise ValueError(f"{where}: split must be a string, got {_brief(ref['split'])}")
        if ref["ref_id"] in seen_ids:
            raise ValueError(f"{where}: duplicate ref_id {_brief(ref['ref_id'])}")
        seen_ids.add(ref["ref_id"])
        if ref["image_id"] not in images:
            raise ValueError(f"{where}: image_id {_brief(ref['image_id'])} is not in {instances_file}")
        ids = _as_list(ref["ann_id"])
        if not all(_is_id(a) for a in ids):
            raise ValueError(f"{where}: ann_id must be an id or a list of ids, got {_brief(ref['ann_id'])}")
        if task == "res" and (len(ids) != 1 or ids[0] == -1):
            raise ValueError(f"{where}: a REFER ref needs exactly one ann_id, got {_brief(ref['ann_id'])}")
        for a in ids:
            if a != -1 and a not in anns:
                raise ValueError(f"{where}: ann_id {_brief(a)} is not in {instances_file}")
            if a != -1 and anns[a]["image_id"] != ref["image_id"]:
                raise ValueError(f"{where}: ann_id {_brief(a)} belongs to image {_brief(anns[a]['image_id'])}, "
                                 f"not {_brief(ref['image_id'])}")
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
