"""ScapSparseMatMul in standard ONNX ops: the one lowering, for every place that runs the contract
without the compiled library.

- :func:`sparsified_input`: x' = Where(|x - m| <= tau, m, x) (token-scaled: Where(|x / n - m| <= tau,
  m * n, x)), which the unchanged MatMul turns into drop(x - m) @ W + m @ W: what the op with the
  rewriter's folded bias computes (m = offset + channel_offset, tau = threshold * threshold_scale,
  per channel where the Sparsification has those vectors). Calibration sparsifies upstream targets
  this way.
- :func:`lower_node` / :func:`lower_model`: the op itself, D = A - offset - channel_offset, dropped
  elements 0, D @ B (+ bias), with the optional per-channel inputs read from the graph. A dropped
  element skips its row of B in the kernels and the reference, so an Inf or NaN in that row must
  not turn into 0 * Inf = NaN: where B is not known to be finite the
  lowering adds the non-finite products separately (counts of kept +Inf / -Inf / NaN products per
  output, from 0/1 matrices), at the price of five more MatMuls.

ScapSparseMatMulNBits has no lowering: a model with such nodes needs the compiled library, and
:func:`lower_model` says so (ScapError).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from ..errors import ScapError
from ..graph.builder import GraphBuilder, ProtoBuilder
from ..graph.view import GraphView, declared_elem_types
from .contract import (OP_TYPE_NBITS, Sparsification, channel_input_names, is_float_node, is_scap_node,
                       node_sparsification)
from .token_norm import default_opset, token_norm

LOWERED_PREFIX = "scap_lowered::"


def _drop_rule(b: GraphBuilder, z, s: Sparsification, elem_type: int, threshold_scale=None, channel_offset=None,
               scalars=None):
    """(D, drop): D = z - offset - channel_offset and whether each element is dropped, in T.
    threshold_scale / channel_offset: float32 [K] graph values, or None. scalars: (offset,
    threshold) as float32 scalar graph values that replace ``s.offset`` and ``s.threshold``, or None."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)

    def as_t(v):
        return v if elem_type == onnx.TensorProto.FLOAT else b.op("Cast", [v], to=elem_type)

    if scalars is None:
        offset, threshold32 = b.const("offset", np.asarray(s.offset, np_dtype)), None
    else:
        offset, threshold32 = as_t(scalars[0]), scalars[1]
    d = b.op("Sub", [z, offset])
    if channel_offset is not None:
        d = b.op("Sub", [d, as_t(channel_offset)])
    if threshold_scale is None:
        tau = b.const("threshold", np.asarray(s.threshold, np_dtype)) if threshold32 is None else as_t(threshold32)
    else:  # threshold * scale, where that is 0 * inf the scale itself (reference.channel_thresholds)
        if threshold32 is None:
            threshold32 = b.const("threshold", np.asarray(s.threshold, np.float32))
        product = b.op("Mul", [threshold32, threshold_scale])
        tau = as_t(b.op("Where", [b.op("IsNaN", [product]), threshold_scale, product]))
    return d, b.op("LessOrEqual", [b.op("Abs", [d]), tau])


def sparsified_input(b: GraphBuilder, x, s: Sparsification, elem_type: int, opset: int, *, output=None,
                     scalars=None):
    """x' (see the module doc): what the original MatMul must read to compute the op's result.

    ``scalars``: (offset, threshold) float32 scalar graph values read instead of ``s.offset`` and
    ``s.threshold``, so that one graph serves many plans (a negative threshold drops nothing)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    scale = None if s.threshold_scale is None else b.const("threshold_scale", s.scale_array())
    channel_offset = None if s.channel_offset is None else b.const("channel_offset", s.channel_offset_array())
    if scalars is None:
        fill = b.const("centre", np.asarray(s.centre(), np_dtype))
    else:
        fill = scalars[0] if elem_type == onnx.TensorProto.FLOAT else b.op("Cast", [scalars[0]], to=elem_type)
        if channel_offset is not None:
            fill = b.op("Add", [fill, b.const("channel_centre", s.channel_offset_array().astype(np_dtype))])
    z = x
    if s.token_scaled:
        z, n = token_norm(b, x, elem_type, opset)
        fill = b.op("Mul", [n, fill])
    _, drop = _drop_rule(b, z, s, elem_type, scale, channel_offset, scalars)
    return b.op("Where", [drop, fill, x], output=output)


def lower_node(b: GraphBuilder, a, weight, bias, s: Sparsification, elem_type: int, *, finite_weight: bool,
               output=None, threshold_scale=None, channel_offset=None):
    """Y = D_kept @ B (+ bias) in standard ops (``s.token_scaled`` is not part of the op: the
    rewriter puts the token norm around it). threshold_scale / channel_offset: the node's optional
    float32 [K] inputs (names), or None."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    zero = b.const("zero", np.asarray(0, np_dtype))
    d, drop = _drop_rule(b, a, s, elem_type, threshold_scale, channel_offset)
    kept = b.op("Where", [drop, zero, d])
    last = output if bias is None else None
    if finite_weight:
        y = b.op("MatMul", [kept, weight], output=last)
    else:
        y = _with_nonfinite_rows(b, d, drop, kept, weight, zero, elem_type, np_dtype, last)
    return y if bias is None else b.op("Add", [y, bias], output=output)


