"""export_onnx on the tiny CGFormer and ReLA, both modes: onnxruntime equals PyTorch at the traced
size and at other batch sizes and text lengths, the file passes onnx.checker's full check with
strict shape inference and TensorRT 10's operator rules, hybrid keeps one rexfast:: node per op
call with its function and plugin attributes, and bad arguments write nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import IMAGE, tiny_model

MODELS = ("cgformer", "rela")
MODES = ("decomposed", "hybrid")
# (batch, text length): the traced example, then other values of both dynamic axes
SHAPES = [(2, 20), (1, 20), (3, 7), (2, 33), (4, 12)]
TOLERANCE = 1e-5  # max |onnxruntime − torch| ≤ 1e-5 · max(1, max |torch|) per output


def _errors(model, data, batch, length, seed, sensitivity=False):
    """output -> (max |onnxruntime − torch|, max |torch|[, max change of torch's own output when
    every image value moves by one float32 ulp: the model's fp32 noise floor at these inputs])."""
    from rexfast.export import example_inputs, onnxruntime_outputs

    args = example_inputs(model, (IMAGE, IMAGE), batch=batch, text_length=length, seed=seed)
    with torch.no_grad():
        want = model.inference_outputs(*args)
        nudged = torch.nextafter(args[0], torch.full_like(args[0], float("inf")))
        moved = model.inference_outputs(nudged, *args[1:]) if sensitivity else want
    got = onnxruntime_outputs(data, args)
    out = {}
    for (name, ref), value in zip(want.items(), got):
        value = torch.from_numpy(value)
        assert value.shape == ref.shape, (name, value.shape, ref.shape)
        out[name] = (float((value - ref).abs().max()), float(ref.abs().max()),
                     float((moved[name] - ref).abs().max()))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_equals_pytorch_static_and_dynamic(exported, name, mode):
    model, result, data = exported(name, mode)
    for batch, length in SHAPES:
        for output, (err, scale, _) in _errors(model, data, batch, length, seed=batch * 100 + length).items():
            print(f"{name} {mode} B={batch} L={length} {output}: max|Δ| {err:.3g} (max|torch| {scale:.3g})")
            assert err <= TOLERANCE * max(1.0, scale), (name, mode, batch, length, output, err, scale)
    assert set(result.max_abs_error) == set(result.output_names)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_the_shortest_text_differs_only_by_the_models_own_float32_noise(exported, name, mode):
    # L = 2 ([CLS] [SEP]): two words for every pixel to attend to, so the PWAM output barely
    # varies over the map and its instance norm amplifies rounding; a one-ulp change of the
    # images moves PyTorch's own output about as much as onnxruntime's differs (tiny ReLA:
    # both ~3e-4 on logits of ~28). The bound: 1e-5 relative, or twice that noise floor.
    model, _, data = exported(name, mode)
    for output, (err, scale, floor) in _errors(model, data, 1, 2, seed=102, sensitivity=True).items():
        print(f"{name} {mode} B=1 L=2 {output}: max|Δ| {err:.3g} (max|torch| {scale:.3g}, 1-ulp noise {floor:.3g})")
        assert err <= max(TOLERANCE * max(1.0, scale), 2 * floor), (output, err, scale, floor)


@pytest.mark.parametrize("name", MODELS)
def test_the_two_modes_compute_the_same(exported, name):
    from rexfast.export import example_inputs, onnxruntime_outputs

    model = exported(name, "decomposed")[0]
    args = example_inputs(model, (IMAGE, IMAGE), batch=2, text_length=9, seed=5)
    a = onnxruntime_outputs(exported(name, "decomposed")[2], args)
    b = onnxruntime_outputs(exported(name, "hybrid")[2], args)
    for x, y in zip(a, b):
        assert abs(x - y).max() <= 1e-5 * max(1.0, abs(x).max())


EXPECTED_CALLS = {"cgformer": {"group_assign": 3},
                  "rela": {"ms_deform_attn": 2, "region_image_attention": 3, "region_language_attention": 1}}


@pytest.mark.parametrize("name", MODELS)
def test_hybrid_keeps_one_plugin_node_per_op_call_with_its_function(exported, name):
    import onnx

    proto = onnx.load_from_string(exported(name, "hybrid")[2])
    nodes = [n for n in proto.graph.node if n.domain == "rexfast"]
    calls = {}
    for node in nodes:
        calls[node.op_type] = calls.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"rexfast" and attrs["plugin_version"] == b"1"
    assert calls == EXPECTED_CALLS[name]
    assert {(f.domain, f.name) for f in proto.functions} == {("rexfast", op) for op in calls}
    assert {o.domain: o.version for o in proto.opset_import} == {"": 18, "rexfast": 1}


@pytest.mark.parametrize("name", MODELS)
def test_decomposed_is_standard_onnx(exported, name):
    import onnx

    proto = onnx.load_from_string(exported(name, "decomposed")[2])
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert not proto.functions and {o.domain for o in proto.opset_import} == {""}
    assert "OneHot" not in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_file_passes_the_full_checker_strict_shape_inference_and_tensorrt_rules(exported, name, mode):
    import onnx

    from rexfast.export import check_tensorrt_compatibility

    proto = onnx.load_from_string(exported(name, mode)[2])
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    assert check_tensorrt_compatibility(proto) == []


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_axes_and_names(exported, name):
    model, result, data = exported(name, "decomposed")
    assert result.input_names == ("images", "input_ids", "attention_mask")
    assert result.output_names == (("logits",) if name == "cgformer" else ("mask_logits", "nt_logits",
                                                                            "minimap_logits"))
    assert result.dynamic_axes["images"] == {0: "batch"}
    assert result.dynamic_axes["input_ids"] == result.dynamic_axes["attention_mask"] == {0: "batch", 1: "text_length"}
    assert all(result.dynamic_axes[o] == {0: "batch"} for o in result.output_names)
    assert result.image_size == (IMAGE, IMAGE) and result.bytes == len(data)


def test_one_file_holds_one_image_size(exported):
    # One engine per resolution: another image size is refused by the runtime, not silently wrong.
    from rexfast.export import example_inputs, onnxruntime_outputs

    model, _, data = exported("cgformer", "decomposed")
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        onnxruntime_outputs(data, example_inputs(model, (96, 96)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_export_leaves_the_model_as_it_was(exported, name, mode):
    exported(name, mode)  # exported from training mode (conftest)
    assert exported.untouched(name, mode), "export changed the model's mode or weights"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="fused"), ValueError, "unknown export mode"),
    (dict(image_size=100), ValueError, "multiple of 32"),
    (dict(image_size=(64, 0)), ValueError, "multiple of 32"),
    (dict(image_size="64"), TypeError, "image_size"),
    (dict(opset=17), ValueError, "opset"),
    (dict(opset=21), ValueError, "opset"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, error, match):
    from rexfast.export import export_onnx

    args = {"image_size": 64, **kwargs}
    with pytest.raises(error, match=match):
        export_onnx(tiny_model("cgformer"), tmp_path / "m.onnx", **args)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_folder_a_noisy_model_a_half_model_and_a_foreign_module(tmp_path):
    from rexfast.export import export_onnx
    from rexfast.models import CGFormer, CGFormerConfig

    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(tiny_model("cgformer"), tmp_path / "dir.onnx", image_size=64)
    with pytest.raises(ValueError, match="eval_noise"):
        export_onnx(CGFormer(CGFormerConfig.tiny(eval_noise=True)), tmp_path / "m.onnx", image_size=64)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_model("cgformer").half(), tmp_path / "m.onnx", image_size=64)
    with pytest.raises(TypeError, match="registered rexfast model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", image_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx"]


def test_window_attention_with_a_grad_requiring_bias_exports(tmp_path):
    # The SDPA view problem: torch.onnx.export(dynamo=True) of Swin window attention failed
    # with "Cannot view a tensor with shape [4, 16, 2, 16] ..." before merge_heads.
    from rexfast.export import onnxruntime_outputs  # noqa: F401  (the export extra is installed)
    from rexfast.models.backbones.swin import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(dim=32, window_size=4, num_heads=2).eval()
    assert attn.relative_position_bias_table.requires_grad
    x = torch.randn(4, 16, 32)
    program = torch.onnx.export(attn, (x, None), dynamo=True, verbose=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), attn(x, None).detach(), rtol=1e-5, atol=1e-6)
