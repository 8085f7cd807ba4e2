"""Fuse ScapSparseMatMul(NBits) nodes that sparsify one input the same way into one node.

Targets that read one activation with one threshold and offset, and equal per-channel vectors
(threshold_scale, channel_offset: both absent, or constants of equal values) (Llama's gate and up
projections; q, k and v at one sparsity) drop the same elements, so they skip the same weight rows. One node
over their weights side by side, followed by a Split, sparsifies the input once and streams each
kept row of all the weights in one pass:

    Y_i = ScapSparseMatMul(X, B_i, b_i)   ->   [Y_1, Y_2] = Split(ScapSparseMatMul(X, [B_1 B_2], [b_1 b_2]))

(the first member's vectors, equal to the others', go to the fused node as they are).

(SmolLM2's decode step with gate and up fused: 4-19% shorter than with them apart, in four
interleaved runs; docs/results.md.) ScapSparseMatMulNBits nodes fuse the same way where their
repacked weights lie side by side exactly: equal K, bits, block_size, accuracy_level, scales type and
zero-point form, and (4 bits) each N a multiple of 32, so that B_packed's and packed zero points' rows
end on whole bytes of 32-column groups; B_packed, scales and zero points are concatenated along N.
(On the random int4 Llama's og.Generator decode fused and apart read alike, 0.98-1.00x in three
interleaved runs, docs/results.md: there a call's fixed costs are small beside its bytes.) The fused
weight is concatenated only when the model is saved (an onnx_ir LazyTensor), so no copy of the
model's weights is held in memory. The fused node
lists its members, the original target names, in its metadata (scap_onnx.op.contract.TARGETS_KEY),
so that validate and measure report each target as before.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.builder import new_initializer, unique_name, used_names as names_in
from ..op import contract
from ..op.contract import DOMAIN, OP_TYPE_NBITS


class FusePass(ir.passes.InPlacePass):
    """:func:`fuse_shared_inputs` as an onnx_ir pass."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=fuse_shared_inputs(model) > 0)


def fuse_shared_inputs(model: ir.Model) -> int:
    """Fuse, in place, the ScapSparseMatMul nodes that can share one pass; returns how many fused
    nodes were made."""
    graph = model.graph
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        key = _fusion_key(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    used_names = names_in(graph)
    opset = model.opset_imports.get("", 13)
    made = 0
    for members in groups.values():
        if len(members) > 1:
            _fuse(graph, members, used_names, opset)
            made += 1
    return made


def _fusion_key(node: ir.Node) -> tuple | None:
    """Nodes with equal keys drop the same elements of the same input: one id of A, threshold,
    offset, per-channel vectors (their bytes) and weight layout. None for nodes that cannot take part
    (B not an initializer, e.g. the Transpose the rewriter puts on a Gemm's transB weight, or a bias
    or per-channel vector that is not one)."""
    if not contract.is_scap_node(node) or len(contract.targets_of(node)) != 1:
        return None
    a = node.inputs[0]
    weights = _weight_inputs(node)
    bias = _bias_input(node)
    if a is None or any(w is not None and not _constant(w) for w in weights) or weights[0] is None:
        return None
    if bias is not None and (not _constant(bias) or len(bias.const_value.shape) != 1):
        return None
    layout = _nbits_layout(node) if node.op_type == OP_TYPE_NBITS else _float_layout(node)
    if layout is None:
        return None
    vectors = []
    for v in _channel_inputs(node):
        if v is not None and not _constant(v):
            return None
        vectors.append(None if v is None else v.const_value.numpy().astype("<f4").tobytes())
    threshold = node.attributes["threshold"].value
    offset = node.attributes["offset"].value if "offset" in node.attributes else 0.0
    return (node.op_type, id(a), float(threshold), float(offset), *vectors, *layout)


def _constant(v: ir.Value) -> bool:
    return v.const_value is not None and not v.is_graph_input()


def _bias_position(node: ir.Node) -> int:
    """The bias input's position: just before the per-channel vectors (contract.CHANNEL_INPUTS)."""
    return contract.CHANNEL_INPUTS[node.op_type][0] - 1


def _weight_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The inputs between A and the bias, concatenated along N: B (ScapSparseMatMul); B_packed,
    scales, zero_points (NBits)."""
    return [node.inputs[i] if len(node.inputs) > i else None for i in range(1, _bias_position(node))]


def _bias_input(node: ir.Node) -> ir.Value | None:
    i = _bias_position(node)
    return node.inputs[i] if len(node.inputs) > i else None


def _float_layout(node: ir.Node) -> tuple | None:
    b = node.inputs[1].const_value
    return None if len(b.shape) != 2 else (b.dtype, int(b.shape[0]))


def _nbits_layout(node: ir.Node) -> tuple | None:
    """What must agree for NBits weights to lie side by side; None where the rows of B_packed (4 bits)
    would not end on a whole 32-column group."""
    attrs = {k: int(node.attributes[k].value) for k in ("K", "N", "bits", "block_size")}
    level = int(node.attributes["accuracy_level"].value) if "accuracy_level" in node.attributes else 0
    if attrs["bits"] == 4 and attrs["N"] % 32 != 0:
        return None
    _, scales, zero_points = _weight_inputs(node)
    if scales is None or len(scales.const_value.shape) != 2:
        return None
    zp_form = None if zero_points is None else ("bytes" if int(zero_points.const_value.shape[-1]) == attrs["N"]
                                                else "packed")
    return (attrs["K"], attrs["bits"], attrs["block_size"], level, scales.const_value.dtype, zp_form)


def _channel_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The node's threshold_scale and channel_offset values (None where absent)."""
    return [node.inputs[i] if len(node.inputs) > i else None for i in contract.CHANNEL_INPUTS[node.op_type]]


def _concatenated(graph: ir.Graph, values: list[ir.Value], name: str) -> ir.Value:
    """An initializer of ``values``' tensors side by side along their last axis, computed when the
    model is saved (one fused weight at a time)."""
    tensors = [v.const_value for v in values]
    dtype = tensors[0].dtype
    shape = [*tensors[0].shape[:-1], sum(int(t.shape[-1]) for t in tensors)]

    def concatenated():
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=-1))

    value = ir.Value(name=name, const_value=ir.LazyTensor(concatenated, dtype=dtype, shape=ir.Shape(shape), name=name))
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape)
    graph.register_initializer(value)
    return value


