"""TensorRT 10's ONNX operator rules, checked on an ONNX model without TensorRT.

The rules are onnx-tensorrt's own support matrix, ``docs/operators.md`` of the
10.1-GA release, vendored unchanged beside this file: for every node of the graph
TensorRT would build,

* the operator is listed as supported ("Y") and the model's opset lies in 9-20;
* the node's operand types (the inputs bound to the operator's principal type
  constraint) are in the operator's "Supported Types" (so, e.g., no Equal on BOOL,
  no Softmax on INT64, no DOUBLE anywhere, UINT8 only at the graph's edges);
* the "Restrictions" column holds: reduction, Slice, Squeeze, Pad and CumSum axes
  and Unsqueeze axes are constants; Resize modes are ones TensorRT implements, no
  antialiasing; LayerNormalization uses only its first output; Constant holds no
  sparse or string value; TopK is sorted with a constant K < 3840; pooling is 2-D
  or 3-D without dilation and MaxPool without Indices; Dropout is not training;
  GridSample is 4-D; Hardmax's and EyeLike's shapes are static. An operator with a
  restriction this module does not check is reported, never passed silently;
* and rexfast's stricter rules: no OneHot (TensorRT needs a build-time depth), no
  Einsum with an ellipsis or a repeated index (TensorRT 8's rule; 10's parser
  lowers Einsum to matrix products only without them);
* ``rexfast::<op>`` nodes (``hybrid`` export) carry ``plugin_namespace="rexfast"``
  and ``plugin_version`` and have a model-local function of the same name; that
  function's body is checked as the graph TensorRT builds when no plugin is
  registered (the functions are inlined, then every rule above applies).

Types come from ONNX shape inference in strict mode (every value must get one).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Optional

SOURCE = ("onnx/onnx-tensorrt docs/operators.md, branch 10.1-GA, commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c "
          "(rexfast/export/onnx_tensorrt_operators.md)")
OPSET_RANGE = (9, 20)
PLUGIN_DOMAIN = "rexfast"
PLUGIN_NAMESPACE = "rexfast"
FORBIDDEN = {"OneHot": "rexfast does not emit OneHot: TensorRT needs its depth as a build-time constant"}

# ONNX TensorProto data types → the names operators.md uses
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4"}


@dataclass(frozen=True)
class OperatorSupport:
    op: str
    supported: bool
    types: frozenset
    restrictions: str


def load_support_matrix(text: Optional[str] = None) -> dict:
    """op name → :class:`OperatorSupport`, parsed from operators.md (the vendored copy by default)."""
    if text is None:
        text = resources.files(__package__).joinpath("onnx_tensorrt_operators.md").read_text(encoding="utf-8")
    rows, in_table = {}, False
    for line in text.splitlines():
        if line.startswith("## Operator Support Matrix"):
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells or cells[0] in ("Operator", "") or set(cells[0]) <= {"-"}:
            continue
        cells += [""] * (4 - len(cells))
        types = frozenset({"INT64" if t == "INF64" else t for t in (x.strip() for x in cells[2].split(",")) if t})
        rows[cells[0]] = OperatorSupport(cells[0], cells[1] == "Y", types, cells[3].strip())
    return rows


# ----------------------------------------------------------------------------- the graph's facts
class _Graph:
    """Producers, consumers, constants and types of one (inlined, shape-inferred) graph."""

    def __init__(self, model):
        import onnx

        self.model = model
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {}
        self.consumers: dict = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.graph_outputs = {v.name for v in graph.output}
        self.graph_inputs = {v.name for v in graph.input}
        self.types: dict = {}
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            self.types[t.name] = t.data_type
        self.shapes = {v.name: v.type.tensor_type.shape for v in list(graph.input) + list(graph.output)
                       + list(graph.value_info) if v.type.HasField("tensor_type")}
        self._onnx = onnx

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output: what TensorRT imports as weights."""
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def constant_value(self, name: str):
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_float"):
                    return self._onnx.helper.get_attribute_value(a)
                if a.name in ("value_ints", "value_floats"):
                    return list(self._onnx.helper.get_attribute_value(a))
        return None

    def rank(self, name: str) -> Optional[int]:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape.dim)

    def static(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and all(d.HasField("dim_value") for d in shape.dim)


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node, i) -> Optional[str]:
    return node.input[i] if len(node.input) > i and node.input[i] else None


