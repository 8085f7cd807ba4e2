"""The ScapSparseMatMul operator contract, in one place on the Python side.

See shared/DESIGN.md ("Operator contract") and custom_ops/scap_sparse_matmul.h for the C++ twin:
D = A - offset; D[i] is dropped iff |D[i]| <= threshold; Y = D_kept @ B (+ bias).

Also the node metadata the rewriter writes (on ScapSparseMatMul and ScapSparseMatMulNBits nodes
alike) and validate, inspect and the measurements read:

- :data:`TARGETS_KEY`: JSON list of the original MatMul / Gemm nodes (target names) the node
  computes: one, or several side by side when fused (in the order of the Split that follows);
- :data:`INPUT_KEY`: the activation those targets read in the original model (for token-scaled
  targets the node reads x / ||x|| instead);
- :data:`NORM_KEY`: JSON list of the names of the standard nodes that belong to the node (the
  token norm, the multiply back by the norm and the original bias Add after it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import onnx
from onnx import helper

DOMAIN = "com.scap"
OP_TYPE = "ScapSparseMatMul"
#: The same op over block-quantized weights (scap_onnx.op.nbits); it carries the same metadata.
OP_TYPE_NBITS = "ScapSparseMatMulNBits"
OP_TYPES = (OP_TYPE, OP_TYPE_NBITS)
OPSET_VERSION = 1

TARGETS_KEY = "scap_onnx.targets"
INPUT_KEY = "scap_onnx.input"
NORM_KEY = "scap_onnx.norm_nodes"


@dataclass(frozen=True)
class Sparsification:
    """What one ScapSparseMatMul node does to its input: the attributes, and whether the rule is
    applied to the input divided by its norm per token (scap_onnx.op.token_norm)."""

    threshold: float
    offset: float = 0.0
    token_scaled: bool = False

    @classmethod
    def of(cls, value) -> "Sparsification":
        """From anything with threshold / offset / token_scaled attributes (a calibration plan
        entry), or a (threshold, offset[, token_scaled]) tuple."""
        if isinstance(value, tuple):
            return cls(float(value[0]), float(value[1]), bool(value[2]) if len(value) > 2 else False)
        return cls(float(value.threshold), float(value.offset), bool(getattr(value, "token_scaled", False)))


def check_attributes(threshold: float, offset: float) -> None:
    """Raise ValueError for attributes the op rejects."""
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if math.isnan(offset):
        raise ValueError("offset must not be NaN")


def opset_import() -> onnx.OperatorSetIdProto:
    """The opset import a model needs before it may hold ScapSparseMatMul nodes."""
    return helper.make_opsetid(DOMAIN, OPSET_VERSION)


def make_node(
    a: str,
    b: str,
    output: str,
    *,
    threshold: float,
    offset: float = 0.0,
    bias: str | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """A ScapSparseMatMul node: Y = drop(A - offset) @ B (+ bias)."""
    inputs = [a, b] + ([bias] if bias else [])
    return helper.make_node(
        OP_TYPE,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        threshold=float(threshold),
        offset=float(offset),
    )


def is_scap_node(node) -> bool:
    """Whether an onnx.NodeProto or onnx_ir.Node is a ScapSparseMatMul or a ScapSparseMatMulNBits."""
    return node.op_type in OP_TYPES and node.domain == DOMAIN


def is_float_node(node) -> bool:
    """Whether a node is a ScapSparseMatMul (float weights: the one that fuses and lowers)."""
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def scap_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ScapSparseMatMul and ScapSparseMatMulNBits nodes of a model's main graph, in order."""
    return [n for n in model.graph.node if is_scap_node(n)]


def node_attribute(node: onnx.NodeProto, name: str, default: float = 0.0) -> float:
    """A float attribute of a NodeProto (an INT attribute read as its value)."""
    for a in node.attribute:
        if a.name == name:
            return float(a.f) if a.type == onnx.AttributeProto.FLOAT else float(a.i)
    return default


def node_sparsification(node: onnx.NodeProto) -> Sparsification:
    return Sparsification(node_attribute(node, "threshold"), node_attribute(node, "offset"))


def _metadata(node) -> dict[str, str]:
    if isinstance(node, onnx.NodeProto):
        return {e.key: e.value for e in node.metadata_props}
    return dict(node.metadata_props)


def targets_of(node) -> list[str]:
    """The target names a ScapSparseMatMul node (NodeProto or onnx_ir.Node) computes, from its
    metadata; [] when the node does not record them (not written by scap-onnx's rewriter)."""
    value = _metadata(node).get(TARGETS_KEY)
    return list(json.loads(value)) if value else []


def source_input_of(node) -> str | None:
    """The activation the node's targets read in the original model (metadata), or None."""
    return _metadata(node).get(INPUT_KEY)


def norm_nodes_of(node) -> list[str]:
    """Names of the standard nodes that belong to a token-scaled node (metadata)."""
    value = _metadata(node).get(NORM_KEY)
    return list(json.loads(value)) if value else []


def record(node, *, targets: list[str], source_input: str, norm_nodes: list[str] = ()) -> None:
    """Write the rewriter's metadata on an onnx_ir node."""
    node.metadata_props[TARGETS_KEY] = json.dumps(list(targets))
    node.metadata_props[INPUT_KEY] = source_input
    if norm_nodes:
        node.metadata_props[NORM_KEY] = json.dumps(list(norm_nodes))
