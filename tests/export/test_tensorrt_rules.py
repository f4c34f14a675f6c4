"""The TensorRT 10 rule check (rexfast/export/tensorrt_rules.py) on hand-made graphs: every rule
catches what it is for, and a clean graph passes. (The exported models are checked in
test_onnx_export.py.)"""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402

from rexfast.export.tensorrt_rules import check_tensorrt_compatibility, load_support_matrix  # noqa: E402


def model(nodes, inputs, outputs, *, opset=18, inits=(), functions=(), extra_opsets=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [h.make_opsetid("", opset), *[h.make_opsetid(d, v) for d, v in extra_opsets]]
    return h.make_model(graph, opset_imports=opsets, functions=list(functions))


X = h.make_tensor_value_info("x", T.FLOAT, [2, 3])
Y = h.make_tensor_value_info("y", T.FLOAT, None)


def test_the_vendored_matrix_parses():
    rows = load_support_matrix()
    assert len(rows) == 196
    assert rows["ReduceSum"].supported and rows["ReduceSum"].restrictions == "`axes` must be an initializer"
    assert rows["ReduceSum"].types == {"FP32", "FP16", "BF16", "INT32", "INT64"}
    assert not rows["Unique"].supported and not rows["AffineGrid"].supported
    assert rows["ConstantOfShape"].types >= {"INT64"}  # the table's "INF64" typo read as INT64
    assert rows["GridSample"].restrictions == "Input must be 4D input."  # a row without the closing pipe
    assert "" not in rows["Selu"].types  # a row with a trailing comma


def test_a_clean_graph_passes():
    axes = h.make_tensor("axes", T.INT64, [1], [1])
    m = model([h.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1), h.make_node("Relu", ["s"], ["y"])],
              [X], [Y], inits=[axes])
    assert check_tensorrt_compatibility(m) == []


