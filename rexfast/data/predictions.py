"""The predictions file: one JSON object per line (JSONL), one line per (image, sentence).

A prediction line::

    {"id": "17", "image": "photos/cat.jpg", "text": "the cat on the left", "height": 480, "width": 640,
     "no_target": false, "no_target_prob": 0.031245,
     "segmentation": {"size": [480, 640], "counts": "..."}}

``segmentation`` is the thresholded mask as COCO RLE (pycocotools' compressed string,
``size`` = [height, width]); ``no_target`` is the model's decision that the sentence names
nothing (a consumer then shows an empty mask); ``no_target_prob`` is the no-target head's
probability, rounded to 6 decimals, or null for a model without one. A pair that could not
be predicted (``--skip-bad``) is an error line ``{"id", "image", "text", "error"}``.

``rexfast predict`` and ``rexfast eval --save-predictions`` write this format and
``rexfast eval --predictions`` reads it (from rexfast or any other tool: only ``id`` and
``segmentation`` are required there; ``no_target`` defaults to the mask being empty).

:class:`JsonlAppender` makes a file resumable after a crash: lines are appended whole and
fsync'ed per chunk, a torn tail (bytes after the last newline) is cut off on restart, and
:func:`scan_jsonl` lists the ids already present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["PREDICTIONS_FILE", "prediction_record", "error_record", "record_line", "scan_jsonl", "JsonlScan",
           "JsonlAppender", "read_predictions", "prediction_mask"]

PathLike = Union[str, os.PathLike]
PREDICTIONS_FILE = "predictions.jsonl"
PROB_DECIMALS = 6


def prediction_record(pid: str, image, text: str, mask: np.ndarray, no_target: bool,
                      no_target_prob: Optional[float], rle: Optional[dict] = None) -> dict:
    """The line for one prediction; ``mask`` is the (H, W) bool mask (its RLE computed
    here unless ``rle`` is given)."""
    if rle is None:
        from .masks import encode_mask

        rle = encode_mask(mask)
    height, width = (int(v) for v in np.shape(mask))
    return {"id": str(pid), "image": None if image is None else str(image), "text": text, "height": height,
            "width": width, "no_target": bool(no_target),
            "no_target_prob": None if no_target_prob is None else round(float(no_target_prob), PROB_DECIMALS),
            "segmentation": {"size": [height, width], "counts": rle["counts"]}}


def error_record(pid: str, image, text: Optional[str], error: str) -> dict:
    """The line for a pair that could not be predicted."""
    return {"id": str(pid), "image": None if image is None else str(image), "text": text, "error": str(error)}


def record_line(record: dict) -> bytes:
    """One JSONL line (UTF-8, ending in a newline)."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class JsonlScan:
    """What a resumable JSONL file holds: the ``(id, line)`` of its complete lines in file
    order, and ``end``, the byte offset after the last of them (where a torn tail, if any,
    starts; ``torn`` says whether there is one)."""

    records: list
    end: int
    torn: bool


def scan_jsonl(path: PathLike) -> JsonlScan:
    """Read a file that :class:`JsonlAppender` writes. A missing file is empty. The bytes
    after the last newline are a torn line (a crash during a write); complete lines at
    the end that are not JSON (the zero-filled blocks a power loss can leave) are torn too.
    A bad line followed by good ones, or a line without a string ``id``, is a ValueError:
    the file was edited or is not one of these files."""
    path = Path(path)
    if not path.exists():
        return JsonlScan([], 0, False)
    data = path.read_bytes()
    records, offset, end, bad = [], 0, 0, None
    while True:
        newline = data.find(b"\n", offset)
        if newline < 0:
            break
        raw = data[offset:newline]
        try:
            obj = json.loads(raw.decode("utf-8"))
            ok = isinstance(obj, dict) and isinstance(obj.get("id"), str)
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj, ok = None, False
        if not ok:
            if bad is None:
                bad = (len(records) + 1, offset)
        else:
            if bad is not None:
                raise ValueError(f"{path}: line {bad[0]} is not a prediction record but later lines are; the file "
                                 "was edited or is not a rexfast predictions file")
            records.append((obj["id"], raw.decode("utf-8")))
            end = newline + 1
        offset = newline + 1
    return JsonlScan(records, end, end < len(data))


class JsonlAppender:
    """Appends whole lines to a JSONL file, flushed and fsync'ed per :meth:`write` call, so
    that after a crash the file holds every line of every completed call and at most a torn
    tail of the next one, which :meth:`open` cuts off (truncating to the last complete line)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._file = None

    def open(self) -> JsonlScan:
        """Cut a torn tail off, open for appending; returns what the file already holds."""
        scan = scan_jsonl(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if scan.torn:
            with open(self.path, "r+b") as f:
                f.truncate(scan.end)
                f.flush()
                os.fsync(f.fileno())
        self._file = open(self.path, "ab")
        return scan

    def write(self, lines: list) -> None:
        if self._file is None:
            raise RuntimeError("JsonlAppender.write before open()")
        if not lines:
            return
        self._file.write(b"".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()


def read_predictions(path: PathLike) -> dict:
    """A predictions file to score: id → record, in file order. Each line must be a JSON
    object with an ``id`` (string or integer, unique) and a ``segmentation`` (COCO RLE:
    ``size`` and ``counts``; or polygons with the record's ``height``/``width``); error
    lines (``"error"``) are refused, as they hold no prediction. ValueError names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    out: dict = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"predictions file {path}, line {line_no}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: not a JSON object")
            pid = rec.get("id")
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise ValueError(f"{where}: 'id' must be a string or an integer, got {json.dumps(pid)}")
            pid = str(pid)
            if pid in out:
                raise ValueError(f"{where}: id {pid!r} repeats line {out[pid]['_line']}")
            if "error" in rec and "segmentation" not in rec:
                raise ValueError(f"{where}: id {pid!r} is an error record ({rec['error']}), not a prediction")
            segm = rec.get("segmentation")
            if isinstance(segm, dict):
                size = segm.get("size")
                if not (isinstance(size, list) and len(size) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                    raise ValueError(f"{where}: segmentation 'size' must be [height, width], got {json.dumps(size)}")
                if "counts" not in segm:
                    raise ValueError(f"{where}: segmentation has no 'counts'")
            elif isinstance(segm, list):
                if not all(isinstance(rec.get(k), int) and rec[k] > 0 for k in ("height", "width")):
                    raise ValueError(f"{where}: polygon segmentation needs the record's 'height' and 'width'")
            else:
                raise ValueError(f"{where}: 'segmentation' must be a COCO RLE object or a polygon list")
            nt = rec.get("no_target")
            if nt is not None and not isinstance(nt, bool):
                raise ValueError(f"{where}: 'no_target' must be true, false or null, got {json.dumps(nt)}")
            rec["_line"] = line_no
            out[pid] = rec
    if not out:
        raise ValueError(f"predictions file {path} holds no predictions")
    return out


def prediction_mask(record: dict) -> np.ndarray:
    """The (H, W) bool mask of a record from :func:`read_predictions`."""
    from .masks import decode_segmentation

    segm = record["segmentation"]
    height, width = (segm["size"] if isinstance(segm, dict) else (record["height"], record["width"]))
    try:
        return decode_segmentation(segm, height, width)
    except ValueError as exc:
        raise ValueError(f"prediction {record['id']!r} (line {record.get('_line')}): {exc}") from None
