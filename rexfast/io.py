"""File I/O every layer shares: one atomic-write helper, one image loader, and
the one way rexfast reads a ``torch.save`` file (never unpickling code).

Atomic writes go to a temporary file in the target's folder, are flushed and
fsync'ed, then renamed over the target (and the folder entry fsync'ed), so a
crash or an error never leaves a half-written file behind. The file gets the
permissions a plain ``open(path, "w")`` would give it (an existing target's mode,
else 0o666 less the umask), not the temporary file's private 0o600.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable, IO, Union

from PIL import Image, UnidentifiedImageError

PathLike = Union[str, os.PathLike]


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``folder``: the one test that answers for every reason a
    write can fail (permission bits, a read-only mount, an immutable folder, root squash on
    NFS, ACLs), where ``os.access`` answers for the permission bits only and ignores them
    for root. Raises ValueError naming ``what``, ``target`` and the reason."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".rexfast-write-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = "" if folder == target else f" (in {folder})"
        raise ValueError(f"{what} {target} cannot be written{where}: {reason}") from None
    os.close(fd)
    os.unlink(probe)


def _check_folder(path: Path, what: str, target: Path) -> None:
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{what} {target}: {p} exists and is not a folder")
        if p.is_dir():
            _probe_writable(p, what, target)
            return


def check_output_dir(path: PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder that exists or can be created, and can be written in: a clear
    ValueError (before any work is done) when it, or one of its parents, is a file, or when
    the folder (or, for a folder still to be created, its nearest existing parent) cannot be
    written (probed by creating and removing a file there)."""
    path = Path(path)
    _check_folder(path, what, path)
    return path


def check_output_file(path: PathLike, what: str = "output file") -> Path:
    """``path`` as a file that can be written: not an existing folder, its parent a folder (or
    creatable) that can be written in (see :func:`check_output_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder")
    _check_folder(path.parent, what, path)
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can
    only be read by setting it, which races with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777  # replacing a file keeps its permissions
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX; elsewhere mkstemp's mode is what there is
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_write_png(path: PathLike, array) -> Path:
    """A uint8 (H, W) or (H, W, 3) array as PNG."""
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


_SNIFF_BYTES = 1 << 16


def _zip_kind(path: Path, size: int) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return f"a truncated or damaged zip archive ({size:,} bytes, no zip directory at its end)"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "a torch.save file"
    if "[Content_Types].xml" in names:
        return "an Office document (a zip archive)"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a zip archive without a data.pkl ({len(names)} entries: {shown}), so not a torch.save file"


def describe_file(path: PathLike) -> str:
    """What a file is, in words, from its first bytes ("an ONNX model (protobuf)", "a JPEG
    image", "a truncated or damaged zip archive", "a YAML file"...): for the error message
    of a reader that was handed the wrong file, which otherwise reports only what its own
    parser choked on ("Unsupported operand 8"). Reads at most 64 KiB; never raises."""
    path = Path(path)
    try:
        if path.is_dir():
            return "a folder"
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if not head:
        return "an empty file (0 bytes)"
    magic = {
        b"\xff\xd8\xff": "a JPEG image", b"\x89PNG\r\n\x1a\n": "a PNG image", b"GIF8": "a GIF image",
        b"BM": "a BMP image", b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image",
        b"\x89HDF\r\n\x1a\n": "an HDF5 file (Keras or TensorFlow weights?)", b"\x93NUMPY": "a NumPy .npy array",
        b"\x1f\x8b": "a gzip archive", b"%PDF": "a PDF document", b"\x7fELF": "an executable (ELF)",
    }
    for prefix, kind in magic.items():
        if head.startswith(prefix):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path, size)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle (an old-style torch.save file, or any pickled object)"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8:
            return "a safetensors file (weights only: a model folder holds it beside config.json)"
    # ONNX ModelProto: field 1 (ir_version, varint, tag 0x08) first, and producer/domain strings
    if head[:1] == b"\x08" and (b"onnx" in head.lower() or b"pytorch" in head or path.suffix.lower() == ".onnx"):
        return "an ONNX model (protobuf)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if size > _SNIFF_BYTES:  # a multi-byte character cut at the sniff boundary
            try:
                text = head[:-4].decode("utf-8")
            except UnicodeDecodeError:
                return f"binary data of an unknown kind ({size:,} bytes)"
        else:
            return f"binary data of an unknown kind ({size:,} bytes)"
    stripped = text.lstrip()
    if stripped[:1] in "{[" and size <= _SNIFF_BYTES:
        try:
            json.loads(text)
            return "a JSON file"
        except ValueError:
            pass
    if size <= _SNIFF_BYTES:
        try:
            import yaml

            if isinstance(yaml.safe_load(text), dict):
                return "a YAML file"
        except Exception:  # noqa: BLE001 - any YAML error just means "not YAML"
            pass
    return "a text file"


class UnsafeFileError(ValueError):
    """A file that could only be read by unpickling more than tensors and plain values."""


_EXPECTED = {"checkpoint": "a training checkpoint such as best.pt or last.pt, the authors' released .pth, "
                           "or a model folder"}


def _unreadable(path: Path, what: str, exc: Exception, text: str) -> str:
    """The message for a file torch.load could not read, in whole sentences: what the file is
    (:func:`describe_file`) and what was expected; torch's own words only for a file that does
    look like a torch.save file, cut at a sentence end."""
    kind = describe_file(path)
    expected = _EXPECTED.get(what, "a file written by torch.save")
    if kind.startswith("a truncated or damaged zip"):
        return (f"cannot read {what} {path}: it is {kind}: a torch.save file cut short (an interrupted copy, "
                "download or save?); copy it again")
    if kind != "a torch.save file" and not kind.startswith("a pickle"):
        return f"cannot read {what} {path}: it is {kind}, not a file written by torch.save; expected {expected}"
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(first) > 300:
        first = first[:300].rsplit(" ", 1)[0] + " (...)"
    return f"cannot read {what} {path}: it looks like {kind}, but torch.load failed: {type(exc).__name__}: {first}"


def safe_torch_load(path: PathLike, what: str = "file", *, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: a file from a stranger cannot run
    code. A file holding anything else (a class, a function: what a hostile
    pickle uses) raises :class:`UnsafeFileError` naming it before any of it runs;
    a missing or corrupt file raises FileNotFoundError / ValueError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a corrupt file
        text = " ".join(str(exc).split())
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        if isinstance(exc, pickle.UnpicklingError) and unsafe:
            raise UnsafeFileError(
                f"refusing to load {what} {path}: it holds a {unsafe.group(1)} object, not only tensors and plain "
                "values, and unpickling it could run code (rexfast reads files with torch.load(weights_only=True) "
                "only)") from None
        raise ValueError(_unreadable(path, what, exc, text)) from None


def load_image(path: PathLike) -> Image.Image:
    """An RGB PIL image; FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


__all__ = ["UnsafeFileError", "safe_torch_load", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_png",
           "check_output_dir", "check_output_file", "load_image"]