BAD = {
    "Equal on BOOL": (model([h.make_node("Equal", ["b", "b"], ["y"])],
                            [h.make_tensor_value_info("b", T.BOOL, [2])],
                            [h.make_tensor_value_info("y", T.BOOL, None)]), "input 'b' is BOOL"),
    "run-time reduction axes": (model([h.make_node("ReduceSum", ["x", "ax"], ["y"])],
                                      [X, h.make_tensor_value_info("ax", T.INT64, [1])], [Y]),
                                "axes must be an initializer"),
    "run-time Unsqueeze axes": (model([h.make_node("Unsqueeze", ["x", "ax"], ["y"])],
                                      [X, h.make_tensor_value_info("ax", T.INT64, [1])], [Y]),
                                "axes must be an initializer"),
    "OneHot": (model([h.make_node("OneHot", ["i", "d", "vals"], ["y"])], [h.make_tensor_value_info("i", T.INT64, [3])],
                     [Y], inits=[h.make_tensor("d", T.INT64, [], [4]), h.make_tensor("vals", T.FLOAT, [2], [0, 1])]),
               "OneHot"),
    "Einsum with an ellipsis": (model([h.make_node("Einsum", ["x", "x"], ["y"], equation="...i,...i->...")], [X],
                                      [Y]), "ellipsis"),
    "Einsum diagonal": (model([h.make_node("Einsum", ["q"], ["y"], equation="ii->i")],
                              [h.make_tensor_value_info("q", T.FLOAT, [3, 3])], [Y]), "diagonal"),
    "cubic Resize": (model([h.make_node("Resize", ["x4", "", "sc"], ["y"], mode="cubic")],
                           [h.make_tensor_value_info("x4", T.FLOAT, [1, 1, 2, 3])], [Y],
                           inits=[h.make_tensor("sc", T.FLOAT, [4], [1, 1, 2, 2])]), "mode 'cubic'"),
    "antialiased Resize": (model([h.make_node("Resize", ["x4", "", "sc"], ["y"], mode="linear", antialias=1)],
                                 [h.make_tensor_value_info("x4", T.FLOAT, [1, 1, 2, 3])], [Y],
                                 inits=[h.make_tensor("sc", T.FLOAT, [4], [1, 1, 0.5, 0.5])]), "antialias"),
    "DOUBLE": (model([h.make_node("Cast", ["x"], ["y"], to=T.DOUBLE)], [X],
                     [h.make_tensor_value_info("y", T.DOUBLE, None)]), "DOUBLE"),
    "unsupported operator": (model([h.make_node("Unique", ["x"], ["y"])], [X], [Y]), "not supported"),
    "opset 21": (model([h.make_node("Relu", ["x"], ["y"])], [X], [Y], opset=21), "opset 21"),
    "LayerNormalization Mean used": (
        model([h.make_node("LayerNormalization", ["x", "g", "b"], ["ln", "mean"]), h.make_node("Add", ["ln", "mean"],
                                                                                             ["y"])],
              [X], [Y], inits=[h.make_tensor("g", T.FLOAT, [3], [1, 1, 1]), h.make_tensor("b", T.FLOAT, [3], [0, 0, 0])]),
        "only output Y"),
    "unchecked restriction (If)": (
        model([h.make_node("If", ["c"], ["y"],
                           then_branch=h.make_graph([h.make_node("Identity", ["x"], ["t"])], "t", [],
                                                    [h.make_tensor_value_info("t", T.FLOAT, [2, 3])]),
                           else_branch=h.make_graph([h.make_node("Identity", ["x"], ["e"])], "e", [],
                                                    [h.make_tensor_value_info("e", T.FLOAT, [2, 3])]))],
              [X, h.make_tensor_value_info("c", T.BOOL, [])], [Y]), "restriction not checked"),
    "TopK unsorted": (model([h.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)], [X],
                            [Y, h.make_tensor_value_info("i", T.INT64, None)], inits=[h.make_tensor("k", T.INT64, [1], [2])]),
                      "sorted must be 1"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_each_rule_catches_its_case(what):
    m, expected = BAD[what]
    problems = check_tensorrt_compatibility(m)
    assert any(expected in p for p in problems), problems


def _function(name="group_assign", domain="rexfast"):
    return h.make_function(domain, name, ["a"], ["b"], [h.make_node("Relu", ["a"], ["b"])],
                           [h.make_opsetid("", 18)], attributes=["plugin_namespace", "plugin_version"])


def _custom(domain="rexfast", **attrs):
    return model([h.make_node("group_assign", ["x"], ["y"], domain=domain, **attrs)], [X], [Y],
                 extra_opsets=[(domain, 1)], functions=[_function(domain=domain)])


def test_plugin_nodes_need_their_attributes_and_function():
    assert check_tensorrt_compatibility(_custom(plugin_namespace="rexfast", plugin_version="1")) == []
    assert any("plugin_namespace" in p for p in check_tensorrt_compatibility(_custom(plugin_version="1")))
    assert any("plugin_version" in p for p in check_tensorrt_compatibility(_custom(plugin_namespace="rexfast")))
    no_function = model([h.make_node("group_assign", ["x"], ["y"], domain="rexfast", plugin_namespace="rexfast",
                                     plugin_version="1")], [X], [Y], extra_opsets=[("rexfast", 1)])
    assert any("no model-local function" in p for p in check_tensorrt_compatibility(no_function))
    assert any("custom domain" in p for p in check_tensorrt_compatibility(
        _custom(domain="acme", plugin_namespace="rexfast", plugin_version="1")))


def test_a_plugin_functions_body_is_checked_as_the_graph_tensorrt_builds():
    body = h.make_function("rexfast", "group_assign", ["a"], ["b"], [h.make_node("Unique", ["a"], ["b"])],
                           [h.make_opsetid("", 18)])
    m = model([h.make_node("group_assign", ["x"], ["y"], domain="rexfast", plugin_namespace="rexfast",
                           plugin_version="1")], [X], [Y], extra_opsets=[("rexfast", 1)], functions=[body])
    assert any("Unique" in p and "not supported" in p for p in check_tensorrt_compatibility(m))
