"""Exported inference: onnxruntime (CPU execution provider) vs eager PyTorch, side by side.

The tiny CGFormer and ReLA (the test presets, 64², random weights), batch 1 and 4,
20-token sentences: the eager model (``torch.no_grad``, its default op backends: the C++
kernels on CPU) against onnxruntime running the ``decomposed`` and the ``hybrid`` file
(onnxruntime expands the hybrid file's functions, so the two should time alike). Both
runtimes use every core (torch's and onnxruntime's default thread counts). Each row
also records the largest |onnxruntime − torch| on the timed inputs.

Rows go to ``benchmarks/.results/export-cpu.json`` (see ``bench_utils``).
"""

from __future__ import annotations

import pytest
import torch

from bench_utils import median_ms, record

SUITE = "export"
IMAGE = 64


def _tiny(name: str):
    from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig

    torch.manual_seed(0)
    model = CGFormer(CGFormerConfig.tiny()) if name == "cgformer" else ReLA(ReLAConfig.tiny())
    return model.eval()


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["cgformer", "rela"])
def test_export_latency_cpu(benchmark, tmp_path, name):
    pytest.importorskip("onnxruntime")
    from rexfast.export import example_inputs, export_onnx

    model = _tiny(name)
    sessions = {}
    for mode in ("decomposed", "hybrid"):
        path = tmp_path / f"{name}-{mode}.onnx"
        export_onnx(model, path, image_size=IMAGE, mode=mode, verify=False)
        sessions[mode] = _session(path)
    for batch in (1, 4):
        args = example_inputs(model, (IMAGE, IMAGE), batch=batch, text_length=20, seed=batch)
        feed = {n: t.numpy() for n, t in zip(("images", "input_ids", "attention_mask"), args)}

        def eager():
            with torch.no_grad():
                return model.inference_outputs(*args)

        reference = eager()
        row = {"device_type": "cpu", "model": f"{name} tiny", "image": IMAGE, "batch": batch, "text_length": 20}
        row.update(median_ms(eager, "cpu", rounds=15, warmup=3).fields("torch_eager"))
        for mode, sess in sessions.items():
            timing = median_ms(lambda: sess.run(None, feed), "cpu", rounds=15, warmup=3)
            row.update(timing.fields(f"ort_{mode}"))
            row[f"ort_{mode}_speedup_vs_eager"] = row["torch_eager_ms"] / float(timing)
            got = sess.run(None, feed)
            row[f"ort_{mode}_max_abs_error"] = max(float((torch.from_numpy(g) - r).abs().max())
                                                   for g, r in zip(got, reference.values()))
        record(SUITE, row)
        benchmark.extra_info[f"batch{batch}"] = {k: v for k, v in row.items() if k.endswith("_ms")}
    benchmark.pedantic(lambda: sessions["decomposed"].run(None, feed), rounds=5, iterations=1, warmup_rounds=1)
