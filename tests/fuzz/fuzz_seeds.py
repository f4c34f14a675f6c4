"""The seed corpus of every fuzz target, made here (nothing is downloaded).

``python tests/fuzz/fuzz_seeds.py`` writes them as ``tests/fuzz/corpus/<target>/seed-*``; the
files are committed, and test_fuzz.py checks that they are what this script writes. The
other files there (``crash-*``, ``timeout-*``, ``oom-*``) are inputs the fuzzers found, kept
as regression inputs.

Each target gets valid files in the formats rexfast meets (several pickle protocols, both
torch.save formats, several image codecs, every COCO segmentation form), plus hostile ones:
pickles that would run code (the canary payloads of fuzz_harness) and files that claim
huge sizes, so the fuzzer starts next to the cases that matter.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CANARY_CODE = "import builtins; builtins.REXFAST_FUZZ_CANARY = 1"


class Exec:
    """Unpickling this calls builtins.exec, which sets the canary."""

    def __reduce__(self):
        import builtins

        return builtins.exec, (CANARY_CODE,)


class System:
    """Unpickling this runs ``touch PWNED`` in the working directory (the target's folder)."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


# ----------------------------------------------------------------------------- 1. REFER pickles
def refer_instances() -> dict:
    """The instances.json beside every fuzzed refs pickle."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8},
                   {"id": 2, "file_name": "b.png", "height": 4, "width": 6}],
        "annotations": [{"id": 10, "image_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]]},
                        {"id": 11, "image_id": 2, "iscrowd": 0, "segmentation": {"size": [4, 6], "counts": [5, 3, 16]}},
                        {"id": 12, "image_id": 1, "iscrowd": 1, "segmentation": {"size": [8, 8], "counts": "0`1"}}],
        "categories": [{"id": 1, "name": "box"}],
    }


def _sent(text: str, sid: int) -> dict:
    return {"tokens": text.split(), "raw": text, "sent": text, "sent_id": sid}


def _refs() -> list:
    return [{"ref_id": 0, "image_id": 1, "ann_id": 10, "category_id": 1, "split": "train", "file_name": "a_0.jpg",
             "sentences": [_sent("the left box", 0), _sent("a box", 1)], "sent_ids": [0, 1]},
            {"ref_id": 1, "image_id": 2, "ann_id": 11, "category_id": 1, "split": "testA",
             "sentences": [_sent("the blob", 2)], "sent_ids": [2], "tags": {"x"}, "ratio": 0.5, "box": (1, 2)}]


def _grefs() -> list:
    return [{"ref_id": 0, "image_id": 1, "ann_id": [10, 12], "category_id": [1], "split": "train", "no_target": False,
             "sentences": [_sent("two boxes", 0)], "sent_ids": [0]},
            {"ref_id": 1, "image_id": 1, "ann_id": [-1], "category_id": [], "split": "val", "no_target": True,
             "sentences": [_sent("nothing", 1)], "sent_ids": [1]}]


def _py2_protocol0(obj) -> bytes:
    """What Python 2's pickle.dump(obj) (protocol 0) writes for dicts, lists, ints and byte
    strings (as latin-1 'S' strings), without the memo."""
    if isinstance(obj, dict):
        return b"(" + b"".join(_py2_protocol0(k) + _py2_protocol0(v) for k, v in obj.items()) + b"d"
    if isinstance(obj, list):
        return b"(" + b"".join(_py2_protocol0(v) for v in obj) + b"l"
    if isinstance(obj, bool):
        return b"I01\n" if obj else b"I00\n"
    if isinstance(obj, int):
        return b"I%d\n" % obj
    if isinstance(obj, str):
        raw = obj.encode("latin-1")
        return b"S'" + b"".join(bytes([c]) if 32 <= c < 127 and c not in b"'\\" else b"\\x%02x" % c
                                for c in raw) + b"'\n"
    raise TypeError(type(obj))


def refer_seeds() -> dict:
    refs = _refs()
    seeds = {f"refs-protocol{p}.p": pickle.dumps(refs, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)}
    seeds["grefs-protocol2.p"] = pickle.dumps(_grefs(), protocol=2)
    py2 = [{"ref_id": 5, "image_id": 1, "ann_id": 10, "split": "train",
            "sentences": [{"raw": "caf\xe9 au lait", "sent": "cafe", "tokens": ["cafe"], "sent_id": 0}]}]
    seeds["refs-python2-protocol0.p"] = _py2_protocol0(py2) + b"."
    seeds["hostile-exec-protocol2.p"] = pickle.dumps([{"ref_id": 0, "payload": Exec()}], protocol=2)
    seeds["hostile-system-protocol0.p"] = pickle.dumps([System()], protocol=0)
    seeds["hostile-exec-protocol4.p"] = pickle.dumps(refs + [Exec()], protocol=4)
    return seeds


# ----------------------------------------------------------------------------- 2. checkpoints
def _checkpoint_dict():
    import torch

    from rexfast.engine.checkpoint import FORMAT

    return {"format": FORMAT, "config": {"model": {"name": "cgformer", "preset": "tiny"}, "data": {}, "train": {}},
            "vocab": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "box"],
            "model": collections.OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                             b=torch.zeros(2, dtype=torch.int64), h=torch.ones(3, dtype=torch.float16),
                                             e=torch.arange(4.0).expand(2, 4)),
            "step": 3, "rng": {"python": (3, (1, 2, 3), None), "numpy": {"pos": 1, "kind": "MT19937"}}}


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    """torch.save's bytes; in the legacy format each storage's key (its address in this
    process) is renumbered 0, 1, … so that the seed is the same on every run."""
    import re

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    if legacy:
        keys = dict.fromkeys(re.findall(rb"X.\x00\x00\x00(\d{8,})", data, re.S))  # BINUNICODE addresses
        for k, key in enumerate(keys):
            data = data.replace(b"X" + struct.pack("<I", len(key)) + key,
                                b"X" + struct.pack("<I", len(str(k))) + str(k).encode())
    return data


def _claims(numel: int, size: tuple, stride: tuple, legacy: bool) -> bytes:
    """A torch.save file of one float tensor whose pickle claims ``numel`` storage elements
    and a (size, stride) view, over 6 stored elements."""
    import torch
    from torch._utils import _rebuild_tensor_v2

    real = _torch_bytes({"w": torch.zeros(6)}, legacy)
    if legacy:  # the storage record's numel (BININT1 6 after the location 'cpu') and the view
        patched = real.replace(b"X\x03\x00\x00\x00cpuq\x06K\x06N",
                               b"X\x03\x00\x00\x00cpuq\x06\x8a\x08" + struct.pack("<q", numel) + b"N")
        assert patched != real
        return patched
    import zipfile

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return _rebuild_tensor_v2, (Storage(), 0, size, stride, False, collections.OrderedDict())

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, Storage) else None

    pkl = io.BytesIO()
    P(pkl, protocol=2).dump({"w": Tensor()})
    src = zipfile.ZipFile(io.BytesIO(real))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, pkl.getvalue() if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


def checkpoint_seeds() -> dict:
    import torch

    ckpt = _checkpoint_dict()
    # the legacy format writes its storages in the order of their addresses: one storage keeps the seed stable
    base = torch.arange(12, dtype=torch.float32)
    legacy = dict(ckpt, model=collections.OrderedDict(w=base[:6].view(2, 3), b=base[6:8], e=base[8:12].expand(2, 4)))
    return {
        "rexfast-checkpoint.pt": _torch_bytes(ckpt),
        "rexfast-checkpoint-legacy.pt": _torch_bytes(legacy, legacy=True),
        "state-dict.pth": _torch_bytes({"layer.weight": torch.eye(3), "layer.bias": torch.zeros(3)}),
        "hostile-exec.pt": _torch_bytes({"format": "x", "payload": Exec()}),
        "hostile-system-legacy.pt": _torch_bytes({"payload": System()}, legacy=True),
        "claims-1e12-elements.pt": _claims(10**12, (10**12,), (1,), legacy=False),
        "claims-1e12-elements-legacy.pt": _claims(10**12, (6,), (1,), legacy=True),
        "claims-1e12-element-view.pt": _claims(6, (10**6, 10**6), (0, 0), legacy=False),
    }


# ----------------------------------------------------------------------------- 3. model folders
def model_folder_seeds() -> dict:
    import torch
    from safetensors.torch import save

    from fuzz_harness import join_model_folder
    from rexfast.models.cgformer import CGFormerConfig
    from rexfast.models.rela import ReLAConfig

    weights = save({"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.zeros(2),
                    "n": torch.ones(2, dtype=torch.int64)}, metadata={"format": "pt"})
    seeds = {}
    for name, cls in (("cgformer", CGFormerConfig), ("rela", ReLAConfig)):
        config = json.dumps({"model_type": name, "rexfast_version": "0.1.0", **cls.preset(cls.PRESETS[0]).to_dict()},
                            indent=1).encode()
        seeds[f"{name}.bin"] = join_model_folder(config, weights)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}}).encode()
    seeds["claims-1e12-elements.bin"] = join_model_folder(b'{"model_type": "cgformer"}',
                                                          struct.pack("<Q", len(header)) + header + b"\0" * 16)
    seeds["claims-huge-header.bin"] = join_model_folder(b'{"model_type": "rela"}', struct.pack("<Q", 1 << 60) + b"{}")
    return seeds


# ----------------------------------------------------------------------------- 4. annotations
def annotation_grefs() -> list:
    """The grefs(unc).json beside every fuzzed instances.json."""
    return [{"ref_id": 0, "image_id": 1, "ann_id": [10, 11, 15], "split": "train", "no_target": False,
             "sentences": [{"raw": "things", "sent": "things"}]},
            {"ref_id": 1, "image_id": 2, "ann_id": [13], "split": "train", "sentences": [{"raw": "two"}]},
            {"ref_id": 2, "image_id": 1, "ann_id": [-1], "split": "val", "no_target": True,
             "sentences": [{"raw": "none"}]}]


def _instances() -> dict:
    comp = np.zeros((20, 30), bool)
    comp[14:19, 1:6] = True
    return {
        "images": [{"id": 1, "file_name": "img1.png", "height": 20, "width": 30},
                   {"id": 2, "file_name": "img2.png", "height": 16, "width": 16},
                   {"id": 3, "file_name": "one.png", "height": 1, "width": 1}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [20, 30], "counts": [250, 5, 15, 5, 325]}},
            {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0,
             "segmentation": {"size": [20, 30], "counts": "R15?0000000b>"}},
            {"id": 13, "image_id": 2, "category_id": 2, "iscrowd": 0,
             "segmentation": [[1, 1, 9, 1, 9, 5, 1, 5], [6, 3, 12, 3, 12, 9, 6, 9.5]]},
            {"id": 14, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": [1.5, 1, 9, 1, 9, 5]},
            {"id": 15, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [20, 30], "counts": [0, 4, 16, 4, 16, 4, 16, 4, 536]}},
            {"id": 16, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": [[-3, -2, 20, 4, 7, 30]]},
        ],
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "blob"}],
    }


def annotations_seeds() -> dict:
    inst = _instances()
    seeds = {"instances.json": json.dumps(inst, indent=1).encode()}
    issue = dict(inst, annotations=[{"id": 20, "image_id": 3, "iscrowd": 0,
                                     "segmentation": {"size": [1, 1], "counts": "]L11n4EP51M: F4 IJhTOn\x00_Yb9HGHVfl^2n2=g"}}])
    seeds["issue-rle-heap.json"] = json.dumps(issue).encode()
    far = dict(inst, annotations=[{"id": 21, "image_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 3e6, 1, 0, 3]]}])
    seeds["far-polygon.json"] = json.dumps(far).encode()
    big = dict(inst, images=inst["images"] + [{"id": 4, "file_name": "huge.png", "height": 100000, "width": 100000}])
    seeds["huge-image.json"] = json.dumps(big).encode()
    return seeds


# ----------------------------------------------------------------------------- 5. images
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def image_seeds() -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    seeds = {}
    for name, im, fmt, kw in (
            ("rgb.png", rgb, "PNG", {}), ("gray.png", rgb.convert("L"), "PNG", {}),
            ("palette.png", rgb.convert("P"), "PNG", {}), ("rgba.png", rgb.convert("RGBA"), "PNG", {}),
            ("i16.png", Image.fromarray(rng.integers(0, 65535, (4, 3), dtype=np.uint16)), "PNG", {}),
            ("rgb.jpg", rgb, "JPEG", {"quality": 50}), ("rgb.gif", rgb.convert("P"), "GIF", {}),
            ("rgb.bmp", rgb, "BMP", {}), ("rgb.tif", rgb, "TIFF", {}),
            ("lzw.tif", rgb, "TIFF", {"compression": "tiff_lzw"}), ("rgb.webp", rgb, "WEBP", {"lossless": True})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        seeds[name] = buf.getvalue()
    # a PNG whose header claims 100,000 x 100,000 pixels (30 GB as RGB) over a few bytes of data
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    seeds["claims-100000x100000.png"] = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                         + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    return seeds


# ----------------------------------------------------------------------------- 6. pairs files
def pairs_images() -> dict:
    """The images beside every fuzzed pairs file (the seeds name them by relative path)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    out = {}
    for name, im, fmt in (("a.png", rgb, "PNG"), ("b.jpg", rgb, "JPEG"), ("sub/c.png", rgb.convert("L"), "PNG")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


def pairs_seeds() -> dict:
    from fuzz_harness import join_pairs

    rows = [{"image": "a.png", "text": "the red square", "id": "r1"},
            {"image": "sub/c.png", "text": "caf\xe9, \"quoted\" \u2014 gauche", "id": 7},
            {"image": "./b.jpg", "text": "the left one"},
            {"image": "sub/../a.png", "text": "again", "id": None, "extra": [1, {"x": 2}]}]
    jsonl = "".join(json.dumps(r, ensure_ascii=k % 2 == 0) + ("\n\n" if k == 1 else "\n") for k, r in enumerate(rows))
    csv_rows = ('image,text,id\r\n'
                'a.png,the red square,r1\r\n'
                'sub/c.png,"caf\xe9, ""quoted"" \u2014\nover two lines",7\r\n'
                './b.jpg,the left one,\r\n'
                '\r\n'
                '"sub/../a.png","again",""\r\n')
    bad_jsonl = ('{"image": "a.png", "text": "one", "id": "x"}\n'
                 '{"image": "missing.png", "text": "two"}\n'
                 '{"image": "b.jpg", "text": "  ", "id": "x"}\n'
                 '[1, 2]\n{"image": "a.png", "text": "no closing"\n'
                 '{"image": 3, "text": ["x"], "id": true}\n')
    bad_csv = ('text,image,note\n'
               'one,a.png,x\n'
               'two,missing.png\n'
               'three,b.jpg,x,extra\n'
               '"unterminated,a.png\n')
    return {
        "rows.jsonl": join_pairs(".jsonl", jsonl.encode()),
        "rows-bom.jsonl": join_pairs(".jsonl", b"\xef\xbb\xbf" + jsonl.encode()),
        "rows.csv": join_pairs(".csv", csv_rows.encode()),
        "rows-bom-no-id.csv": join_pairs(".csv", b"\xef\xbb\xbf" + b"text,image\nthe square,a.png\nthe grey one,sub/c.png\n"),
        "bad-rows.jsonl": join_pairs(".jsonl", bad_jsonl.encode()),
        "bad-rows.csv": join_pairs(".csv", bad_csv.encode()),
    }


SEEDS = {"refer": refer_seeds, "checkpoint": checkpoint_seeds, "model_folder": model_folder_seeds,
         "annotations": annotations_seeds, "image": image_seeds, "pairs": pairs_seeds}


def write_seeds(corpus: Path = HERE / "corpus") -> list[Path]:
    written = []
    for target, make in SEEDS.items():
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for name, data in make().items():
            path = folder / f"seed-{name}"
            path.write_bytes(data)
            written.append(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for p in write_seeds():
        print(p.relative_to(HERE.parents[1]), p.stat().st_size)
