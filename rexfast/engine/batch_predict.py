"""Batch prediction: every (image, sentence) pair of a pairs file or an image folder into one
``predictions.jsonl`` (see :mod:`rexfast.data.predictions` for its lines), resumable and
splittable over ``torchrun`` ranks.

Output folder ``D``:

* ``D/predictions.jsonl``: one line per pair, in pair order when the run ends;
* ``D/predictions.run.json``: the run's arguments (model source and its weights file's size
  and modification time, thresholds, precision, ``--set`` overrides, tokenizer, the pairs'
  digest, which PNGs are saved, whether large JPEGs were decoded in full, that images were
  turned as their EXIF orientation says). A run into a folder whose arguments differ is refused
  (``overwrite=True`` / ``--overwrite`` starts over instead), so that one file never mixes
  the results of two runs. The batch size, workers and device may change between runs;
* ``D/masks/<name>.png`` (``save_masks``: the mask as shown, empty for "no target", 0/255)
  and ``D/overlays/<name>.png`` (``save_overlays``), where ``<name>`` is the pair's id when
  it is a plain file name (letters, digits, ``._-``; no case-only twin in the run), else the
  id made plain plus ``-`` and 10 hex digits of its SHA-1: two pairs never share a file.

Resuming: killed and started again with the same arguments, a run keeps every line already
written and predicts the rest. Lines are appended whole and fsync'ed per batch (PNGs are
written, atomically, before their line), and a torn last line is cut off on restart, so the
file never holds a torn or a repeated line (:class:`~rexfast.data.predictions.JsonlAppender`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r predicts the r-th contiguous slice of the
pairs into ``D/predictions.rank{r}.jsonl`` (each resumable as above); after a barrier rank 0
merges ``predictions.jsonl`` (lines of an earlier run, if any) and every part into one
``predictions.jsonl`` in pair order, written atomically, then removes the parts. A
single-process run appends to ``predictions.jsonl`` directly, unless parts of an interrupted
distributed run are there; then it writes a part and merges the same way. Pairs already in any
of these files are never predicted again.

``skip_bad``: pairs that are bad (see :mod:`rexfast.data.pairs`) or whose image fails to
decode are written as error lines ``{"id", "image", "text", "error"}``; those are final (a
rerun keeps them; ``--overwrite`` retries everything). Without it, an image that fails to
decode mid-run stops the run with a ValueError naming the pair (what was written stays, and
a rerun continues).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data.pairs import PairList
from ..data.predictions import (PREDICTIONS_FILE, JsonlAppender, error_record, prediction_record, record_line,
                                scan_jsonl)
from ..io import atomic_write, atomic_write_json, atomic_write_png, check_output_dir

__all__ = ["RUN_FILE", "BatchSummary", "run_arguments", "file_stems", "predict_pairs", "source_fingerprint"]

RUN_FILE = "predictions.run.json"
PART_PATTERN = re.compile(r"^predictions\.rank(\d+)\.jsonl$")
# run-file keys that may differ between the runs writing one folder (they do not change a prediction)
_INFORMATIONAL = ("rexfast", "pairs_source")
# what a run did before its run file recorded a key (the value a missing key stands for, and why):
# every JPEG was decoded in full (the reduced decode came with the key), and no image was turned by
# its EXIF orientation
_BEFORE_RECORDED = {
    "full_decode": (True, "an earlier rexfast, which decoded every JPEG in full: --full-decode continues it"),
    "exif_transpose": (False, "an earlier rexfast, which read every image as stored"),
}
# keys no flag sets, so a rerun cannot repeat an earlier value: only a new folder or --overwrite helps
_NOT_A_FLAG = {"exif_transpose": "an earlier rexfast read the images as stored; this one turns them as their EXIF "
                                 "orientation says, as viewers show them, so an oriented photo's lines would differ"}


def source_fingerprint(source) -> Optional[dict]:
    """Size and modification time of a local model source's weights (a file, or a model
    folder's ``model.safetensors`` / ``config.json``): a checkpoint retrained in place between
    two runs into one folder changes it. None for a source that is not a local path (a Hub id)."""
    try:
        path = Path(source)
        if path.is_file():
            st = path.stat()
            return {path.name: [st.st_size, st.st_mtime_ns]}
        if path.is_dir():
            out = {}
            for name in ("model.safetensors", "config.json"):
                if (path / name).is_file():
                    st = (path / name).stat()
                    out[name] = [st.st_size, st.st_mtime_ns]
            return out
    except (OSError, TypeError, ValueError):
        pass
    return None


def run_arguments(source, pairs: PairList, *, mask_threshold: float, no_target_threshold: float, precision: str,
                  overrides=(), tokenizer=None, save_masks: bool = False, save_overlays: bool = False,
                  full_decode: bool = False) -> dict:
    """What the run file records: everything that changes a prediction or the folder's contents."""
    from .._version import __version__

    local = Path(str(source))
    return {
        "rexfast": __version__,
        "source": str(local.resolve()) if local.exists() else str(source),
        "source_weights": source_fingerprint(source),
        "tokenizer": None if tokenizer is None else str(Path(tokenizer).resolve()),
        "overrides": list(overrides or ()),
        "precision": precision,
        "mask_threshold": float(mask_threshold),
        "no_target_threshold": float(no_target_threshold),
        "pairs_source": pairs.source,
        "pairs_digest": pairs.digest,
        "save_masks": bool(save_masks),
        "save_overlays": bool(save_overlays),
        "full_decode": bool(full_decode),  # a reduced JPEG decode moves a few pixels (README)
        # images are turned as their EXIF orientation says (Processor.decode): masks, height and width
        # are in the orientation a viewer shows
        "exif_transpose": True,
    }


