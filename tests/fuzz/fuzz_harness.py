"""Fuzz targets for every rexfast reader of a stranger's bytes, and the contract each input is held to.

A target takes one input (bytes), writes it where the reader expects its file inside the
target's own temporary folder, and calls the reader. :func:`check_one` holds every input
to the contract of issue 39:

- only the documented exception types escape (:attr:`Target.allowed`), each with a message;
- no hang: each input within :data:`INPUT_SECONDS` (libFuzzer's ``-timeout`` when fuzzing);
- memory stays bounded: each input may raise the process's peak resident memory by at most
  its target's :attr:`Target.peak_mb` (measured per input: the kernel's high-water mark is
  reset before it, ``/proc/self/clear_refs``), so the finding is the input that made the
  peak. libFuzzer's ``-rss_limit_mb`` cannot say that: it compares the process's lifetime
  peak with the limit once a second and blames whatever input runs then (CI saved a
  harmless 150-byte BMP that way, long after a large image had made the peak). The
  fuzzing process also runs under an address-space cap, and an error that says an
  allocation failed is a finding too (the file was not refused before the allocation);
- nothing is written outside the target's folder: an audit hook sees every ``open`` for
  writing, rename, remove, mkdir, … made from Python while an input runs;
- no code runs: the seeds carry pickles whose ``__reduce__`` calls ``builtins.exec`` (which
  would set :data:`CANARY` on the builtins module) and ``os.system("touch PWNED")`` (which
  would create PWNED in the target's folder, the working directory); both are checked after
  every input, and so are the audit events of starting a process.

Targets (``TARGETS``): ``refer``, ``checkpoint``, ``model_folder``, ``annotations``, ``image`` (the CLI's and the
web page's readers),
``pairs``. A new target is a ``Target`` whose ``run`` writes the input where its reader expects
the file and calls the reader, with seeds in ``fuzz_seeds.py`` and corpus files under
``corpus/<target>/``.
"""

from __future__ import annotations

import builtins
import dataclasses
import gc
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = HERE / "corpus"
CANARY = "REXFAST_FUZZ_CANARY"
INPUT_SECONDS = 10.0
# What one input may add to the process's peak resident memory. A reader of a stranger's
# file holds what the file's own header justifies and no more; for most targets that is little.
PEAK_MB = 1024
# The image readers decode up to the pixel limit, 178,956,970 pixels (rexfast.io.max_image_pixels):
# the RGB image is 4 bytes a pixel in PIL, and the most any format needs at once is 4 such
# images: WebP's decoder canvas, the decoded frame as bytes, PIL's pixels and the RGB copy
# (tests/engine/test_io_hostile.py::test_decoding_holds_few_copies_of_the_image measures each format).
# (rexfast.io.DEFAULT_MAX_IMAGE_PIXELS written out: importing rexfast.io here, before fuzz_main's
# instrument_imports, would leave it uninstrumented; test_fuzz.py checks the two agree)
IMAGE_PEAK_MB = (16 * 178_956_970 >> 20) + 256
ADDRESS_SPACE_HEADROOM = 4 << 30  # bytes above what the process holds once the readers are imported
# libFuzzer's own limit only as the backstop for memory that grows over many inputs: above
# the resident memory after the imports (about 260 MB) plus the largest per-input peak
RSS_LIMIT_MB = 4096
# what an error message says when the reader tried an allocation the file did not justify
_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "MemoryError", "out of memory",
                        "std::bad_alloc")


class ContractViolation(AssertionError):
    """An input broke the contract: libFuzzer records it as a crash and saves the input."""


@dataclasses.dataclass
class Target:
    name: str
    run: Callable[[bytes, Path], None]  # (input, the target's folder)
    allowed: tuple  # exception types the reader documents
    instrument: tuple  # module prefixes atheris instruments for coverage
    setup: Callable[[Path], None] = lambda folder: None  # fixed files the reader needs beside the input
    peak_mb: int = PEAK_MB  # what one input may add to the process's peak resident memory


# ----------------------------------------------------------------------------- write and exec guards
_state = {"active": False, "folder": "", "violations": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_PROCESS_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "os.startfile", "pty.spawn"}


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an open file descriptor: its file was checked when it was opened
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == _state["folder"] or real.startswith(_state["folder"] + os.sep) or real == os.devnull


