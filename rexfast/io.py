"""File I/O every layer shares: one atomic-write helper, one image loader, and
the one way rexfast reads a ``torch.save`` file (never unpickling code).

Atomic writes go to a temporary file in the target's folder, are flushed and
fsync'ed, then renamed over the target (and the folder entry fsync'ed), so a
crash or an error never leaves a half-written file behind. The file gets the
permissions a plain ``open(path, "w")`` would give it (an existing target's mode,
else 0o666 less the umask), not the temporary file's private 0o600.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable, IO, NamedTuple, Optional, Union

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
    except Exception as exc:  # noqa: BLE001 - zipfile also raises NotImplementedError (an unknown zip
        # version or compression), RuntimeError, ValueError, struct.error... on a damaged directory;
        # describe_file never raises, it says what the file is
        return f"a damaged zip archive ({size:,} bytes; its directory cannot be read: {type(exc).__name__}: {exc})"
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


# ----------------------------------------------------------------------------- pickles from strangers
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# what a dict key or a set item may be: hashing these costs O(their size), never more
HASHABLE_SCALARS = (str, bytes, int, float, bool, type(None))


def _reader(data, start: int):
    """A file over ``data`` (bytes, or an mmap, whose read(n) returns at most what is left
    without allocating n bytes first) at offset ``start``."""
    import io

    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    f.seek(start)
    return f


class RefusedOpcode(ValueError):
    """A pickle holds an opcode its kind of file never holds."""


def pickle_opcodes(data, start: int = 0):
    """(opcode name, argument, offset) of every opcode of the pickle at ``data[start:]``, up
    to its STOP, from pickletools' own opcode table and argument readers. As
    :func:`pickletools.genops`, except that a protocol-0 string (``S'...'``) is returned
    undecoded: genops decodes it as ASCII and so stops at the latin-1 text Python 2 pickles
    hold. Each reader checks a length against the bytes that remain before it reads."""
    import pickletools

    f = _reader(data, start)
    while True:
        pos = f.tell()
        code = f.read(1)
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise ValueError("the pickle ends before its STOP opcode" if not code
                             else f"unknown opcode {code!r} at byte {pos}")
        if op.arg is None:
            arg = None
        elif op.arg is pickletools.stringnl:
            arg = pickletools.read_stringnl(f, decode=False)
        else:
            arg = op.arg.reader(f)
        yield op.name, arg, pos
        if op.name == "STOP":
            return


def check_pickle(data, refused=frozenset(), start: int = 0) -> int:
    """Check the pickle at ``data[start:]`` before anything unpickles it; returns the offset
    after its STOP. ValueError for what would make unpickling cost more than the file's
    size: a memo index larger than the number of opcodes before it (a pickler numbers its
    memo 0, 1, 2, … one opcode per entry, and CPython's C unpickler sizes its memo array to
    the index: index 778,398,819 in a 349-byte file took 12 GB); a memo read of an index
    never written; a frame longer than the rest of the file; strings, bytes or integers
    longer than the rest of the file (the argument readers refuse those). An opcode in
    ``refused`` is a :class:`RefusedOpcode`. Every opcode takes at least one byte, so the
    work of the check and of the unpickling after it is linear in the file's size."""
    memo = set()
    n_ops = 0
    end = start
    for name, arg, pos in pickle_opcodes(data, start):
        n_ops += 1
        end = pos + 1
        if name in refused:
            raise RefusedOpcode(f"it holds a {name} opcode at byte {pos}")
        if name in _MEMO_PUTS:
            if arg >= n_ops:
                raise ValueError(f"memo index {arg} at byte {pos} is larger than the number of opcodes before it "
                                 f"({n_ops - 1})")
            memo.add(arg)
        elif name == "MEMOIZE":
            memo.add(len(memo))
        elif name in _MEMO_GETS and arg not in memo:
            raise ValueError(f"memo index {arg} read at byte {pos} was never written")
        elif name == "FRAME" and arg > len(data) - pos - 9:
            raise ValueError(f"frame of {arg} bytes at byte {pos} is longer than the rest of the file")
    return end


class _Opaque:
    """What the shape reader makes of any object a pickle builds: it takes items and state
    and keeps nothing."""

    def __init__(self, tag=None):
        self.tag = tag

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass


