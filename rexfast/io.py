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


def check_output_dir(path: PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder that exists or can be created; a clear ValueError
    (before any work is done) when it, or one of its parents, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{what} {path}: {p} exists and is not a folder")
        if p.is_dir():
            break
    return path


def check_output_file(path: PathLike, what: str = "output file") -> Path:
    """``path`` as a file that can be written: not an existing folder, its parent a folder (or creatable)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder")
    check_output_dir(path.parent, f"the folder of {what} {path}")
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


class UnsafeFileError(ValueError):
    """A file that could only be read by unpickling more than tensors and plain values."""


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
        detail = re.search(r"(Unsupported operand \d+|invalid load key[^.]*)", text)
        raise ValueError(f"cannot read {what} {path}: {type(exc).__name__}: "
                         f"{detail.group(1) if detail else text[:200]}") from None


DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's decompression-bomb limit (its error threshold is twice that)


def max_image_pixels() -> int:
    """The most pixels an image (or a mask of one) may have: ``REXFAST_MAX_IMAGE_PIXELS``,
    default 178,956,970 (PIL's own bomb warning: a 3-channel image of that size is 512 MB
    decoded). A value that is not a whole number >= 1 is a ValueError naming the variable."""
    raw = os.environ.get("REXFAST_MAX_IMAGE_PIXELS")
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"REXFAST_MAX_IMAGE_PIXELS must be a whole number >= 1, got {raw!r}")
    return value


def load_image(path: PathLike) -> Image.Image:
    """An RGB PIL image; FileNotFoundError / ValueError naming the path."""
    path = Path(path)
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