# ----------------------------------------------------------------------------- restrictions
def _constant_input(i, what):
    def check(node, g):
        name = _input(node, i)
        if name is not None and not g.is_constant(name):
            return [f"{what} must be an initializer or a Constant (it is computed at run time)"]
        return []
    return check


def _resize(node, g):
    out = []
    modes = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
    if _attr(node, "coordinate_transformation_mode", "half_pixel") not in modes:
        out.append(f"coordinate_transformation_mode {_attr(node, 'coordinate_transformation_mode')!r} unsupported")
    if _attr(node, "mode", "nearest") not in ("nearest", "linear"):
        out.append(f"mode {_attr(node, 'mode')!r} unsupported (nearest, linear only)")
    if _attr(node, "nearest_mode", "round_prefer_floor") not in ("floor", "ceil", "round_prefer_floor",
                                                                 "round_prefer_ceil"):
        out.append(f"nearest_mode {_attr(node, 'nearest_mode')!r} unsupported")
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        out.append("keep_aspect_ratio_policy must be 'stretch'")
    if _attr(node, "antialias", 0):
        out.append("antialiasing is not supported")
    axes = _attr(node, "axes")
    scales = _input(node, 2)
    if scales is not None and not g.is_constant(scales) and axes is not None:
        rank = g.rank(node.input[0])
        if rank is None or list(axes) != list(range(rank)):
            out.append(f"with a tensor scales input, axes must be an iota of the input rank, got {list(axes)}")
    return out


def _layer_norm(node, g):
    used = [o for o in node.output[1:] if o and (g.consumers.get(o) or o in g.graph_outputs)]
    return [f"only output Y is supported, but {used} are used"] if used else []


def _constant(node, g):
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return [f"attribute {bad} unsupported"] if bad else []


def _topk(node, g):
    out = []
    if _attr(node, "sorted", 1) != 1:
        out.append("sorted must be 1")
    k = _input(node, 1)
    value = g.constant_value(k) if k else None
    if value is None:
        out.append("K must be a constant")
    elif int(value.reshape(-1)[0]) >= 3840:
        out.append(f"K must be below 3840, got {int(value.reshape(-1)[0])}")
    return out


def _pooling(with_indices_rule):
    def check(node, g):
        out = []
        kernel = _attr(node, "kernel_shape", [])
        if len(kernel) not in (2, 3):
            out.append(f"only 2-D or 3-D pooling, kernel_shape {list(kernel)}")
        dilations = _attr(node, "dilations")
        if dilations is not None and any(d != 1 for d in dilations):
            out.append(f"dilations must be empty or all ones, got {list(dilations)}")
        if with_indices_rule and len(node.output) > 1 and node.output[1]:
            out.append("the Indices output is unsupported")
        return out
    return check


def _dropout(node, g):
    training = _input(node, 2)
    if training is None:
        return []
    value = g.constant_value(training)
    if value is None or bool(value.reshape(-1)[0] if hasattr(value, "reshape") else value):
        return ["training_mode must be a constant False"]
    return []


def _grid_sample(node, g):
    return [] if g.rank(node.input[0]) == 4 else [f"input must be 4-D, rank {g.rank(node.input[0])}"]


def _static_input(node, g):
    return [] if g.static(node.input[0]) else ["the input shape must be static"]


def _einsum(node, g):
    equation = _attr(node, "equation", "").replace(" ", "")
    out = []
    if "..." in equation:
        out.append(f"ellipsis in equation {equation!r}")
    for operand in equation.split("->")[0].split(","):
        letters = [c for c in operand if c.isalpha()]
        if len(letters) != len(set(letters)):
            out.append(f"diagonal (repeated index) in operand {operand!r} of {equation!r}")
    return out