def _pickle_shape(data, start: int, on_reduce=None, on_persistent=None) -> int:
    """Unpickle ``data[start:]`` without calling anything it names: every global, call and
    object build becomes an :class:`_Opaque`, ``on_reduce(func, args)`` sees each call the
    pickle asks for and ``on_persistent(index, pid)`` each persistent id; returns the offset
    after the pickle.

    Dict keys and set items must be scalars or tuples of scalars: a pickle can share one
    tuple twice inside the next, 100 levels deep, and hashing it as a key takes 2**100
    steps (torch's weights-only unpickler would hash it)."""
    import io
    import pickle

    count = 0

    def check_keys(keys):
        for k in keys:
            if not (isinstance(k, HASHABLE_SCALARS + (_Opaque,)) or (
                    type(k) is tuple and all(isinstance(v, HASHABLE_SCALARS) for v in k))):
                raise ValueError(f"a dict key or set item is a {type(k).__name__} holding containers")

    class Shape(pickle._Unpickler):
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            return _Opaque((module, name))

        def persistent_load(self, pid):
            nonlocal count
            count += 1
            if on_persistent:
                on_persistent(count - 1, pid)
            return _Opaque(("storage", count - 1))

        def load_reduce(self):
            args = self.stack.pop()
            func = self.stack[-1]
            result = on_reduce(func, args) if on_reduce else None
            self.stack[-1] = result if result is not None else _Opaque()

        def load_build(self):
            self.stack.pop()

        def load_newobj(self):
            self.stack.pop()
            self.stack[-1] = _Opaque()

        def load_newobj_ex(self):
            del self.stack[-2:]
            self.stack[-1] = _Opaque()

        def load_obj(self):
            self.pop_mark()
            self.append(_Opaque())

        def load_inst(self):
            self.readline(), self.readline()
            self.pop_mark()
            self.append(_Opaque())

        def load_dict(self):
            items = self.pop_mark()
            check_keys(items[::2])
            self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

        def load_setitem(self):
            check_keys(self.stack[-2:-1])
            super().load_setitem()

        def load_setitems(self):
            check_keys(self.stack[::2])
            super().load_setitems()

        def load_additems(self):
            check_keys(self.stack)
            super().load_additems()

        def load_frozenset(self):
            check_keys(self.stack)
            super().load_frozenset()

    for code, method in ((pickle.REDUCE, Shape.load_reduce), (pickle.BUILD, Shape.load_build),
                         (pickle.NEWOBJ, Shape.load_newobj), (pickle.NEWOBJ_EX, Shape.load_newobj_ex),
                         (pickle.OBJ, Shape.load_obj), (pickle.INST, Shape.load_inst), (pickle.DICT, Shape.load_dict),
                         (pickle.SETITEM, Shape.load_setitem), (pickle.SETITEMS, Shape.load_setitems),
                         (pickle.ADDITEMS, Shape.load_additems), (pickle.FROZENSET, Shape.load_frozenset)):
        Shape.dispatch[code[0]] = method
    f = _reader(data, start)
    Shape(f, encoding="latin1").load()
    return f.tell()


# opcodes torch.save never writes: the extension registry and protocol-5 out-of-band buffers
_TORCH_REFUSED = frozenset({"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER", "BYTEARRAY8"})
_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_tensor_v3")}


def _check_torch_pickle(data, start: int, file_size: int) -> int:
    """Check one pickle of a torch.save file (see :func:`check_torch_file`); returns its end."""
    check_pickle(data, _TORCH_REFUSED, start)
    claims: dict = {}  # persistent-id index -> elements its storage claims
    keys: set = set()
    total = 0

    def on_persistent(k, pid):
        nonlocal total
        # ('storage', storage type, key, location, numel[, view metadata]) in both formats
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            return
        numel, key = pid[4], pid[2]
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"a storage claims {type(numel).__name__} {numel if isinstance(numel, int) else ''} "
                             "elements")
        claims[k] = numel
        key = key if isinstance(key, (str, int)) else ("#", k)
        if key not in keys:
            keys.add(key)
            total += numel
            if total > file_size:  # every element takes at least a byte of the file
                raise ValueError(f"its storages claim {total} elements, more than the file's {file_size} bytes "
                                 "could hold")

    def on_reduce(func, args):
        if not (isinstance(func, _Opaque) and func.tag in _REBUILD_TENSOR and isinstance(args, tuple)
                and len(args) >= 4 and isinstance(args[0], _Opaque) and isinstance(args[0].tag, tuple)
                and args[0].tag[1] in claims):
            return None
        numel = claims[args[0].tag[1]]
        offset, size, stride = args[1:4]
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(isinstance(v, int) for v in size + stride)):
            return None  # torch refuses these itself
        elements = math.prod(size)
        if offset < 0 or any(v < 0 for v in size + stride) or (
                elements and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= numel):
            raise ValueError(f"a tensor of size {list(size[:8])} (stride {list(stride[:8])}, offset {offset}) "
                             f"reaches past its storage of {numel} elements")
        if elements > max(numel, file_size):  # a stride-0 view: free now, elements x 8 bytes once copied
            raise ValueError(f"a tensor claims {elements} elements (size {list(size[:8])}) over a storage of "
                             f"{numel}, more than the file's {file_size} bytes")
        return None

    return _pickle_shape(data, start, on_reduce, on_persistent)


