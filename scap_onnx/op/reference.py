"""Numpy reference of ScapSparseMatMul: the oracle for every kernel and for the rewriter.

Semantics (scap_onnx.op.contract): D[..., k] = A[..., k] - offset - channel_offset[k]; D[..., k] is
dropped iff |D[..., k]| <= threshold * threshold_scale[k]; Y = D_kept @ B (+ bias); the two vectors
optional (float32 [K]). Arithmetic in float32 whatever T is, the result cast back to T.
ScapSparseMatMulNBits (scap_onnx.op.nbits) is the same rule over W dequantised in float32, except
that with accuracy_level 4 several rows of A multiply as int8 activations (:func:`quantize_blocks`).
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .contract import DOMAIN, OP_TYPE, check_attributes, check_channel_vectors
from .nbits import (INT8_ACCURACY_LEVEL, OP_TYPE_NBITS, check_accuracy_level, check_nbits_attributes,
                    default_zero_point, dequantize_packed, k_blocks, row_bytes, unpack_rows, zero_points_kn)


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


def _check_operands(a, k: int, n: int, bias, threshold_scale, channel_offset, threshold: float, offset: float) -> None:
    """ValueError (ScapError for the attributes) for operands that do not fit a [K, N] weight."""
    check_attributes(threshold, offset)
    if a.ndim < 1 or a.shape[-1] != k:
        raise ValueError(f"A's last dimension must equal B's first ({k}), got shape {a.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
    check_channel_vectors(k, threshold_scale, channel_offset)


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
    if b.ndim != 2:
        raise ValueError(f"B must be 2-D, got shape {b.shape}")
    _check_operands(a, b.shape[0], b.shape[1], bias, threshold_scale, channel_offset, threshold, offset)
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


def quantize_blocks(d: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations D float32 [rows, K] -> (qa int8 [rows, K], sa float32 [rows, k_blocks]): per row
    and block of K, amax = max |D|, qa = rint(D * (127 / amax)) (half to even), sa = amax / 127,
    every step in float32; a block with amax = 0 gets qa = 0 and sa = 0. For rows without Inf or
    NaN (the caller's). Only where 127 / amax overflows to Inf (amax < 127 / FLT_MAX) is there
    more to say: D * Inf is clamped to +-127, and 0 * Inf (NaN) is 0, as the kernels do."""
    d = np.asarray(d, np.float32)
    rows, k = d.shape
    kb = k_blocks(k, block_size)
    padded = np.zeros((rows, kb * block_size), np.float32)
    padded[:, :k] = d
    blocks = padded.reshape(rows, kb, block_size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        amax = np.abs(blocks).max(axis=2)
        inv = np.where(amax == 0, np.float32(0), np.float32(127) / amax)
        scaled = blocks * inv[..., None]
        qa = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0, posinf=127.0, neginf=-127.0), -127, 127)).astype(np.int8)
        sa = (amax / np.float32(127)).astype(np.float32)
    return qa.reshape(rows, kb * block_size)[:, :k], sa


