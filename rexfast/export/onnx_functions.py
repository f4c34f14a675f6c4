"""The ops' inference decompositions as ONNX functions (onnxscript), and their translations.

Each function here is the decomposition of ``rexfast/ops/<op>/decomposition.py``
written operation for operation in ONNX opset 18 (the tests hold every one to
its PyTorch decomposition: identical decisions, values within fp32 rounding).
They live in the ``rexfast`` domain under the op's name, so that

* ``hybrid`` export emits each op as one ``rexfast::<op>`` node carrying
  ``plugin_namespace="rexfast"`` and ``plugin_version="1"``, with the function
  as a model-local ONNX function of the same name: onnxruntime expands the
  function; TensorRT's ONNX parser builds a registered plugin
  (``rexfast/tensorrt``) for a node that carries ``plugin_namespace`` and
  otherwise expands the function;
* ``decomposed`` export inlines the functions: a graph of standard ONNX operators.

Only operators TensorRT 10 parses are used, with its restrictions met
(reduction axes and shapes of Unsqueeze/Slice as constants, no OneHot, no
Einsum, no ArgMax tie-breaking: the first maximum is found with ReduceMin over
the indices of the maximum). ``import rexfast`` never imports this module (it
needs onnxscript).
"""

from __future__ import annotations

from typing import Tuple

import onnxscript
from onnxscript import BOOL, FLOAT, INT64
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "rexfast"
PLUGIN_NAMESPACE = "rexfast"
PLUGIN_VERSION = "1"
# The largest float32 x with float32 sigmoid(x) < 0.5 in PyTorch (-(1.5·2⁻²³ − 2⁻⁴⁶)): RIA's
# "sigmoid(logit) < 0.5" is "logit <= SIGMOID_BELOW_HALF", which every runtime computes alike.
SIGMOID_BELOW_HALF = -1.7881392011531716e-07
REXFAST = Opset(DOMAIN, 1)
_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT64 = 7  # onnx.TensorProto.INT64


# ----------------------------------------------------------------------------- group_assign
@onnxscript.script(REXFAST, default_opset=op)
def group_assign(q: FLOAT, k: FLOAT, v: FLOAT, tau: FLOAT, plugin_namespace: str = "rexfast",
                 plugin_version: str = "1") -> Tuple[FLOAT, FLOAT, FLOAT]:
    """(q (B,N,C), k (B,P,C), v (B,P,D), tau (1,)) → (out (B,N,D), assign (B,N,P), counts (B,N) float)."""
    eps = op.CastLike(op.Constant(value_float=1e-12), q)
    q_hat = op.Div(q, op.Add(op.ReduceL2(q, [-1], keepdims=1), eps))
    k_hat = op.Div(k, op.Add(op.ReduceL2(k, [-1], keepdims=1), eps))
    z = op.Div(op.MatMul(q_hat, op.Transpose(k_hat, perm=[0, 2, 1])), op.CastLike(tau, q))  # (B, N, P)
    nan = op.IsNaN(z)
    finite_or_inf = op.Where(nan, op.CastLike(op.Constant(value_float=float("-inf")), z), z)
    best = op.ReduceMax(finite_or_inf, [1], keepdims=1)  # (B, 1, P)
    zero_f = op.Constant(value_float=0.0)
    any_nan = op.Greater(op.ReduceMax(op.Cast(nan, to=1), [1], keepdims=1), zero_f)
    poisoned = op.Or(any_nan, op.IsInf(best))  # (B, 1, P)
    n_tokens = op.Shape(z, start=1, end=2)  # (1,) int64
    tokens = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(n_tokens, [0]), op.Constant(value_int=1)),
                        [1, -1, 1])  # (1, N, 1)
    candidates = op.Where(op.Equal(finite_or_inf, best), tokens, n_tokens)
    first = op.ReduceMin(candidates, [1], keepdims=1)  # the first maximum
    first = op.Where(poisoned, op.Constant(value_int=0), first)
    hard = op.CastLike(op.Equal(tokens, first), q)  # (B, N, P) one-hot by comparison
    nan_c = op.CastLike(op.Constant(value_float=float("nan")), q)
    zero_c = op.CastLike(zero_f, q)
    assign = op.Where(poisoned, nan_c, hard)
    item_poisoned = op.Greater(op.ReduceMax(op.Cast(poisoned, to=1), [2], keepdims=0), zero_f)  # (B, 1)
    counts = op.Add(op.ReduceSum(hard, [2], keepdims=0), op.Where(item_poisoned, nan_c, zero_c))  # (B, N)
    one_c = op.CastLike(op.Constant(value_float=1.0), q)
    out = op.Div(op.MatMul(hard, v), op.Unsqueeze(op.Add(counts, one_c), [2]))
    return out, assign, op.Cast(counts, to=1)