def check_torch_file(path: PathLike) -> None:
    """Check a ``torch.save`` file before torch reads it, in either format (a zip archive
    with ``data.pkl``, or the legacy sequence of pickles and raw storages): ValueError
    when a pickle breaks :func:`check_pickle`, uses an opcode torch.save never writes,
    keys a dict with nested tuples, or claims more storage elements in all than the file
    has bytes, or a tensor view larger than both its storage and the file (a stride-0
    view of 10¹² elements loads for free and costs 4 TB when copied); or when the zip
    entries declare more bytes than the file holds. torch allocates a legacy file's
    storages at the sizes its pickle claims before it reads them: 4 TB for a 355-byte
    file that claims 10¹² elements."""
    import mmap
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":  # torch's own test for the zip format
            try:
                with zipfile.ZipFile(f) as z:
                    infos = z.infolist()
                    declared = sum(i.file_size for i in infos)
                    if declared > size:
                        raise ValueError(f"its zip entries declare {declared} bytes, more than the file's {size} "
                                         "(torch.save stores them uncompressed)")
                    pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
                    data = z.read(pickles[0]) if len(pickles) == 1 else None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError) as exc:
                raise ValueError(f"not a readable zip archive ({exc})") from None
            if data is not None:  # none or several: torch says what is wrong
                _check_torch_pickle(data, 0, size)
            return
        if size == 0:
            raise ValueError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset = 0
            for _ in range(5):  # magic number, protocol version, system info, the objects, the storage keys
                offset = _check_torch_pickle(data, offset, size)


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
        check_torch_file(path)
    except RefusedOpcode as exc:
        raise UnsafeFileError(f"refusing to load {what} {path}: {exc}, which torch.save never writes") from None
    except RecursionError:
        raise ValueError(f"cannot read {what} {path}: its pickle nests too deeply") from None
    except Exception as exc:  # noqa: BLE001 - ValueError and what the pure-Python unpickler raises on bad input
        detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        kind = describe_file(path)
        if kind != "a torch.save file" and not kind.startswith("a pickle"):  # an image, an ONNX file, a cut zip...
            raise ValueError(_unreadable(path, what, exc, detail)) from None
        raise ValueError(f"cannot read {what} {path}: {detail}") from None
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


DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # where PIL's decompression-bomb check raises (2 x Image.MAX_IMAGE_PIXELS)


def max_image_pixels() -> int:
    """The most pixels an image (or a mask of one) may have: ``REXFAST_MAX_IMAGE_PIXELS``,
    default 178,956,970, where PIL refuses an image as a decompression bomb (an RGB image
    of that size is 512 MiB as an 8-bit array, 683 MiB in PIL, which keeps RGB at 4 bytes a
    pixel; a reader holds at most 4 such images at its peak, see :func:`decode_image`). PIL's
    own refusal still applies above it. A value that is not a whole number >= 1 is a
    ValueError naming the variable."""
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


