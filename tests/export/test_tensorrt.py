"""The TensorRT side without TensorRT (it cannot be installed on these machines): the plugins'
shape and type rules and implementation bodies on CPU (reference and C++ backends) against the
ops and the ONNX nodes they stand for; the quickly-deployable-plugin glue run against a stand-in
for ``tensorrt.plugin``; the torch-TensorRT lowering registration applied to the tiny models.
Engine builds run only where ``tensorrt`` imports and CUDA is present."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))

import group_assign_cases as ga_cases  # noqa: E402
import ms_deform_attn_cases as msda_cases  # noqa: E402
import region_attention_cases as ra_cases  # noqa: E402
from conftest import IMAGE, tiny_model  # noqa: E402
from harness import require_backend  # noqa: E402
from rexfast.tensorrt.plugin_specs import SPECS  # noqa: E402


def _cases(op: str):
    """(inputs, attributes) for a few shapes of each plugin op."""
    if op == "group_assign":
        for shape in ga_cases.PARITY_SHAPES[:4]:
            q, k, v, tau = ga_cases.make_case(shape, noise="none", seed=1).args
            yield (q, k, v, tau.reshape(1)), {}
    elif op == "region_image_attention":
        for shape in ra_cases.RIA_SHAPES[:4]:
            q, k, v, logits, (kh, kw) = ra_cases.ria_case(shape, seed=2).args
            yield (q, k, v, logits), {"kh": kh, "kw": kw, "scale": q.shape[-1] ** -0.5}
    else:
        for shape in msda_cases.PARITY_SHAPES[:4]:
            yield msda_cases.make_case(shape, seed=3).args, {}


def _reference(op, inputs, attributes):
    """The public op on the reference backend (what the plugin must compute)."""
    from rexfast.ops import group_assign, ms_deform_attn, region_image_attention

    if op == "group_assign":
        return group_assign(*inputs[:3], inputs[3], backend="reference")
    if op == "region_image_attention":
        q, k, v, logits = inputs
        return (region_image_attention(q, k, v, logits, (attributes["kh"], attributes["kw"]),
                                       scale=attributes["scale"], backend="reference"),)
    return (ms_deform_attn(*inputs, backend="reference"),)


@pytest.mark.parametrize("op", list(SPECS))
def test_each_plugin_matches_its_onnx_node_input_for_input(op):
    from rexfast.export.onnx_functions import function_protos

    proto = next(p for p in function_protos() if p.name == op)
    spec = SPECS[op]
    assert spec.name == f"{proto.domain}::{proto.name}"
    assert tuple(proto.input) == spec.inputs
    assert tuple(proto.attribute) == spec.attributes  # plugin_namespace/_version are the parser's
    assert len(proto.output) == len(spec.outputs)
    assert len([t for t in spec.type_combination.split(",")]) == len(spec.inputs) + len(spec.outputs)


class Sym:
    """A stand-in for TensorRT's symbolic ShapeExpr: only indexing and products are allowed."""

    def __init__(self, text):
        self.text = text

    def __mul__(self, other):
        return Sym(f"({self.text}*{other.text})")

    def __eq__(self, other):
        return isinstance(other, Sym) and other.text == self.text

    def __repr__(self):
        return self.text


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("op", list(SPECS))
def test_plugin_bodies_compute_the_op_and_their_shape_and_type_rules_hold(op, backend):
    from rexfast.ops import registry

    spec = SPECS[op]
    backends = registry.OPS[op]
    if backend not in backends.names:
        pytest.skip(f"{op} has no {backend} backend on this branch")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    require_backend(types.SimpleNamespace(name=op, backends=backends), backend, "cpu")
    for inputs, attributes in _cases(op):
        outputs = spec.run(*inputs, backend=backend, **attributes)
        assert len(outputs) == len(spec.outputs)
        shapes = spec.output_shapes(*[tuple(t.shape) for t in inputs], **attributes)
        assert [tuple(o.shape) for o in outputs] == [tuple(s) for s in shapes]
        assert [o.dtype for o in outputs] == list(spec.output_dtypes([t.dtype for t in inputs], torch.float32, torch.bool))
        symbolic = spec.output_shapes(*[tuple(Sym(f"{name}{i}") for i in range(t.dim()))
                                        for name, t in zip(spec.inputs, inputs)], **attributes)
        assert all(isinstance(d, Sym) for s in symbolic for d in s)
        for got, want in zip(outputs, _reference(op, inputs, attributes)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    tokens = [t.strip() for t in spec.type_combination.split(",")]
    kinds = {torch.float32: "FP32", torch.int64: "INT64", torch.bool: "BOOL"}
    assert tokens[:len(spec.inputs)] == [kinds[t.dtype] for t in inputs]
    assert tokens[len(spec.inputs):] == [kinds[o.dtype] for o in outputs]


# ----------------------------------------------------------------------------- the QDP glue
class _Desc:
    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = tuple(shape), dtype


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """``tensorrt`` and ``tensorrt.plugin`` stand-ins recording what rexfast registers."""
    registered: dict = {}

    def decorator(kind):
        def named(name):
            def wrap(fn):
                registered.setdefault(name, {})[kind] = fn
                return fn
            return wrap
        return named

    trtp = types.ModuleType("tensorrt.plugin")
    trtp.register, trtp.impl, trtp.autotune = decorator("register"), decorator("impl"), decorator("autotune")
    trtp.TensorDesc, trtp.Tensor = _Desc, torch.Tensor
    trtp.from_shape_expr = lambda shape, dtype: _Desc(shape, dtype)
    trtp.AutoTuneCombination = lambda types_, layout: (types_, layout)
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.bool, trt.plugin = "trt.float32", "trt.bool", trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, "rexfast.tensorrt.plugins", raising=False)
    module = importlib.import_module("rexfast.tensorrt.plugins")
    monkeypatch.setattr(module, "_as_torch", lambda t: t)  # CPU tensors stand in for TensorRT's
    monkeypatch.setattr(module, "_stream", lambda stream: contextlib.nullcontext())
    yield registered
    sys.modules.pop("rexfast.tensorrt.plugins", None)


