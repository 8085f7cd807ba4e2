"""Rewrite: target MatMuls (+ a following constant-bias Add) -> ScapSparseMatMul.

An onnx_ir in-place pass (:class:`ScapRewritePass`) over a model loaded lazily (external data
stays memory-mapped; weights are read only to fold biases):

    Y = X @ B (+ b)   ->   ScapSparseMatMul(X, B, b + offset * colsum(B)), threshold, offset

The folded bias makes the new node compute the original function wherever nothing is dropped
(shared/DESIGN.md). Node names are those of the original MatMuls; outputs keep their names, types
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
from .fileio import same_file
from .op import DOMAIN, OP_TYPE, OPSET_VERSION
from .stats import TargetPlan
from .targets import GraphView, find_all_targets

#: Models whose initializers exceed this are saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _node_key(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


class ScapRewritePass(ir.passes.InPlacePass):
    """Replace the planned MatMuls by ScapSparseMatMul. ``plan``: target name -> TargetPlan
    (or a (threshold, offset) pair)."""

    def __init__(self, plan: Mapping[str, TargetPlan | tuple[float, float]]):
        super().__init__()
        self.plan = {k: (v.threshold, v.offset) if isinstance(v, TargetPlan) else (float(v[0]), float(v[1]))
                     for k, v in plan.items()}
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
        for name, (threshold, offset) in self.plan.items():
            if not (np.isfinite(threshold) and threshold >= 0 and np.isfinite(offset)):
                raise ScapError(f"target {name!r}: invalid threshold {threshold} / offset {offset}")
            t = targets[name]
            mm = nodes[name]
            a_val = mm.inputs[0]
            b_val = graph.initializers.get(t.weight, mm.inputs[1])
            old_nodes = [mm]
            old_out = mm.outputs[0]
            bias_val = None
            if t.bias is not None:
                add = nodes[t.bias_add]
                old_nodes.append(add)
                old_out = add.outputs[0]
                bias_val = graph.initializers.get(t.bias)
                if bias_val is None:  # a Constant node output: keep the Add's own input
                    bias_val = next(v for v in add.inputs if v is not mm.outputs[0])
            if offset != 0.0:
                b = b_val.const_value.numpy()
                folded = np.float64(offset) * b.sum(axis=0, dtype=np.float64)
                if bias_val is not None:
                    folded = folded + bias_val.const_value.numpy().astype(np.float64)
                bname = _unique(f"{t.weight}/scap_bias", used_names)
                bias_val = ir.Value(name=bname, const_value=ir.tensor(folded.astype(b.dtype), name=bname))
                bias_val.type = ir.TensorType(ir.DataType.from_numpy(b.dtype))
                bias_val.shape = ir.Shape([b.shape[1]])
                graph.register_initializer(bias_val)
            inputs = [a_val, b_val] + ([bias_val] if bias_val is not None else [])
            fused = f"; fused bias Add {t.bias_add!r}" if t.bias is not None else ""
            new = ir.Node(
                DOMAIN, OP_TYPE, inputs,
                attributes=[ir.AttrFloat32("threshold", float(threshold)), ir.AttrFloat32("offset", float(offset))],
                name=mm.name or None, num_outputs=1,
                doc_string=f"scap-onnx: rewritten from MatMul {name!r}{fused}",
            )
            out = new.outputs[0]
            if old_out.type is None:
                out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype)))
            ir.convenience.replace_nodes_and_values(graph, mm, old_nodes, [new], [old_out], [out])
            self.rewritten.append(name)
        # Drop original biases that were folded and that nothing reads any more.
        for nm in {targets[n].bias for n in self.rewritten if targets[n].bias}:
            v = graph.initializers.get(nm)
            if v is not None and not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del graph.initializers[nm]
        if self.rewritten:
            model.opset_imports[DOMAIN] = OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.rewritten))


def _unique(name: str, used: set[str]) -> str:
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
        raise ScapError(f"model {p} does not exist")
    try:
        return ir.load(str(p))
    except Exception:
        raise ScapError(f"{p} is not an ONNX model (cannot parse it as ModelProto)") from None


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
    if external is None:
        external = _uses_external_data(model) or _initializer_bytes(model) > EXTERNAL_DATA_BYTES
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


def rewrite_model(model: ir.Model, plan: Mapping[str, TargetPlan | tuple[float, float]]) -> tuple[ir.Model, list[str]]:
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
