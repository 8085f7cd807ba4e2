"""Rewrite: target MatMuls (+ a following constant-bias Add) and Gemms -> ScapSparseMatMul.

An onnx_ir in-place pass (:class:`ScapRewritePass`) over a model loaded lazily (external data
stays memory-mapped; weights are read only to fold biases):

    Y = X @ B (+ b)   ->   ScapSparseMatMul(X, B, b + offset * colsum(B)), threshold, offset

The folded bias makes the new node compute the original function wherever nothing is dropped
(shared/DESIGN.md). A Gemm's C is its bias; a Gemm with transB reads its [N, K] weight through a
Transpose node, which onnxruntime folds into a constant when it loads the model, so the file keeps
the original weight. Node names are those of the original MatMuls; outputs keep their names, types
and shapes (the Add's output when a bias Add was fused). :func:`save_model` writes atomically,
with external data when the input had it or the model is too large for one protobuf.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from .errors import ScapError
from .fileio import check_output_file, missing_model_message, same_file
from .op import DOMAIN, OP_TYPE, OPSET_VERSION
from .stats import TargetPlan
from .targets import GraphView, find_all_targets
from .token_scale import NORM_TAG, TINY

#: Models whose initializers exceed this are saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _node_key(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


class ScapRewritePass(ir.passes.InPlacePass):
    """Replace the planned MatMuls by ScapSparseMatMul. ``plan``: target name -> TargetPlan
    (or a (threshold, offset[, token_scaled]) tuple)."""

    def __init__(self, plan: Mapping[str, TargetPlan | tuple]):
        super().__init__()
        self.plan = {k: _plan_entry(v) for k, v in plan.items()}
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets = {t.name: t for t in find_all_targets(GraphView.from_ir(model))}
        missing = [n for n in self.plan if n not in targets]
        if missing:
            raise ScapError(f"{len(missing)} planned target(s) are not target MatMuls of this model, e.g. {missing[0]!r}")
        nodes = {_node_key(n): n for n in graph}
        used_names = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
        self.rewritten = []
        norms: dict[int, tuple[ir.Value, ir.Value]] = {}  # id of an input -> (x / n, n), token scaling
        opset = model.opset_imports.get("", 13)
        for name, (threshold, offset, token_scaled) in self.plan.items():
            if not (np.isfinite(threshold) and threshold >= 0 and np.isfinite(offset)):
                raise ScapError(f"target {name!r}: invalid threshold {threshold} / offset {offset}")
            t = targets[name]
            mm = nodes[name]
            a_val = mm.inputs[0]
            weight_val = graph.initializers.get(t.weight, mm.inputs[1])
            new_nodes = []
            b_val = _transposed(weight_val, t, used_names, new_nodes) if t.trans_b else weight_val
            old_nodes = [mm]
            old_out = mm.outputs[0]
            bias_val = None
            if t.bias is not None and t.op == "Gemm":
                bias_val = graph.initializers.get(t.bias, mm.inputs[2])
            elif t.bias is not None:
                add = nodes[t.bias_add]
                old_nodes.append(add)
                old_out = add.outputs[0]
                bias_val = graph.initializers.get(t.bias)
                if bias_val is None:  # a Constant node output: keep the Add's own input
                    bias_val = next(v for v in add.inputs if v is not mm.outputs[0])
            a_in, after = a_val, []  # token scaling: Y = op(x / n) * n (+ the original bias), `after` the op
            if token_scaled:
                if id(a_val) not in norms:
                    norms[id(a_val)] = _token_norm(graph, a_val, t.dtype, opset, used_names)
                a_in, norm = norms[id(a_val)]
                after = [("Mul", "scap_token_scale", norm)]
                if bias_val is not None:
                    after.append(("Add", "scap_bias_add", bias_val))
                bias_val = _folded_bias(graph, t, offset, weight_val, None, used_names) if offset != 0.0 else None
            elif offset != 0.0 or not _is_vector(bias_val, t.n):
                bias_val = _folded_bias(graph, t, offset, weight_val, bias_val, used_names)
            inputs = [a_in, b_val] + ([bias_val] if bias_val is not None else [])
            fused = f"; fused bias Add {t.bias_add!r}" if t.bias_add is not None else ""
            new = ir.Node(
                DOMAIN, OP_TYPE, inputs,
                attributes=[ir.AttrFloat32("threshold", float(threshold)), ir.AttrFloat32("offset", float(offset))],
                name=mm.name or None, num_outputs=1,
                doc_string=f"scap-onnx: rewritten from {t.op} {name!r}{fused}",
            )
            new_nodes.append(new)
            out = new.outputs[0]
            for op, suffix, operand in after:  # each reads the previous output
                node_name = unique_name(f"{name}/{suffix}", used_names)
                out.name = unique_name(f"{node_name}/input", used_names)
                out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
                node = ir.Node("", op, [out, operand], name=node_name, num_outputs=1)
                new_nodes.append(node)
                out = node.outputs[0]
            if old_out.type is None:
                out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
            ir.convenience.replace_nodes_and_values(graph, mm, old_nodes, new_nodes, [old_out], [out])
            self.rewritten.append(name)
        # Drop original biases that were folded and that nothing reads any more.
        for nm in {targets[n].bias for n in self.rewritten if targets[n].bias}:
            v = graph.initializers.get(nm)
            if v is not None and not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del graph.initializers[nm]
        if self.rewritten:
            model.opset_imports[DOMAIN] = OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.rewritten))


def _plan_entry(v) -> tuple[float, float, bool]:
    """(threshold, offset, token_scaled) from a TargetPlan or a (threshold, offset[, token_scaled]) tuple."""
    if isinstance(v, TargetPlan):
        return v.threshold, v.offset, v.token_scaled
    return float(v[0]), float(v[1]), bool(v[2]) if len(v) > 2 else False


def _token_norm(graph: ir.Graph, x: ir.Value, dtype: str, opset: int, used_names: set[str]) -> tuple[ir.Value, ir.Value]:
    """(x / n, n), n = ||x|| over the last axis plus TINY, in float32 (scap_onnx.token_scale), as nodes
    placed right after x's producer."""
    p = unique_name(f"{x.name}{NORM_TAG}", used_names)
    nodes: list[ir.Node] = []

    def node(op, inputs, attributes=(), dtype_out="float32"):
        n = ir.Node("", op, inputs, attributes=list(attributes), name=f"{p}/{op}{len(nodes)}", num_outputs=1)
        n.outputs[0].name = unique_name(f"{p}/{op}{len(nodes)}_out", used_names)
        n.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype_out)))
        nodes.append(n)
        return n.outputs[0]

    def const(suffix, array):
        return new_initializer(graph, unique_name(f"{p}/{suffix}", used_names), array)

    x32 = x if dtype == "float32" else node("Cast", [x], [ir.AttrInt64("to", ir.DataType.FLOAT)])
    if opset >= 18:
        l2 = node("ReduceL2", [x32, const("axes", np.asarray([-1], np.int64))], [ir.AttrInt64("keepdims", 1)])
    else:
        l2 = node("ReduceL2", [x32], [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)])
    n = node("Add", [l2, const("tiny", np.asarray(TINY, np.float32))])
    z = node("Div", [x32, n])
    if dtype != "float32":
        to = ir.AttrInt64("to", ir.DataType.from_numpy(np.dtype(dtype)))
        z = node("Cast", [z], [to], dtype)
        n = node("Cast", [n], [to], dtype)
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(next(iter(graph)), nodes)
    return z, n


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


