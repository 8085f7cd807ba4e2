"""Sparsity measured from the op's own inputs: per target, per role, and weighted by weight bytes.

:class:`SparsityCounter` counts, per target, the input elements with ``|A - offset| <= threshold``
over batches of captured inputs; validate feeds it alongside the accuracy metrics, and
:func:`measure_sparsity` runs it on a rewritten model alone. :func:`summarize` turns the fractions
into the report's form: per node, per role, and the share of all FC weight bytes (MatMuls with a
constant 2-D B, lm_head included) that the kernels skip, with the speedup that share would give if
decoding were nothing but reading FC weights (``ideal_fc_speedup``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..calibration.capture import build_capture_model, CAPTURE_PREFIX
from ..errors import ScapError
from ..graph.model_io import ModelSource
from ..graph.quantized import MATMUL_NBITS
from ..graph.targets import layer_of, role_of
from ..graph.view import GraphView
from ..op.contract import OP_TYPE, channel_vectors, is_float_node, node_attribute, scap_nodes, targets_of
from ..op.reference import drop_rule
from ..op.session import base_options, open_session, run_session
from ..progress import NullProgress, Progress

_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1}


def fc_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every MatMul / Gemm weight that is a constant 2-D tensor, also through Identity,
    Transpose or Cast nodes (a tied lm_head reads the embedding through a Transpose), of every
    MatMulNBits' codes and every MatMul's QDQ weight (a DequantizeLinear of a constant): what a
    decode step streams from memory for its fully-connected layers."""
    view = GraphView.from_proto(model)
    total = 0
    for n in view.nodes:
        if n.op_type == MATMUL_NBITS and len(n.inputs) > 1 and (b := view.constant(n.inputs[1])) is not None:
            total += int(np.prod(view.initializers[b][0]))  # uint8
            continue
        if n.op_type not in ("MatMul", "Gemm") or len(n.inputs) < 2 or view.resolve(n.inputs[0]) is not None:
            continue
        origin = view.resolve(n.inputs[1])
        if origin is None and n.op_type == "MatMul" and (dq := view.dequantized(n.inputs[1])) is not None:
            origin = dq.x
        if origin is None:
            continue
        dims, elem = view.initializers[origin.name]
        if len(dims) == 2:
            total += int(dims[0]) * int(dims[1]) * _ITEMSIZE.get(elem, 4)
    return total


class SparsityCounter:
    """Per target (dicts with name, input, threshold, offset and optionally threshold_scale /
    channel_offset): dropped / total input elements, by the op's own rule (scap_onnx.op.reference)."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        self.dropped = {e["name"]: 0 for e in entries}
        self.total = {e["name"]: 0 for e in entries}

    def add(self, captured: dict[str, np.ndarray]) -> None:
        """``captured``: input tensor name -> the values the op read in one batch."""
        for e in self.entries:
            x = captured[e["input"]]
            _, dropped = drop_rule(x, e["threshold"], e["offset"], e.get("threshold_scale"), e.get("channel_offset"))
            self.dropped[e["name"]] += int(np.count_nonzero(dropped))
            self.total[e["name"]] += int(x.size)

    def measured(self) -> dict[str, float]:
        return {k: self.dropped[k] / max(self.total[k], 1) for k in self.dropped}


def role_summary(nodes: dict[str, dict], targets: dict[str, float] | None = None) -> dict[str, dict]:
    """Per role: number of targets, mean / min / max sparsity, byte-weighted mean where the nodes
    carry ``bytes``, and the deviation from ``targets`` (role -> target sparsity)."""
    by_role: dict[str, list[dict]] = {}
    for v in nodes.values():
        by_role.setdefault(v["role"], []).append(v)
    out = {}
    for role, vs in by_role.items():
        vals = [v["sparsity"] for v in vs]
        d = {"targets": len(vals), "mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
        if all("bytes" in v for v in vs):
            d["weighted"] = float(np.average(vals, weights=[v["bytes"] for v in vs]))
        if targets and role in targets:
            d["target"] = float(targets[role])
            d["mean_error"] = d["mean"] - d["target"]
            d["worst_error"] = float(max(vals, key=lambda x: abs(x - targets[role])) - targets[role])
        out[role] = d
    return out


def summarize(entries: list[dict], measured: dict[str, float], fc_bytes: int,
              targets: dict[str, float] | None) -> dict:
    """Per node, per role and weighted by FC weight bytes (``entries`` as scap_onnx.evaluation.pairing
    makes them)."""
    nodes = {}
    skipped = 0.0
    sparse_bytes = 0
    for n in entries:
        s = measured[n["name"]]
        nb = n.get("bytes", n["k"] * n["n"] * n["itemsize"])
        nodes[n["name"]] = {"role": n["role"], "layer": n["layer"], "k": n["k"], "n": n["n"],
                            "threshold": n["threshold"], "offset": n["offset"], "sparsity": s, "bytes": nb}
        skipped += s * nb
        sparse_bytes += nb
    roles = role_summary(nodes, targets)
    for v in nodes.values():
        del v["bytes"]
    total = max(fc_bytes, sparse_bytes, 1)
    return {
        "nodes": nodes,
        "roles": roles,
        "weighted": skipped / total,
        "weighted_sparse_targets": skipped / max(sparse_bytes, 1),
        "fc_bytes": int(total),
        "fc_bytes_sparse_targets": int(sparse_bytes),
        "ideal_fc_speedup": total / max(total - skipped, 1e-9),
    }


def measure_sparsity(model: str | Path, data, *, threads: int | None = None, use_library: bool | None = None,
                     progress: Progress | None = None) -> dict[str, dict]:
    """Per target of a rewritten model: role, layer, threshold, offset and the fraction of its input
    elements dropped on ``data`` (a DataSource), without the dense original."""
    with ModelSource(model) as src:
        nodes = scap_nodes(src.proto)
        if not nodes:
            raise ScapError(f"{model} has no {OP_TYPE} nodes")
        entries = []
        for n in nodes:
            try:
                vectors = channel_vectors(n, src.weight)
            except ValueError as e:
                raise ScapError(f"cannot measure sparsity: {e}") from None
            for name in targets_of(n) or [n.name]:
                entries.append({"name": name, "input": n.input[0], "threshold": node_attribute(n, "threshold"),
                                "offset": node_attribute(n, "offset"), **vectors})
        view = src.view
        # A's type: that of a ScapSparseMatMul's B; of a ScapSparseMatMulNBits' bias (its scales' type is not A's)
        elem = {n.input[0]: (view.elem_type(n.input[1]) if is_float_node(n) else
                             view.elem_type(n.input[4]) if len(n.input) > 4 and n.input[4] else None)
                or onnx.TensorProto.FLOAT for n in nodes}
        capture = build_capture_model(src.proto, elem)
        session = open_session(capture, data_dir=src.data_dir, options=base_options(threads),
                               use_library=use_library, weight_is_finite=src.weight_is_finite)
        names = list(elem)
        outputs = [f"{CAPTURE_PREFIX}{k}" for k in range(len(names))]
        counter = SparsityCounter(entries)
        task = (progress or NullProgress()).task("measure sparsity", data.max_tokens if data.is_text else None)
        for feeds, n_tok in data.batches():
            counter.add(dict(zip(names, run_session(session, outputs, feeds))))
            task.advance(n_tok)
        task.close()
    measured = counter.measured()
    return {e["name"]: {"role": role_of(e["name"]) or "other", "layer": layer_of(e["name"]),
                        "threshold": e["threshold"], "offset": e["offset"], "sparsity": measured[e["name"]]}
            for e in entries}