def _audit(event: str, args: tuple) -> None:
    if not _state["active"]:
        return
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            _state["violations"].append(f"wrote {path!r} outside the target's folder")
    elif event in _PATH_EVENTS:
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                _state["violations"].append(f"{event} on {path!r} outside the target's folder")
    elif event in _PROCESS_EVENTS:
        _state["violations"].append(f"started a process ({event} {args[:2]!r})")


_hook_installed = False


def install_guards(folder: Path) -> None:
    """The audit hook (once per process: hooks cannot be removed) and the target's folder as
    working directory, so a relative write and ``touch PWNED`` land in it."""
    global _hook_installed
    _state["folder"] = os.path.realpath(folder)
    os.chdir(folder)
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_memory() -> int | None:
    """Reset the kernel's peak resident memory of this process (VmHWM) to what it holds now
    and return that, in kB; None where it cannot be measured (not Linux, no write to
    ``/proc/self/clear_refs``, no VmRSS/VmHWM in ``/proc/self/status``): the per-input check
    is skipped there, and only libFuzzer's ``-rss_limit_mb`` bounds memory."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kb("VmHWM")
        return _status_kb("VmRSS")
    except (OSError, KeyError, ValueError):
        return None


def check_one(target: Target, data: bytes, folder: Path) -> str:
    """Run one input under the contract; a ContractViolation says how it broke it.
    Returns "ok" or the name of the documented exception the reader raised."""
    _state["violations"] = []
    outcome = "ok"
    resident_kb = reset_peak_memory()
    t0 = time.perf_counter()
    _state["active"] = True
    try:
        target.run(data, folder)
    except target.allowed as exc:
        outcome = type(exc).__name__
        message = str(exc)
        if not message.strip():
            raise ContractViolation(f"{type(exc).__name__} without a message") from exc
        if any(s in message for s in _ALLOCATION_FAILURES):
            raise ContractViolation(f"the reader tried an allocation the file did not justify: {message[:300]}") from exc
    finally:
        _state["active"] = False
        elapsed = time.perf_counter() - t0
        # the garbage cycles this input made (an exception's traceback and the frames it holds)
        # go now, not at some later full collection: what one input leaves must not count
        # against the next one's memory (young generations only: a fraction of a millisecond)
        gc.collect(1)
    if _state["violations"]:
        raise ContractViolation("; ".join(_state["violations"][:5]))
    if hasattr(builtins, CANARY):
        delattr(builtins, CANARY)
        raise ContractViolation("a hostile payload ran code (builtins.exec set the canary)")
    if (folder / "PWNED").exists():
        (folder / "PWNED").unlink()
        raise ContractViolation("a hostile payload ran a shell command (os.system created PWNED)")
    if elapsed > INPUT_SECONDS:
        raise ContractViolation(f"one input took {elapsed:.1f} s, more than {INPUT_SECONDS} s")
    if resident_kb is not None:
        peak_mb = (_status_kb("VmHWM") - resident_kb) / 1024
        if peak_mb > target.peak_mb:
            raise ContractViolation(f"one input raised the peak resident memory by {peak_mb:.0f} MB, more than "
                                    f"the {target.peak_mb} MB the {target.name} target allows")
    return outcome


def cap_address_space(headroom: int = ADDRESS_SPACE_HEADROOM) -> None:
    """An allocation of more than ``headroom`` bytes beyond what the process holds now fails
    at once (MemoryError or the allocator's error) instead of swapping the machine to death."""
    import resource

    vsz = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))


def fresh_folder(target: Target) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"rexfast-fuzz-{target.name}-"))
    target.setup(folder)
    return folder


# ----------------------------------------------------------------------------- the targets
def _clear(folder: Path, keep=()) -> None:
    """Remove what an earlier input left in the folder (the fixed files stay)."""
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# -- 1. REFER refs pickle --------------------------------------------------------------------
def refer_setup(folder: Path) -> None:
    from fuzz_seeds import refer_instances
    import json

    (folder / "refcoco").mkdir()
    (folder / "refcoco" / "instances.json").write_text(json.dumps(refer_instances()))


def refer_run(data: bytes, folder: Path) -> None:
    from rexfast.data.refer import load_refer

    (folder / "refcoco" / "refs(unc).p").write_bytes(data)
    idx = load_refer(folder, "refcoco", "unc")
    for split in idx.splits:  # what a dataset does with the refs next
        for ref in idx.refs_for_split(split):
            idx.ann_ids(ref), idx.is_no_target(ref), idx.sentences(ref), idx.image_info(ref)