# ----------------------------------------------------------------------------- ms_deform_attn
@onnxscript.script(REXFAST, default_opset=op)
def ms_deform_attn(value: FLOAT, spatial_shapes: INT64, level_start_index: INT64, sampling_locations: FLOAT,
                   attention_weights: FLOAT, plugin_namespace: str = "rexfast", plugin_version: str = "1") -> FLOAT:
    """value (B,S,M,D), spatial_shapes (L,2) int64, level_start_index (L,) int64,
    sampling_locations (B,Q,M,L,P,2), attention_weights (B,Q,M,L,P) → (B, Q, M·D)."""
    loc = op.Transpose(sampling_locations, perm=[0, 2, 1, 3, 4, 5])  # (B, M, Q, L, P, 2)
    attn = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])  # (B, M, Q, L, P)
    level_axis = [1, 1, 1, -1, 1, 1]
    height_i = op.Reshape(op.Gather(spatial_shapes, op.Constant(value_int=0), axis=1), level_axis)
    width_i = op.Reshape(op.Gather(spatial_shapes, op.Constant(value_int=1), axis=1), level_axis)
    starts = op.Reshape(level_start_index, level_axis)
    height = op.CastLike(height_i, value)
    width = op.CastLike(width_i, value)
    half = op.CastLike(op.Constant(value_float=0.5), value)
    one = op.CastLike(op.Constant(value_float=1.0), value)
    zero = op.CastLike(op.Constant(value_float=0.0), value)
    x = op.Sub(op.Mul(op.Slice(loc, [0], [1], [5]), width), half)  # (B, M, Q, L, P, 1)
    y = op.Sub(op.Mul(op.Slice(loc, [1], [2], [5]), height), half)
    x0 = op.Floor(x)
    y0 = op.Floor(y)
    fx = op.Sub(x, x0)
    fy = op.Sub(y, y0)
    dx = op.CastLike(op.Constant(value_floats=[0.0, 1.0, 0.0, 1.0]), value)  # corners x0y0, x1y0, x0y1, x1y1
    dy = op.CastLike(op.Constant(value_floats=[0.0, 0.0, 1.0, 1.0]), value)
    cx = op.Add(x0, dx)  # (B, M, Q, L, P, 4)
    cy = op.Add(y0, dy)
    inside_x = op.And(op.GreaterOrEqual(cx, zero), op.LessOrEqual(cx, op.Sub(width, one)))
    inside_y = op.And(op.GreaterOrEqual(cy, zero), op.LessOrEqual(cy, op.Sub(height, one)))
    inside = op.And(inside_x, inside_y)
    wx = op.Where(inside, op.Where(op.Equal(dx, one), fx, op.Sub(one, fx)), zero)
    wy = op.Where(inside, op.Where(op.Equal(dy, one), fy, op.Sub(one, fy)), zero)
    row_y = op.Cast(op.Where(inside, cy, zero), to=7)
    row_x = op.Cast(op.Where(inside, cx, zero), to=7)
    row = op.Add(op.Add(starts, op.Mul(row_y, width_i)), row_x)  # int64 flat rows into value
    table = op.Transpose(value, perm=[0, 2, 1, 3])  # (B, M, S, D)
    flat = op.Reshape(row, op.Concat(op.Shape(table, start=0, end=2), [-1, 1], axis=0))  # (B, M, K, 1)
    taps = op.GatherND(table, flat, batch_dims=2)  # (B, M, K, D)
    taps = op.Reshape(taps, op.Concat(op.Shape(inside), op.Shape(table, start=3, end=4), axis=0))
    taps = op.Where(op.Unsqueeze(inside, [-1]), taps, zero)  # (B, M, Q, L, P, 4, D)
    sample = op.ReduceSum(op.Mul(op.Unsqueeze(op.Mul(wx, wy), [-1]), taps), [5], keepdims=0)  # (B, M, Q, L, P, D)
    nan_c = op.CastLike(op.Constant(value_float=float("nan")), value)
    sample = op.Where(op.Or(op.IsNaN(x), op.IsNaN(y)), nan_c, sample)
    out = op.ReduceSum(op.Mul(op.Unsqueeze(attn, [-1]), sample), [3, 4], keepdims=0)  # (B, M, Q, D)
    out = op.Transpose(out, perm=[0, 2, 1, 3])  # (B, Q, M, D)
    return op.Reshape(out, op.Concat(op.Shape(out, start=0, end=2), [-1], axis=0))


