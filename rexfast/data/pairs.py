"""The (image, sentence) pairs a batch prediction runs over: a JSONL or CSV pairs file, or
one sentence over a folder of images.

Pairs file rows have the columns ``image`` (a path; relative paths are relative to the
pairs file's folder, ``~`` is expanded), ``text`` (the sentence) and optionally ``id``.
A row without an id gets its **0-based position among the file's rows** (``"0"`` for the
first row, counting bad rows too, not counting blank lines), the index pandas gives the
same file (``read_csv``, ``read_json(lines=True)``). Ids are strings (a JSON integer id
``7`` is ``"7"``) and must be unique. Other columns are ignored.

* JSONL: one JSON object per line (UTF-8); blank lines are skipped.
* CSV: a header row naming the columns, then one row per pair (the ``csv`` module's
  dialect: commas, double quotes; a field may span lines).

A folder (``folder_pairs``) gives one pair per image file directly inside it (extensions
in :data:`IMAGE_EXTENSIONS`, any case), sorted by file name; each pair's id is the file
name, which is unique in a folder.

Every row is checked before anything is predicted: the JSON is an object, the columns
are there, the text is a non-empty string, the id is a string or integer and not
repeated, and the image exists and PIL identifies its header (``Image.open`` reads the
header only; pixels are decoded later, in the prediction's workers). All bad rows are
found in one pass. By default they raise one ValueError naming the first bad row's
line number and how many are bad; with ``skip_bad=True`` they come back as pairs with
an ``error`` (a batch prediction writes them as error records).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = ["Pair", "PairList", "IMAGE_EXTENSIONS", "read_pairs", "folder_pairs", "check_image"]

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COLUMNS = ("image", "text")


@dataclass(frozen=True)
class Pair:
    """One (image, sentence) row. ``where`` names the row in messages (``line 4``);
    ``error`` is None for a good row, else why it cannot be predicted."""

    index: int  # position in the pair list, 0-based
    id: str
    image: Optional[Path]
    text: Optional[str]
    where: str
    error: Optional[str] = None
    source_image: Optional[str] = None  # the image as the row names it (what the predictions file repeats)


@dataclass(frozen=True)
class PairList:
    """The pairs in file order. ``digest`` identifies the input (sha256 of the pairs
    file's bytes, or of the folder's sorted file names and the sentence): a resumed run
    compares it to refuse mixing the results of two inputs."""

    pairs: tuple
    source: str
    digest: str

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]

    @property
    def bad(self) -> list:
        return [p for p in self.pairs if p.error is not None]


def check_image(path: Path, limit: Optional[int] = None) -> Optional[str]:
    """None when ``path`` is a file whose header PIL identifies, of at most ``limit`` pixels
    (default :func:`rexfast.io.max_image_pixels`, the limit :func:`rexfast.io.load_image`
    applies), else why not. Only the header is read (no pixel decoding), so checking
    thousands of images is quick."""
    import warnings

    from PIL import Image

    from ..io import max_image_pixels

    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # pathlib answers False only for a missing file: a name too long, a folder it may not enter
        return f"cannot read image {path}: {exc.strerror or exc}"
    if not exists:
        return f"image not found: {path}"
    if not is_file:
        return f"image is not a file: {path}"
    limit = max_image_pixels() if limit is None else limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as im:
                width, height = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on a bad header
        return f"cannot read image {path}: {type(exc).__name__}: {exc}"
    if width < 1 or height < 1:
        return f"image {path} is empty ({width}x{height})"
    if width * height > limit:
        return f"image {path} is {width}x{height} pixels, more than {limit} (REXFAST_MAX_IMAGE_PIXELS)"
    return None


def _check_images(rows: list[dict]) -> None:
    """Fill in the image errors of the rows that are otherwise good (in threads: the
    header reads are I/O)."""
    from ..io import max_image_pixels

    todo = [row for row in rows if row["error"] is None]
    if not todo:
        return
    limit = max_image_pixels()  # a bad REXFAST_MAX_IMAGE_PIXELS is one error, before any row
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        for row, error in zip(todo, pool.map(lambda image: check_image(image, limit), [row["image"] for row in todo])):
            row["error"] = error


def _finish(rows: list[dict], source: str, digest: str, skip_bad: bool, what: str) -> PairList:
    if not rows:
        raise ValueError(f"{source} holds no {what}")
    _check_images(rows)
    seen: dict = {}
    for row in rows:  # ids last: a repeated id is the later row's fault, whatever else is wrong with it
        pid = row["id"]
        if pid is None:
            continue
        if pid in seen:
            row["error"] = row["error"] or f"id {pid!r} repeats the id of {seen[pid]}"
        else:
            seen[pid] = row["where"]
    pairs = tuple(Pair(index=k, id=row["id"] if row["id"] is not None else str(k), image=row["image"],
                       text=row["text"], where=row["where"], error=row["error"], source_image=row.get("source_image"))
                  for k, row in enumerate(rows))
    result = PairList(pairs=pairs, source=source, digest=digest)
    bad = result.bad
    if bad and not skip_bad:
        first = bad[0]
        count = f"{len(bad)} of the {len(pairs)} {what} are bad" if len(bad) > 1 else f"1 of the {len(pairs)} {what} is bad"
        raise ValueError(f"{source}: {count}; the first, {first.where}: {first.error} "
                         "(fix them, or skip them with --skip-bad / skip_bad=True: they are then written as "
                         "error records)")
    return result


def _row(k: int, line: int, fields: dict, base: Path) -> dict:
    """A row's checked values; ``fields`` maps column names to the values found (absent
    columns are absent)."""
    where = f"line {line}"
    row = {"where": where, "error": None, "image": None, "text": None, "id": None}
    errors = []
    pid = fields.get("id")
    if pid is None or pid == "":
        row["id"] = str(k)
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)):
        errors.append(f"id must be a string or an integer, got {json.dumps(pid)}")
    else:
        row["id"] = str(pid)
    missing = [c for c in COLUMNS if c not in fields]
    if missing:
        errors.append(f"the {' and '.join(repr(c) for c in missing)} column{'s are' if len(missing) > 1 else ' is'} "
                      "missing")
    text = fields.get("text")
    if "text" not in missing:
        if not isinstance(text, str):
            errors.append(f"text must be a string, got {json.dumps(text)}")
        elif not text.strip():
            errors.append("the text is empty")
        else:
            row["text"] = text
    image = fields.get("image")
    if "image" not in missing:
        if not isinstance(image, str) or not image.strip():
            errors.append(f"image must be a non-empty path string, got {json.dumps(image)}")
        elif "\x00" in image:  # no file has one in its name (and "~user\x00" made expanduser raise)
            errors.append(f"image path contains a NUL character: {json.dumps(image)[:200]}")
        else:
            try:  # "~user/...": the user's name is looked up, and must encode for it (a lone surrogate cannot)
                path = Path(os.path.expanduser(image))
            except ValueError as exc:
                errors.append(f"image path {json.dumps(image)[:200]} cannot be expanded ({exc})")
            else:
                row["image"] = path if path.is_absolute() else base / path
                row["source_image"] = image
    if errors:
        row["error"] = "; ".join(errors)
    return row


def _read_jsonl(data: bytes, base: Path) -> list[dict]:
    rows = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        k = len(rows)
        try:
            obj = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            rows.append({"where": f"line {line_no}", "error": f"not UTF-8 text ({exc.reason})", "image": None,
                         "text": None, "id": None})
            continue
        except json.JSONDecodeError as exc:
            rows.append({"where": f"line {line_no}", "error": f"not valid JSON ({exc.msg}, column {exc.colno})",
                         "image": None, "text": None, "id": None})
            continue
        except RecursionError:  # the C scanner's recursion limit: a row of thousands of nested [ or {
            rows.append({"where": f"line {line_no}", "error": "not usable JSON (nested too deeply)", "image": None,
                         "text": None, "id": None})
            continue
        except ValueError as exc:  # a number of more than sys.get_int_max_str_digits() digits
            rows.append({"where": f"line {line_no}", "error": f"not usable JSON ({str(exc).split(':')[0]})",
                         "image": None, "text": None, "id": None})
            continue
        if not isinstance(obj, dict):
            rows.append({"where": f"line {line_no}", "error": f"not a JSON object (a {type(obj).__name__})",
                         "image": None, "text": None, "id": None})
            continue
        rows.append(_row(k, line_no, obj, base))
    return rows


def _read_csv(data: bytes, path: Path, base: Path) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"pairs file {path} is not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"pairs file {path} is empty") from None
    except csv.Error as exc:
        raise ValueError(f"pairs file {path}, line 1: {exc}") from None
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"pairs file {path}, line 1: the header has no {' or '.join(repr(c) for c in missing)} "
                         f"column (it names {header}; a CSV pairs file starts with a header such as image,text,id)")
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise ValueError(f"pairs file {path}, line 1: the header repeats the column(s) {repeated}")
    rows = []
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append({"where": f"line {start}", "error": f"malformed CSV ({exc})", "image": None, "text": None,
                         "id": None})
            break  # the csv module cannot resynchronise after a malformed row
        line, start = start, reader.line_num + 1
        if not values or all(not v.strip() for v in values):
            continue
        k = len(rows)
        fields = dict(zip(header, values))
        row = _row(k, line, fields, base)
        if len(values) > len(header):
            extra = f"the row has {len(values)} fields, the header {len(header)}"
            row["error"] = f"{row['error']}; {extra}" if row["error"] else extra
        rows.append(row)
    return rows


def read_pairs(path: PathLike, *, skip_bad: bool = False) -> PairList:
    """The pairs of a ``.jsonl`` / ``.csv`` pairs file (see the module docstring).

    Raises FileNotFoundError for a missing file, ValueError for an unknown extension,
    an unusable CSV header, or (without ``skip_bad``) any bad row.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pairs file must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"pairs file {path}: expected a .jsonl or .csv file, got {suffix or 'no extension'!r}")
    data = path.read_bytes()
    base = path.resolve().parent
    rows = _read_jsonl(data, base) if suffix == ".jsonl" else _read_csv(data, path, base)
    return _finish(rows, f"pairs file {path}", hashlib.sha256(data).hexdigest(), skip_bad, "rows")


def folder_pairs(folder: PathLike, text: str, *, skip_bad: bool = False) -> PairList:
    """One sentence over every image directly in ``folder`` (sorted by file name; the id
    is the file name). Unreadable images are bad rows, as in a pairs file."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty: say what to segment, e.g. --text \"the red circle\"")
    folder = Path(folder)
    if not folder.is_dir():
        raise (FileNotFoundError if not folder.exists() else NotADirectoryError)(f"images folder not found: {folder}")
    names = sorted(entry.name for entry in os.scandir(folder)
                   if entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith(".")
                   and entry.is_file())
    if not names:
        raise ValueError(f"images folder {folder} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    rows = [{"where": f"image {name}", "error": None, "image": folder.resolve() / name, "text": text, "id": name,
             "source_image": str(folder / name)} for name in names]
    digest = hashlib.sha256(json.dumps({"images": names, "text": text}).encode("utf-8")).hexdigest()
    return _finish(rows, f"images folder {folder}", digest, skip_bad, "images")