# -- 2. weights-only checkpoint ----------------------------------------------------------------
def checkpoint_run(data: bytes, folder: Path) -> None:
    from rexfast.engine.checkpoint import load
    from rexfast.io import safe_torch_load

    path = folder / "last.pt"
    path.write_bytes(data)
    safe_torch_load(path, "checkpoint")  # the reader every .pt/.pth/.bin goes through
    load(path)  # and a rexfast checkpoint's own checks


# -- 3. model folder (config.json + model.safetensors) -----------------------------------------
def split_model_folder(data: bytes) -> tuple[bytes, bytes]:
    """One fuzz input holds both files: a 4-byte little-endian length, config.json, then model.safetensors."""
    n = struct.unpack("<I", data[:4])[0] if len(data) >= 4 else 0
    return data[4:4 + n], data[4 + n:]


def join_model_folder(config: bytes, weights: bytes) -> bytes:
    return struct.pack("<I", len(config)) + config + weights


def model_folder_run(data: bytes, folder: Path) -> None:
    """The loader's reading of a model folder, up to building the model: ``config.json`` (the
    runtime options a config written before they left it holds are split out and built, so
    their own checks see hostile values) and ``model.safetensors``."""
    from rexfast.models.loading import stored_model_config
    from rexfast.models.pretrained import read_pretrained_config, read_pretrained_weights

    config, weights = split_model_folder(data)
    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_bytes(config)
    (model / "model.safetensors").write_bytes(weights)
    name, fields = read_pretrained_config(model)
    read_pretrained_weights(model)
    stored_model_config(name, fields)  # what load_model_source does with config.json next


# -- 4. COCO / gRefCOCO annotations with masks ---------------------------------------------------
def annotations_setup(folder: Path) -> None:
    from fuzz_seeds import annotation_grefs
    import json

    (folder / "grefcoco").mkdir()
    (folder / "grefcoco" / "grefs(unc).json").write_text(json.dumps(annotation_grefs()))


def annotations_run(data: bytes, folder: Path) -> None:
    from rexfast.data.masks import annotations_to_mask
    from rexfast.data.refer import _check_instances, _read_json, load_grefer

    path = folder / "grefcoco" / "instances.json"
    path.write_bytes(data)
    inst = _read_json(path, "instances file")
    images, anns, _ = _check_instances(inst, path)  # the loader's own checks, then every mask it can make
    for ann in anns.values():
        img = images.get(ann["image_id"])
        if img is not None:
            annotations_to_mask([ann], img["height"], img["width"])
            annotations_to_mask([ann], img["height"], img["width"], size=(13, 17))
    idx = load_grefer(folder, "grefcoco", "unc")
    for ref in idx.refs:
        idx.mask(ref)


# -- 5. images -------------------------------------------------------------------------------------
IMAGE_ALLOWED = (ValueError,)


def image_run(data: bytes, folder: Path) -> None:
    """``load_image`` (the datasets' reader: pixels as stored, in full), predict's reader of a
    user's image (``decode_image`` with a ``min_side``, so a JPEG of 32 px or more takes the
    reduced-scale draft path, and ``exif_transpose=True``: the EXIF orientation parsed and
    applied, the draft box turned with it), then the web page's check of an upload
    (``rexfast.serve.checks.open_image``: its RequestError is a ValueError).

    The readers always run, each in its own ``try``, and the first exception that is not
    allowed is the one raised: the two limits differ (a header of 50-179 MP passes
    ``load_image``'s and is decoded there, while ``open_image`` refuses it at 50 MP), so if one
    reader's allowed refusal replaced the other's forbidden exception (as in
    ``try: ... finally: ...``) the finding would be recorded as a documented refusal."""
    from rexfast.io import decode_image, load_image
    from rexfast.serve.checks import open_image

    def predict_reader(path):
        return decode_image(path, min_side=16, exif_transpose=True).image

    path = folder / "image"
    path.write_bytes(data)
    errors = []
    for read in (load_image, predict_reader, open_image):
        try:
            read(path).getextrema()  # every pixel, read without a copy (the readers' peak is what counts)
        except Exception as exc:  # noqa: BLE001 - sorted below: forbidden ones first
            errors.append(exc)
    if errors:
        first = next((exc for exc in errors if not isinstance(exc, IMAGE_ALLOWED)), errors[0])
        # no reference from this frame to an exception whose traceback holds this frame: such a
        # cycle kept each input's readers' frames (and what they had allocated) alive until a full
        # garbage collection, 256 MB resident and 1.15 GB of address space a time for a tall BMP,
        # until the address-space cap made a later input's allocation fail
        errors.clear()
        try:
            raise first
        finally:
            del first