# ----------------------------------------------------------------------------- region attentions
@onnxscript.script(REXFAST, default_opset=op)
def region_image_attention(q: FLOAT, k: FLOAT, v: FLOAT, region_logits: FLOAT, kh: int, kw: int, scale: float,
                           plugin_namespace: str = "rexfast",
                           plugin_version: str = "1") -> Tuple[FLOAT, FLOAT, BOOL]:
    """q (B,H,Q,d), k/v (B,H,kh·kw,d), region_logits (B,Q,mh,mw) → (out (B,H,Q,d), lse (B,H,Q),
    open_rows (B,Q): the rows whose region blocked every key, so they attend to all — the op's
    third output, as in torch.ops.rexfast.region_image_attention)."""
    logits = op.Cast(region_logits, to=1)  # the decision is made in float32
    key_hw = op.Concat(op.Reshape(op.Constant(value_int=kh), [1]), op.Reshape(op.Constant(value_int=kw), [1]),
                       axis=0)
    lead = op.Shape(logits, start=0, end=2)
    resampled = op.Resize(logits, None, None, op.Concat(lead, key_hw, axis=0), mode="linear",
                          coordinate_transformation_mode="half_pixel")
    # sigmoid(x) < 0.5 as PyTorch computes it in float32 holds exactly for x <= -1.7881392e-07
    # (SIGMOID_BELOW_HALF; tests/export checks every float32 in [-1e-3, 0]); runtimes' own
    # Sigmoid kernels round differently near 0 (onnxruntime's already for x < -5.96e-08).
    threshold = op.Constant(value_float=-1.7881392011531716e-07)
    half = op.Constant(value_float=0.5)
    blocked = op.Reshape(op.LessOrEqual(resampled, threshold), op.Concat(lead, [-1], axis=0))  # (B, Q, S)
    every = op.Greater(op.ReduceMin(op.Cast(blocked, to=1), [-1], keepdims=1), half)  # (B, Q, 1)
    blocked = op.Unsqueeze(op.And(blocked, op.Not(every)), [1])  # (B, 1, Q, S)
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    scores = op.Where(blocked, op.CastLike(op.Constant(value_float=float("-inf")), q), scores)
    out = op.MatMul(op.Softmax(scores, axis=-1), v)
    return out, op.Cast(op.ReduceLogSumExp(scores, [-1], keepdims=0), to=1), op.Squeeze(every, [-1])


@onnxscript.script(REXFAST, default_opset=op)
def region_language_attention(q: FLOAT, k: FLOAT, v: FLOAT, scale: float, plugin_namespace: str = "rexfast",
                              plugin_version: str = "1") -> Tuple[FLOAT, FLOAT]:
    """Without a padding mask (ReLA's main branch): q (B,H,Q,d), k/v (B,H,S,d) → (out, lse)."""
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    out = op.MatMul(op.Softmax(scores, axis=-1), v)
    return out, op.Cast(op.ReduceLogSumExp(scores, [-1], keepdims=0), to=1)


@onnxscript.script(REXFAST, default_opset=op)
def region_language_attention_masked(q: FLOAT, k: FLOAT, v: FLOAT, key_padding_mask: BOOL, scale: float,
                                     plugin_namespace: str = "rexfast",
                                     plugin_version: str = "1") -> Tuple[FLOAT, FLOAT]:
    """With a (B, S) bool padding mask (True = padded): a sample with every word padded gets zero rows."""
    padded = op.Unsqueeze(key_padding_mask, [1, 2])  # (B, 1, 1, S)
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    scores = op.Where(padded, neg_inf, scores)
    out = op.MatMul(op.Softmax(scores, axis=-1), v)
    lse = op.ReduceLogSumExp(scores, [-1], keepdims=0)
    half = op.Constant(value_float=0.5)
    empty = op.Greater(op.ReduceMin(op.Cast(padded, to=1), [-1], keepdims=1), half)  # (B, 1, 1, 1)
    out = op.Where(empty, op.CastLike(op.Constant(value_float=0.0), q), out)
    lse = op.Where(op.Squeeze(empty, [-1]), neg_inf, lse)
    return out, op.Cast(lse, to=1)