def test_the_plugin_glue_registers_describes_and_runs_each_op(fake_tensorrt):
    from rexfast.tensorrt import PLUGIN_OPS, register_plugins

    assert set(fake_tensorrt) == {f"rexfast::{op}" for op in PLUGIN_OPS}
    assert register_plugins() == tuple(f"rexfast::{op}" for op in PLUGIN_OPS)
    for op, spec in SPECS.items():
        entry = fake_tensorrt[spec.name]
        assert set(entry) == {"register", "impl", "autotune"}
        inputs, attributes = next(_cases(op))
        descs = entry["register"](*[_Desc(t.shape, "in") for t in inputs], **attributes)
        descs = descs if isinstance(descs, tuple) else (descs,)
        want = spec.output_shapes(*[tuple(t.shape) for t in inputs], **attributes)
        assert [d.shape_expr for d in descs] == [tuple(s) for s in want]
        assert descs[-1].dtype == {"group_assign": "trt.float32", "region_image_attention": "trt.bool"}.get(op, "in")
        assert entry["autotune"](*[None] * len(inputs), *attributes.values(), None) == [(spec.type_combination,
                                                                                          "LINEAR")]
        expected = spec.run(*inputs, **attributes)
        outputs = tuple(torch.full_like(e, float("nan")) for e in expected)
        entry["impl"](*inputs, *attributes.values(), outputs, 0)
        for got, e in zip(outputs, expected):
            torch.testing.assert_close(got, e, rtol=0, atol=0, equal_nan=True)


def test_without_tensorrt_registration_says_why():
    from rexfast.tensorrt import register_plugins, tensorrt_error

    if tensorrt_error() is None:
        pytest.skip("tensorrt imports here")
    with pytest.raises(ImportError, match="tensorrt"):
        register_plugins()