def file_stems(pairs: PairList) -> dict:
    """id → the file name stem of its PNGs (see the module docstring): unique per run, also on
    a case-insensitive file system, and the same in every run over the same pairs."""
    plain = {p.id: re.sub(r"[^A-Za-z0-9._-]", "_", p.id)[:100] for p in pairs}
    folded: dict = {}
    for pid, stem in plain.items():
        folded.setdefault(stem.casefold(), []).append(pid)
    out = {}
    for pid, stem in plain.items():
        if stem != pid or stem.startswith(".") or len(folded[stem.casefold()]) > 1:
            stem = f"{stem}-{hashlib.sha1(pid.encode('utf-8')).hexdigest()[:10]}"
        out[pid] = stem
    return out


@dataclass
class BatchSummary:
    pairs: int  # in the pair list
    predicted: int  # by this run (all ranks)
    resumed: int  # already in the output when the run started
    no_target: int  # lines saying "no target" (the whole file)
    errors: int  # error lines (the whole file)
    seconds: float
    path: Path

    def line(self) -> str:
        rate = f" ({self.predicted / self.seconds:.1f} pairs/s)" if self.predicted and self.seconds > 0 else ""
        resumed = f", {self.resumed} already done" if self.resumed else ""
        return (f"{self.pairs} pairs ({self.predicted} predicted{resumed}): {self.no_target} no target, "
                f"{self.errors} errors, {self.seconds:.1f} s{rate} -> {self.path}")


# ----------------------------------------------------------------------------- the output folder
def _parts(out: Path) -> list:
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), out / name) for name in os.listdir(out) if (m := PART_PATTERN.match(name))]
    return [path for _, path in sorted(found)]


