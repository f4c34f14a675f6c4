"""The ops' ONNX functions (rexfast/export/onnx_functions.py) against their PyTorch decompositions,
run by onnxruntime as the export emits them: one ``rexfast::<op>`` node with its model-local
function (hybrid) and the same function inlined (decomposed), both through the export's own
finishing step (``finalize``: functions, inlining, optimiser, checker, strict shape inference).

group_assign must make the decomposition's decisions exactly (winners, NaN columns, counts:
ties, zero vectors, non-finite inputs); ms_deform_attn, RIA and RLA must match in NaN
positions and within fp32 rounding; RIA's masks are read back through probe inputs."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))

import group_assign_cases as ga_cases  # noqa: E402
import ms_deform_attn_cases as msda_cases  # noqa: E402
import region_attention_cases as ra_cases  # noqa: E402
from rexfast.export.onnx_export import finalize  # noqa: E402
from rexfast.export.tensorrt_rules import check_tensorrt_compatibility  # noqa: E402
from rexfast.ops.group_assign.decomposition import group_assign_decomposition  # noqa: E402
from rexfast.ops.ms_deform_attn.decomposition import ms_deform_attn_decomposition  # noqa: E402
from rexfast.ops.region_attention.region_image_attention.decomposition import region_image_attention_decomposition  # noqa: E402
from rexfast.ops.region_attention.region_language_attention.decomposition import region_language_attention_decomposition  # noqa: E402

MODES = ("hybrid", "decomposed")
FLOAT, INT64, BOOL = 1, 7, 9


def op_model(op: str, inputs, out_ranks, mode: str, **attrs):
    """A one-node model: ``rexfast::<op>`` on inputs [(name, elem_type, rank)] with outputs of the given
    ranks (an int: a FLOAT output; a (rank, elem_type) pair otherwise), finished as the export does."""
    import onnx_ir as ir
    from onnx import helper

    values = [helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])
              for name, elem, rank in inputs]
    outs = [f"out{i}" for i in range(len(out_ranks))]
    node = helper.make_node(op, [name for name, _, _ in inputs], outs, domain="rexfast", plugin_namespace="rexfast",
                            plugin_version="1", **attrs)
    out_types = [r if isinstance(r, tuple) else (r, FLOAT) for r in out_ranks]
    graph = helper.make_graph([node], op, values, [helper.make_tensor_value_info(o, elem, [f"{o}_{i}" for i in range(r)])
                                                   for o, (r, elem) in zip(outs, out_types)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rexfast", 1)])
    return finalize(ir.serde.deserialize_model(model), mode, 18)


@functools.lru_cache(maxsize=None)
def session(op: str, inputs: tuple, out_ranks: tuple, mode: str, attrs: tuple = ()):
    proto = op_model(op, inputs, out_ranks, mode, **dict(attrs))
    assert check_tensorrt_compatibility(proto) == []
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess, *arrays):
    feed = {i.name: a.detach().numpy() for i, a in zip(sess.get_inputs(), arrays)}
    return [torch.from_numpy(x) for x in sess.run(None, feed)]


def assert_close_nan(got, want, tol=1e-5, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{what}: inf differs"
    finite = torch.isfinite(want)
    if finite.any():
        err = (got[finite].double() - want[finite].double()).norm() / want[finite].double().norm().clamp_min(1e-30)
        assert err <= tol, f"{what}: relative error {err:.3g}"


def assert_identical(got, want, what=""):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{what} differs")


# ----------------------------------------------------------------------------- group_assign
GA_INPUTS = (("q", FLOAT, 3), ("k", FLOAT, 3), ("v", FLOAT, 3), ("tau", FLOAT, 1))
GA_EDGE = ["ties", "ties_gemm_path", "zero_rows", "zero_rows_gemm_path", "nan_q", "inf_q", "nan_k", "inf_k", "nan_v",
           "inf_v"]


def _check_group_assign(case, mode):
    q, k, v, tau = case.args
    tau = tau.reshape(1).float()
    out, assign, counts = run(session("group_assign", GA_INPUTS, (3, 3, 2), mode), q, k, v, tau)
    want_out, want_assign, want_counts = group_assign_decomposition(q, k, v, tau)
    assert_identical(assign, want_assign, "assign")
    assert_identical(counts, want_counts, "counts")
    assert_close_nan(out, want_out, what="out")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ga_cases.PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_assign_function_equals_the_decomposition(mode, shape):
    _check_group_assign(ga_cases.make_case(shape, noise="none", seed=11), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", GA_EDGE)
def test_group_assign_function_edge_cases(mode, name):
    _check_group_assign(ga_cases.EDGE_CASES[name](torch.float32, "cpu"), mode)


# ----------------------------------------------------------------------------- ms_deform_attn
MSDA_INPUTS = (("value", FLOAT, 4), ("spatial_shapes", INT64, 2), ("level_start_index", INT64, 1),
               ("sampling_locations", FLOAT, 6), ("attention_weights", FLOAT, 5))
MSDA_EDGE = [n for n in msda_cases.EDGE_CASES if not n.startswith("empty")]


def _check_msda(case, mode):
    args = [a.contiguous() for a in case.args]
    (got,) = run(session("ms_deform_attn", MSDA_INPUTS, (3,), mode), *args)
    assert_close_nan(got, ms_deform_attn_decomposition(*args), what="ms_deform_attn")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", msda_cases.PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ms_deform_attn_function_equals_the_decomposition(mode, shape):
    _check_msda(msda_cases.make_case(shape, seed=5), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MSDA_EDGE)
def test_ms_deform_attn_function_edge_cases(mode, name):
    _check_msda(msda_cases.EDGE_CASES[name](torch.float32, "cpu"), mode)


# ----------------------------------------------------------------------------- RIA
RIA_INPUTS = (("q", FLOAT, 4), ("k", FLOAT, 4), ("v", FLOAT, 4), ("region_logits", FLOAT, 4))


def _ria_session(key_size, scale, mode):
    return session("region_image_attention", RIA_INPUTS, (4, 3, (2, BOOL)), mode,
                   (("kh", key_size[0]), ("kw", key_size[1]), ("scale", float(scale))))


def _check_ria(case, mode):
    q, k, v, logits, key_size = case.args
    scale = case.kwargs.get("scale", q.shape[-1] ** -0.5)
    out, lse, open_rows = run(_ria_session(key_size, scale, mode), q.contiguous(), k.contiguous(), v.contiguous(),
                              logits)
    want_out, want_lse, want_open = region_image_attention_decomposition(q, k, v, logits, *key_size, scale)
    assert_close_nan(out, want_out, what="out")
    assert_close_nan(lse, want_lse, what="lse")
    assert torch.equal(open_rows, want_open), "open_rows"


RIA_NON_EMPTY = [n for n in ra_cases.RIA_EDGE_CASES if not n.startswith("empty")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ra_cases.RIA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_image_attention_function_equals_the_decomposition(mode, shape):
    _check_ria(ra_cases.ria_case(shape, seed=3), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in RIA_NON_EMPTY if "logits" not in n and "near_zero" not in n])
def test_region_image_attention_function_edge_cases(mode, name):
    _check_ria(ra_cases.RIA_EDGE_CASES[name](torch.float32, "cpu"), mode)


def _ria_masks(logits, key_size, mode):
    q, k, v = ra_cases.decision_probe(logits, key_size)
    out = run(_ria_session(key_size, 1.0, mode), q, k, v, logits)[0]
    want = region_image_attention_decomposition(q, k, v, logits, *key_size, 1.0)[0]
    return out > 0, want > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ra_cases.RIA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_image_attention_function_makes_the_same_masks(mode, shape):
    logits, key_size = ra_cases.ria_case(shape, seed=4).args[3:5]
    got, want = _ria_masks(logits, key_size, mode)
    assert_identical(got, want, "mask")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in RIA_NON_EMPTY if n.startswith("near_zero") or n == "all_blocked_rows"])
def test_region_image_attention_function_masks_at_the_decision_threshold(mode, name):
    logits, key_size = ra_cases.RIA_EDGE_CASES[name](torch.float32, "cpu").args[3:5]
    got, want = _ria_masks(logits, key_size, mode)
    assert_identical(got, want, "mask")


# ----------------------------------------------------------------------------- RLA
RLA_INPUTS = (("q", FLOAT, 4), ("k", FLOAT, 4), ("v", FLOAT, 4))
RLA_MASKED_INPUTS = RLA_INPUTS + (("key_padding_mask", BOOL, 2),)


def _check_rla(case, mode):
    q, k, v, kpm = (a.contiguous() if a is not None else None for a in case.args)
    scale = case.kwargs.get("scale", q.shape[-1] ** -0.5)
    if kpm is None:
        out, lse = run(session("region_language_attention", RLA_INPUTS, (4, 3), mode, (("scale", float(scale)),)), q, k, v)
    else:
        sess = session("region_language_attention_masked", RLA_MASKED_INPUTS, (4, 3), mode, (("scale", float(scale)),))
        out, lse = run(sess, q, k, v, kpm)
    want_out, want_lse = region_language_attention_decomposition(q, k, v, kpm, scale)
    assert_close_nan(out, want_out, what="out")
    assert_close_nan(lse, want_lse, what="lse")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", ["none", "padded", "with_empty", "scattered"])
@pytest.mark.parametrize("shape", ra_cases.RLA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_language_attention_function_equals_the_decomposition(mode, mask, shape):
    _check_rla(ra_cases.rla_case(shape, seed=2, mask=mask), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in ra_cases.RLA_EDGE_CASES if not n.startswith("empty")])
def test_region_language_attention_function_edge_cases(mode, name):
    _check_rla(ra_cases.RLA_EDGE_CASES[name](torch.float32, "cpu"), mode)


def test_every_function_carries_the_plugin_attributes_and_one_overload():
    from rexfast.export import onnx_functions

    names = set()
    for proto in onnx_functions.function_protos():
        assert proto.domain == "rexfast"
        assert {"plugin_namespace", "plugin_version"} <= {a.name for a in proto.attribute_proto}
        names.add(proto.name)
    assert names == {"group_assign", "ms_deform_attn", "region_image_attention", "region_language_attention",
                     "region_language_attention_masked"}


def _float32_range(start_bits: int, stop_bits: int) -> torch.Tensor:
    bits = torch.arange(start_bits, stop_bits, dtype=torch.int64)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def test_the_ria_threshold_is_pytorchs_float32_sigmoid_test():
    # The function decides sigmoid(x) < 0.5 as x <= SIGMOID_BELOW_HALF: the same set of x in
    # PyTorch's float32 sigmoid (vectorised and scalar-tail paths) around the threshold.
    from rexfast.export.onnx_functions import SIGMOID_BELOW_HALF

    threshold = torch.tensor(SIGMOID_BELOW_HALF, dtype=torch.float32)
    assert threshold.item() == SIGMOID_BELOW_HALF  # exactly representable
    assert torch.sigmoid(threshold) < 0.5 and torch.sigmoid(torch.nextafter(threshold, torch.tensor(0.0))) == 0.5
    bits = threshold.view(torch.int32).item() & 0xFFFFFFFF
    window = _float32_range(bits - 2**21, bits + 2**21)
    assert torch.equal(torch.sigmoid(window) < 0.5, window <= threshold)
    for n in range(1, 40):  # short tensors take the scalar path
        x = _float32_range(bits - n, bits + n)
        assert torch.equal(torch.sigmoid(x) < 0.5, x <= threshold), n
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e-45, -90.0, 90.0])
    assert torch.equal(torch.sigmoid(special) < 0.5, special <= threshold)


@pytest.mark.slow
def test_the_ria_threshold_holds_for_every_float32_between_minus_1e3_and_0():
    from rexfast.export.onnx_functions import SIGMOID_BELOW_HALF

    threshold = torch.tensor(SIGMOID_BELOW_HALF, dtype=torch.float32)
    stop = torch.tensor(-1e-3).view(torch.int32).item() & 0xFFFFFFFF
    for start in range(0x80000000, stop, 2**24):  # -0.0 … -1e-3 in bit order
        x = _float32_range(start, min(start + 2**24, stop))
        assert torch.equal(torch.sigmoid(x) < 0.5, x <= threshold), hex(start)
    x = -torch.logspace(-3, 38, 100_000)  # below -1e-3 the sigmoid is far below 0.5
    assert (torch.sigmoid(x) < 0.5).all()
