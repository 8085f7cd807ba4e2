"""Which quantized weight MatMuls are targets, and why the others are not.

onnxruntime's block-quantized ``MatMulNBits`` (com.microsoft) is a target when its B, scales
and zero points are constants, its bits and block_size are ones ScapSparseMatMulNBits takes and it
has no ``g_idx``: K, N, bits and block_size come from its attributes, the dtype from its scales
(of A's type), its optional bias input is carried like a Gemm's C, and its ``accuracy_level`` (0 to
4; 4 quantises A to int8) is the rewritten node's. ``weight_format`` says how a target's weight is
stored ("float32", "int4 block 32", "int4 block 32 asym" with zero points, "... accuracy_level 4"
when it is not 0).

A MatMul whose B is an int8 or uint8 constant dequantised by a DequantizeLinear (QDQ, as
onnxruntime.quantization's quantize_static writes weights), per tensor or per output column, with
constant scales and zero points, through the Identity and Transpose nodes GraphView follows, is a
target too: ``weight`` is the quantized constant (``trans_b`` when it is stored [N, K]),
``scales`` and ``zero_points`` the DequantizeLinear's, ``bits`` 8 and ``block_size`` the block the
rewrite repacks it in (:func:`qdq_block_size`). Block-wise DequantizeLinear (``block_size``), other
integer types and non-constant scales are not (:func:`unsupported_weights` says why).

Each ``*_fields`` function returns (the Target fields, None) for a target, (None, why not) for a
quantized weight ScapSparseMatMulNBits cannot take (it stays dense; :func:`unsupported_weights`
lists them for inspect and the no-target error), or (None, None) for no quantized weight at all.
"""

from __future__ import annotations

import numpy as np
import onnx

from .view import GraphView, Node

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
ELEM_OF = {v: k for k, v in FLOAT_TYPES.items()}
#: What ScapSparseMatMulNBits takes (scap_onnx.op.nbits checks its nodes by these).
NBITS_BITS = (4, 8)
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
NBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' own
MATMUL_NBITS = "MatMulNBits"
#: Quantized types of a DequantizeLinear weight that are targets (repacked as 8-bit codes).
QDQ_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