# ----------------------------------------------------------------------------- torch-TensorRT lowering
def test_the_torch_tensorrt_registration_hands_over_every_inference_decomposition():
    """The glue to torch_tensorrt's decomposition table; that this table lowers every rexfast op
    and keeps the values is tests/ops/test_decompositions.py's (each op), and the whole models'
    lowering below (slow: a torch.export of each tiny model)."""
    from torch._decomp import register_decomposition

    from rexfast.ops.decompositions import INFERENCE_DECOMPOSITIONS
    from rexfast.tensorrt.torch_trt import register_torch_tensorrt_decompositions

    table: dict = {}
    assert register_torch_tensorrt_decompositions(register_decomposition, table) == INFERENCE_DECOMPOSITIONS
    assert set(table) == set(INFERENCE_DECOMPOSITIONS)
    assert all(callable(fn) for fn in table.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cgformer", "rela"])
def test_the_torch_tensorrt_lowering_removes_every_rexfast_op_from_the_models(name):
    from torch._decomp import register_decomposition

    from rexfast.export import example_inputs
    from rexfast.ops.decompositions import INFERENCE_DECOMPOSITIONS
    from rexfast.tensorrt.torch_trt import register_torch_tensorrt_decompositions

    table: dict = {}
    assert register_torch_tensorrt_decompositions(register_decomposition, table) == INFERENCE_DECOMPOSITIONS
    assert set(table) == set(INFERENCE_DECOMPOSITIONS)
    model = tiny_model(name)
    args = example_inputs(model, (IMAGE, IMAGE))

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images, ids, mask):
            return tuple(self.model.inference_outputs(images, ids, mask).values())

    with torch.no_grad():
        ep = torch.export.export(Outputs().eval(), args).run_decompositions(table)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not [t for t in targets if "rexfast" in t]
        for got, want in zip(ep.module()(*args), Outputs()(*args)):
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())


def test_the_torch_tensorrt_lowering_needs_torch_tensorrt():
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt imports here")
    except ImportError:
        pass
    from rexfast.tensorrt.torch_trt import register_torch_tensorrt_decompositions

    with pytest.raises(ImportError, match="torch_tensorrt"):
        register_torch_tensorrt_decompositions()


# ----------------------------------------------------------------------------- engines
def test_profile_shapes():
    from rexfast.tensorrt.engine import profile_shapes

    shapes = profile_shapes(480, batch=(1, 4, 8), text=(2, 20, 40))
    assert shapes["images"] == ((1, 3, 480, 480), (4, 3, 480, 480), (8, 3, 480, 480))
    assert shapes["input_ids"] == shapes["attention_mask"] == ((1, 2), (4, 20), (8, 40))
    assert profile_shapes((320, 480))["images"][0] == (1, 3, 320, 480)
    with pytest.raises(ValueError, match="text"):
        profile_shapes(480, text=(1, 20, 40))
    with pytest.raises(ValueError, match="batch"):
        profile_shapes(480, batch=(4, 2, 8))
    with pytest.raises(ValueError, match="multiple of 32"):
        profile_shapes(100)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decomposed", "hybrid"])
@pytest.mark.parametrize("name", ["cgformer", "rela"])
def test_tensorrt_engine_equals_pytorch(exported, tmp_path, name, mode):
    pytest.importorskip("tensorrt")
    from rexfast.export import example_inputs
    from rexfast.tensorrt.engine import build_engine, run_engine

    model, result, _ = exported(name, mode)
    engine = build_engine(result.path, tmp_path / "model.plan", image_size=IMAGE, batch=(1, 2, 4), text=(2, 20, 40))
    model = model.cuda()
    for batch, length in [(2, 20), (1, 7), (4, 33)]:
        args = [a.cuda() for a in example_inputs(model, (IMAGE, IMAGE), batch=batch, text_length=length)]
        with torch.no_grad():
            want = model.inference_outputs(*args)
        got = run_engine(engine, *args)
        for key, ref in want.items():
            assert (got[key] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max()), key
    model.cpu()