def _fuse(graph: ir.Graph, members: list[ir.Node], used_names: set[str], opset: int) -> None:
    nbits = members[0].op_type == OP_TYPE_NBITS
    widths = [int(m.attributes["N"].value) if nbits else int(m.inputs[1].const_value.shape[1]) for m in members]
    base = members[0].inputs[1].name
    weights = []
    for i, first in enumerate(_weight_inputs(members[0])):
        if first is not None:
            weights.append(_concatenated(graph, [_weight_inputs(m)[i] for m in members],
                                         unique_name(base + ("/scap_fused" if i == 0 else f"/scap_fused_{i}"),
                                                     used_names)))
        else:
            weights.append(None)
    bias = None
    biases = [_bias_input(m) for m in members]
    if any(b is not None for b in biases):
        present = next(b for b in biases if b is not None)
        np_dtype = present.const_value.dtype.numpy()
        parts = [b.const_value.numpy().astype(np_dtype) if b is not None else np.zeros(w, np_dtype)
                 for b, w in zip(biases, widths)]
        bias = new_initializer(graph, unique_name(base + "/scap_fused_bias", used_names), np.concatenate(parts))
    attributes = list(members[0].attributes.values())
    if nbits:
        attributes = [ir.AttrInt64("N", sum(widths)) if a.name == "N" else a for a in attributes]
        inputs = [members[0].inputs[0], *weights, bias, *_channel_inputs(members[0])]
    else:
        inputs = [members[0].inputs[0], weights[0], bias, *_channel_inputs(members[0])]
    while inputs[-1] is None:
        inputs.pop()
    names = [t for m in members for t in contract.targets_of(m)]
    fused = ir.Node(DOMAIN, members[0].op_type, inputs, attributes=attributes,
                    name=unique_name(" + ".join(names), used_names), num_outputs=1,
                    doc_string="scap-onnx: " + " + ".join(names) + " over one sparsified input")
    contract.record(fused, targets=names, source_input=contract.source_input_of(members[0]),
                    norm_nodes=[n for m in members for n in contract.norm_nodes_of(m)])
    fused.outputs[0].name = unique_name(members[0].outputs[0].name + "/scap_fused", used_names)
    fused.outputs[0].type = members[0].outputs[0].type
    split_name = unique_name(fused.name + "/split", used_names)
    if opset >= 13:
        sizes = new_initializer(graph, unique_name(split_name + "/sizes", used_names), np.array(widths, np.int64))
        split = ir.Node("", "Split", [fused.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                        name=split_name, num_outputs=len(members))
    else:
        split = ir.Node("", "Split", [fused.outputs[0]],
                        attributes=[ir.AttrInt64("axis", -1), ir.AttrInt64s("split", widths)],
                        name=split_name, num_outputs=len(members))
    old_weights = [v for m in members for v in m.inputs[1:]]
    # The new nodes go where the first member was: every consumer of a member comes after it.
    ir.convenience.replace_nodes_and_values(graph, members[0], members, [fused, split],
                                            [m.outputs[0] for m in members], list(split.outputs))
    for v in old_weights:
        if v is not None and v.name in graph.initializers and not v.uses() and not v.is_graph_output() \
                and not v.is_graph_input():
            del graph.initializers[v.name]