def matmul_nbits_fields(view: GraphView, n: Node) -> tuple[dict | None, str | None]:
    """(the Target fields of a MatMulNBits, None) when it is a target; (None, why not) when it is
    one scap-onnx cannot take; (None, None) when it is not a weight MatMul at all."""
    ins = list(n.inputs) + [""] * (6 - len(n.inputs))
    a, b_in, s_in, zp_in, g_idx, bias_in = ins[:6]
    b, scales = view.constant(b_in), view.constant(s_in)
    if b is None or scales is None or view.constant(a) is not None:
        return None, None
    k, n_cols, bits, block, level = (int(n.attr(x, 0)) for x in ("K", "N", "bits", "block_size", "accuracy_level"))
    if g_idx:
        return None, "has g_idx (act-order), which is not supported"
    if bits not in NBITS_BITS:
        return None, f"has bits = {bits} (4 and 8 are supported)"
    if block not in NBITS_BLOCK_SIZES:
        return None, f"has block_size = {block} (powers of two from 16 to 256 are supported)"
    if level not in NBITS_ACCURACY_LEVELS:
        return None, f"has accuracy_level = {level} (0 to 4 are valid)"
    stype = view.initializers[scales][1]
    if stype not in FLOAT_TYPES:
        return None, "has scales that are neither float32 nor float16"
    kb = -(-k // block) if k > 0 and n_cols > 0 else 0
    zp = view.constant(zp_in) if zp_in else None
    if zp_in and (zp is None or view.initializers[zp][1] != onnx.TensorProto.UINT8):
        return None, "has zero points that are not a constant uint8 tensor"
    sizes = [(b, n_cols * kb * block * bits // 8), (scales, n_cols * kb)] + \
            ([(zp, n_cols * -(-kb * bits // 8))] if zp else [])
    if not kb or any(int(np.prod(view.initializers[c][0])) != size for c, size in sizes):
        return None, f"has weights whose sizes do not match K = {k}, N = {n_cols}, bits = {bits}"
    bias = view.constant(bias_in) if bias_in else None
    if bias_in and (bias is None or view.initializers[bias][1] != stype
                    or int(np.prod(view.initializers[bias][0])) != n_cols):
        return None, "has a bias that is not a constant [N] tensor"
    fmt = f"int{bits} block {block}" + (" asym" if zp else "") + (f" accuracy_level {level}" if level else "")
    return dict(input=a, weight=b, k=k, n=n_cols, dtype=FLOAT_TYPES[stype], bias=bias, op=MATMUL_NBITS,
                weight_format=fmt, bits=bits, block_size=block, scales=scales, zero_points=zp,
                accuracy_level=level), None


def qdq_block_size(k: int) -> int:
    """The block a per-tensor or per-channel QDQ weight is repacked in: scales repeat per block, so
    the largest block the op takes (256: 4 bytes of scale per 256 codes) or, for a smaller K, the
    smallest power of two that holds all of K."""
    return next((b for b in NBITS_BLOCK_SIZES if b >= k), NBITS_BLOCK_SIZES[-1])


def qdq_fields(view: GraphView, b_in: str) -> tuple[dict | None, str | None]:
    """(the Target fields of a QDQ weight read as MatMul's B, None) when it is a target; (None, why
    not) when it is a constant weight scap-onnx cannot take; (None, None) when B is no
    DequantizeLinear of a constant (an activation, as in attention's QDQ MatMuls)."""
    dq = view.dequantized(b_in)
    if dq is None:
        return None, None
    dims, xtype = view.initializers[dq.x.name]
    if len(dims) != 2:
        return None, None
    if xtype not in QDQ_TYPES:
        tname = onnx.TensorProto.DataType.Name(xtype).lower()
        return None, f"has {tname} DequantizeLinear weights (int8 and uint8 are supported)"
    if int(dq.node.attr("block_size", 0)):
        return None, f"has a block-wise DequantizeLinear (block_size = {int(dq.node.attr('block_size', 0))}), " \
                     "which is not supported"
    ins = list(dq.node.inputs) + [""]
    scales, zp = view.constant(ins[1]), (view.constant(ins[2]) if ins[2] else None)
    if scales is None or (ins[2] and zp is None):
        return None, "has DequantizeLinear scales or zero points that are not constants"
    stype = view.initializers[scales][1]
    if stype not in FLOAT_TYPES:
        return None, "has DequantizeLinear scales that are neither float32 nor float16"
    k, n_cols = (dims[1], dims[0]) if dq.transposes % 2 else (dims[0], dims[1])
    n_axis = 0 if sum(op == "Transpose" for op in dq.after) % 2 else 1  # N's axis in the DequantizeLinear's input
    axis = int(dq.node.attr("axis", 1)) % 2
    size = int(np.prod(view.initializers[scales][0]))
    if size != 1 and (axis != n_axis or tuple(view.initializers[scales][0]) != (n_cols,)):
        return None, "has a DequantizeLinear per input channel (scales along K), which is not supported"
    if zp is not None and (view.initializers[zp][1] != xtype or int(np.prod(view.initializers[zp][0])) != size):
        return None, "has DequantizeLinear zero points that do not match its weight and scales"
    fmt = f"{QDQ_TYPES[xtype]} per-{'tensor' if size == 1 else 'channel'} QDQ"
    return dict(weight=dq.x.name, k=int(k), n=int(n_cols), dtype=FLOAT_TYPES[stype], trans_b=bool(dq.transposes % 2),
                weight_format=fmt, bits=8, block_size=qdq_block_size(int(k)), scales=scales, zero_points=zp), None


def unsupported_weights(view: GraphView) -> list[tuple[str, str, str]]:
    """(op, node name, why) of every quantized weight MatMul that is no target and stays dense: a
    MatMulNBits or a MatMul's QDQ weight of a form ScapSparseMatMulNBits cannot take."""
    found = []
    for n in view.nodes:
        why = None
        if n.op_type == MATMUL_NBITS and n.domain == "com.microsoft":
            why = matmul_nbits_fields(view, n)[1]
        elif n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 \
                and view.constant(n.inputs[0]) is None:
            why = qdq_fields(view, n.inputs[1])[1]
        if why is not None:
            found.append((n.op_type, n.name or n.outputs[0], why))
    return found
