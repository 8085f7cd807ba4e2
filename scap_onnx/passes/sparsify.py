"""Rewrite: target MatMuls (+ a following constant-bias Add) and Gemms -> ScapSparseMatMul.

An onnx_ir in-place pass (:class:`ScapRewritePass`) over a model loaded lazily (external data
stays memory-mapped; weights are read only to fold biases):

    Y = X @ B (+ b)   ->   ScapSparseMatMul(X, B, b + offset * colsum(B)), threshold, offset

With per-channel vectors in the plan (threshold_scale, channel_offset: float32 [K]) they become
initializers read by the op's inputs 3 and 4 (ScapSparseMatMulNBits: 5 and 6), and the folded bias is
b + (offset + channel_offset) @ B.

The folded bias makes the new node compute the original function wherever nothing is dropped
(shared/DESIGN.md). A MatMulNBits becomes a ScapSparseMatMulNBits over its weights repacked
(scap_onnx.op.nbits; computed when the model is saved, one weight at a time; 4-bit zero points
packed, scales float16 where block_scales_for_layout allows and ``nbits_scales`` asks), its folded
bias from the column sums of the source's dequantised weight (before any float16 rounding of the
scales); its own bias input is carried like a Gemm's C, and its accuracy_level is the new node's.
A MatMul whose B is an int8 QDQ weight becomes a
ScapSparseMatMulNBits at bits 8 over the same codes, accuracy_level 0 (the DequantizeLinear and the
nodes between it and the MatMul go when nothing else reads them; QDQ pairs on the activation stay
in front of the new node). A Gemm's C is its bias; a Gemm with transB
reads its [N, K] weight through a Transpose node, which onnxruntime folds into a constant when it
loads the model, so the file keeps the original weight. Node names are those of the original MatMuls; outputs keep their names, types
and shapes (the Add's output when a bias Add was fused). Each new node records in its metadata
which target it replaces, the activation that target read and the standard nodes that belong to it
(scap_onnx.op.contract), so that validate pairs it with the dense model without guessing from names.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_ir as ir

from ..errors import ScapError
from ..graph.builder import IrBuilder, new_initializer, unique_name
from ..graph.quantized import MATMUL_NBITS
from ..graph.targets import Target, find_all_targets
from ..graph.view import GraphView
from ..op import contract
from ..op.contract import DOMAIN, OP_TYPE, OP_TYPE_NBITS, OPSET_VERSION, Sparsification
from ..op.nbits import (DEFAULT_NBITS_SCALES, block_scales_for_layout, check_accuracy_level, check_nbits_attributes,
                        check_nbits_scales, k_blocks, matmul_nbits_codes, matmul_nbits_scales, matmul_nbits_zero_points,
                        pack_rows, qdq_codes, qdq_scales, qdq_zero_points, row_bytes, weight_kn)
from ..op.token_norm import NORM_TAG, token_norm


def _node_key(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


class ScapRewritePass(ir.passes.InPlacePass):
    """Replace the planned MatMuls by ScapSparseMatMul (MatMulNBits by ScapSparseMatMulNBits). ``plan``: target name -> a Sparsification,
    a calibration plan entry (scap_onnx.calibration.stats.TargetPlan) or a (threshold, offset[,
    token_scaled]) tuple. ``nbits_scales``: the type asked for ScapSparseMatMulNBits' scales
    (scap_onnx.op.nbits.block_scales_for_layout)."""

    def __init__(self, plan: Mapping[str, object], nbits_scales: str = DEFAULT_NBITS_SCALES):
        super().__init__()
        check_nbits_scales(nbits_scales)
        self.plan = {k: Sparsification.of(v) for k, v in plan.items()}
        self.nbits_scales = nbits_scales
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        view = GraphView.from_ir(model)
        targets = {t.name: t for t in find_all_targets(view)}
        missing = [n for n in self.plan if n not in targets]
        if missing:
            raise ScapError(f"{len(missing)} planned target(s) are not target MatMuls of this model, e.g. {missing[0]!r}")
        nodes = {_node_key(n): n for n in graph}
        used_names = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
        self.rewritten = []
        dequantized: list[ir.Value] = []  # the B of rewritten QDQ targets: a DequantizeLinear's output
        norms: dict[int, tuple[ir.Value, ir.Value, list[str]]] = {}  # id of x -> (x / n, n, node names)
        opset = model.opset_imports.get("", 13)
        for name, s in self.plan.items():
            threshold, offset, token_scaled = s.threshold, s.offset, s.token_scaled
            if not (np.isfinite(threshold) and threshold >= 0 and np.isfinite(offset)):
                raise ScapError(f"target {name!r}: invalid threshold {threshold} / offset {offset}")
            t = targets[name]
            _check_vectors(name, t, s)
            centred = offset != 0.0 or s.channel_offset is not None
            mm = nodes[name]
            a_val = mm.inputs[0]
            new_nodes = []
            if t.qdq:
                dequantized.append(mm.inputs[1])
            if t.quantized:
                op_type, weight_inputs = OP_TYPE_NBITS, _repacked(graph, t, used_names, self.nbits_scales)
                # A MatMulNBits' accuracy_level goes with it (4: several rows multiply as int8
                # activations); 0, the default, is left out, as make_nbits_node leaves it
                level = (("accuracy_level", t.accuracy_level),) if t.accuracy_level else ()
                attrs = [ir.AttrInt64(k, v) for k, v in (("K", t.k), ("N", t.n), ("bits", t.bits),
                                                           ("block_size", t.block_size), *level)]
            else:
                weight_val = graph.initializers.get(t.weight, mm.inputs[1])
                op_type, weight_inputs, attrs = OP_TYPE, [_transposed(weight_val, t, used_names, new_nodes)
                                                          if t.trans_b else weight_val], []
            old_nodes = [mm]
            old_out = mm.outputs[0]
            bias_val = None
            if t.bias is not None and t.op in ("Gemm", MATMUL_NBITS):
                bias_val = graph.initializers.get(t.bias, mm.inputs[2 if t.op == "Gemm" else 5])
            elif t.bias is not None:
                add = nodes[t.bias_add]
                old_nodes.append(add)
                old_out = add.outputs[0]
                bias_val = graph.initializers.get(t.bias)
                if bias_val is None:  # a Constant node output: keep the Add's own input
                    bias_val = next(v for v in add.inputs if v is not mm.outputs[0])
            a_in, after, norm_names = a_val, [], []  # token scaling: Y = op(x / n) * n (+ the bias), `after` the op
            if token_scaled:
                if id(a_val) not in norms:
                    norms[id(a_val)] = _token_norm(graph, a_val, t.dtype, opset, used_names)
                a_in, norm, norm_names = norms[id(a_val)]
                after = [("Mul", "scap_token_scale", norm)]
                if bias_val is not None:
                    after.append(("Add", "scap_bias_add", bias_val))
                bias_val = _folded_bias(graph, view, t, s, None, used_names) if centred else None
            elif centred or not _is_vector(graph, view, bias_val, t.n):
                bias_val = _folded_bias(graph, view, t, s, bias_val, used_names)
            vectors = [None if v is None else
                       new_initializer(graph, unique_name(f"{t.weight}/scap_{label}", used_names), v)
                       for label, v in (("threshold_scale", s.scale_array()),
                                        ("channel_offset", s.channel_offset_array()))]
            inputs = [a_in, *weight_inputs, bias_val, *vectors]
            while inputs[-1] is None:  # absent optional inputs at the end
                inputs.pop()
            fused = f"; fused bias Add {t.bias_add!r}" if t.bias_add is not None else ""
            new = ir.Node(
                DOMAIN, op_type, inputs,
                attributes=attrs + [ir.AttrFloat32("threshold", float(threshold)),
                                    ir.AttrFloat32("offset", float(offset))],
                name=mm.name or None, num_outputs=1,
                doc_string=f"scap-onnx: rewritten from {t.op} {name!r}{fused}",
            )
            new_nodes.append(new)
            out = new.outputs[0]
            after_names = []
            for op, suffix, operand in after:  # each reads the previous output
                node_name = unique_name(f"{name}/{suffix}", used_names)
                out.name = unique_name(f"{node_name}/input", used_names)
                out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
                node = ir.Node("", op, [out, operand], name=node_name, num_outputs=1)
                new_nodes.append(node)
                after_names.append(node_name)
                out = node.outputs[0]
            contract.record(new, targets=[name], source_input=a_val.name, norm_nodes=norm_names + after_names)
            if old_out.type is None:
                out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
            ir.convenience.replace_nodes_and_values(graph, mm, old_nodes, new_nodes, [old_out], [out])
            self.rewritten.append(name)
        # Drop original biases that were folded, and quantized weights that were repacked (with
        # the DequantizeLinear of a QDQ weight), that nothing reads any more.
        for value in dequantized:
            _remove_unread(graph, value)
        done = [targets[n] for n in self.rewritten]
        replaced = {t.bias for t in done} | {nm for t in done if t.quantized
                                             for nm in (t.weight, t.scales, t.zero_points)}
        for nm in sorted(replaced - {None}):
            v = graph.initializers.get(nm)
            if v is not None and not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del graph.initializers[nm]
        if self.rewritten:
            model.opset_imports[DOMAIN] = OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.rewritten))


def _token_norm(graph: ir.Graph, x: ir.Value, dtype: str, opset: int,
                used_names: set[str]) -> tuple[ir.Value, ir.Value, list[str]]:
    """(x / n, n, the norm's node names) (scap_onnx.op.token_norm), as nodes placed right after x's producer."""
    b = IrBuilder(graph, unique_name(f"{x.name}{NORM_TAG}", used_names) + "/", used_names)
    elem = int(ir.DataType.from_numpy(np.dtype(dtype)))
    z, n = token_norm(b, x, elem, opset)
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, b.nodes)
    else:
        graph.insert_before(next(iter(graph)), b.nodes)
    return z, n, [node.name for node in b.nodes]


def _transposed(b_val: ir.Value, t, used_names: set[str], new_nodes: list[ir.Node]) -> ir.Value:
    """B as [K, N] for a Gemm with transB: a Transpose node (onnxruntime folds it at load time)."""
    name = unique_name(f"{t.weight}/scap_transposed", used_names)
    node = ir.Node("", "Transpose", [b_val], attributes=[ir.AttrInt64s("perm", [1, 0])],
                   name=name, num_outputs=1)
    out = node.outputs[0]
    out.name = name
    out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
    out.shape = ir.Shape([t.k, t.n])
    new_nodes.append(node)
    return out


def _constant_tensor(graph: ir.Graph, name: str):
    """The tensor of the constant ``name`` (an initializer or a Constant node's output), unread."""
    if name in graph.initializers:
        return graph.initializers[name].const_value
    node = next(n for n in graph if n.op_type == "Constant" and n.outputs[0].name == name)
    return node.attributes["value"].value


def _const_array(graph: ir.Graph, view: GraphView, val: ir.Value) -> np.ndarray:
    """The array of the constant ``val`` is (resolved by scap_onnx.graph.view)."""
    name = view.constant(val.name)
    if name is None:
        raise ScapError(f"{val.name!r} is not a constant")
    return _constant_tensor(graph, name).numpy()


def _remove_unread(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the nodes that computed ``value`` (a QDQ weight: Identity, Transpose and
    DequantizeLinear nodes) back from it, as long as nothing else reads their outputs."""
    node = value.producer()
    while (node is not None and node.graph is graph and node.op_type in ("Identity", "Transpose", "DequantizeLinear")
           and not any(o.uses() or o.is_graph_output() for o in node.outputs)):
        x = node.inputs[0]
        graph.remove(node, safe=True)
        node = x.producer() if x is not None else None


def _repacked(graph: ir.Graph, t: Target, used_names: set[str], nbits_scales: str) -> list[ir.Value | None]:
    """ScapSparseMatMulNBits' B_packed, scales and zero points (None when absent) of a MatMulNBits
    or QDQ target: new initializers computed from the original ones when the model is saved. Read
    now, being small: the scales, for their type (block_scales_for_layout), and a QDQ weight's zero
    points (absent when all are the op's default). 4-bit zero points are packed as B_packed's rows."""
    check_nbits_attributes(t.k, t.n, t.bits, t.block_size)
    check_accuracy_level(t.accuracy_level, t.name)
    shape = dict(k=t.k, n=t.n, block_size=t.block_size)
    b, scales = _constant_tensor(graph, t.weight), _constant_tensor(graph, t.scales)
    zp = _constant_tensor(graph, t.zero_points) if t.zero_points else None
    if t.qdq:
        zp_arr = qdq_zero_points(zp.numpy() if zp is not None else None, b.dtype.numpy(), **shape)
        codes = lambda: qdq_codes(b.numpy(), trans=t.trans_b)
        scales_of = lambda: qdq_scales(scales.numpy(), **shape)
        zp_of = None if zp_arr is None else (lambda: zp_arr)
    else:
        codes = lambda: matmul_nbits_codes(b.numpy(), bits=t.bits, **shape)
        scales_of = lambda: matmul_nbits_scales(scales.numpy(), **shape)
        zp_of = None if zp is None else (lambda: matmul_nbits_zero_points(zp.numpy(), bits=t.bits, **shape))
    blocks, width = k_blocks(t.k, t.block_size), row_bytes(t.n, t.bits)
    layout_scales = lambda: block_scales_for_layout(scales_of(), nbits_scales)
    scales_type = ir.DataType.from_numpy(layout_scales().dtype)  # the same rule again at save time
    parts = [
        ("packed", ir.DataType.UINT8, (t.k, width), lambda: pack_rows(codes(), t.bits)),
        ("scales", scales_type, (blocks, t.n), layout_scales),
    ]
    if zp_of is not None:
        parts.append(("zero_points", ir.DataType.UINT8, (blocks, width), lambda: pack_rows(zp_of(), t.bits)))
    values = []
    for suffix, dtype, dims, compute in parts:
        name = unique_name(f"{t.weight}/scap_{suffix}", used_names)
        value = ir.Value(name=name, const_value=ir.LazyTensor(lambda f=compute: ir.tensor(f()), dtype=dtype,
                                                              shape=ir.Shape(dims), name=name))
        value.type, value.shape = ir.TensorType(dtype), ir.Shape(dims)
        graph.register_initializer(value)
        values.append(value)
    return values + ([None] if zp_of is None else [])


def _is_vector(graph: ir.Graph, view: GraphView, bias_val: ir.Value | None, n: int) -> bool:
    """Whether a bias can go to the op as it is: absent, or of shape [N] (a Gemm's C may be [1, N])."""
    return bias_val is None or _const_array(graph, view, bias_val).shape == (n,)


def _check_vectors(name: str, t: Target, s: Sparsification) -> None:
    """ScapError for per-channel vectors of a plan entry that the op would reject, or a channel
    offset that is not finite (it is folded into the bias)."""
    try:
        contract.check_channel_vectors(t.k, s.scale_array(), s.channel_offset_array())
    except ValueError as e:
        raise ScapError(f"target {name!r}: {e}") from None
    if s.channel_offset is not None and not np.isfinite(s.channel_offset_array()).all():
        raise ScapError(f"target {name!r}: channel_offset must be finite")


# Rows of the weight per float64 product when folding a per-channel centre (bounds the copy).
_FOLD_ROWS = 1024


def _folded_bias(graph: ir.Graph, view: GraphView, t: Target, s: Sparsification, bias_val: ir.Value | None,
                 used_names: set[str]) -> ir.Value:
    """A new [N] initializer: bias + (offset + channel_offset) @ W, W the weight as float32 [K, N] (a
    quantized weight dequantised); a scalar centre times W's column sums."""
    folded = np.zeros(t.n, np.float64)
    centre = s.centre()
    if np.any(centre != 0.0):
        w = weight_kn(t, lambda name: _constant_tensor(graph, name).numpy())
        if centre.ndim == 0:
            folded += centre * w.sum(axis=0, dtype=np.float64)
        else:
            for k0 in range(0, t.k, _FOLD_ROWS):
                folded += centre[k0:k0 + _FOLD_ROWS] @ w[k0:k0 + _FOLD_ROWS].astype(np.float64)
        del w
    if bias_val is not None:
        folded += _const_array(graph, view, bias_val).astype(np.float64).reshape(t.n)
    return new_initializer(graph, unique_name(f"{t.weight}/scap_bias", used_names), folded.astype(np.dtype(t.dtype)))


def rewrite_model(model: ir.Model, plan: Mapping[str, object],
                  nbits_scales: str = DEFAULT_NBITS_SCALES) -> tuple[ir.Model, list[str]]:
    """Apply the plan in place; returns the model and the names of the rewritten targets."""
    p = ScapRewritePass(plan, nbits_scales)
    result = p(model)
    return result.model, p.rewritten