def _const_array(val: ir.Value) -> np.ndarray:
    """The value of an initializer, or of a Constant node's output, also through Identity nodes."""
    if val.const_value is not None:
        return val.const_value.numpy()
    producer = val.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    if producer is not None and producer.op_type == "Identity" and producer.inputs[0] is not None:
        return _const_array(producer.inputs[0])
    raise ScapError(f"{val.name!r} is not a constant")


def _is_vector(bias_val: ir.Value | None, n: int) -> bool:
    """Whether a bias can go to the op as it is: absent, or of shape [N] (a Gemm's C may be [1, N])."""
    return bias_val is None or _const_array(bias_val).shape == (n,)


def _folded_bias(graph: ir.Graph, t, offset: float, weight_val: ir.Value, bias_val: ir.Value | None,
                 used_names: set[str]) -> ir.Value:
    """A new [N] initializer: bias + offset * (column sums of B as [K, N])."""
    folded = np.zeros(t.n, np.float64)
    if offset != 0.0:
        folded += np.float64(offset) * _const_array(weight_val).sum(axis=1 if t.trans_b else 0, dtype=np.float64)
    if bias_val is not None:
        folded += _const_array(bias_val).astype(np.float64).reshape(t.n)
    return new_initializer(graph, unique_name(f"{t.weight}/scap_bias", used_names), folded.astype(np.dtype(t.dtype)))


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` registered in ``graph`` as the initializer ``name`` (already unique), typed and shaped."""
    val = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    val.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    val.shape = ir.Shape(list(array.shape))
    graph.register_initializer(val)
    return val


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``...: the first not in ``used`` (which then holds it)."""
    cand, i = name, 1
    while cand in used:
        i += 1
        cand = f"{name}_{i}"
    used.add(cand)
    return cand


def load_model(path: str | Path) -> ir.Model:
    """onnx_ir model, external data left on disk (memory-mapped). ScapError if not ONNX."""
    p = Path(path)
    if not p.is_file():
        raise ScapError(missing_model_message(p))
    try:
        return ir.load(str(p))
    except Exception:
        raise ScapError(f"{p} is not an ONNX model (cannot parse it as ModelProto)") from None


def wants_external_data(model: ir.Model) -> bool:
    """Whether ``model`` should be saved with external data: it had some, or it is too large for one
    protobuf. Ask before fusing (scap_onnx.fuse): fused weights are computed tensors, not external."""
    return _uses_external_data(model) or _initializer_bytes(model) > EXTERNAL_DATA_BYTES


def _uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += int(np.prod(t.shape.numpy(), dtype=np.int64)) * t.dtype.itemsize
    return total


def external_data_name(output: Path) -> str:
    return output.name + ".data"


def save_model(model: ir.Model, output: str | Path, *, external: bool | None = None,
               inputs_to_keep: list[Path] | None = None) -> Path | None:
    """Save atomically: the model (and its data file) appear complete or not at all.

    ``external``: None decides by the size of the model (or whether it used external data).
    Returns the external data file written, if any.
    """
    output = Path(output)
    check_output_file(output)
    if external is None:
        external = wants_external_data(model)
    for p in inputs_to_keep or []:
        if same_file(p, output) or (external and same_file(p, output.parent / external_data_name(output))):
            raise ScapError(f"output {output} would overwrite the input {p}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp_model = tmp / output.name
        if external:
            data_name = external_data_name(output)
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp / data_name, output.parent / data_name)
            os.replace(tmp_model, output)
            return output.parent / data_name
        ir.save(model, tmp_model)
        os.replace(tmp_model, output)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rewrite_model(model: ir.Model, plan: Mapping[str, TargetPlan | tuple]) -> tuple[ir.Model, list[str]]:
    """Apply the plan in place; returns the model and the names of the rewritten targets."""
    p = ScapRewritePass(plan)
    result = p(model)
    return result.model, p.rewritten


def check_model(path: str | Path) -> None:
    """onnx.checker on a saved model (by path, so external data and > 2 GB models work)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ScapError(f"rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from None