class ClampedReader(io.BufferedReader):
    """A binary file whose ``read(n)`` asks for no more than the bytes left in it.

    A decoder reads a chunk at the length its header claims, and Python allocates the
    buffer for ``n`` bytes before it reads: a 94-byte PNG whose IDAT chunk claims
    0xfb000025 bytes made PIL ask for 4.2 GB (a MemoryError where memory is capped, found by
    fuzzing). Clamped, the read returns what the file has, and the decoder reports the
    file as truncated."""

    def __init__(self, path: PathLike):
        super().__init__(io.FileIO(os.fspath(path), "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(self._size - self.tell(), 0))
            if size == 0:
                return b""
        return super().read(size)


# How much larger than the model's input side a JPEG decoded at reduced size must stay: the
# decoder's 1/2, 1/4, 1/8 scaling is a block average, and the bilinear resize to the input
# (an antialiasing triangle filter, as wide as the reduction) smooths over what remains.
# At 2x, the model input from a reduced decode differs from the full decode's by at most 4/255
# on photo-like images, and the masks agree about as well as after re-saving the photo at JPEG
# quality 95 (README, "Large JPEGs"; tests/engine/test_large_jpegs.py).
DRAFT_MARGIN = 2


# EXIF orientation (tag 0x0112) -> the transpose that shows the image as a viewer does: the
# EXIF 2.3 table, the one PIL's ImageOps.exif_transpose and browsers apply
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# the transposes that swap width and height
_QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
                  Image.Transpose.TRANSVERSE)


def _transpose_box(box: tuple, size: tuple, method) -> tuple:
    """``box`` (left, upper, right, lower, in an image of ``size`` = (w, h)) after
    ``image.transpose(method)``: each corner (x, y), as a point on the image's continuous
    plane, goes where the transpose sends it (ROTATE_90, counter-clockwise: (y, w - x);
    ROTATE_270: (h - y, x); TRANSPOSE: (y, x); TRANSVERSE: (h - y, w - x); the flips and
    ROTATE_180 mirror one or both axes)."""
    w, h = size
    T = Image.Transpose
    move = {
        T.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y), T.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        T.ROTATE_180: lambda x, y: (w - x, h - y), T.ROTATE_90: lambda x, y: (y, w - x),
        T.ROTATE_270: lambda x, y: (h - y, x), T.TRANSPOSE: lambda x, y: (y, x),
        T.TRANSVERSE: lambda x, y: (h - y, w - x),
    }[method]
    (x0, y0), (x1, y1) = move(box[0], box[1]), move(box[2], box[3])
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


class DecodedImage(NamedTuple):
    """An image as :func:`decode_image` read it.

    ``image``: the RGB PIL image, possibly decoded at a reduced size (and, with
    ``exif_transpose``, turned as its EXIF orientation says);
    ``original_size``: (width, height) of the full image: the file's own size (its header),
    with its sides swapped where ``exif_transpose`` turned it a quarter turn;
    ``box``: (left, upper, right, lower) of the region of ``image`` that the full image
    covers, in ``image``'s pixels (``image.resize(size, box=box)`` lines the reduced
    image up with the full one exactly: the decoder rounds a partial 8-pixel block up to a
    whole output pixel, and a turn moves that rounding to the side it turns to); None when
    ``image`` is the full image."""

    image: Image.Image
    original_size: tuple
    box: Optional[tuple] = None

    @property
    def reduced(self) -> bool:
        """True when the image was decoded at a reduced size."""
        return self.box is not None


