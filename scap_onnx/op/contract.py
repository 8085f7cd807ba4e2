"""The ScapSparseMatMul operator contract, in one place on the Python side.

See shared/DESIGN.md ("Operator contract"), README ("The operator") and custom_ops/op_base.h for
the C++ twin. Inputs A, B[, bias][, threshold_scale][, channel_offset] (the last two float32 [K],
each optional, an empty name where absent):

    D[..., k] = A[..., k] - offset - channel_offset[k]          (channel_offset absent: 0)
    D[..., k] is dropped iff |D[..., k]| <= threshold * threshold_scale[k]   (absent: 1)
    Y = D_kept @ B (+ bias)

threshold_scale entries are >= 0; +inf drops every element of its channel (but NaN). Where the
product is 0 * inf the scale decides: 0 keeps the channel's non-zeros, +inf drops the channel
(:func:`channel_thresholds` in scap_onnx.op.reference computes it). A scale rather than a raw vector
of thresholds, so that a sweep changes the scalar attribute only.

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

import numpy as np
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

#: Input positions of the optional per-channel vectors: ScapSparseMatMul (A, B, bias, ...) and
#: ScapSparseMatMulNBits (A, B_packed, scales, zero_points, bias, ...).
CHANNEL_INPUTS = {OP_TYPE: (3, 4), OP_TYPE_NBITS: (5, 6)}


def _vector(values) -> tuple[float, ...] | None:
    """A per-channel vector as a tuple of float32 values (hashable, comparable), or None."""
    if values is None:
        return None
    return tuple(float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1))


@dataclass(frozen=True)
class Sparsification:
    """What one ScapSparseMatMul node does to its input: the attributes, the optional per-channel
    vectors (float32 values, as tuples) and whether the rule is applied to the input divided by its
    norm per token (scap_onnx.op.token_norm)."""

    threshold: float
    offset: float = 0.0
    token_scaled: bool = False
    threshold_scale: tuple[float, ...] | None = None
    channel_offset: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "threshold_scale", _vector(self.threshold_scale))
        object.__setattr__(self, "channel_offset", _vector(self.channel_offset))

    @classmethod
    def of(cls, value) -> "Sparsification":
        """From anything with threshold / offset / token_scaled (and optionally threshold_scale /
        channel_offset) attributes (a calibration plan entry), or a (threshold, offset[,
        token_scaled]) tuple."""
        if isinstance(value, tuple):
            return cls(float(value[0]), float(value[1]), bool(value[2]) if len(value) > 2 else False)
        return cls(float(value.threshold), float(value.offset), bool(getattr(value, "token_scaled", False)),
                   getattr(value, "threshold_scale", None), getattr(value, "channel_offset", None))

    def scale_array(self) -> np.ndarray | None:
        return None if self.threshold_scale is None else np.asarray(self.threshold_scale, np.float32)

    def channel_offset_array(self) -> np.ndarray | None:
        return None if self.channel_offset is None else np.asarray(self.channel_offset, np.float32)

    def centre(self) -> np.ndarray:
        """offset + channel_offset (float64; a scalar array without channel_offset): what the
        rewriter folds into the bias, and what a dropped element stands for in the lowering."""
        base = np.float64(self.offset)
        return base if self.channel_offset is None else base + self.channel_offset_array().astype(np.float64)


def check_attributes(threshold: float, offset: float) -> None:
    """Raise ValueError for attributes the op rejects."""
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if math.isnan(offset):
        raise ValueError("offset must not be NaN")


def check_channel_vectors(k: int, threshold_scale=None, channel_offset=None) -> None:
    """Raise ValueError for per-channel vectors the op rejects: a length other than K, a
    threshold_scale entry that is negative or NaN (+inf is allowed). channel_offset's values are
    data, like A's: NaN there gives NaN outputs."""
    for name, v in (("threshold_scale", threshold_scale), ("channel_offset", channel_offset)):
        if v is not None and np.shape(v) != (k,):
            raise ValueError(f"{name} must have shape ({k},) (K), got {np.shape(v)}")
    if threshold_scale is not None:
        bad = ~(np.asarray(threshold_scale, np.float32) >= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"threshold_scale must be >= 0 and not NaN, got {threshold_scale[i]} at channel {i}")


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
    threshold_scale: str | None = None,
    channel_offset: str | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """A ScapSparseMatMul node: Y = drop(A - offset - channel_offset) @ B (+ bias), the drop
    threshold scaled per channel by threshold_scale (optional inputs: names or None)."""
    inputs = trim_inputs([a, b, bias or "", threshold_scale or "", channel_offset or ""])
    return helper.make_node(
        OP_TYPE,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        threshold=float(threshold),
        offset=float(offset),
    )


def trim_inputs(inputs: list[str]) -> list[str]:
    """A node's input names with the trailing absent ("") optional ones removed."""
    inputs = list(inputs)
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def channel_input_names(node: onnx.NodeProto) -> tuple[str | None, str | None]:
    """(threshold_scale, channel_offset) input names of a ScapSparseMatMul(NBits) NodeProto, None
    where absent."""
    positions = CHANNEL_INPUTS[node.op_type]
    return tuple(node.input[i] if len(node.input) > i and node.input[i] else None for i in positions)


def channel_vectors(node: onnx.NodeProto, read) -> dict[str, np.ndarray | None]:
    """{"threshold_scale": ..., "channel_offset": ...} of a ScapSparseMatMul(NBits) NodeProto: float32
    arrays, None where absent. ``read(name)``: the array of the constant ``name`` (KeyError when it is
    not one)."""
    names = channel_input_names(node)
    out = {}
    for key, name in zip(("threshold_scale", "channel_offset"), names):
        try:
            out[key] = None if name is None else np.asarray(read(name), np.float32)
        except KeyError:
            raise ValueError(f"{node.op_type} node {node.name!r}: its {key} {name!r} is not a constant") from None
    return out


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
    """The node's attributes as a Sparsification; its per-channel inputs are graph values, read with
    :func:`channel_input_names` / :func:`channel_vectors`."""
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
