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
- scales: float32 or float16 [k_blocks, N]: a block's scales for all N columns together, read once
  per block; a float16 scale is converted exactly to float32 and used as one.
- zero_points (optional): uint8, one of two forms (:func:`zero_points_kn` tells them apart by the
  shape): [k_blocks, N], one code a byte; or, bits 4 only, [k_blocks, row_bytes], each row packed as
  a row of B_packed (:func:`pack_rows`). The shapes coincide only at N = 16, where both forms read
  the same (a byte form's codes are below 16: the low nibble of byte t is code t). Absent means
  2^(bits-1) (8 or 128), MatMulNBits' default.
- W[k, j] = (q[k, j] - zero_points[k // block_size, j]) * scales[k // block_size, j], float32.
- accuracy_level (optional, 0 to 4, as MatMulNBits'): at 4, several rows of A are multiplied as int8
  activations per block (scap_onnx.op.reference.quantize_blocks); 0 to 3, and one row, over W.

A MatMul's int8 QDQ weight (DequantizeLinear of a constant, per tensor or per output column) is
this op at bits 8, exactly: an int8 code q with zero point z is the uint8 code q + 128 with zero
point z + 128, and the per-tensor or per-column scales repeat in every block (:func:`unpack_qdq`).

The rewriter writes 4-bit zero points packed (lossless) and the scales float16 where that is exact
or within float16's normal range (:func:`block_scales_for_layout`): at M = 1 the kept rows' codes are
the only bytes that shrink with sparsity, and float32 scales with byte zero points add 0.156 bytes a
weight (block 32) to the 0.5 of 4-bit codes in every block that keeps a row, float16 with nibbles 0.078.

Also the one place that dequantises weights: :func:`dequantize_packed` (this layout),
:func:`dequantize_matmul_nbits` (MatMulNBits' layout) and :func:`weight_kn` (any target's weight
as float32 [K, N], which calibration and the rewriter's bias folding read).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import ScapError
from ..graph.quantized import MATMUL_NBITS, NBITS_ACCURACY_LEVELS as ACCURACY_LEVELS, NBITS_BITS as BITS
from ..graph.quantized import NBITS_BLOCK_SIZES as BLOCK_SIZES
from ..graph.targets import Target
from .contract import DOMAIN, OP_TYPE_NBITS, check_attributes, trim_inputs


def check_nbits_attributes(k: int, n: int, bits: int, block_size: int) -> None:
    """Raise ScapError (a one-line reason) for K, N, bits or block_size the op rejects."""
    if bits not in BITS:
        raise ScapError(f"{OP_TYPE_NBITS}: bits must be 4 or 8, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise ScapError(f"{OP_TYPE_NBITS}: block_size must be a power of two from 16 to 256, got {block_size}")
    if k < 1 or n < 1:
        raise ScapError(f"{OP_TYPE_NBITS}: K and N must be >= 1, got K = {k}, N = {n}")


#: The accuracy_level at which several rows of A are quantised to int8 (MatMulNBits' int8 compute type).
INT8_ACCURACY_LEVEL = 4


def check_accuracy_level(accuracy_level: int, node: str | None = None) -> None:
    """Raise ScapError (one line, naming ``node`` when given) for an accuracy_level outside 0 to 4."""
    if accuracy_level not in ACCURACY_LEVELS:
        where = f" node {node!r}" if node else ""
        raise ScapError(f"{OP_TYPE_NBITS}{where}: accuracy_level must be 0 to 4, got {accuracy_level}")


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


def zero_points_kn(zero_points, *, blocks: int, n: int, bits: int) -> np.ndarray:
    """The op's zero_points input, in either form (module docstring), -> uint8 [k_blocks, N]; a
    one-line ScapError for any other type or shape. The one place that tells the forms apart: at 4
    bits a row of row_bytes(N, 4) bytes is packed (at N = 16 a byte form reads the same that way)."""
    zp = np.asarray(zero_points)
    packed_width = row_bytes(n, bits) if bits == 4 else None
    if zp.dtype != np.uint8 or zp.ndim != 2 or zp.shape[0] != blocks or zp.shape[1] not in (n, packed_width):
        packed = f" or, packed, [{blocks}, {packed_width}]" if packed_width else ""
        raise ScapError(f"zero_points must be uint8 [{blocks}, {n}]{packed}, got {zp.dtype} {list(zp.shape)}")
    return unpack_rows(zp, n, bits) if zp.shape[1] == packed_width else zp


#: --nbits-scales: the type the rewriter asks for a ScapSparseMatMulNBits' scales in (the first: the default).
NBITS_SCALES = ("float16", "float32")
DEFAULT_NBITS_SCALES = NBITS_SCALES[0]
# float16's normal range: a scale in it rounds to 11 significant bits, a relative error of at most
# 2^-11 (below it, subnormals keep fewer bits; above it, Inf).
_FLOAT16_NORMAL = (2.0 ** -14, 65504.0)


def check_nbits_scales(want: str) -> None:
    """ScapError (one line) for a --nbits-scales value other than float16 and float32."""
    if want not in NBITS_SCALES:
        raise ScapError(f"--nbits-scales must be one of {', '.join(NBITS_SCALES)}, got {want!r}")


def block_scales_for_layout(scales, want: str = DEFAULT_NBITS_SCALES) -> np.ndarray:
    """One target's block scales [k_blocks, N] (float32, or float16 as the source stored them) in the
    type the rewriter writes them in: float16 scales stay float16 (exact); float32 ones become
    float16 when ``want`` is "float16" and every one is 0 or within float16's normal range (each
    then rounds to within 2^-11 of itself, far below the weights' own quantisation), and stay
    float32 otherwise, or when ``want`` is "float32"."""
    check_nbits_scales(want)
    scales = np.asarray(scales)
    if scales.dtype == np.float16:
        return scales
    scales = scales.astype(np.float32, copy=False)
    magnitude = np.abs(scales)
    in_range = (magnitude == 0) | ((magnitude >= _FLOAT16_NORMAL[0]) & (magnitude <= _FLOAT16_NORMAL[1]))
    return scales.astype(np.float16) if want == "float16" and in_range.all() else scales


def _dequantize(q: np.ndarray, scales, zero_points, *, k: int, bits: int, block_size: int) -> np.ndarray:
    """W float32 [K, N] from codes q [K, N], per-block scales [k_blocks, N] (float32 or float16) and
    zero points uint8 [k_blocks, N] (None: the default)."""
    blocks = np.arange(k) // block_size
    zp = (np.float32(default_zero_point(bits)) if zero_points is None
          else np.asarray(zero_points, np.float32)[blocks])
    return ((q.astype(np.float32) - zp) * np.asarray(scales, np.float32)[blocks]).astype(np.float32)


def dequantize_packed(b_packed, scales, zero_points, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """W: float32 [K, N] from the op's own layout (zero points in either form)."""
    zp = None if zero_points is None else zero_points_kn(zero_points, blocks=k_blocks(k, block_size), n=n, bits=bits)
    return _dequantize(unpack_rows(b_packed, n, bits), scales, zp, k=k, bits=bits, block_size=block_size)


def matmul_nbits_codes(b, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' B uint8 [N, k_blocks, block_size * bits / 8] (codes along K, low nibble first)
    -> codes uint8 [K, N]."""
    check_nbits_attributes(k, n, bits, block_size)
    kb = k_blocks(k, block_size)
    b = np.asarray(b)
    if b.dtype != np.uint8 or b.size != n * kb * block_size * bits // 8:
        raise ScapError(f"MatMulNBits B must be uint8 [{n}, {kb}, {block_size * bits // 8}], got {b.dtype} {b.shape}")
    b = b.reshape(n, kb * block_size * bits // 8)
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1) if bits == 4 else b
    return np.ascontiguousarray(codes[:, :k].T)


def _scale_type(scales: np.ndarray) -> type:
    """The type block scales keep from their source: float16 stays float16, the rest is float32."""
    return np.float16 if scales.dtype == np.float16 else np.float32


def matmul_nbits_scales(scales, *, k: int, n: int, block_size: int) -> np.ndarray:
    """MatMulNBits' scales [N * k_blocks] or [N, k_blocks] (float32 or float16) -> [k_blocks, N] of
    the same type."""
    kb = k_blocks(k, block_size)
    scales = np.asarray(scales)
    if scales.size != n * kb:
        raise ScapError(f"MatMulNBits scales must hold N * k_blocks = {n * kb} values, got shape {scales.shape}")
    return np.ascontiguousarray(scales.astype(_scale_type(scales)).reshape(n, kb).T)


def matmul_nbits_zero_points(zero_points, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' uint8 zero points [N * ceil(k_blocks * bits / 8)] (4 bits: two blocks a byte,
    low nibble first) or [N, that] -> uint8 [k_blocks, N]."""
    kb = k_blocks(k, block_size)
    zero_points = np.asarray(zero_points)
    if zero_points.dtype != np.uint8:
        raise ScapError(f"MatMulNBits zero points of type {zero_points.dtype} are not supported (uint8 only)")
    per_column = -(-kb * bits // 8)
    if zero_points.size != n * per_column:
        raise ScapError(f"MatMulNBits zero_points must hold {n * per_column} bytes, got shape {zero_points.shape}")
    zp = zero_points.reshape(n, per_column)
    if bits == 4:
        zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
    return np.ascontiguousarray(zp[:, :kb].T)


def unpack_matmul_nbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int):
    """onnxruntime's MatMulNBits weights -> (codes uint8 [K, N], scales [k_blocks, N] (float16 where
    the source's are, else float32), zero points uint8 [k_blocks, N] or None).

    MatMulNBits: B uint8 [N, k_blocks, block_size * bits / 8], codes along K, low nibble first;
    scales [N * k_blocks] or [N, k_blocks]; zero_points uint8 [N * ceil(k_blocks * bits / 8)]
    (4 bits: two blocks a byte, low nibble first) or [N, that]. Zero points of the scales' type and
    g_idx are not supported (ScapError).
    """
    shape = dict(k=k, n=n, block_size=block_size)
    q = matmul_nbits_codes(b, bits=bits, **shape)
    zp = None if zero_points is None else matmul_nbits_zero_points(zero_points, bits=bits, **shape)
    return q, matmul_nbits_scales(scales, **shape), zp


def dequantize_matmul_nbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """W: float32 [K, N] from MatMulNBits' weights (what MatMulNBits with accuracy_level 0 multiplies by)."""
    q, s, zp = unpack_matmul_nbits(b, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
    return _dequantize(q, s, zp, k=k, bits=bits, block_size=block_size)


def qdq_codes(x, *, trans: bool) -> np.ndarray:
    """A QDQ weight's int8 or uint8 values (stored [N, K] when ``trans``) -> codes uint8 [K, N]
    (int8 q -> q + 128)."""
    x = np.asarray(x)
    if x.dtype not in (np.int8, np.uint8) or x.ndim != 2:
        raise ScapError(f"a QDQ weight must be a 2-D int8 or uint8 tensor, got {x.dtype} {x.shape}")
    codes = x.view(np.uint8) ^ np.uint8(0x80) if x.dtype == np.int8 else x
    return np.ascontiguousarray(codes.T if trans else codes)


def qdq_scales(scale, *, k: int, n: int, block_size: int) -> np.ndarray:
    """A DequantizeLinear's scale (one, or one per output column) -> [k_blocks, N], float16 where the
    source's is, else float32."""
    scale = np.asarray(scale)
    scale = scale.astype(_scale_type(scale)).reshape(-1)
    if scale.size not in (1, n):
        raise ScapError(f"QDQ scales must hold 1 or N = {n} values, got {scale.size}")
    return np.ascontiguousarray(np.broadcast_to(scale, (k_blocks(k, block_size), n)))


def qdq_zero_points(zero_point, x_dtype, *, k: int, n: int, block_size: int) -> np.ndarray | None:
    """A DequantizeLinear's int8 / uint8 zero point (one, or one per output column; None: its
    default, 0 of the weight's type ``x_dtype``) -> uint8 [k_blocks, N] (int8 z -> z + 128); None
    when every one is 128, the op's default."""
    zp = np.zeros(1, x_dtype) if zero_point is None else np.asarray(zero_point).reshape(-1)
    if zp.dtype not in (np.int8, np.uint8) or zp.size not in (1, n):
        raise ScapError(f"QDQ zero points must be 1 or N = {n} int8 / uint8 values, got {zp.dtype} {zp.size}")
    zp = zp.view(np.uint8) ^ np.uint8(0x80) if zp.dtype == np.int8 else zp
    if np.all(zp == default_zero_point(8)):
        return None
    return np.ascontiguousarray(np.broadcast_to(zp, (k_blocks(k, block_size), n)))


def unpack_qdq(x, scale, zero_point, *, k: int, n: int, block_size: int, trans: bool):
    """A QDQ weight (x int8 / uint8, [K, N] or, when ``trans``, [N, K]; scale and zero point per
    tensor or per output column) -> (codes uint8 [K, N], scales [k_blocks, N] (float16 or float32, as
    the source's), zero points uint8 [k_blocks, N] or None): the same W at bits 8 in blocks of
    ``block_size``."""
    q = qdq_codes(x, trans=trans)
    if q.shape != (k, n):
        raise ScapError(f"QDQ weight of shape {np.shape(x)} is not [K, N] = [{k}, {n}]")
    shape = dict(k=k, n=n, block_size=block_size)
    return q, qdq_scales(scale, **shape), qdq_zero_points(zero_point, np.asarray(x).dtype, **shape)


def quantized_weights(target: Target, read):
    """A quantized target's (codes uint8 [K, N], scales [k_blocks, N] (float16 or float32, as the
    source's), zero points uint8 [k_blocks, N] or None), from a MatMulNBits' weights or a QDQ weight."""
    zp = read(target.zero_points) if target.zero_points else None
    shape = dict(k=target.k, n=target.n, block_size=target.block_size)
    if target.op == MATMUL_NBITS:
        return unpack_matmul_nbits(read(target.weight), read(target.scales), zp, bits=target.bits, **shape)
    return unpack_qdq(read(target.weight), read(target.scales), zp, trans=target.trans_b, **shape)


def weight_kn(target: Target, read) -> np.ndarray:
    """A target's weight as float32 [K, N]: a float weight as it is (transposed for a Gemm with
    transB), a quantized weight (MatMulNBits, QDQ) dequantised. ``read(name)``: the array of the
    constant ``name``."""
    if target.quantized:
        q, s, zp = quantized_weights(target, read)
        return _dequantize(q, s, zp, k=target.k, bits=target.bits, block_size=target.block_size)
    w = read(target.weight).astype(np.float32, copy=False)
    return np.ascontiguousarray(w.T) if target.trans_b else w


def repack_matmul_nbits(b, scales, zero_points, *, k: int, n: int, bits: int, block_size: int,
                        nbits_scales: str = DEFAULT_NBITS_SCALES):
    """onnxruntime's MatMulNBits weights -> this op's (B_packed, scales, zero_points or None) as the
    rewriter writes them: scales by :func:`block_scales_for_layout`, zero points packed as B_packed's
    rows (4 bits: two a byte, lossless)."""
    q, scales, zp = unpack_matmul_nbits(b, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
    packed_zp = None if zp is None else pack_rows(zp, bits)
    return pack_rows(q, bits), block_scales_for_layout(scales, nbits_scales), packed_zp


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
    threshold_scale: str | None = None,
    channel_offset: str | None = None,
    name: str | None = None,
    accuracy_level: int = 0,
) -> onnx.NodeProto:
    """A ScapSparseMatMulNBits node: Y = drop(A - offset - channel_offset) @ W (+ bias), W from the
    packed weights, the threshold scaled per channel by threshold_scale (inputs 5 and 6); with
    accuracy_level 4, several rows of A quantised to int8 per block (the attribute is written only
    when it is not 0, the default)."""
    check_attributes(threshold, offset)
    check_nbits_attributes(k, n, bits, block_size)
    check_accuracy_level(accuracy_level, name)
    inputs = trim_inputs([a, b_packed, scales, zero_points or "", bias or "", threshold_scale or "",
                          channel_offset or ""])
    level = {"accuracy_level": int(accuracy_level)} if accuracy_level else {}
    return helper.make_node(
        OP_TYPE_NBITS, inputs, [output], name=name, domain=DOMAIN,
        K=int(k), N=int(n), bits=int(bits), block_size=int(block_size),
        threshold=float(threshold), offset=float(offset), **level,
    )