def check_out_dir(out_dir, args: dict, *, overwrite: bool) -> Path:
    """The output folder, checked against the run file: a ValueError when it holds results
    of a run with other arguments, or predictions no run file describes (unless ``overwrite``)."""
    out = check_output_dir(out_dir, "--out-dir")
    if overwrite or not out.exists():
        return out
    run_file, main = out / RUN_FILE, out / PREDICTIONS_FILE
    if not run_file.is_file():
        if main.exists() or _parts(out):
            raise ValueError(f"--out-dir {out} holds a {PREDICTIONS_FILE} that no {RUN_FILE} describes, so a run "
                             "cannot tell whether it may continue it; choose another --out-dir or pass --overwrite "
                             "to start over")
        return out
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(before, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {run_file} ({exc}); pass --overwrite to start over") from None
    recorded = set(before)
    before = {**{key: value for key, (value, _) in _BEFORE_RECORDED.items()}, **before}
    changed = [key for key in sorted(set(before) | set(args)) if key not in _INFORMATIONAL
               and before.get(key) != args.get(key)]
    if changed:
        def then(key):
            value = json.dumps(before.get(key))
            return value if key in recorded else f"{value} (not recorded: {_BEFORE_RECORDED[key][1]})"

        what = "; ".join(f"{key}: {then(key)} then, {json.dumps(args.get(key))} now" for key in changed[:3])
        fixed = [_NOT_A_FLAG[key] for key in changed if key in _NOT_A_FLAG]
        if fixed:
            raise ValueError(f"--out-dir {out} holds predictions of a run with other arguments ({what}): "
                             f"{'; '.join(fixed)}; choose another --out-dir, or pass --overwrite to start over")
        raise ValueError(f"--out-dir {out} holds predictions of a run with other arguments ({what}); a rerun must "
                         "repeat them to continue, or choose another --out-dir, or pass --overwrite to start over")
    return out


def _start_over(out: Path) -> None:
    for path in [out / PREDICTIONS_FILE, out / RUN_FILE, *_parts(out)]:
        if path.exists():
            path.unlink()


def _done(out: Path, pair_ids: dict) -> dict:
    """id → line of every pair already in the main file or any part (first occurrence)."""
    done: dict = {}
    for path in [out / PREDICTIONS_FILE, *_parts(out)]:
        seen = set()
        for pid, line in scan_jsonl(path).records:
            if pid in seen:
                raise ValueError(f"{path} holds id {pid!r} twice: it was edited; pass --overwrite to start over")
            if pid not in pair_ids:
                raise ValueError(f"{path} holds id {pid!r}, which is not one of the pairs: it was edited or comes "
                                 "from other pairs; pass --overwrite to start over")
            seen.add(pid)
            done.setdefault(pid, line)
    return done


def _merge(out: Path, pair_ids: dict) -> None:
    """Rank 0, after every rank finished: one predictions.jsonl in pair order, then no parts."""
    main, parts = out / PREDICTIONS_FILE, _parts(out)
    lines = _done(out, pair_ids)
    missing = [pid for pid in pair_ids if pid not in lines]
    if missing:
        raise RuntimeError(f"{len(missing)} pairs have no line after every rank finished (e.g. {missing[0]!r})")
    order = list(pair_ids)
    current = [pid for pid, _ in scan_jsonl(main).records]
    if current == order and not parts:
        return
    atomic_write(main, lambda f: [f.write((lines[pid] + "\n").encode("utf-8")) for pid in order])
    for part in parts:
        part.unlink()


def _count(path: Path) -> tuple:
    no_target = errors = 0
    for _, line in scan_jsonl(path).records:
        rec = json.loads(line)
        errors += "error" in rec
        no_target += bool(rec.get("no_target"))
    return no_target, errors


# ----------------------------------------------------------------------------- reading images in workers
class _PairInputs(torch.utils.data.Dataset):
    """Pair k → its decoded image run through the segmenter's per-sample processor (in a
    DataLoader worker), or the reason it cannot be."""

    def __init__(self, pairs: list, processor, keep_image: bool):
        self.pairs, self.processor, self.keep_image = pairs, processor, keep_image

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        pair = self.pairs[k]
        if pair.error is not None:
            return {"k": k, "error": pair.error}
        try:
            # the path, not a decoded image: the processor decodes a large JPEG at a reduced size for
            # the model (and, for an overlay, the full image besides: keep_image changes no prediction)
            inputs = self.processor(pair.image, pair.text, keep_image=self.keep_image)
        except (OSError, ValueError, TypeError) as exc:  # deleted or corrupt since the up-front check
            return {"k": k, "error": str(exc) or type(exc).__name__}
        return {"k": k, "inputs": inputs}


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the model's threads are the main process's


def _batches(dataset: _PairInputs, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=list, worker_init_fn=_one_thread if workers else None,
                                         persistent_workers=False, prefetch_factor=2 if workers else None)
    return iter(loader)


# ----------------------------------------------------------------------------- the run
def predict_pairs(pairs: PairList, out_dir, load_segmenter: Callable, args: dict, *, batch_size: int = 8,
                  workers: Optional[int] = None, save_masks: bool = False, save_overlays: bool = False,
                  skip_bad: bool = False, overwrite: bool = False, progress: bool = True,
                  device: str = "auto") -> BatchSummary:
    """Predict every pair into ``out_dir`` (see the module docstring).

    ``load_segmenter(device)`` returns the :class:`rexfast.Segmenter` to run (called only
    when this rank has pairs left, after every check passed and before anything is
    written); ``args`` is
    :func:`run_arguments`' record of the run; ``workers`` DataLoader workers decode the
    images (default ``min(2, CPUs this process may run on)``; 0: in this process)."""
    from . import distributed

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if workers is None:
        from .device import usable_cpus

        workers = min(2, usable_cpus())  # taskset -c 0: one worker, not two on one core
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be a non-negative integer, got {workers!r}")
    out = check_out_dir(out_dir, args, overwrite=overwrite)
    pair_ids = {p.id: p for p in pairs}

    started = time.perf_counter()
    ours = not torch.distributed.is_initialized()  # a caller's process group is left as it is
    info = distributed.init(device)
    try:
        # read-only until the model has loaded: a source that fails to load leaves the folder as it was
        done = {} if overwrite else _done(out, pair_ids)
        lo, hi = len(pairs) * info.rank // info.world_size, len(pairs) * (info.rank + 1) // info.world_size
        todo = [p for p in pairs.pairs[lo:hi] if p.id not in done]
        segmenter = load_segmenter(info.device) if any(p.error is None for p in todo) else None
        distributed.barrier(info)
        if info.is_main:
            if overwrite:
                _start_over(out)
            out.mkdir(parents=True, exist_ok=True)
            if not (out / RUN_FILE).is_file():
                atomic_write_json(out / RUN_FILE, args)
        distributed.barrier(info)
        direct = info.world_size == 1 and not _parts(out)
        target = out / (PREDICTIONS_FILE if direct else f"predictions.rank{info.rank}.jsonl")
        predicted = _run(todo, target, segmenter, pairs, batch_size=batch_size, workers=workers,
                         save_masks=save_masks, save_overlays=save_overlays, progress=progress and info.is_main,
                         out=out, skip_bad=skip_bad) if todo else 0
        predicted = sum(distributed.all_gather_objects(predicted, info))
        distributed.barrier(info)
        if info.is_main:
            _merge(out, pair_ids)
        distributed.barrier(info)
    finally:
        if ours:
            distributed.cleanup()
    no_target, errors = _count(out / PREDICTIONS_FILE)
    return BatchSummary(pairs=len(pairs), predicted=predicted, resumed=len(done), no_target=no_target, errors=errors,
                        seconds=time.perf_counter() - started, path=out / PREDICTIONS_FILE)


def _record(pair, result) -> dict:
    """A :class:`~rexfast.Segmentation`'s line. Its ``segmentation`` is the thresholded mask
    (``raw_mask``) even where the answer is "no target" (``result.mask`` is then empty): the
    GRES metrics count those pixels, so the file scores as the model evaluates."""
    if result.no_target:
        mask, rle = result.raw_mask, None
    else:
        mask, rle = result.mask, result.rle()
    return prediction_record(pair.id, pair.source_image, pair.text, mask, result.no_target, result.no_target_prob,
                             rle=rle)


def _save_pngs(out: Path, stem: Optional[str], result, save_masks: bool, save_overlays: bool) -> None:
    """The mask as shown (empty for "no target"; 0/255) and the overlay of it on the image."""
    if save_masks:
        atomic_write_png(out / "masks" / f"{stem}.png", np.asarray(result.mask, dtype=np.uint8) * 255)
    if save_overlays:
        atomic_write(out / "overlays" / f"{stem}.png", lambda f: result.overlay().save(f, format="PNG"))


def _run(todo: list, target: Path, segmenter, pairs: PairList, *, batch_size: int, workers: int, save_masks: bool,
         save_overlays: bool, progress: bool, out: Path, skip_bad: bool) -> int:
    """Predict ``todo`` (in order) into ``target``; returns how many lines were written."""
    appender = JsonlAppender(target)
    appender.open()
    try:
        stems = file_stems(pairs) if save_masks or save_overlays else {}
        for folder, wanted in (("masks", save_masks), ("overlays", save_overlays)):
            if wanted:
                (out / folder).mkdir(parents=True, exist_ok=True)
        dataset = _PairInputs(todo, None if segmenter is None else segmenter.processor, keep_image=save_overlays)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="predict", unit="pair", dynamic_ncols=True)
        written = 0
        try:
            for batch in _batches(dataset, batch_size, workers):
                good = [item for item in batch if "error" not in item]
                results = iter(segmenter.segment_items([item["inputs"] for item in good]) if good else [])
                lines = []
                for item in batch:
                    pair = todo[item["k"]]
                    if "error" in item:
                        if not skip_bad:
                            appender.write(lines)  # the pairs before it are done
                            kept = written + len(lines)
                            kept_text = ("this run wrote no line before it" if kept == 0 else
                                         "the 1 line before it is kept" if kept == 1 else
                                         f"the {kept} lines before it are kept")
                            raise ValueError(f"{pairs.source}, {pair.where}: {item['error']} ({kept_text}: fix it "
                                             "and run again to continue, or pass --skip-bad)")
                        lines.append(record_line(error_record(pair.id, pair.source_image, pair.text, item["error"])))
                        continue
                    result = next(results)
                    _save_pngs(out, stems.get(pair.id), result, save_masks, save_overlays)
                    lines.append(record_line(_record(pair, result)))
                appender.write(lines)
                written += len(lines)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return written
    finally:
        appender.close()
