"""Numpy reference of ScapSparseMatMul: the oracle for every kernel and for the rewriter.

Semantics (scap_onnx.op.contract): D[..., k] = A[..., k] - offset - channel_offset[k]; D[..., k] is
dropped iff |D[..., k]| <= threshold * threshold_scale[k]; Y = D_kept @ B (+ bias); the two vectors
optional (float32 [K]). Arithmetic in float32 whatever T is, the result cast back to T.
ScapSparseMatMulNBits (scap_onnx.op.nbits) is the same rule over W dequantised in float32.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .contract import DOMAIN, OP_TYPE, check_attributes, check_channel_vectors
from .nbits import OP_TYPE_NBITS, check_nbits_attributes, dequantize_packed, k_blocks, row_bytes


def channel_thresholds(threshold: float, threshold_scale: np.ndarray) -> np.ndarray:
    """threshold * threshold_scale[k] in float32; where that is 0 * inf the scale decides (0: keep
    the channel's non-zeros, +inf: drop the channel), as in every kernel."""
    scale = np.asarray(threshold_scale, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        tau = np.float32(threshold) * scale
    return np.where(np.isnan(tau), scale, tau)


def drop_rule(a: np.ndarray, threshold: float, offset: float = 0.0, threshold_scale: np.ndarray | None = None,
              channel_offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(D, dropped): D = A - offset - channel_offset in float32 (the subtractions in that order, each
    rounded to float32, as in the kernels) and whether each element is dropped (NaN never is)."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.asarray(a).astype(np.float32, copy=False) - np.float32(offset)
        if channel_offset is not None:
            d = d - np.asarray(channel_offset, np.float32)
        tau = np.float32(threshold) if threshold_scale is None else channel_thresholds(threshold, threshold_scale)
        return d, np.abs(d) <= tau


def sparsify(a: np.ndarray, threshold: float, offset: float = 0.0, threshold_scale: np.ndarray | None = None,
             channel_offset: np.ndarray | None = None) -> np.ndarray:
    """D (see :func:`drop_rule`) with the dropped elements set to 0."""
    d, dropped = drop_rule(a, threshold, offset, threshold_scale, channel_offset)
    return np.where(dropped, np.float32(0), d)


def scap_sparse_matmul(
    a: np.ndarray,
    b: np.ndarray,
    bias: np.ndarray | None = None,
    threshold_scale: np.ndarray | None = None,
    channel_offset: np.ndarray | None = None,
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
    check_channel_vectors(b.shape[0], threshold_scale, channel_offset)
    d = sparsify(a, threshold, offset, threshold_scale, channel_offset)
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

    def _run(self, a, b, bias=None, threshold_scale=None, channel_offset=None, threshold=None,  # noqa: D401
             offset=0.0):
        if threshold is None:
            raise ValueError("ScapSparseMatMul requires the 'threshold' attribute")
        return (scap_sparse_matmul(a, b, bias, threshold_scale, channel_offset, threshold=threshold, offset=offset),)


ScapSparseMatMulOpRun = ScapSparseMatMul


def scap_sparse_matmul_nbits(
    a: np.ndarray,
    b_packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    threshold_scale: np.ndarray | None = None,
    channel_offset: np.ndarray | None = None,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    threshold: float,
    offset: float = 0.0,
) -> np.ndarray:
    """ScapSparseMatMulNBits: W dequantised from the packed layout in float32, then scap_sparse_matmul."""
    check_nbits_attributes(k, n, bits, block_size)
    kb = k_blocks(k, block_size)
    if b_packed.shape != (k, row_bytes(n, bits)) or b_packed.dtype != np.uint8:
        raise ValueError(f"B_packed must be uint8 [{k}, {row_bytes(n, bits)}], got {b_packed.dtype} {b_packed.shape}")
    if scales.shape != (kb, n):
        raise ValueError(f"scales must have shape ({kb}, {n}), got {scales.shape}")
    if zero_points is not None and zero_points.shape != (kb, n):
        raise ValueError(f"zero_points must have shape ({kb}, {n}), got {zero_points.shape}")
    w = dequantize_packed(b_packed, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
    return scap_sparse_matmul(a, w, bias, threshold_scale, channel_offset, threshold=threshold, offset=offset)


class ScapSparseMatMulNBits(OpRun):
    """onnx.reference implementation of ScapSparseMatMulNBits (an omitted optional input is None)."""

    op_domain = DOMAIN
    op_type = OP_TYPE_NBITS

    def _run(self, a, b_packed, scales, zero_points=None, bias=None, threshold_scale=None,  # noqa: N803
             channel_offset=None, K=None, N=None, bits=None, block_size=None, threshold=None, offset=0.0):
        if None in (K, N, bits, block_size, threshold):
            raise ValueError("ScapSparseMatMulNBits requires the K, N, bits, block_size and threshold attributes")
        return (scap_sparse_matmul_nbits(a, b_packed, scales, zero_points, bias, threshold_scale, channel_offset,
                                         k=K, n=N, bits=bits,
                                         block_size=block_size, threshold=threshold, offset=offset),)
