"""Capture: run a copy of the model that exposes target inputs as outputs, with onnxruntime.

The model is held once without its weights (scap_onnx.graph.model_io.ModelSource). Each capture
graph (original graph + Identity outputs for the requested tensors, optionally with upstream
targets sparsified in standard ONNX ops, dead nodes pruned) is then a small proto.

The sparsification inserted for upstream-aware calibration is the op contract in standard ops
(scap_onnx.op.lowering.sparsified_input): x' = Where(|x - m| <= tau, m, x), which with the
unchanged MatMul gives drop(x - m) @ W + m * colsum(W), what ScapSparseMatMul with the folded
bias computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..graph.builder import ProtoBuilder
from ..graph.model_io import ModelSource
from ..op.contract import Sparsification
from ..op.lowering import sparsified_input
from ..op.session import base_options, open_session, run_session
from ..op.token_norm import default_opset, token_norm

CAPTURE_PREFIX = "scap_capture::"
_SPARSIFY_PREFIX = "scap_sparsify::"


@dataclass(frozen=True)
class Upstream:
    """A tensor the capture graph sparsifies for the consumers named (upstream-aware calibration)."""

    input: str
    sparsification: Sparsification
    elem_type: int
    consumers: Sequence[str]
    #: (offset, threshold): names of float32 scalar graph inputs that replace the sparsification's
    #: own, fed at each run (calibration.sensitivity measures many plans in one session); or None.
    scalars: tuple[str, str] | None = None


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def _prune(nodes: list[onnx.NodeProto], wanted: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``wanted``, in their original order."""
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    need = set()
    stack = [w for w in wanted if w in producer]
    seen_names = set(stack)
    while stack:
        i = producer[stack.pop()]
        if i in need:
            continue
        need.add(i)
        for nm in list(nodes[i].input) + sorted(_subgraph_inputs(nodes[i])):
            if nm in producer and nm not in seen_names:
                seen_names.add(nm)
                stack.append(nm)
    return [n for i, n in enumerate(nodes) if i in need]


def build_capture_model(
    base: onnx.ModelProto,
    capture: Mapping[str, int],
    sparsify: Iterable[Upstream] | None = None,
    token_scaled: Iterable[str] = (),
) -> onnx.ModelProto:
    """A weight-free copy of ``base`` whose outputs are the tensors in ``capture`` (name -> elem type);
    those in ``token_scaled`` divided by their norm per token (scap_onnx.op.token_norm).

    ``sparsify``: :class:`Upstream` entries: their consumers read the sparsified tensor instead.
    """
    opset = default_opset(base)
    token_scaled = set(token_scaled)
    model = onnx.ModelProto()
    model.ir_version = base.ir_version
    model.opset_import.extend(base.opset_import)
    model.functions.extend(base.functions)  # model-local functions the kept nodes may call
    model.producer_name = "scap-onnx capture"
    g = model.graph
    g.name = base.graph.name
    g.input.extend(base.graph.input)
    g.initializer.extend(base.graph.initializer)  # weight-free: external references only
    g.sparse_initializer.extend(base.graph.sparse_initializer)
    nodes: list[onnx.NodeProto] = []
    extra_inits = []
    rewired: dict[str, dict[str, str]] = {}  # consumer node name -> {old input: new input}
    pre_nodes: dict[str, list[onnx.NodeProto]] = {}  # insert before first consumer
    for k, up in enumerate(sparsify or []):
        b = ProtoBuilder(f"{_SPARSIFY_PREFIX}{k}/")
        new = sparsified_input(b, up.input, up.sparsification, up.elem_type, opset, scalars=up.scalars)
        if up.scalars is not None:
            g.input.extend(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, []) for nm in up.scalars)
        extra_inits += b.initializers
        for c in up.consumers:
            rewired.setdefault(c, {})[up.input] = new
        if up.consumers:
            pre_nodes.setdefault(up.consumers[0], []).extend(b.nodes)
    for n in base.graph.node:
        key = n.name or n.output[0]
        if key in pre_nodes:
            nodes.extend(pre_nodes.pop(key))
        if key in rewired:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            for i, nm in enumerate(m.input):
                if nm in rewired[key]:
                    m.input[i] = rewired[key][nm]
            nodes.append(m)
        else:
            nodes.append(n)
    outputs = []
    for k, (name, dtype) in enumerate(capture.items()):
        out = f"{CAPTURE_PREFIX}{k}"
        if name in token_scaled:
            b = ProtoBuilder(f"{CAPTURE_PREFIX}norm{k}/")
            name, _ = token_norm(b, name, dtype, opset)
            nodes.extend(b.nodes)
            extra_inits += b.initializers
        nodes.append(helper.make_node("Identity", [name], [out], name=f"{CAPTURE_PREFIX}Identity{k}"))
        outputs.append(helper.make_tensor_value_info(out, dtype, None))
    g.node.extend(_prune(nodes, [o.name for o in outputs]))
    g.initializer.extend(extra_inits)
    g.output.extend(outputs)
    # Keep only the graph inputs the pruned graph reads (onnxruntime then needs no others).
    used = {i for n in g.node for i in n.input} | {i for n in g.node for i in _subgraph_inputs(n)}
    keep = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(keep)
    kept_inits = [t for t in g.initializer if t.name in used]
    if len(kept_inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    return model


class Capture:
    """An onnxruntime session over a capture model; ``run(feeds)`` returns {tensor name: array}."""

    def __init__(self, source: ModelSource, capture: Mapping[str, int], sparsify: Iterable[Upstream] | None = None,
                 options: ort.SessionOptions | None = None, providers: list[str] | None = None,
                 token_scaled: Iterable[str] = ()):
        self.names = list(capture)
        model = build_capture_model(source.proto, capture, sparsify, token_scaled)
        self.session = open_session(model, data_dir=source.data_dir, options=options or base_options(),
                                    provider=list(providers) if providers else None)
        self.output_names = [f"{CAPTURE_PREFIX}{k}" for k in range(len(self.names))]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, run_session(self.session, self.output_names, feeds)))
