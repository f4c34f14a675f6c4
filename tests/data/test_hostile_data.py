"""Dataset files from strangers: the REFER pickle memo bomb, RLE strings that
corrupted pycocotools' heap, polygons that cost gigabytes, and a test suite that
runs without pycocotools (issue 39, issue 34).

The inputs the issue reported are committed under tests/fuzz/corpus/; each is
refused here with one ValueError that names the file or the annotation, fast and
with bounded memory, measured in a child process (so that a regression cannot
take the test run down with it)."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rexfast.data import load_refer
from rexfast.data.masks import (MAX_POLYGON_VERTICES, annotations_to_mask, decode_segmentation, encode_mask,
                                rle_counts_from_string)
from rexfast.data.refer import _read_pickle

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz" / "corpus"
ISSUE_RLE = {"size": [1, 1], "counts": "]L11n4EP51M: F4 IJhTOn\x00_Yb9HGHVfl^2n2=g"}

# pycocotools' own numpy-2 notice from its decode, which these tests call to compare
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and MALLOC_CHECK_ are Linux's")


@pytest.fixture
def mask_utils():
    return pytest.importorskip("pycocotools.mask", reason="comparing with pycocotools needs it installed")


def malloc_check_env() -> dict:
    """glibc's heap checking: MALLOC_CHECK_=3 aborts at the first corrupted chunk; glibc >= 2.34
    honours it only with libc_malloc_debug preloaded."""
    import ctypes.util

    env = {"MALLOC_CHECK_": "3"}
    debug = ctypes.util.find_library("c_malloc_debug")
    if debug:
        env["LD_PRELOAD"] = " ".join(filter(None, [debug, os.environ.get("LD_PRELOAD", "")]))
    return env


def run_child(body: str, *, env=None, address_space_headroom: int | None = None, timeout=120):
    """Run ``body`` in a fresh interpreter (the repository first on the path); with
    ``address_space_headroom`` its address space is capped at that many bytes above what
    it holds after its imports, so an allocation of gigabytes fails there at once."""
    prelude = textwrap.dedent("""
        import json, os, resource, sys, time, tracemalloc
        def cap_address_space(headroom):
            vsz = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vsz + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
        def maxrss_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    """)
    code = prelude + textwrap.dedent(body)
    if address_space_headroom is not None:
        code = code.replace("#CAP", f"cap_address_space({address_space_headroom})")
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout)


def _refs_root(tmp_path: Path, refs_bytes: bytes) -> Path:
    (tmp_path / "refcoco").mkdir(parents=True)
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(refs_bytes)
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], "annotations": []}))
    return tmp_path


# ----------------------------------------------------------------------------- (a) REFER pickles

# name -> what the error says. Each is a valid refs pickle with a few bytes changed:
REFER_CRASHES = {
    # BINPUT became LONG_BINPUT 778,398,819: CPython's C unpickler sized its memo array to that index
    # (29 s and 12 GB before it answered)
    "crash-memo-index-778398819.p": "memo index 778398819 at byte 20 is larger than the number of opcodes",
    # a BYTEARRAY8 claiming 2,650,800,134 bytes: the C unpickler printed "SystemError: deallocated bytearray
    # object has exported buffers" when the allocation failed (under a 2 GB address-space cap)
    "crash-bytearray8-systemerror.p": "expected 2650800134 bytes in a bytearray8, but only 333 remain",
}


@linux_only
def test_refer_crash_inputs_are_refused_fast_with_bounded_memory(tmp_path):
    roots = {name: _refs_root(tmp_path / name, (CORPUS / "refer" / name).read_bytes()) for name in REFER_CRASHES}
    paths = {name: str(root) for name, root in roots.items()}
    proc = run_child(f"""
        from rexfast.data import load_refer
        #CAP
        results = {{}}
        for name, root in {paths!r}.items():
            tracemalloc.start()
            t = time.perf_counter()
            try:
                load_refer(root, "refcoco", "unc")
                out = {{"error": None}}
            except Exception as e:
                out = {{"error": type(e).__name__, "message": str(e)}}
            out["seconds"] = time.perf_counter() - t
            out["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            results[name] = out
        print(json.dumps(results))
    """, address_space_headroom=2 << 30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # no SystemError printed on the way
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, reason in REFER_CRASHES.items():
        out = results[name]
        assert out["error"] == "ValueError", out
        message = out["message"]
        assert str(roots[name] / "refcoco" / "refs(unc).p") in message and reason in message, message
        assert out["peak_mb"] < 20, out  # memory, not speed: shared machines


def _refs():
    sent = {"tokens": ["the", "man"], "raw": "the man", "sent": "the man", "sent_id": 0}
    return [{"ref_id": 1, "image_id": 1, "ann_id": 3, "split": "train", "sentences": [sent], "sent_ids": [0],
             "tags": {"a", "b"}, "frozen": frozenset({1, 2}), "pair": (1.5, None), "ok": True}]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_of_a_refs_pickle_loads(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(_refs(), protocol=protocol))
    assert _read_pickle(path, "refs file") == _refs()


def test_python2_protocol0_latin1_strings_load(tmp_path):
    # Python 2's default pickle of [{'raw': 'caf\xe9'}]: protocol 0, the byte string escaped in S'...'
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"(lp0\n(dp1\nS'raw'\np2\nS'caf\\xe9'\np3\nsa.")
    assert _read_pickle(path, "refs file") == [{"raw": "café"}]


def _nested_tuple_key(depth: int) -> bytes:
    """A protocol-2 pickle of {t: 1} where t(k) = (t(k-1), t(k-1)) shares one tuple twice, ``depth``
    levels deep: 3 bytes a level, and hashing it as a dict key takes 2**depth steps."""
    out = bytearray(b"\x80\x02}q\x00)q\x01")
    for k in range(1, depth + 1):
        out += b"h" + bytes([k]) + b"h" + bytes([k]) + b"\x86q" + bytes([k + 1])
    out += b"K\x01s."
    return bytes(out)


@pytest.mark.parametrize("data, match", [
    (_nested_tuple_key(100), "a dict key is a tuple"),
    (b"\x80\x02c__builtin__\nset\n)q\x00)q\x01\x86q\x02\x85R.", "a set item is a tuple"),
    (b"\x80\x02]q\x00h\x05a.", "memo index 5 read at byte 5 was never written"),
    (b"\x80\x02]r\xff\xff\xff\x7f.", "memo index 2147483647 at byte 3 is larger"),
    (b"\x80\x04\x95\x00\x00\x00\x00\x01\x00\x00\x00].", "frame of 4294967296 bytes"),
    (b"\x80\x02X\xff\xff\xff\x7fabc.", "4294967167 bytes|2147483647 bytes"),
    (b"\x80\x02cbuiltins\nobject\n)\x81.", "it holds a NEWOBJ opcode at byte 20"),
    (b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.", "it holds a posix.system object"),
    (b"\x80\x02(cbuiltins\nlist\no.", "it holds a OBJ opcode"),
    (b"\x80\x02]q\x00", "ends before its STOP"),
    (b"\x80\x02\xff.", "unknown opcode"),
])
def test_malformed_refs_pickles_are_one_value_error(tmp_path, data, match):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        _read_pickle(path, "refs file")
    assert str(path) in str(info.value)


def test_sets_hold_at_most_as_many_items_as_the_file_has_bytes(tmp_path):
    # one 200-item list, then 100 sets built from it by memo reference: 40 bytes of opcodes, 20,000 items
    body = bytearray(b"\x80\x02c__builtin__\nset\nq\x00](" + b"K\x01" * 200 + b"eq\x01(")
    body += b"h\x00h\x01\x85R" * 100
    body += b"l."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(bytes(body))
    with pytest.raises(ValueError, match="sets hold more items than the file has bytes"):
        _read_pickle(path, "refs file")


def test_oversized_refs_file_is_refused_before_reading(tmp_path, monkeypatch):
    import rexfast.data.refer as refer

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(_refs(), protocol=2))
    monkeypatch.setattr(refer, "MAX_PICKLE_BYTES", 64)
    with pytest.raises(ValueError, match=r"refusing to read refs file .*bytes, more than a REFER file's 64 limit"):
        _read_pickle(path, "refs file")


def _shared_tuple_ref(depth: int) -> bytes:
    """A protocol-2 pickle of one complete ref whose ref_id is t(depth), t as in _nested_tuple_key:
    a value, not a key, so the unpickler lets it through, and only the index's checks stand between
    it and a hash that would take 2**depth steps."""
    def text(t):
        return b"X" + struct.pack("<I", len(t)) + t.encode()

    out = bytearray(b"\x80\x02]q\x00}q\x01" + text("ref_id") + b"q\x02)q\x03")
    for k in range(3, depth + 3):
        out += b"0h" + bytes([k]) + b"h" + bytes([k]) + b"\x86q" + bytes([k + 1])
    out += b"s(" + text("image_id") + b"K\x01" + text("ann_id") + b"K\x01" + text("split") + text("train")
    out += text("sentences") + b"]}" + text("raw") + text("a") + b"sau" + b"a."
    return bytes(out)


def test_refs_with_a_self_sharing_tuple_id_are_refused_fast(tmp_path):
    root = _refs_root(tmp_path, _shared_tuple_ref(100))
    with pytest.raises(ValueError, match=r"ref #0 in .*refs\(unc\)\.p: ref_id must be an integer or a string, "
                                         r"got a tuple of 2 items"):
        load_refer(root, "refcoco", "unc")
    refs = [{"ref_id": 1, "image_id": 1, "ann_id": [[1, 2]], "split": "train", "sentences": [{"raw": "a"}]}]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"ann_id must be an id or a list of ids, got a list of 1 items"):
        load_refer(root, "refcoco", "unc")


def _image(**kw):
    return {"id": 1, "file_name": "a.png", "height": 4, "width": 4, **kw}


@pytest.mark.parametrize("instances, match", [
    ('{"images": [' * 100000 + "]" * 100000 + "}", "corrupt JSON .*RecursionError"),
    ('{"images": [], "annotations": [], "x": ' + "9" * 5000 + "}", "corrupt JSON .*ValueError"),
    ({"images": [_image(height=float("inf"))], "annotations": []}, "image #0 .*height must be a whole number"),
    ({"images": [_image(height=100000, width=100000)], "annotations": []}, "100000x100000 is more than"),
    ({"images": [_image(width=[4])], "annotations": []}, "width must be a whole number >= 1, got a list"),
    ({"images": [_image(id=[1])], "annotations": []}, "id must be an integer or a string"),
    ({"images": [{"id": 1}], "annotations": []}, "must be an object with 'id', 'height', 'width'"),
    ({"images": [_image(file_name="/etc/passwd")], "annotations": []}, "file_name must be a relative path"),
    ({"images": [_image(file_name="../../secret.png")], "annotations": []}, "file_name must be a relative path"),
    ({"images": [_image()], "annotations": [{"id": 10}]}, "annotation #0 .* 'id' and 'image_id'"),
    ({"images": [_image()], "annotations": [], "categories": [{"id": 1}]}, "category #0"),
    ({"images": [_image()], "annotations": [], "categories": {"id": 1}}, "'categories' must be a list"),
])
def test_malformed_instances_are_one_value_error(tmp_path, instances, match):
    root = _refs_root(tmp_path, pickle.dumps([], protocol=2))
    text = instances if isinstance(instances, str) else json.dumps(instances)
    (root / "refcoco" / "instances.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_refer(root, "refcoco", "unc")
    assert "instances" in str(info.value)


# ----------------------------------------------------------------------------- (b) RLE

@linux_only
def test_issue_rle_string_is_refused_without_heap_corruption():
    """The string from the issue ended the process with glibc's ``free(): invalid next size``
    (exit 134) inside pycocotools' decoder; with MALLOC_CHECK_=3 glibc aborts at the first
    corrupted chunk (the old reader: at the first try), so a clean exit after 200 tries
    shows no heap write went astray."""
    proc = run_child(f"""
        from rexfast.data.masks import annotations_to_mask, decode_segmentation
        segm = {ISSUE_RLE!r}
        n = 0
        for _ in range(200):
            try:
                decode_segmentation(segm, 1, 1)
            except ValueError:
                n += 1
            try:
                annotations_to_mask([{{"id": 9, "segmentation": segm}}], 1, 1)
            except ValueError as e:
                msg = str(e)
        print(json.dumps({{"refused": n, "message": msg}}))
    """, env=malloc_check_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["refused"] == 200
    assert out["message"].startswith("annotation 9: compressed RLE counts"), out


def test_rle_decode_equals_pycocotools_on_random_masks(mask_utils):
    rng = np.random.default_rng(0)
    for k in range(600):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if k % 3 == 0:  # blocks: long runs, large deltas between runs
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):rng.integers(0, h) + 1, rng.integers(0, w):rng.integers(0, w) + 1] = True
        elif k % 3 == 1:
            m = rng.random((h, w)) < rng.random()
        else:
            m = np.full((h, w), bool(k % 2))
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        theirs = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(theirs, m)
        for counts in (rle["counts"], rle["counts"].decode("ascii")):
            assert np.array_equal(decode_segmentation({"size": [h, w], "counts": counts}, h, w), theirs)
        assert encode_mask(m)["counts"] == rle["counts"].decode("ascii")  # the same string pycocotools writes
        runs = rle_counts_from_string(rle["counts"], h * w)
        assert np.array_equal(decode_segmentation({"size": [h, w], "counts": runs}, h, w), theirs)


@pytest.mark.parametrize("segm, match", [
    ({"size": [2, 2], "counts": [1, -1, 4]}, "run length of -1"),
    ({"size": [2, 2], "counts": [1, 2]}, "sum to 3, expected 4"),
    ({"size": [2, 2], "counts": [1, 2, 2]}, "sum to 5, expected 4"),
    ({"size": [2, 2], "counts": [5]}, "run length of 5, outside 0..4"),
    ({"size": [2, 2], "counts": [1.5, 2.5]}, "whole numbers"),
    ({"size": [2, 2], "counts": [True, 3]}, "whole numbers"),
    ({"size": [2, 2], "counts": [[1], [3]]}, "whole numbers"),
    ({"size": [2, 2], "counts": ["4"]}, "whole numbers"),
    ({"size": [2, 2], "counts": [0] * 6 + [4]}, "7 runs, more than"),
    ({"size": [2, 2], "counts": "4 "}, r"b' ' at offset 1"),
    ({"size": [2, 2], "counts": "4\x00"}, r"b'\\x00' at offset 1"),
    ({"size": [2, 2], "counts": "4p"}, r"b'p' at offset 1"),
    ({"size": [2, 2], "counts": "é"}, "non-ASCII"),
    ({"size": [2, 2], "counts": "4P"}, "end inside a run length"),
    ({"size": [2, 2], "counts": "PPPPPPP0"}, "longer than 7 characters"),
    ({"size": [2, 2], "counts": "0" * 36}, "36 characters long"),
    ({"size": [2, 2], "counts": "3O4"}, "run length of -1"),  # 3, then -1 (sign bit)
    ({"size": [2, 2], "counts": 5}, "must be a list, str or bytes"),
    ({"size": [2, 3], "counts": [4]}, r"size \[2, 3\] does not match the image size \[2, 2\]"),
    ({"size": [2], "counts": [4]}, r"size must be \[height, width\]"),
    ({"size": "2x2", "counts": [4]}, r"size must be \[height, width\]"),
    ({"size": [2.5, 2], "counts": [4]}, r"size must be \[height, width\]"),
    ({"counts": [4]}, "needs 'counts' and 'size'"),
])
def test_malformed_rle_is_one_value_error(segm, match):
    with pytest.raises(ValueError, match=match):
        decode_segmentation(segm, 2, 2)
    with pytest.raises(ValueError, match="^annotation 17: "):
        annotations_to_mask([{"id": 17, "segmentation": segm}], 2, 2)


def test_rle_delta_coding_from_the_fourth_run():
    # runs 2, 1, 3 stored as themselves; the fourth run (2) as its difference to the second (1)
    assert encode_mask(np.array([[0, 0, 1, 0, 0, 0, 1, 1]], bool).T)["counts"] == "2131"
    assert rle_counts_from_string("2131", 8) == [2, 1, 3, 2]


@pytest.mark.parametrize("height, width, match", [
    (0, 4, "height must be a whole number >= 1, got 0"),
    (4, -1, "width must be a whole number >= 1"),
    (4, 2.5, "width must be a whole number"),
    (float("nan"), 4, "height must be a whole number"),
    ("4", 4, "height must be a whole number"),
    (100_000, 100_000, "100000x100000 is more than 178956970 pixels"),
])
def test_mask_size_is_checked_before_allocation(height, width, match):
    for segm in ({"size": [4, 4], "counts": [16]}, [[0, 0, 1, 0, 1, 1]]):
        with pytest.raises(ValueError, match=match):
            decode_segmentation(segm, height, width)


def test_max_image_pixels_from_the_environment(monkeypatch):
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", "15")
    with pytest.raises(ValueError, match="4x4 is more than 15 pixels"):
        decode_segmentation({"size": [4, 4], "counts": [16]}, 4, 4)
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="REXFAST_MAX_IMAGE_PIXELS must be a whole number >= 1, got 'lots'"):
        decode_segmentation({"size": [4, 4], "counts": [16]}, 4, 4)


# ----------------------------------------------------------------------------- (c) polygons

@linux_only
def test_far_polygon_vertices_answer_fast_with_bounded_memory(mask_utils):
    """pycocotools' own allocations are C mallocs, invisible to tracemalloc: the child
    compares its peak resident size before and after, under a 1 GB address-space cap."""
    cases = {
        3e6: r"outline is 6000004 pixels long, more than 838860",  # pycocotools: 452 MB
        1e9: r"coordinate 1e\+09, beyond the ±1e\+08",  # pycocotools: killed by the OOM killer at 24 GB
    }
    proc = run_child(f"""
        from rexfast.data.masks import annotations_to_mask
        annotations_to_mask([{{"id": 1, "segmentation": [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]]}}], 4, 4)
        #CAP
        results = []
        for x in {list(cases)!r}:
            before = maxrss_mb()
            t = time.perf_counter()
            try:
                annotations_to_mask([{{"id": 5, "segmentation": [[0.0, 0.0, x, 1.0, 0.0, 3.0]]}}], 4, 4)
                out = {{"error": None}}
            except ValueError as e:
                out = {{"error": str(e)}}
            out["seconds"] = time.perf_counter() - t
            out["grew_mb"] = maxrss_mb() - before
            results.append(out)
        print(json.dumps(results))
    """, address_space_headroom=1 << 30)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    for out, match in zip(json.loads(proc.stdout.strip().splitlines()[-1]), cases.values()):
        assert out["error"] is not None and out["error"].startswith("annotation 5: "), out
        assert re.search(match, out["error"]), out
        assert out["grew_mb"] < 20, out  # memory, not speed: shared machines


@pytest.mark.parametrize("poly, match", [
    ([0, 0, float("nan"), 1, 0, 3], "NaN or infinite"),
    ([0, 0, float("inf"), 1, 0, 3], "NaN or infinite"),
    ([0, 0, 1, -float("inf"), 0, 3], "NaN or infinite"),
    ([0, 0, 1, True, 0, 3], "must be a list of numbers"),
    ([0, 0, 1, "1", 0, 3], "must be a list of numbers"),
])
def test_bad_polygon_coordinates_are_one_value_error(poly, match):
    with pytest.raises(ValueError, match="^annotation 3: .*" + match):
        annotations_to_mask([{"id": 3, "segmentation": [poly]}], 4, 4)
    with pytest.raises(ValueError, match="^annotation 3: .*" + match):  # and when rasterised at another size
        annotations_to_mask([{"id": 3, "segmentation": [poly]}], 4, 4, size=(8, 8))


def test_polygon_vertex_count_is_bounded():
    poly = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0] * ((MAX_POLYGON_VERTICES // 3) + 1)
    with pytest.raises(ValueError, match=f"more than {MAX_POLYGON_VERTICES} polygon vertices"):
        decode_segmentation([poly], 4, 4)


def test_many_long_edges_inside_the_image_are_bounded_too():
    # a zig-zag across a 2000-px-wide image: every vertex inside, the outline about 4,000,000 px long
    zig = [v for k in range(1000) for v in (0.0, 2.0 * k, 1999.0, 2.0 * k + 1)]
    with pytest.raises(ValueError, match="outline is .* pixels long"):
        decode_segmentation([zig], 2000, 2000)


def test_polygons_equal_pycocotools_on_random_polygons(mask_utils):
    """Nothing is clipped or moved: a polygon that passes the checks is rasterised by
    pycocotools itself, vertices outside the image included."""
    rng = np.random.default_rng(3)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        span = 3 * max(h, w)
        polys = [rng.uniform(-span, span + max(h, w), 2 * int(rng.integers(3, 9))).round(2).tolist()
                 for _ in range(int(rng.integers(1, 4)))]
        theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
        assert np.array_equal(decode_segmentation(polys, h, w), theirs)


# ----------------------------------------------------------------------------- no pycocotools (issue 34)

def _hide_pycocotools(tmp_path: Path) -> dict:
    """An environment whose interpreters find no pycocotools (as on the device image)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['pycocotools'] = None\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_rexfast_data_imports_and_decodes_rle_without_pycocotools(tmp_path):
    env = _hide_pycocotools(tmp_path)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import numpy as np
        import rexfast.data
        from rexfast.data.masks import decode_segmentation, encode_mask
        try:
            import pycocotools
        except ImportError:
            pass
        else:
            raise SystemExit("pycocotools was not hidden")
        m = np.eye(5, dtype=bool)
        assert np.array_equal(decode_segmentation(encode_mask(m), 5, 5), m)
        try:
            decode_segmentation([[0, 0, 1, 0, 1, 1]], 4, 4)
        except ImportError as e:
            print(e)
    """)], capture_output=True, text=True, env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rasterising COCO polygons needs pycocotools" in proc.stdout


def test_the_test_suite_collects_without_pycocotools(tmp_path):
    env = _hide_pycocotools(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests")], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **env), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "during collection" not in proc.stdout and " tests collected" in proc.stdout, proc.stdout[-3000:]
