"""Emit small graphs of standard ONNX ops in either representation the project uses.

The token norm and the lowering of ScapSparseMatMul (scap_onnx.op) are written once against this
interface and emitted as onnx protos (capture graphs, lowered models) by :class:`ProtoBuilder` or
as onnx_ir nodes (the rewriter) by :class:`IrBuilder`:

    v = builder.op("Div", [x, n])          # a node; returns its output
    c = builder.const("tiny", array)       # an initializer; returns it
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

#: Ops whose output is boolean; the others (but Cast and Where) take their first input's type.
_BOOL_OPS = {"LessOrEqual", "Less", "Greater", "GreaterOrEqual", "Equal", "IsNaN", "IsInf", "And", "Or", "Not"}


class GraphBuilder(Protocol):
    def op(self, op_type: str, inputs: Sequence, *, output=None, **attributes): ...
    def const(self, suffix: str, array: np.ndarray): ...


class ProtoBuilder:
    """Collects NodeProtos and TensorProtos named ``prefix`` + a counter; values are names."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: Sequence[str], *, output: str | None = None, **attributes) -> str:
        name = f"{self.prefix}{op_type}{len(self.nodes)}"
        output = output or name + "_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attributes))
        return output

    def const(self, suffix: str, array: np.ndarray) -> str:
        name = self.prefix + suffix
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name


class IrBuilder:
    """Creates onnx_ir nodes (in :attr:`nodes`, not yet in the graph) and registers initializers in
    ``graph``; names are made unique against ``used_names``; values are ir.Values with types."""

    def __init__(self, graph: ir.Graph, prefix: str, used_names: set[str]):
        self.graph = graph
        self.prefix = prefix
        self.used_names = used_names
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: Sequence[ir.Value], *, output: str | None = None, **attributes) -> ir.Value:
        name = unique_name(f"{self.prefix}{op_type}{len(self.nodes)}", self.used_names)
        attrs = [_ir_attribute(k, v) for k, v in attributes.items()]
        node = ir.Node("", op_type, list(inputs), attributes=attrs, name=name, num_outputs=1)
        out = node.outputs[0]
        out.name = unique_name(output or name + "_out", self.used_names)
        dtype = _result_type(op_type, inputs, attributes)
        if dtype is not None:
            out.type = ir.TensorType(dtype)
        self.nodes.append(node)
        return out

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return new_initializer(self.graph, unique_name(self.prefix + suffix, self.used_names), np.asarray(array))


def _ir_attribute(name: str, value) -> ir.Attr:
    if isinstance(value, (list, tuple)):
        return ir.AttrInt64s(name, [int(v) for v in value])
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    return ir.AttrInt64(name, int(value))


def _result_type(op_type: str, inputs: Sequence[ir.Value], attributes: dict) -> ir.DataType | None:
    if op_type == "Cast":
        return ir.DataType(attributes["to"])
    if op_type in _BOOL_OPS:
        return ir.DataType.BOOL
    source = inputs[1] if op_type == "Where" else inputs[0]
    return source.dtype if source is not None and source.type is not None else None


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


def used_names(graph: ir.Graph) -> set[str]:
    """Every node, value and initializer name of ``graph`` (new names must avoid them)."""
    return ({v.name for n in graph for v in n.outputs} | set(graph.initializers) | {n.name for n in graph}
            | {v.name for v in graph.inputs})