def decode_image(path: PathLike, *, min_side: Optional[int] = None, exif_transpose: bool = False) -> DecodedImage:
    """Read an image file, a JPEG at a reduced size where the use needs far fewer pixels.

    With ``min_side``, a JPEG of at least ``2 * min_side`` pixels on each side is decoded at
    the smallest of the decoder's scales 1/2, 1/4, 1/8 that keeps every side at least
    ``min_side`` (PIL's ``Image.draft``: the scaled inverse DCT, which never builds the full
    image; a 12000x9000 JPEG is 324 MB decoded in full, 5 MB at 1/8). Every other format, and
    every call without ``min_side``, decodes in full. ``original_size`` is always the full
    image's size, so a caller can answer at the full size.

    ``exif_transpose=True`` turns the image as its EXIF orientation tag says, as viewers,
    browsers and the web page (``rexfast serve``) show it: a phone photo stored 4000x3000 and
    tagged "rotate 90° clockwise" comes back 3000x4000, and so does ``original_size``. The
    default reads the pixels as stored: dataset annotations (COCO, RefCOCO, gRefCOCO) are
    in the stored orientation, and the authors' pipelines do not turn their images. One
    exception is PIL's, not ours: a TIFF's orientation tag is applied by PIL's TIFF reader
    itself (its header size is already the turned one), whatever ``exif_transpose`` says.

    The pixel limit (:func:`max_image_pixels`) applies to the size in the header, before
    anything is decoded, and no read asks for more bytes than the file has
    (:class:`ClampedReader`). FileNotFoundError / ValueError naming the path; TypeError for
    a ``min_side`` that is not an int or ``exif_transpose`` that is not a bool.

    Memory: the file's image is freed before the RGB one is turned, so the peak is the
    stored pixels and their RGB conversion: 2x the returned image in PIL's RGB (4 bytes a
    pixel), 2.25x for float pixels, 4x for WebP, whose decoder keeps its canvas and the
    frame as bytes beside PIL's pixels (2.7 GiB at the default pixel limit); measured in
    tests/engine/test_io_hostile.py."""
    import warnings

    if min_side is not None:
        if isinstance(min_side, bool) or not isinstance(min_side, int):
            raise TypeError(f"min_side must be a positive int or None, got {type(min_side).__name__} {min_side!r}")
        if min_side < 1:
            raise ValueError(f"min_side must be a positive int or None, got {min_side!r}")
    if not isinstance(exif_transpose, bool):
        raise TypeError(f"exif_transpose must be True or False, got {exif_transpose!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's notice at half its limit
            with ClampedReader(path) as f:
                image, (width, height), box, method = _decode_rgb(f, path, limit, min_side, exif_transpose)
    except Image.DecompressionBombError as e:  # PIL's own check, at the open
        raise ValueError(f"image {path} is too large to decode: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    # the file's image (its pixels in the stored mode, and a decoder's own buffer: WebP keeps
    # the whole decoded frame) is gone by here, so the turn holds two RGB copies at most
    if method is not None:
        if box is not None:
            box = _transpose_box(box, image.size, method)
        image = image.transpose(method)
        if method in _QUARTER_TURNS:
            width, height = height, width
    return DecodedImage(image, (width, height), box)



def orientation_transpose(image: Image.Image) -> Optional[Image.Transpose]:
    """The transpose that shows ``image`` as its EXIF orientation tag (0x0112) says, as viewers
    and browsers show it; None for no tag, orientation 1, a value outside the EXIF table, or
    an EXIF block that cannot be parsed (browsers then show the stored pixels too: a damaged
    block of metadata does not make the image unreadable)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - PIL's EXIF parser raises struct.error, SyntaxError, ValueError, ... on a damaged block
        return None
    return _ORIENTATION_TRANSPOSE.get(orientation)


def _decode_rgb(f, path: Path, limit: int, min_side: Optional[int], exif_transpose: bool):
    """(RGB image, the file's (width, height), draft box or None, orientation transpose or None)
    of the open file ``f``. Its own function so that the file's image object dies on return:
    the decoded pixels in the stored mode, and a decoder's buffer beside them, are then freed
    before the caller turns the RGB copy (a 179 MP image is 716 MB in PIL's RGB, so every
    copy alive at once counts)."""
    from PIL import JpegImagePlugin

    with Image.open(f) as im:
        width, height = im.size
        if width * height > limit:
            raise ValueError(f"image {path} is {width}x{height} pixels, more than {limit} "
                             "(REXFAST_MAX_IMAGE_PIXELS)")
        box = None
        if min_side is not None and isinstance(im, JpegImagePlugin.JpegImageFile) and min(width, height) >= 2 * min_side:
            # draft picks the largest scale s in (8, 4, 2) with s <= min(width, height) // min_side;
            # None where it cannot scale (a JPEG of several tiles)
            drafted = im.draft("RGB", (min_side, min_side))
            if drafted is not None and im.size != (width, height):
                box = tuple(drafted[1])
        try:
            im.load()
            method = orientation_transpose(im) if exif_transpose else None
            image = im.convert("RGB")
        finally:
            # the stored-mode pixels go now, not when the with block ends, and on a failed decode
            # too: PIL allocates them before it decodes, and the traceback of an exception a
            # caller keeps (a list of bad files) would hold this frame and the pixels with it
            im.close()
        return image, (width, height), box, method


def load_image(path: PathLike, *, exif_transpose: bool = False) -> Image.Image:
    """An RGB PIL image, decoded in full; FileNotFoundError / ValueError naming the path.
    ``exif_transpose=True`` turns it as its EXIF orientation says (see :func:`decode_image`);
    the default gives the pixels as stored, as the datasets' annotations need them.

    An image of more than :func:`max_image_pixels` pixels is refused from its header,
    before it is decoded (a 69-byte PNG can claim 100,000 x 100,000 pixels: 30 GB as RGB);
    no read asks for more bytes than the file has (:class:`ClampedReader`)."""
    return decode_image(path, exif_transpose=exif_transpose).image


__all__ = ["UnsafeFileError", "ClampedReader", "safe_torch_load", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_png",
           "check_output_dir", "check_output_file", "load_image", "decode_image", "DecodedImage", "DRAFT_MARGIN", "max_image_pixels", "check_pickle", "pickle_opcodes",
           "check_torch_file", "RefusedOpcode", "HASHABLE_SCALARS", "DEFAULT_MAX_IMAGE_PIXELS",
           "orientation_transpose"]
