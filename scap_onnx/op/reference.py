"""Numpy reference of ScapSparseMatMul: the oracle for every kernel and for the rewriter.

Semantics (shared/DESIGN.md): D = A - offset; D[i] is dropped iff |D[i]| <= threshold;
Y = D_kept @ B (+ bias). Arithmetic in float32 whatever T is, the result cast back to T.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .contract import DOMAIN, OP_TYPE, check_attributes


def sparsify(a: np.ndarray, threshold: float, offset: float = 0.0) -> np.ndarray:
    """D = A - offset in float32 with the dropped elements set to 0 (NaN is never dropped)."""
    d = a.astype(np.float32) - np.float32(offset)
    with np.errstate(invalid="ignore"):
        dropped = np.abs(d) <= np.float32(threshold)
    return np.where(dropped, np.float32(0), d)


def scap_sparse_matmul(
    a: np.ndarray,
    b: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    threshold: float,
    offset: float = 0.0,
) -> np.ndarray:
    """Y = sparsify(A) @ B (+ bias), accumulated in float32 (float64 for the matmul), cast to A's type."""
    check_attributes(threshold, offset)
    if b.ndim != 2:
        raise ValueError(f"B must be 2-D, got shape {b.shape}")
    if a.ndim < 1 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"A's last dimension must equal B's first ({b.shape[0]}), got shape {a.shape}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"bias must have shape ({b.shape[1]},), got {bias.shape}")
    d = sparsify(a, threshold, offset)
    # float64 accumulation keeps the oracle more exact than the kernels it judges.
    d64 = d.astype(np.float64)
    b64 = b.astype(np.float64)
    if np.isfinite(b64).all():
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf in A propagate, as in MatMul
            y = d64 @ b64
    else:
        # A dropped element skips its row of B, so an Inf there must not turn into 0 * Inf = NaN.
        rows = d64.reshape(-1, d64.shape[-1])
        with np.errstate(invalid="ignore", over="ignore"):
            y = np.stack([r[r != 0] @ b64[r != 0] for r in rows]) if len(rows) else rows @ b64
        y = y.reshape(*d64.shape[:-1], b64.shape[1])
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(a.dtype)


class ScapSparseMatMul(OpRun):
    """onnx.reference implementation: ReferenceEvaluator(model, new_ops=[ScapSparseMatMulOpRun]).

    ReferenceEvaluator finds new ops by (op_domain, class name): the class bears the op's name.
    """

    op_domain = DOMAIN
    op_type = OP_TYPE

    def _run(self, a, b, bias=None, threshold=None, offset=0.0):  # noqa: D401 - OpRun signature
        if threshold is None:
            raise ValueError("ScapSparseMatMul requires the 'threshold' attribute")
        return (scap_sparse_matmul(a, b, bias, threshold=threshold, offset=offset),)


ScapSparseMatMulOpRun = ScapSparseMatMul