FUNCTIONS = (group_assign, ms_deform_attn, region_image_attention, region_language_attention,
             region_language_attention_masked)


# ----------------------------------------------------------------------------- nodes and translations
def _op_schema(function) -> "onnx.defs.OpSchema":
    """The schema of a ``rexfast::<op>`` node: the function's inputs, outputs and attributes."""
    import onnx_ir as ir
    from onnx.defs import OpSchema

    sig = function.op_signature

    def type_str(param):
        (allowed,) = param.type_constraint.allowed_types
        return f"tensor({allowed.dtype.name.lower()})"

    kinds = {ir.AttributeType.INT: OpSchema.AttrType.INT, ir.AttributeType.FLOAT: OpSchema.AttrType.FLOAT,
             ir.AttributeType.STRING: OpSchema.AttrType.STRING}
    return OpSchema(sig.name, sig.domain, 1,
                    inputs=[OpSchema.FormalParameter(p.name, type_str(p)) for p in sig.inputs],
                    outputs=[OpSchema.FormalParameter(p.name, type_str(p)) for p in sig.outputs],
                    attributes=[OpSchema.Attribute(a.name, kinds[a.type], "", required=False) for a in sig.attributes])


_NODES: dict = {}


def _node(function):
    """An onnxscript op that records one ``rexfast::<name>`` node (not the function's body)."""
    if function.name not in _NODES:
        from onnxscript.values import Op

        _NODES[function.name] = Op(REXFAST, function.name, _op_schema(function))
    return _NODES[function.name]


_PLUGIN = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


# torch.onnx's custom_translation_table entries: the registered op's arguments → one
# rexfast::<op> node; rexfast.export adds the functions (and inlines them for "decomposed").
def _translate_group_assign(q, k, v, tau, noise=None, key=None, backend=None):
    if noise is not None or key is not None:
        raise ValueError("group_assign with Gumbel noise (noise= or seed=) cannot be exported: export the model with "
                         "deterministic inference (CGFormer eval_noise=False)")
    return _node(group_assign)(q, k, v, tau, **_PLUGIN)


def _translate_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              backend=None):
    return _node(ms_deform_attn)(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 **_PLUGIN)


def _translate_region_image_attention(q, k, v, region_logits, kh, kw, scale, backend=None):
    return _node(region_image_attention)(q, k, v, region_logits, kh=int(kh), kw=int(kw), scale=float(scale),
                                         **_PLUGIN)


def _translate_region_language_attention(q, k, v, key_padding_mask=None, scale=1.0, backend=None):
    if key_padding_mask is None:
        return _node(region_language_attention)(q, k, v, scale=float(scale), **_PLUGIN)
    return _node(region_language_attention_masked)(q, k, v, key_padding_mask, scale=float(scale), **_PLUGIN)


def translation_table() -> dict:
    """``torch.onnx.export(custom_translation_table=...)``: every registered rexfast op → its node."""
    import torch

    import rexfast.ops  # noqa: F401  (registers the ops)

    return {
        torch.ops.rexfast.group_assign.default: _translate_group_assign,
        torch.ops.rexfast.ms_deform_attn.default: _translate_ms_deform_attn,
        torch.ops.rexfast.region_image_attention.default: _translate_region_image_attention,
        torch.ops.rexfast.region_language_attention.default: _translate_region_language_attention,
    }


def function_protos(opset: int = 18) -> list:
    """The model-local ``onnx.FunctionProto`` of every op, importing the model's ONNX opset.

    The bodies are written for opset 18; every operator they use means the same in
    opsets 19 and 20 (those versions only add types and modes the bodies do not use),
    so the import is raised to the model's opset, as ONNX requires of local functions."""
    protos = []
    for function in FUNCTIONS:
        proto = function.to_function_proto()
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
        protos.append(proto)
    return protos


__all__ = ["DOMAIN", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "SIGMOID_BELOW_HALF", "FUNCTIONS", "group_assign", "ms_deform_attn",
           "region_image_attention", "region_language_attention", "region_language_attention_masked",
           "translation_table", "function_protos"]
