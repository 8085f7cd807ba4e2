"""Token-scaled thresholds: the drop rule applied to x / ||x|| for inputs whose scale moves with the text.

SCAP's thresholds are static. Inputs that come out of a normalisation (q/k/v and gate/up read an
RMSNorm or LayerNorm) have a fixed scale per token, but the attention output that o reads and the
act(gate) * up that down reads do not: their scale follows the text, and so does the sparsity a
static threshold gives (docs/calibration.md: o of one layer read 50% on fortunes for a 40% target
calibrated on pydoc). For those roles the threshold is calibrated on each token's activation
divided by its L2 norm n, and the rewritten model computes

    Y = ScapSparseMatMul(x / n, B, offset * colsum(B)) * n  (+ bias)

with standard ops around the unchanged op: x_i is dropped iff |x_i / n - m| <= tau, i.e. the
threshold scales with the token. The norm is computed in float32 (n + 1e-30, so that a zero token
gives zeros, not NaN). These helpers build the nodes for the capture graphs (onnx protos); the
rewriter builds the same with onnx_ir.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Roles whose inputs are not the output of a normalisation in pre-norm (Llama, GPT-2) and
#: post-norm (BERT) transformers: the attention output (o) and the MLP's hidden activation (down).
#: The default of calibrate's ``token_scaled_roles`` (``--token-scaled``; ``none`` for SCAP's static
#: rule everywhere): with it, thresholds calibrated on one text hold on others (docs/calibration.md).
UNNORMALISED_ROLES = ("o", "down")
DEFAULT_ROLES: tuple[str, ...] = UNNORMALISED_ROLES
#: Added to the norm: a token of zeros divides by this instead of by 0.
TINY = 1e-30
#: In the names of the rewriter's norm nodes (x.name + NORM_TAG + ...), by which validate finds x.
NORM_TAG = "/scap_token_norm"


def parse_roles(value: str | None) -> tuple[str, ...]:
    """``"o,down"`` -> ("o", "down"); ``"none"``, "" or None -> () (static thresholds)."""
    if value is None:
        return DEFAULT_ROLES
    roles = tuple(r.strip() for r in value.split(",") if r.strip())
    return () if roles in (("none",), ()) else roles


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def norm_nodes(x: str, dtype: int, opset: int, prefix: str) -> tuple[list[onnx.NodeProto], list, str, str]:
    """Nodes computing z = x / n and n = ||x|| over the last axis (keepdims), both of x's type.
    Returns (nodes, initializers, z, n)."""
    p = prefix
    tiny = numpy_helper.from_array(np.asarray(TINY, np.float32), p + "tiny")
    inits = [tiny]
    nodes = []
    x32 = x
    if dtype != TensorProto.FLOAT:
        x32 = p + "x32"
        nodes.append(helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT, name=p + "Cast"))
    if opset >= 18:
        axes = numpy_helper.from_array(np.asarray([-1], np.int64), p + "axes")
        inits.append(axes)
        nodes.append(helper.make_node("ReduceL2", [x32, axes.name], [p + "l2"], keepdims=1, name=p + "ReduceL2"))
    else:
        nodes.append(helper.make_node("ReduceL2", [x32], [p + "l2"], axes=[-1], keepdims=1, name=p + "ReduceL2"))
    nodes.append(helper.make_node("Add", [p + "l2", tiny.name], [p + "n32"], name=p + "AddTiny"))
    nodes.append(helper.make_node("Div", [x32, p + "n32"], [p + "z32"], name=p + "Div"))
    if dtype == TensorProto.FLOAT:
        return nodes, inits, p + "z32", p + "n32"
    nodes.append(helper.make_node("Cast", [p + "z32"], [p + "z"], to=dtype, name=p + "CastZ"))
    nodes.append(helper.make_node("Cast", [p + "n32"], [p + "n"], to=dtype, name=p + "CastN"))
    return nodes, inits, p + "z", p + "n"
