"""Batch prediction on a CPU: pairs per second of ``rexfast predict --pairs`` (the engine behind
it, :func:`rexfast.engine.batch_predict.predict_pairs`: images decoded in DataLoader workers,
``--batch-size`` pairs per model call, each line RLE-encoded, appended and fsync'ed) at batch
1, 8 and 16, against a loop of single-pair ``Segmenter`` calls (``seg(path, text)`` and its
``rle()``: what a user writes without the batch form), side by side in one process.

Models (random weights, built in-process, nothing downloaded; speed does not depend on the
values), fp32 (``rexfast.optimize(precision="fp32")``):

* ``rela_demo``: the demo preset (``ReLAConfig.demo()``, what ``rexfast demo`` trains) at its
  64² input, on 128×96 JPEGs, 64 pairs;
* ``rela_r50``: the released ReLA R50 architecture at 480², on 640×480 JPEGs, 16 pairs
  (``slow``).

Each variant runs ``REXFAST_BENCH_ROUNDS`` (default 3) rounds over all the pairs after one
warm-up round, the rounds interleaved across the variants (a second tenant on shared cores
slows them all alike). Each row: pairs/s from the median round, its speed-up over the loop,
the peak resident memory of this process above its level before the round (``/proc/self/statm``
sampled every 2 ms; tracemalloc does not see torch's allocations) and the largest peak RSS of
a DataLoader worker (``getrusage(RUSAGE_CHILDREN)``), and how many pairs have exactly the
loop's mask (RLE; "no target" pairs count as equal: the file keeps their thresholded mask).
The aim (issue 33): batch 8 ≥ 1.5× the single-pair loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench_utils import PeakRSS, Timing, record

SUITE = "batch_predict"
ROUNDS = int(os.environ.get("REXFAST_BENCH_ROUNDS", "3"))
BATCHES = (1, 8, 16)
WORDS = ("the a left right red blue green circle square triangle big small shape on of next to above below "
         "two all except middle top bottom").split()
SPECS = {
    "rela_demo": dict(preset="demo", input=64, image=(96, 128), pairs=64),
    "rela_r50": dict(preset="r50", input=480, image=(480, 640), pairs=16),
}


def _segmenter(preset: str, size: int, folder):
    import rexfast
    from rexfast.data import load_tokenizer
    from rexfast.engine.segmenter import Segmenter
    from rexfast.models import ReLA, ReLAConfig
    from rexfast.models.preprocessing import Preprocessing
    from rexfast.models.text import bert_for_vocab

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = load_tokenizer(vocab)
    config = getattr(ReLAConfig, preset)()
    bert = bert_for_vocab(config.bert, len(tokenizer), has_weights=config.bert_weights is not None)
    torch.manual_seed(0)
    model = ReLA(dataclasses.replace(config, bert=bert))
    model = rexfast.optimize(model, precision="fp32")
    return Segmenter(model, tokenizer, Preprocessing(image_size=size))


def _pairs_file(folder, count: int, shape):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    for k in range(count):
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{k}.jpg", quality=90)
        words = rng.choice(WORDS, size=int(rng.integers(3, 9)))
        rows.append({"image": f"images/{k}.jpg", "text": " ".join(words)})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bench(name: str, tmp_path, benchmark):
    from rexfast.data.pairs import read_pairs
    from rexfast.engine.batch_predict import predict_pairs, run_arguments

    spec = SPECS[name]
    seg = _segmenter(spec["preset"], spec["input"], tmp_path)
    pairs = read_pairs(_pairs_file(tmp_path, spec["pairs"], spec["image"]))
    args = run_arguments(name, pairs, mask_threshold=0.5, no_target_threshold=0.5, precision="fp32")
    workers = min(2, os.cpu_count() or 1)
    runs = iter(range(10**6))
    masks: dict = {}

    def loop():
        out = []
        for pair in pairs:
            result = seg(pair.image, pair.text)
            out.append(result.rle()["counts"])
        masks["loop"] = out

    def batched(b):
        def fn():
            out = tmp_path / f"out-{b}-{next(runs)}"
            predict_pairs(pairs, out, lambda device: seg, args, batch_size=b, workers=workers, progress=False,
                          device="cpu")
            lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
            masks[f"batch_{b}"] = [r["segmentation"]["counts"] if not r["no_target"] else None for r in lines]
        return fn

    fns = {"loop": loop, **{f"batch_{b}": batched(b) for b in BATCHES}}
    for variant, fn in fns.items():  # warm-up
        fn()
    times = {v: [] for v in fns}
    peaks = {v: 0.0 for v in fns}
    loads = []
    for _ in range(ROUNDS):
        for variant, fn in fns.items():
            with PeakRSS() as peak:
                started = time.perf_counter()
                fn()
                times[variant].append((time.perf_counter() - started) * 1e3)
            peaks[variant] = max(peaks[variant], peak.mib)
            print(f"[{name}] {variant}: {len(pairs) / times[variant][-1] * 1e3:.2f} pairs/s", flush=True)
        loads.append(os.getloadavg()[0])
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    loop_ms = float(Timing(times["loop"]))
    # the loop's masks are what each pair gives alone; a "no target" pair's shown mask is empty (None above)
    reference = masks["loop"]
    for variant in fns:
        timing = Timing(times[variant])
        got = masks[variant]
        same = sum(g is None or g == r for g, r in zip(got, reference))
        record(SUITE, {"device_type": "cpu", "model": name, "input": spec["input"],
                       "image_hw": list(spec["image"]), "pairs": len(pairs), "variant": variant,
                       "batch": None if variant == "loop" else int(variant.split("_")[1]),
                       "workers": None if variant == "loop" else workers,
                       "pairs_per_s": len(pairs) / float(timing) * 1e3, **timing.fields("round"),
                       "speedup_vs_loop": loop_ms / float(timing), "peak_rss_MiB": peaks[variant],
                       "worker_peak_rss_MiB": None if variant == "loop" else worker_peak,
                       "pairs_with_the_loops_mask": same, "torch_threads": torch.get_num_threads(),
                       "loadavg_1min_per_round": loads})
    benchmark.extra_info.update({v: len(pairs) / float(Timing(t)) * 1e3 for v, t in times.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_batch_predict_demo_preset(benchmark, tmp_path):
    _bench("rela_demo", tmp_path, benchmark)


@pytest.mark.slow
def test_batch_predict_rela_r50_480(benchmark, tmp_path):
    _bench("rela_r50", tmp_path, benchmark)