def _with_nonfinite_rows(b, d, drop, kept, weight, zero, elem_type, np_dtype, output):
    """D_kept @ B where B may hold Inf or NaN: the finite part by one MatMul, then the non-finite
    products of kept elements decide the outputs they reach (NaN where +Inf and -Inf meet)."""
    def as_t(flag):
        return b.op("Cast", [flag], to=elem_type)

    w32 = weight if elem_type == onnx.TensorProto.FLOAT else b.op("Cast", [weight], to=onnx.TensorProto.FLOAT)
    pos_inf = b.op("IsInf", [w32], detect_negative=0)  # (onnxruntime's IsInf takes no float16)
    neg_inf = b.op("IsInf", [w32], detect_positive=0)
    nan = b.op("IsNaN", [w32])
    finite_b = b.op("Where", [b.op("Or", [b.op("Or", [pos_inf, neg_inf]), nan]), zero, weight])
    y = b.op("MatMul", [kept, finite_b])
    keep = b.op("Not", [drop])
    d_pos = as_t(b.op("And", [keep, b.op("Greater", [d, zero])]))
    d_neg = as_t(b.op("And", [keep, b.op("Less", [d, zero])]))
    b_pos, b_neg = as_t(pos_inf), as_t(neg_inf)
    to_pos = b.op("Add", [b.op("MatMul", [d_pos, b_pos]), b.op("MatMul", [d_neg, b_neg])])
    to_neg = b.op("Add", [b.op("MatMul", [d_pos, b_neg]), b.op("MatMul", [d_neg, b_pos])])
    to_nan = b.op("MatMul", [as_t(keep), as_t(nan)])
    reaches_pos, reaches_neg = b.op("Greater", [to_pos, zero]), b.op("Greater", [to_neg, zero])
    is_nan = b.op("Or", [b.op("Or", [b.op("IsNaN", [y]), b.op("Greater", [to_nan, zero])]),
                         b.op("And", [reaches_pos, reaches_neg])])
    y = b.op("Where", [reaches_neg, b.const("neg_inf", np.asarray(-np.inf, np_dtype)), y])
    y = b.op("Where", [reaches_pos, b.const("pos_inf", np.asarray(np.inf, np_dtype)), y])
    return b.op("Where", [is_nan, b.const("nan", np.asarray(np.nan, np_dtype)), y], output=output)


def lower_model(model: onnx.ModelProto, weight_is_finite: Callable[[str], bool] | None = None) -> onnx.ModelProto:
    """Replace the ScapSparseMatMul nodes of ``model`` (in place) by standard ops computing the same.

    ``weight_is_finite(name)``: whether the constant B named ``name`` holds only finite values (the
    short lowering then suffices); without it every B is treated as possibly non-finite.
    ScapError for a model with ScapSparseMatMulNBits nodes (they run with the library only).
    """
    nbits = [n for n in model.graph.node if is_scap_node(n) and not is_float_node(n)]
    if nbits:
        raise ScapError(f"{OP_TYPE_NBITS} node {nbits[0].name or nbits[0].output[0]!r} needs the compiled op library "
                        "(it has no lowering to standard ops): build it, or set SCAP_ONNX_LIBRARY")
    view = GraphView.from_proto(model)
    declared = declared_elem_types(model.graph)
    new_nodes: list[onnx.NodeProto] = []
    initializers = []
    for i, n in enumerate(model.graph.node):
        if not is_scap_node(n):
            new_nodes.append(n)
            continue
        weight = n.input[1]
        elem_type = view.elem_type(weight) or declared.get(weight) or declared.get(n.input[0])
        if elem_type is None:
            raise ScapError(f"cannot lower {n.name or n.output[0]!r}: the element type of {weight!r} is unknown")
        origin = view.resolve(weight)
        finite = weight_is_finite is not None and origin is not None and weight_is_finite(origin.name)
        b = ProtoBuilder(f"{LOWERED_PREFIX}{i}/")
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        scale, channel_offset = channel_input_names(n)
        lower_node(b, n.input[0], weight, bias, node_sparsification(n), elem_type, finite_weight=finite,
                   output=n.output[0], threshold_scale=scale, channel_offset=channel_offset)
        new_nodes += b.nodes
        initializers += b.initializers
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(initializers)
    return model


__all__ = ["LOWERED_PREFIX", "default_opset", "lower_model", "lower_node", "sparsified_input"]
