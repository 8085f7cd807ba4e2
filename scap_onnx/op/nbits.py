"""The ScapSparseMatMulNBits contract on the Python side: its attributes, its packed weight layout,
the node builder, and the repack from onnxruntime's MatMulNBits layout (done once, at rewrite time).

The op is ScapSparseMatMul over block-quantized weights (README, "ScapSparseMatMulNBits"); the C++
twin is custom_ops/scap_sparse_matmul_nbits.h. Layout of the weights (K input channels, N output
columns, k_blocks = ceil(K / block_size); block b holds input channels [b * block_size, (b + 1) *
block_size) cut at K):

- B_packed: uint8 [K, row_bytes], one row per input channel, so a dropped channel is one skipped
  row. bits 8: row_bytes = N, byte j = q[k, j]. bits 4: row_bytes = 16 * ceil(N / 32); columns
  32g .. 32g + 31 sit in bytes 16g .. 16g + 15, column 32g + t in the low nibble of byte 16g + t
  for t < 16 and in the high nibble of byte 16g + t - 16 otherwise (one 16-byte load, masked and
  shifted, gives 32 columns in order); padding columns hold 0.
- scales: float32 [k_blocks, N]: a block's scales for all N columns together, read once per block.
- zero_points (optional): uint8 [k_blocks, N], one per byte; absent means 2^(bits-1) (8 or 128),
  MatMulNBits' default.
- W[k, j] = (q[k, j] - zero_points[k // block_size, j]) * scales[k // block_size, j], float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import ScapError
from .contract import DOMAIN, check_attributes

OP_TYPE_NBITS = "ScapSparseMatMulNBits"
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


def check_nbits_attributes(k: int, n: int, bits: int, block_size: int) -> None:
    """Raise ScapError (a one-line reason) for K, N, bits or block_size the op rejects."""
    if bits not in BITS:
        raise ScapError(f"{OP_TYPE_NBITS}: bits must be 4 or 8, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise ScapError(f"{OP_TYPE_NBITS}: block_size must be a power of two from 16 to 256, got {block_size}")
    if k < 1 or n < 1:
        raise ScapError(f"{OP_TYPE_NBITS}: K and N must be >= 1, got K = {k}, N = {n}")


def k_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def row_bytes(n: int, bits: int) -> int:
    """Bytes of one input channel's row of B_packed."""
    return n if bits == 8 else 16 * -(-n // 32)


def default_zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes q: uint8 [K, N] -> B_packed [K, row_bytes] (module docstring)."""
    q = np.asarray(q, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(q)
    k, n = q.shape
    padded = np.zeros((k, 32 * -(-n // 32)), np.uint8)
    padded[:, :n] = q & 0x0F
    groups = padded.reshape(k, -1, 2, 16)  # [K, group, half, t]
    return np.ascontiguousarray((groups[:, :, 0, :] | (groups[:, :, 1, :] << 4)).reshape(k, -1))


def unpack_rows(b_packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """B_packed [K, row_bytes] -> codes uint8 [K, N]."""
    if bits == 8:
        return np.asarray(b_packed, np.uint8)[:, :n]
    k = b_packed.shape[0]
    groups = np.asarray(b_packed, np.uint8).reshape(k, -1, 1, 16)
    halves = np.concatenate([groups & 0x0F, groups >> 4], axis=2)  # [K, group, half, t]
    return halves.reshape(k, -1)[:, :n]


def dequantize_packed(b_packed, scales, zero_points, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """W: float32 [K, N] from the op's own layout."""
    q = unpack_rows(b_packed, n, bits).astype(np.float32)
    blocks = np.arange(k) // block_size
    zp = (np.float32(default_zero_point(bits)) if zero_points is None
          else np.asarray(zero_points, np.float32)[blocks])
    return ((q - zp) * np.asarray(scales, np.float32)[blocks]).astype(np.float32)


def unpack_matmul_nbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int):
    """onnxruntime's MatMulNBits weights -> (codes uint8 [K, N], scales float32 [k_blocks, N],
    zero points uint8 [k_blocks, N] or None).

    MatMulNBits: B uint8 [N, k_blocks, block_size * bits / 8], codes along K, low nibble first;
    scales [N * k_blocks] or [N, k_blocks]; zero_points uint8 [N * ceil(k_blocks * bits / 8)]
    (4 bits: two blocks a byte, low nibble first) or [N, that]. Zero points of the scales' type and
    g_idx are not supported (ScapError).
    """
    check_nbits_attributes(k, n, bits, block_size)
    kb = k_blocks(k, block_size)
    b = np.asarray(b)
    if b.dtype != np.uint8 or b.size != n * kb * block_size * bits // 8:
        raise ScapError(f"MatMulNBits B must be uint8 [{n}, {kb}, {block_size * bits // 8}], got {b.dtype} {b.shape}")
    b = b.reshape(n, kb * block_size * bits // 8)
    if bits == 4:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1)
    else:
        codes = b
    q = np.ascontiguousarray(codes[:, :k].T)
    scales = np.asarray(scales)
    if scales.size != n * kb:
        raise ScapError(f"MatMulNBits scales must hold N * k_blocks = {n * kb} values, got shape {scales.shape}")
    scales = np.ascontiguousarray(scales.astype(np.float32).reshape(n, kb).T)
    zp = None
    if zero_points is not None:
        zero_points = np.asarray(zero_points)
        if zero_points.dtype != np.uint8:
            raise ScapError(f"MatMulNBits zero points of type {zero_points.dtype} are not supported (uint8 only)")
        per_column = -(-kb * bits // 8)
        if zero_points.size != n * per_column:
            raise ScapError(f"MatMulNBits zero_points must hold {n * per_column} bytes, got shape {zero_points.shape}")
        zp = zero_points.reshape(n, per_column)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zp = np.ascontiguousarray(zp[:, :kb].T)
    return q, scales, zp


def repack_matmul_nbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int):
    """onnxruntime's MatMulNBits weights -> this op's (B_packed, scales, zero_points or None)."""
    q, scales, zp = unpack_matmul_nbits(b, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
    return pack_rows(q, bits), scales, zp


def make_nbits_node(
    a: str,
    b_packed: str,
    scales: str,
    output: str,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    threshold: float,
    offset: float = 0.0,
    zero_points: str | None = None,
    bias: str | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """A ScapSparseMatMulNBits node: Y = drop(A - offset) @ W (+ bias), W from the packed weights."""
    check_attributes(threshold, offset)
    check_nbits_attributes(k, n, bits, block_size)
    inputs = [a, b_packed, scales, zero_points or "", bias or ""]
    while inputs[-1] == "":
        inputs.pop()
    return helper.make_node(
        OP_TYPE_NBITS, inputs, [output], name=name, domain=DOMAIN,
        K=int(k), N=int(n), bits=int(bits), block_size=int(block_size),
        threshold=float(threshold), offset=float(offset),
    )
