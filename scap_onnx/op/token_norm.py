"""Token-scaled thresholds: the drop rule applied to x / ||x|| for inputs whose scale moves with the text.

SCAP's thresholds are static. Inputs that come out of a normalisation (q/k/v and gate/up read an
RMSNorm or LayerNorm) have a fixed scale per token, but the attention output that o reads and the
act(gate) * up that down reads do not: their scale follows the text, and so does the sparsity a
static threshold gives (docs/calibration.md: o of one layer read 50% on fortunes for a 40% target
calibrated on pydoc). For those targets the threshold is calibrated on each token's activation
divided by its L2 norm n, and the rewritten model computes

    Y = ScapSparseMatMul(x / n, B, offset * colsum(B)) * n  (+ bias)

with standard ops around the unchanged op: x_i is dropped iff |x_i / n - m| <= tau, i.e. the
threshold scales with the token. The norm is computed in float32 (n + TINY, so that a zero token
gives zeros, not NaN). :func:`token_norm` builds those nodes once for every user: the capture
graphs (onnx protos) and the rewriter (onnx_ir), through scap_onnx.graph.builder.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.builder import GraphBuilder

#: Added to the norm: a token of zeros divides by this instead of by 0.
TINY = 1e-30
#: In the names of the rewriter's norm nodes (x.name + NORM_TAG + ...), for readers of the graph.
NORM_TAG = "/scap_token_norm"


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def token_norm(b: GraphBuilder, x, elem_type: int, opset: int):
    """(x / n, n) with n = ||x|| over the last axis (keepdims) + TINY, computed in float32 and both
    returned in x's element type."""
    f32 = onnx.TensorProto.FLOAT
    x32 = x if elem_type == f32 else b.op("Cast", [x], to=f32)
    if opset >= 18:
        l2 = b.op("ReduceL2", [x32, b.const("axes", np.asarray([-1], np.int64))], keepdims=1)
    else:
        l2 = b.op("ReduceL2", [x32], axes=[-1], keepdims=1)
    n = b.op("Add", [l2, b.const("tiny", np.asarray(TINY, np.float32))])
    z = b.op("Div", [x32, n])
    if elem_type == f32:
        return z, n
    return b.op("Cast", [z], to=elem_type), b.op("Cast", [n], to=elem_type)