def _int8_activation_matmul(d: np.ndarray, q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *,
                            bits: int, block_size: int) -> np.ndarray:
    """Y float32 [rows, N] = sum over blocks b, ascending, of (sa[:, b] * scales[b]) * isum_b, isum_b
    = qa[:, block b] @ (q - zero point)[block b] exactly; D [rows, K] holds no Inf or NaN; scales
    float32, zero points uint8 [k_blocks, N] or None."""
    rows, k = d.shape
    qa, sa = quantize_blocks(d, block_size)
    zp = (np.full(scales.shape, default_zero_point(bits), np.float64) if zero_points is None
          else np.asarray(zero_points, np.float64))
    y = np.zeros((rows, q.shape[1]), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(sa.shape[1]):
            ks = slice(b * block_size, min((b + 1) * block_size, k))
            # Exact in float64 (BLAS): every partial sum is an integer below 127 * 255 * 256 < 2^53.
            isum = (qa[:, ks].astype(np.float64) @ (q[ks].astype(np.float64) - zp[b])).astype(np.int64)
            term = (sa[:, b, None] * scales[b]) * isum.astype(np.float32)  # exact: |isum| < 2^24
            # amax = 0 (a block with amax > 0 quantises its largest value to +-127): it adds 0, even
            # against a non-finite scale, as a dropped row does in the float path.
            y += np.where(qa[:, ks].any(axis=1, keepdims=True), term, np.float32(0))
    return y


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
    accuracy_level: int = 0,
) -> np.ndarray:
    """ScapSparseMatMulNBits: W dequantised from the packed layout in float32, then scap_sparse_matmul.
    scales: float32 or float16 (converted exactly to float32); zero_points in either form
    (scap_onnx.op.nbits.zero_points_kn).

    With accuracy_level 4 and more than one row of A (rows: the product of A's leading dims), D
    after the drop rule is quantised to int8 per row and block (:func:`quantize_blocks`) and Y =
    sum over blocks of (sa * scales) * (integer sum of qa * (q - zero point)) (+ bias), accumulated
    in float32 in ascending block order (the kernels fuse the multiply and the add: compare with a
    tolerance). A row of D holding Inf or NaN (its kept values) takes the float path, so that they
    propagate as in the float op.
    """
    check_nbits_attributes(k, n, bits, block_size)
    check_accuracy_level(accuracy_level)
    kb = k_blocks(k, block_size)
    if b_packed.shape != (k, row_bytes(n, bits)) or b_packed.dtype != np.uint8:
        raise ValueError(f"B_packed must be uint8 [{k}, {row_bytes(n, bits)}], got {b_packed.dtype} {b_packed.shape}")
    if scales.shape != (kb, n) or scales.dtype not in (np.float32, np.float16):
        raise ValueError(f"scales must be float32 or float16 [{kb}, {n}], got {scales.dtype} {scales.shape}")
    zp = None if zero_points is None else zero_points_kn(zero_points, blocks=kb, n=n, bits=bits)

    def float_path(a_rows: np.ndarray) -> np.ndarray:
        w = dequantize_packed(b_packed, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
        return scap_sparse_matmul(a_rows, w, bias, threshold_scale, channel_offset, threshold=threshold, offset=offset)

    rows = int(np.prod(a.shape[:-1]))
    if accuracy_level != INT8_ACCURACY_LEVEL or rows <= 1:
        return float_path(a)
    _check_operands(a, k, n, bias, threshold_scale, channel_offset, threshold, offset)
    a2 = a.reshape(rows, k)
    d = sparsify(a2, threshold, offset, threshold_scale, channel_offset)
    finite = np.isfinite(d).all(axis=1)
    y = np.empty((rows, n), np.float32)
    y[finite] = _int8_activation_matmul(d[finite], unpack_rows(b_packed, n, bits), scales.astype(np.float32),
                                        zp, bits=bits, block_size=block_size)
    if bias is not None:
        y[finite] += bias.astype(np.float32)
    if not finite.all():
        y[~finite] = float_path(a2[~finite])
    return y.reshape(*a.shape[:-1], n).astype(a.dtype)


class ScapSparseMatMulNBits(OpRun):
    """onnx.reference implementation of ScapSparseMatMulNBits (an omitted optional input is None)."""

    op_domain = DOMAIN
    op_type = OP_TYPE_NBITS

    def _run(self, a, b_packed, scales, zero_points=None, bias=None, threshold_scale=None,  # noqa: N803
             channel_offset=None, K=None, N=None, bits=None, block_size=None, threshold=None, offset=0.0,
             accuracy_level=0):
        if None in (K, N, bits, block_size, threshold):
            raise ValueError("ScapSparseMatMulNBits requires the K, N, bits, block_size and threshold attributes")
        check_accuracy_level(accuracy_level, self.onnx_node.name)
        return (scap_sparse_matmul_nbits(a, b_packed, scales, zero_points, bias, threshold_scale, channel_offset,
                                         k=K, n=N, bits=bits, block_size=block_size, threshold=threshold,
                                         offset=offset, accuracy_level=accuracy_level),)