# -- 6. pairs files (JSONL / CSV) ------------------------------------------------------------------
def pairs_setup(folder: Path) -> None:
    """The small valid images the seed pairs files name (relative to the pairs file)."""
    from fuzz_seeds import pairs_images

    for name, data in pairs_images().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def split_pairs(data: bytes) -> tuple[str, bytes]:
    """One fuzz input is a pairs file: the first byte picks the format (even: ``.jsonl``, odd:
    ``.csv``; the seeds start with ``J`` and ``C``), the rest is the file."""
    return (".csv" if data[:1] and data[0] & 1 else ".jsonl"), data[1:]


def join_pairs(suffix: str, body: bytes) -> bytes:
    return {".jsonl": b"J", ".csv": b"C"}[suffix] + body


def pairs_run(data: bytes, folder: Path) -> None:
    """``read_pairs`` with ``skip_bad=True``, then without. Beyond the common contract, the
    reader's own promise: with ``skip_bad=True`` every bad row comes back as a pair with an
    error, so only the file as a whole may be refused (a ValueError naming the pairs file);
    without it, the same file gives the same pairs, or one ValueError when any row is bad."""
    from rexfast.data.pairs import read_pairs

    suffix, body = split_pairs(data)
    for old in ("pairs.jsonl", "pairs.csv"):
        (folder / old).unlink(missing_ok=True)
    path = folder / f"pairs{suffix}"
    path.write_bytes(body)
    try:
        pairs = read_pairs(path, skip_bad=True)
    except ValueError as exc:
        if not str(exc).startswith(f"pairs file {path}"):
            raise ContractViolation(f"skip_bad=True refused the file for a row: {exc}") from exc
        read_pairs(path)  # the file-level error again (a ValueError: documented)
        raise
    ids = [p.id for p in pairs if p.error is None]
    if len(set(ids)) != len(ids) or any(p.error is not None and not p.error.strip() for p in pairs) or any(
            p.error is None and (p.text is None or p.image is None or not p.image.is_file()) for p in pairs):
        raise ContractViolation(f"inconsistent pairs: {pairs.pairs[:5]!r}")
    if pairs.bad:
        try:
            read_pairs(path)
        except ValueError:
            return
        raise ContractViolation(f"{len(pairs.bad)} bad row(s) with skip_bad=True, none without")
    if read_pairs(path) != pairs:
        raise ContractViolation("skip_bad=False read the file differently")


# (atheris instruments only these modules: the readers and the parsers under them, not the models)
TARGETS = {
    "refer": Target("refer", refer_run, (ValueError,),
                    ("rexfast.data.refer", "rexfast.data.masks", "rexfast.io", "pickle", "pickletools"), refer_setup),
    "checkpoint": Target("checkpoint", checkpoint_run, (ValueError,),
                         ("rexfast.io", "rexfast.engine.checkpoint", "torch.serialization",
                          "torch._weights_only_unpickler", "zipfile", "pickle", "pickletools")),
    "model_folder": Target("model_folder", model_folder_run, (ValueError, TypeError),
                           ("rexfast.models.pretrained", "rexfast.models.loading", "rexfast.models.base",
                            "rexfast.models.cgformer.config", "rexfast.models.rela.config", "safetensors", "json")),
    "annotations": Target("annotations", annotations_run, (ValueError,),
                          ("rexfast.data.refer", "rexfast.data.masks", "json", "pycocotools"), annotations_setup),
    "image": Target("image", image_run, IMAGE_ALLOWED, ("rexfast.io", "rexfast.serve.checks", "PIL"),
                    peak_mb=IMAGE_PEAK_MB),
    "pairs": Target("pairs", pairs_run, (ValueError,), ("rexfast.data.pairs", "json", "csv"), pairs_setup),
}


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