_REDUCE_AXES = _constant_input(1, "axes")
CHECKERS = {
    **{op: _REDUCE_AXES for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                   "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Slice": _constant_input(3, "axes"),
    "Squeeze": _constant_input(1, "axes"),
    "Unsqueeze": _constant_input(1, "axes"),
    "Pad": _constant_input(3, "axes"),
    "CumSum": _constant_input(1, "axis"),
    "Resize": _resize,
    "LayerNormalization": _layer_norm,
    "Constant": _constant,
    "TopK": _topk,
    "MaxPool": _pooling(True),
    "AveragePool": _pooling(False),
    "LpPool": _pooling(False),
    "Dropout": _dropout,
    "GridSample": _grid_sample,
    "Hardmax": _static_input,
    "EyeLike": _static_input,
    "Einsum": _einsum,
}


# ----------------------------------------------------------------------------- types
def _operand_inputs(node, opset: int) -> list:
    """The inputs bound to the operator's principal type constraint (output 0's, else input 0's)."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return []
    formal = list(schema.inputs)
    if not formal:
        return []
    params = [formal[min(i, len(formal) - 1)].type_str for i in range(len(node.input))]
    principal = schema.outputs[0].type_str if schema.outputs else params[0]
    if principal not in params:
        principal = params[0]
    return [name for name, p in zip(node.input, params) if name and p == principal]


# ----------------------------------------------------------------------------- the check
def _hybrid_problems(model) -> list:
    functions = {(f.domain, f.name) for f in model.functions}
    out = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        where = f"{node.domain}::{node.op_type} ({node.name or 'unnamed'})"
        if node.domain != PLUGIN_DOMAIN:
            out.append(f"{where}: a custom domain TensorRT knows nothing about")
            continue
        if (node.domain, node.op_type) not in functions:
            out.append(f"{where}: no model-local function of that name (TensorRT could only build a plugin)")
        if _attr(node, "plugin_namespace") != PLUGIN_NAMESPACE:
            out.append(f"{where}: plugin_namespace must be {PLUGIN_NAMESPACE!r}, got {_attr(node, 'plugin_namespace')!r}")
        if not _attr(node, "plugin_version"):
            out.append(f"{where}: no plugin_version")
    return out


def check_tensorrt_compatibility(model, support: Optional[dict] = None) -> list:
    """Every way ``model`` (an ``onnx.ModelProto``) breaks TensorRT 10's ONNX rules; [] when none.

    Local functions are inlined first (the graph TensorRT builds without plugins)."""
    import onnx
    import onnx.inliner

    support = load_support_matrix() if support is None else support
    problems = _hybrid_problems(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset}: TensorRT 10 parses opsets {OPSET_RANGE[0]}-{OPSET_RANGE[1]}")
        return problems
    inlined = onnx.inliner.inline_local_functions(model) if len(model.functions) else model
    try:
        inlined = onnx.shape_inference.infer_shapes(inlined, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        return problems + [f"strict shape inference fails: {' '.join(str(exc).split())[:300]}"]
    g = _Graph(inlined)
    for node in inlined.graph.node:
        where = f"{node.op_type} ({node.name or 'unnamed'})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is left after inlining")
            continue
        if node.op_type in FORBIDDEN:
            problems.append(f"{where}: {FORBIDDEN[node.op_type]}")
            continue
        row = support.get(node.op_type)
        if row is None or not row.supported:
            problems.append(f"{where}: not supported by TensorRT 10's ONNX parser")
            continue
        for name in _operand_inputs(node, opset):
            elem = g.types.get(name)
            if elem is None:
                problems.append(f"{where}: the type of input {name!r} is unknown")
            elif _TYPE_NAMES.get(elem, str(elem)) not in row.types:
                problems.append(f"{where}: input {name!r} is {_TYPE_NAMES.get(elem, elem)}; TensorRT takes "
                                f"{sorted(row.types)}")
        checker = CHECKERS.get(node.op_type)
        if checker is not None:
            problems += [f"{where}: {p}" for p in checker(node, g)]
        elif row.restrictions:
            problems.append(f"{where}: restriction not checked by rexfast: {row.restrictions!r}")
    for name, elem in g.types.items():
        if elem == 11:
            problems.append(f"{name}: DOUBLE tensors are cast to FLOAT by TensorRT (export float32)")
        if elem == 2 and name not in g.graph_inputs | g.graph_outputs and not g.is_constant(name):
            problems.append(f"{name}: UINT8 is only supported for network inputs and outputs")
    for node in inlined.graph.node:  # every value must have a type (strict inference gave one)
        for out in node.output:
            if out and out not in g.types:
                problems.append(f"{node.op_type} ({node.name or 'unnamed'}): output {out!r} has no inferred type")
    return problems


__all__ = ["SOURCE", "OPSET_RANGE", "FORBIDDEN", "CHECKERS", "OperatorSupport", "load_support_matrix",
           "check_tensorrt_compatibility"]
