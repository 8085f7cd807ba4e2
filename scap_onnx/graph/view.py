"""The little of a graph that target finding, pairing and lowering need, from either representation,
and the one resolver of constant weights.

:class:`GraphView` reads an ``onnx.ModelProto`` (weights not needed: load with
``load_external_data=False``) or an ``onnx_ir.Model``: nodes, constant tensors (initializers and
Constant nodes, with dims and element type) and graph outputs. :meth:`GraphView.resolve` follows a
value back through the nodes that pass a constant on (Identity, Transpose, Cast) to the constant
it comes from; every question of the form "which constant weight does this MatMul read" goes
through it. :meth:`GraphView.dequantized` is its twin for a weight stored quantized: the
DequantizeLinear a value comes from (through Identity and Transpose nodes) and the constant it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

#: Attributes target finding reads: Gemm's, MatMulNBits' shape, format and accuracy level,
#: DequantizeLinear's axis and block_size.
_ATTRS = ("alpha", "beta", "transA", "transB", "K", "N", "bits", "block_size", "accuracy_level", "axis")
#: Nodes through which a value is still "that constant": copied, transposed (the rewriter's B of a
#: Gemm with transB, a tied lm_head reading the embedding) or cast.
PASS_THROUGH = ("Identity", "Transpose", "Cast")
DEQUANTIZE = "DequantizeLinear"
_MAX_CHAIN = 8


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, float], ...] = ()  # those of _ATTRS that are set

    def attr(self, name: str, default: float) -> float:
        return dict(self.attrs).get(name, default)


@dataclass(frozen=True)
class Origin:
    """Where a value comes from: the constant ``name`` and the pass-through ops on the way."""

    name: str
    through: tuple[str, ...] = ()

    @property
    def unchanged(self) -> bool:
        """The value is the constant itself (only Identity nodes in between)."""
        return all(op == "Identity" for op in self.through)


@dataclass(frozen=True)
class Dequantized:
    """A value computed by a DequantizeLinear from a constant: the node, the constant its x input
    comes from, and the pass-through ops between the node's output and the value."""

    node: Node
    x: Origin
    after: tuple[str, ...] = ()

    @property
    def transposes(self) -> int:
        """How many Transpose nodes lie between the stored constant and the value (odd: a weight
        read as [K, N] is stored [N, K])."""
        return sum(op == "Transpose" for op in (*self.x.through, *self.after))


@dataclass
class GraphView:
    """Nodes, constant tensors (name -> (dims, onnx elem type)) and graph outputs of a graph."""

    nodes: list[Node]
    initializers: dict[str, tuple[tuple[int, ...], int]]
    graph_outputs: set[str]
    producers: dict[str, Node] = field(default_factory=dict)  # pass-through node by its output

    @classmethod
    def from_proto(cls, model: onnx.ModelProto) -> "GraphView":
        g = model.graph
        graph_inputs = {i.name for i in g.input}
        inits = {
            t.name: (tuple(int(d) for d in t.dims), t.data_type) for t in g.initializer if t.name not in graph_inputs
        }
        # Constant nodes with a tensor value are constants too (some exporters fold weights into them).
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        inits[n.output[0]] = (tuple(int(d) for d in a.t.dims), a.t.data_type)
        nodes = [Node(n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output),
                      tuple((a.name, a.f if a.type == onnx.AttributeProto.FLOAT else a.i)
                            for a in n.attribute if a.name in _ATTRS)) for n in g.node]
        return cls(nodes, inits, {o.name for o in g.output})._index()

    @classmethod
    def from_ir(cls, model) -> "GraphView":
        g = model.graph
        inits: dict[str, tuple[tuple[int, ...], int]] = {}
        for name, v in g.initializers.items():
            if v.is_graph_input() or v.const_value is None:
                continue
            inits[name] = (tuple(int(d) for d in v.const_value.shape), int(v.const_value.dtype))
        nodes = []
        for n in g:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in n.attributes:
                t = n.attributes["value"].value
                if hasattr(t, "shape") and hasattr(t, "dtype"):
                    inits[n.outputs[0].name] = (tuple(int(d) for d in t.shape), int(t.dtype))
            nodes.append(
                Node(
                    n.name or "",
                    n.op_type,
                    n.domain,
                    tuple(v.name if v is not None else "" for v in n.inputs),
                    tuple(v.name for v in n.outputs),
                    tuple((k, a.value) for k, a in n.attributes.items() if k in _ATTRS),
                )
            )
        return cls(nodes, inits, {o.name for o in g.outputs})._index()

    def _index(self) -> "GraphView":
        for n in self.nodes:
            if n.op_type in (*PASS_THROUGH, DEQUANTIZE) and n.domain in ("", "ai.onnx") and n.inputs and n.outputs:
                self.producers[n.outputs[0]] = n
        return self

    def resolve(self, name: str) -> Origin | None:
        """The constant a value comes from through pass-through nodes; None if it is not constant."""
        through: list[str] = []
        while name not in self.initializers:
            node = self.producers.get(name)
            if node is None or node.op_type == DEQUANTIZE or len(through) >= _MAX_CHAIN:
                return None
            through.append(node.op_type)
            name = node.inputs[0]
        return Origin(name, tuple(through))

    def dequantized(self, name: str) -> Dequantized | None:
        """The DequantizeLinear that computes a value from a constant, through Identity and
        Transpose nodes on either side (a Cast would change the weight's type); None otherwise."""
        after: list[str] = []
        node = self.producers.get(name)
        while node is not None and node.op_type in ("Identity", "Transpose") and len(after) < _MAX_CHAIN:
            after.append(node.op_type)
            node = self.producers.get(node.inputs[0])
        if node is None or node.op_type != DEQUANTIZE:
            return None
        x = self.resolve(node.inputs[0])
        if x is None or "Cast" in x.through:
            return None
        return Dequantized(node, x, tuple(after))

    def constant(self, name: str) -> str | None:
        """The constant a value is (through Identity nodes only); None if it is not one."""
        origin = self.resolve(name)
        return origin.name if origin is not None and origin.unchanged else None

    def elem_type(self, name: str) -> int | None:
        """Element type of a constant value; None if it is not constant or a Cast changes it."""
        origin = self.resolve(name)
        if origin is None or "Cast" in origin.through:
            return None
        return self.initializers[origin.name][1]


def declared_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element types a graph declares: inputs, outputs, value_info and initializers."""
    types = {info.name: info.type.tensor_type.elem_type for info in [*graph.input, *graph.output, *graph.value_info]
             if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types
