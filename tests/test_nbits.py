"""ScapSparseMatMulNBits: the repack from MatMulNBits' layout, the numpy reference and onnx.reference
OpRun, and the compiled op in real onnxruntime sessions against the reference (the oracle).

Weights are random codes, scales and zero points packed here in onnxruntime's MatMulNBits layout
(B [N, k_blocks, blob] with codes along K low nibble first; zero points two blocks a byte for
4 bits), then repacked by scap_onnx.op.nbits as the rewriter will, its block parameters in either
form the op takes (BLOCK_PARAMS). Error metric as in test_op.py: max |y - ref| / max |ref| over the
finite outputs, NaN and Inf in the same places.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import scap_onnx
from conftest import skip_unless_cpu_runs
from scap_onnx.errors import ScapError
from scap_onnx.op.contract import opset_import
from scap_onnx.op.nbits import (block_scales_for_layout, dequantize_packed, make_nbits_node, pack_rows,
                                 repack_matmul_nbits, row_bytes, zero_points_kn)
from scap_onnx.op.reference import ScapSparseMatMulNBits, scap_sparse_matmul_nbits

TOL = {np.float32: 1e-5, np.float16: 3e-3}
IR_VERSION = 9
BITS = [4, 8]
BLOCKS = [16, 32, 128]
ROWS = [0, 1, 5, 6, 7, 64]  # 5-7: the int8 tiles' last 1-3 rows
# The block parameters' forms, (scales' type, 4-bit zero points packed as B_packed's rows): float32
# with one zero point a byte (the op's first form) and float16 with packed ones (what the rewriter
# writes) in every test of the op; the two mixed forms in one.
BLOCK_PARAMS = {"f32-bytes": ("float32", False), "f16-packed": ("float16", True),
                "f16-bytes": ("float16", False), "f32-packed": ("float32", True)}
LAYOUTS = ["f32-bytes", "f16-packed"]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# ----------------------------------------------------------------------------- MatMulNBits weights
def _matmul_nbits_weights(k, n, bits, block, with_zp, seed, scale_dtype=np.float32):
    """Random codes q [K, N], scales and zero points [k_blocks, N] (None: the default), and the
    same packed as onnxruntime's MatMulNBits inputs (B, scales, zero_points)."""
    rng = np.random.default_rng(seed)
    kb = -(-k // block)
    q = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
    scales = (rng.random((kb, n)) * 0.1 + 0.01).astype(scale_dtype)
    zp = rng.integers(0, 1 << bits, size=(kb, n), dtype=np.uint8) if with_zp else None
    # Codes along K per column, padded to whole blocks (the padding is never read).
    codes = np.zeros((n, kb * block), np.uint8)
    codes[:, :k] = q.T
    if bits == 4:
        blob = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, kb, block // 2)
    else:
        blob = codes.reshape(n, kb, block)
    zp_packed = None
    if zp is not None:
        if bits == 4:
            z = np.zeros((n, 2 * -(-kb // 2)), np.uint8)
            z[:, :kb] = zp.T
            zp_packed = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)
        else:
            zp_packed = np.ascontiguousarray(zp.T).reshape(-1)
    return (q, scales, zp), (blob, np.ascontiguousarray(scales.T).reshape(-1), zp_packed)


def _dequantize(q, scales, zp, bits, block):
    blocks = np.arange(q.shape[0]) // block
    z = np.float32(1 << (bits - 1)) if zp is None else zp[blocks].astype(np.float32)
    return (q.astype(np.float32) - z) * scales[blocks].astype(np.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("nbits_scales", ["float16", "float32"])
def test_repack_matches_dequantisation_of_the_original_layout(bits, block, with_zp, nbits_scales):
    # float16: the scales (0.01 to 0.11) rounded to float16, exactly what W is then made of
    for k, n in [(block, 32), (3 * block + 5, 45), (7, 1), (block + 1, 33), (block, 16)]:
        (q, scales, zp), (b, s, z) = _matmul_nbits_weights(k, n, bits, block, with_zp, _seed(k, n, bits, block))
        packed, p_scales, p_zp = repack_matmul_nbits(b, s, z, k=k, n=n, bits=bits, block_size=block,
                                                     nbits_scales=nbits_scales)
        kb = -(-k // block)
        assert packed.dtype == np.uint8 and packed.shape == (k, row_bytes(n, bits))
        assert p_scales.dtype == np.dtype(nbits_scales) and p_scales.shape == (kb, n)
        assert (p_zp is None) == (not with_zp)
        if with_zp:  # row_bytes: 4 bits packed as B_packed's rows, 8 bits one a byte
            assert p_zp.dtype == np.uint8 and p_zp.shape == (kb, row_bytes(n, bits))
        w = dequantize_packed(packed, p_scales, p_zp, k=k, n=n, bits=bits, block_size=block)
        np.testing.assert_array_equal(w, _dequantize(q, scales.astype(nbits_scales), zp, bits, block))


@pytest.mark.parametrize("nbits_scales", ["float16", "float32"])
def test_repack_keeps_float16_scales_and_takes_two_dimensional_scales(nbits_scales):
    (q, scales, zp), (b, s, z) = _matmul_nbits_weights(40, 9, 4, 16, True, 1, scale_dtype=np.float16)
    packed, p_scales, p_zp = repack_matmul_nbits(b, s.reshape(9, 3), z, k=40, n=9, bits=4, block_size=16,
                                                 nbits_scales=nbits_scales)
    assert p_scales.dtype == np.float16  # exact either way
    w = dequantize_packed(packed, p_scales, p_zp, k=40, n=9, bits=4, block_size=16)
    np.testing.assert_array_equal(w, _dequantize(q, scales, zp, 4, 16))


# ----------------------------------------------------------------------------- compact block parameters
@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 45, 600])
def test_zero_points_round_trip_through_either_form(n):
    kb = 5
    zp = np.random.default_rng(n).integers(0, 16, (kb, n), dtype=np.uint8)
    packed = pack_rows(zp, 4)
    assert packed.shape == (kb, row_bytes(n, 4))
    np.testing.assert_array_equal(zero_points_kn(packed, blocks=kb, n=n, bits=4), zp)
    np.testing.assert_array_equal(zero_points_kn(zp, blocks=kb, n=n, bits=4), zp)  # the byte form
    bytes8 = np.random.default_rng(n).integers(0, 256, (kb, n), dtype=np.uint8)
    np.testing.assert_array_equal(zero_points_kn(bytes8, blocks=kb, n=n, bits=8), bytes8)


def test_at_n_16_both_zero_point_forms_read_the_same():
    # [k_blocks, 16] is either form at 4 bits: a byte's code (< 16) is its low nibble, and byte t
    # holds column t's low nibble (its high nibble, column t + 16, is padding)
    zp = np.random.default_rng(16).integers(0, 16, (3, 16), dtype=np.uint8)
    packed = pack_rows(zp, 4)
    assert packed.shape == zp.shape
    np.testing.assert_array_equal(packed, zp)
    q = np.random.default_rng(17).integers(0, 16, (40, 16), dtype=np.uint8)
    scales = np.full((3, 16), 0.5, np.float16)
    w = dequantize_packed(pack_rows(q, 4), scales, zp, k=40, n=16, bits=4, block_size=16)
    np.testing.assert_array_equal(w, _dequantize(q, scales, zp, 4, 16))


@pytest.mark.parametrize("bits, shape", [(4, (3, 17)), (4, (2, 45)), (8, (3, 32)), (4, (3, 45, 1))])
def test_zero_points_of_another_shape_are_a_one_line_error(bits, shape):
    with pytest.raises(ScapError, match=r"zero_points must be uint8 \[3, 45\]") as info:
        zero_points_kn(np.zeros(shape, np.uint8), blocks=3, n=45, bits=bits)
    assert "\n" not in str(info.value) and ("packed, [3, 32]" in str(info.value)) == (bits == 4)
    with pytest.raises(ScapError, match="got float32"):
        zero_points_kn(np.zeros((3, 45), np.float32), blocks=3, n=45, bits=4)


def test_block_scales_turn_float16_only_within_its_normal_range():
    s = np.array([[0.0, -0.0, 2.0 ** -14, -1.5, 65504.0, 0.1]], np.float32)
    out = block_scales_for_layout(s)
    assert out.dtype == np.float16
    assert np.all(np.abs(out.astype(np.float32) - s) <= np.abs(s) * 2.0 ** -11)
    assert block_scales_for_layout(s, "float32").dtype == np.float32
    for outside in (1e-6, 2.0 ** -14 * 0.99, 65520.0, 1e6, np.inf, np.nan):  # subnormal, Inf or NaN in float16
        t = s.copy()
        t[0, 3] = outside
        kept = block_scales_for_layout(t)
        assert kept.dtype == np.float32 and np.array_equal(kept, t, equal_nan=True), outside
    f16 = np.array([[1e-7, 6e4, 0.1]], np.float16)  # a float16 source, subnormal included: exact as it is
    for want in ("float16", "float32"):
        assert block_scales_for_layout(f16, want).dtype == np.float16
        np.testing.assert_array_equal(block_scales_for_layout(f16, want), f16)
    with pytest.raises(ScapError, match=r"^--nbits-scales must be one of float16, float32, got 'bf16'$"):
        block_scales_for_layout(s, "bf16")


def test_bad_bits_is_a_one_line_error():
    with pytest.raises(ScapError, match="bits must be 4 or 8, got 3") as info:
        make_nbits_node("a", "b", "s", "y", k=16, n=4, bits=3, block_size=16, threshold=0.0)
    assert "\n" not in str(info.value)
    with pytest.raises(ScapError, match="block_size"):
        repack_matmul_nbits(np.zeros((4, 1, 6), np.uint8), np.ones(4, np.float32), None, k=16, n=4, bits=4,
                            block_size=12)
    with pytest.raises(ScapError, match="not supported"):
        repack_matmul_nbits(np.zeros((4, 1, 8), np.uint8), np.ones(4, np.float32), np.ones(4, np.float32), k=16,
                            n=4, bits=4, block_size=16)


# ----------------------------------------------------------------------------- models and sessions
def _model(dtype, *, k, n, bits, block, threshold, offset=0.0, with_zp, with_bias, weights=None, attrs=None,
           accuracy_level=0, layout="f32-bytes"):
    """One ScapSparseMatMulNBits node named "nbits" over graph input a and initializers."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if weights is None:
        weights = _packed(k, n, bits, block, with_zp, *BLOCK_PARAMS[layout])
    packed, scales, zp, bias = weights
    initializers = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales")]
    if with_zp:
        initializers.append(numpy_helper.from_array(zp, "zp"))
    if with_bias:
        initializers.append(numpy_helper.from_array(bias.astype(dtype), "bias"))
    node = make_nbits_node("a", "b", "scales", "y", k=k, n=n, bits=bits, block_size=block, threshold=threshold,
                           offset=offset, zero_points="zp" if with_zp else None, bias="bias" if with_bias else None,
                           name="nbits", accuracy_level=accuracy_level)
    if attrs is not None:
        for attribute in node.attribute:
            if attribute.name in attrs:
                attribute.i = attrs[attribute.name]
    graph = helper.make_graph([node], "nbits_test", [helper.make_tensor_value_info("a", elem, None)],
                              [helper.make_tensor_value_info("y", elem, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = IR_VERSION
    return model


@functools.lru_cache(maxsize=None)
def _packed(k, n, bits, block, with_zp, scales="float32", packed_zp=False):
    """(B_packed, scales, zero points or None, bias) of random weights: scales of the type
    ``scales``, 4-bit zero points packed as B_packed's rows when ``packed_zp`` (else one a byte)."""
    _, (b, s, z) = _matmul_nbits_weights(k, n, bits, block, with_zp, _seed("w", k, n, bits, block, with_zp))
    packed, p_scales, zp = repack_matmul_nbits(b, s, z, k=k, n=n, bits=bits, block_size=block, nbits_scales=scales)
    if zp is not None and not packed_zp:
        zp = zero_points_kn(zp, blocks=-(-k // block), n=n, bits=bits)
    bias = np.random.default_rng(_seed("bias", n)).standard_normal(n).astype(np.float32)
    return packed, p_scales, zp, bias


def _session(model, threads=1):
    options = scap_onnx.session_options(intra_op_threads=threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(shape, dtype, seed, nan):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    if flat.size:
        flat[rng.random(flat.size) < 0.08] = 0  # exact zeros: dropped at threshold 0
        if nan:
            flat[rng.choice(flat.size, size=max(1, flat.size // 97), replace=False)] = np.nan
    return a


def _assert_close(y, ref, tol):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    yf, rf = y.astype(np.float64), ref.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(yf), np.isnan(rf))
    finite = np.isfinite(rf)
    np.testing.assert_array_equal(yf[~finite & ~np.isnan(rf)], rf[~finite & ~np.isnan(rf)])
    if finite.any():
        scale = max(np.abs(rf[finite]).max(), 1e-30)
        err = np.abs(yf[finite] - rf[finite]).max() / scale
        assert err <= tol, f"relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------- the op against the reference
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accuracy_level", [0, 4], ids=["acc0", "acc4"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("with_zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", BITS)
def test_op_matches_the_reference(bits, block, with_zp, dtype, accuracy_level, layout):
    # K off the block; N off the 32-column groups (16: one group's half, where the two zero point
    # forms share a shape), and wide enough at M = 1 for several tasks, and at accuracy_level 4
    # (several rows in int8) for column tasks that pack four 4-bit groups at once beside single ones
    # (N = 2100: tasks of 128-160 columns). Rows with NaN keep the float path; one row never quantises.
    k = 3 * block + 5
    cases = [(16, 2), (45, 1), (600, 1 + _seed(bits, block, with_zp) % 4), (1100, 4)]
    if accuracy_level == 4:
        cases.append((2100, 2))
    for n, threads in cases:
        for threshold, offset, with_bias in [(0.0, 0.0, False), (math.inf, 0.0, True), (0.6, 0.1, True)]:
            model = _model(dtype, k=k, n=n, bits=bits, block=block, threshold=threshold, offset=offset,
                           with_zp=with_zp, with_bias=with_bias, accuracy_level=accuracy_level, layout=layout)
            session = _session(model, threads)
            packed, scales, zp, bias = _packed(k, n, bits, block, with_zp, *BLOCK_PARAMS[layout])
            for rows in ROWS:
                shape = (2, rows // 2, k) if rows == 64 else (rows, k)
                for nan in (False, True):
                    a = _activations(shape, dtype, _seed(bits, block, with_zp, n, threshold, rows, nan), nan)
                    (y,) = session.run(None, {"a": a})
                    ref = scap_sparse_matmul_nbits(a, packed, scales, zp if with_zp else None,
                                                   bias.astype(dtype) if with_bias else None, k=k, n=n, bits=bits,
                                                   block_size=block, threshold=threshold, offset=offset,
                                                   accuracy_level=accuracy_level)
                    _assert_close(y, ref, TOL[dtype])


@pytest.mark.parametrize("layout", ["f16-bytes", "f32-packed"])
@pytest.mark.parametrize("accuracy_level", [0, 4], ids=["acc0", "acc4"])
@pytest.mark.parametrize("block", BLOCKS)
def test_mixed_block_parameter_forms_match_the_reference(block, accuracy_level, layout):
    """Scales and zero points each in the other form (the op reads them input by input): 4 bits with
    zero points."""
    test_op_matches_the_reference(4, block, True, np.float32, accuracy_level, layout)


@pytest.mark.parametrize("accuracy_level", [0, 4], ids=["acc0", "acc4"])
@pytest.mark.parametrize("bits", BITS)
def test_float16_scales_read_as_the_same_values_in_float32(bits, accuracy_level):
    """float16 scales, subnormal, 0, Inf and NaN among them, give exactly the output of the same
    values given as float32 (the conversion is exact), on one row and several; packed zero points
    exactly that of one a byte."""
    k, n, block = 200, 300, 32
    packed, _, zp_packed, _ = _packed(k, n, bits, block, True, "float16", True)
    rng = np.random.default_rng(_seed("f16 values", bits))
    s16 = (rng.random((-(-k // block), n)) * 0.1 + 0.01).astype(np.float16)
    s16.reshape(-1)[rng.choice(s16.size, 40, replace=False)] = np.array(
        [2.0 ** -20, 0.0, np.inf, np.nan] * 10, np.float16)  # 2^-20: a float16 subnormal
    zp_bytes = zero_points_kn(zp_packed, blocks=s16.shape[0], n=n, bits=bits)
    a = _activations((9, k), np.float32, _seed("f16 a", bits), nan=False)
    outputs = []
    for scales, zp in [(s16, zp_packed), (s16.astype(np.float32), zp_bytes)]:
        model = _model(np.float32, k=k, n=n, bits=bits, block=block, threshold=0.4, with_zp=True, with_bias=False,
                       weights=(packed, scales, zp, None), accuracy_level=accuracy_level)
        session = _session(model, 2)
        outputs.append([session.run(None, {"a": a[:rows]})[0] for rows in (1, 9)])
    for y16, y32 in zip(*outputs):
        np.testing.assert_array_equal(y16.view(np.uint32), y32.view(np.uint32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_int8_rows_over_several_chunks_of_k(bits, layout):
    # K past the int8 kernels' 1024-row chunks (the later chunks add to Y), off the block.
    k, n, block = 2100, 300, 64
    model = _model(np.float32, k=k, n=n, bits=bits, block=block, threshold=0.3, with_zp=True, with_bias=True,
                   accuracy_level=4, layout=layout)
    packed, scales, zp, bias = _packed(k, n, bits, block, True, *BLOCK_PARAMS[layout])
    a = _activations((6, k), np.float32, _seed("chunks", bits), nan=False)
    (y,) = _session(model, 2).run(None, {"a": a})
    ref = scap_sparse_matmul_nbits(a, packed, scales, zp, bias, k=k, n=n, bits=bits, block_size=block, threshold=0.3,
                                   accuracy_level=4)
    _assert_close(y, ref, TOL[np.float32])


@pytest.mark.parametrize("scale_type", ["float32", "float16"])
def test_int8_block_of_zeros_meets_an_infinite_scale_as_nothing(scale_type):
    # A row whose block is all 0 adds nothing for that block, even where the block's scale is Inf
    # (0 * Inf would be NaN), while the other rows of its tile use the block.
    k, n, bits, block = 64, 40, 4, 32
    packed, scales, zp, _ = _packed(k, n, bits, block, False, scale_type)
    scales = scales.copy()
    scales[0, 3] = np.inf
    model = _model(np.float32, k=k, n=n, bits=bits, block=block, threshold=0.0, with_zp=False, with_bias=False,
                   weights=(packed, scales, zp, None), accuracy_level=4)
    a = _activations((4, k), np.float32, _seed("inf scale"), nan=False)
    a[0, :block] = 0.0
    (y,) = _session(model).run(None, {"a": a})
    ref = scap_sparse_matmul_nbits(a, packed, scales, None, None, k=k, n=n, bits=bits, block_size=block,
                                   threshold=0.0, accuracy_level=4)
    assert np.isfinite(y[0]).all() and np.isfinite(ref[0]).all()
    _assert_close(y, ref, TOL[np.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_onnx_reference_evaluator_runs_the_op(layout):
    k, n, bits, block = 50, 20, 4, 16
    model = _model(np.float32, k=k, n=n, bits=bits, block=block, threshold=0.3, with_zp=True, with_bias=True,
                   layout=layout)
    a = _activations((3, k), np.float32, 5, nan=False)
    (y,) = ReferenceEvaluator(model, new_ops=[ScapSparseMatMulNBits]).run(None, {"a": a})
    (y_ort,) = _session(model).run(None, {"a": a})
    _assert_close(y_ort, y, 1e-5)


def test_unsupported_bits_is_an_error_naming_the_node():
    model = _model(np.float32, k=32, n=8, bits=4, block=16, threshold=0.0, with_zp=False, with_bias=False,
                   attrs={"bits": 3})
    with pytest.raises(Exception, match=r"ScapSparseMatMulNBits node 'nbits'.*'bits' must be 4 or 8, got 3"):
        _session(model)


def test_accuracy_level_of_another_type_is_an_error_naming_the_node():
    # Read as absent it would silently be level 0 (float), not the level the model asks for.
    model = _model(np.float32, k=32, n=8, bits=4, block=16, threshold=0.0, with_zp=False, with_bias=False)
    model.graph.node[0].attribute.append(helper.make_attribute("accuracy_level", 4.0))
    with pytest.raises(Exception, match=r"ScapSparseMatMulNBits node 'nbits'.*'accuracy_level' must be an INT"):
        _session(model)


def test_wrong_packed_shape_is_an_error_naming_the_node():
    packed, scales, zp, bias = _packed(40, 8, 4, 16, False)
    model = _model(np.float32, k=40, n=8, bits=4, block=16, threshold=0.0, with_zp=False, with_bias=False,
                   weights=(packed[:39], scales, zp, bias))  # one input channel short
    with pytest.raises(Exception, match=r"ScapSparseMatMulNBits node 'nbits'.*B_packed must have shape \[40, 16\]"):
        _session(model).run(None, {"a": np.zeros((1, 40), np.float32)})


@pytest.mark.parametrize("bits", BITS)
def test_zero_points_of_neither_form_are_an_error_naming_the_node(bits):
    packed, scales, zp, bias = _packed(40, 45, bits, 16, True)
    model = _model(np.float32, k=40, n=45, bits=bits, block=16, threshold=0.0, with_zp=True, with_bias=False,
                   weights=(packed, scales, zp[:, :40], bias))  # neither N = 45 nor (4 bits) 32 bytes a row
    packed_form = r" or, packed as B_packed's rows, \[3, 32\]" if bits == 4 else ", got"
    with pytest.raises(Exception, match=r"ScapSparseMatMulNBits node 'nbits'.*zero_points must have shape \[3, 45\]"
                                        + packed_form):
        _session(model).run(None, {"a": np.zeros((1, 40), np.float32)})


def test_scales_of_another_type_are_an_error_naming_the_node():
    packed, scales, zp, bias = _packed(40, 8, 4, 16, False)
    model = _model(np.float32, k=40, n=8, bits=4, block=16, threshold=0.0, with_zp=False, with_bias=False,
                   weights=(packed, scales.astype(np.float64), zp, bias))
    with pytest.raises(Exception, match=r"ScapSparseMatMulNBits node 'nbits'.*scales"):
        _session(model).run(None, {"a": np.zeros((1, 40), np.float32)})


# ----------------------------------------------------------------------------- against MatMulNBits
def _matmul_nbits_model(dtype, k, n, bits, block, b, scales, zp):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    initializers = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales.astype(dtype), "scales")]
    inputs = ["a", "b", "scales"]
    if zp is not None:
        initializers.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("a", elem, None)],
                              [helper.make_tensor_value_info("y", elem, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("with_zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", BITS)
def test_threshold_zero_equals_matmul_nbits(bits, block, with_zp, dtype):
    # N = 70: 32-column groups only; N = 300: the whole register tiles of M = 1 too. Scales of A's
    # type, repacked exactly: float32 ones kept float32, float16 ones float16 (with 4-bit zero
    # points packed, the f16 cases compare the rewriter's compact form with MatMulNBits)
    for n in (70, 300):
        k = 2 * block + 7
        _, (b, s, z) = _matmul_nbits_weights(k, n, bits, block, with_zp, _seed("ort", k, n, bits, block, with_zp),
                                             scale_dtype=dtype)
        theirs = ort.InferenceSession(_matmul_nbits_model(dtype, k, n, bits, block, b, s, z).SerializeToString(),
                                      providers=["CPUExecutionProvider"])
        packed, scales, zp = repack_matmul_nbits(b, s, z, k=k, n=n, bits=bits, block_size=block,
                                                 nbits_scales="float32")
        assert scales.dtype == dtype
        ours = _session(_model(dtype, k=k, n=n, bits=bits, block=block, threshold=0.0, with_zp=with_zp,
                               with_bias=False, weights=(packed, scales, zp, None)), threads=2)
        for rows in (1, 7, 64):
            a = _activations((rows, k), dtype, _seed("ort-a", rows), nan=False)
            (expected,) = theirs.run(None, {"a": a})
            (y,) = ours.run(None, {"a": a})
            _assert_close(y, expected, TOL[dtype])


# ----------------------------------------------------------------------------- magnitudes and ISA caps
# Activation magnitudes per row: the M = 1 kernel multiplies 4-bit codes read in place (q * 16^t)
# by d / 16^t, and must leave that form where d / 16^7 would be subnormal (1e-34), as where sums of
# |d| * 256 could overflow (1e35); rows mixing them put both kinds of block in one call.
# 1e-37: at accuracy_level 4, 127 / amax overflows to Inf (the quantisation clamps).
MAGNITUDES = [1.0, 1e-20, 1e-34, 1e-37, 1e35]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accuracy_level", [0, 4], ids=["acc0", "acc4"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("with_zp", [False, True], ids=["sym", "zp"])
def test_activations_of_every_magnitude_match_the_reference(bits, with_zp, accuracy_level, layout):
    k, n, block = 3 * 32 + 5, 600, 32
    packed, scales, zp, _ = _packed(k, n, bits, block, with_zp, *BLOCK_PARAMS[layout])
    session = _session(_model(np.float32, k=k, n=n, bits=bits, block=block, threshold=0.0, with_zp=with_zp,
                              with_bias=False, accuracy_level=accuracy_level, layout=layout), threads=2)
    rng = np.random.default_rng(_seed("magnitudes", bits, with_zp))
    rows = [np.full(k, m, np.float32) for m in MAGNITUDES]
    rows.append(rng.choice(np.array(MAGNITUDES, np.float32), size=k))  # every magnitude in one row
    for row_scale in rows:
        # Level 4 quantises several rows only: three (a tile of 3 rows).
        a = (rng.standard_normal((1 if accuracy_level == 0 else 3, k)) * row_scale).astype(np.float32)
        (y,) = session.run(None, {"a": a})
        ref = scap_sparse_matmul_nbits(a, packed, scales, zp if with_zp else None, None, k=k, n=n, bits=bits,
                                       block_size=block, threshold=0.0, offset=0.0, accuracy_level=accuracy_level)
        # _assert_close measures against max |ref| of at least 1e-30: scaled by a power of two (exact)
        unit = np.float32(2.0 ** -round(math.log2(float(np.abs(ref).max()))))
        _assert_close(y * unit, ref * unit, TOL[np.float32])


def run_battery() -> int:
    """A smaller sweep for the ISA-capped subprocesses: the failures' count, each printed."""
    failures = 0
    for bits, with_zp, layout in itertools.product(BITS, (False, True), LAYOUTS):
        for name, call in [("reference", lambda: test_op_matches_the_reference(bits, 32, with_zp, np.float32, 0,
                                                                               layout)),
                           ("magnitudes", lambda: test_activations_of_every_magnitude_match_the_reference(
                               bits, with_zp, 0, layout)),
                           ("magnitudes int8", lambda: test_activations_of_every_magnitude_match_the_reference(
                               bits, with_zp, 4, layout)),
                           ("int8", lambda: test_op_matches_the_reference(bits, 32, with_zp, np.float32, 4, layout))]:
            try:
                call()
            except AssertionError as error:
                failures += 1
                print(f"FAIL {name} bits={bits} zp={with_zp} {layout}: {error}")
    for layout, level in itertools.product(("f16-bytes", "f32-packed"), (0, 4)):  # the mixed forms
        try:
            test_op_matches_the_reference(4, 32, True, np.float32, level, layout)
        except AssertionError as error:
            failures += 1
            print(f"FAIL mixed {layout} accuracy_level={level}: {error}")
    print(f"isa={scap_onnx.kernel_isa()}: {failures} failures")  # the kernels the library chose
    return failures


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_nbits_op_under_isa_caps(isa):
    """The AVX2 and portable NBits kernels (the library reads the cap once per process)."""
    skip_unless_cpu_runs(isa)
    package_root = str(Path(scap_onnx.__file__).resolve().parents[1])
    env = {**os.environ, "SCAP_ONNX_ISA": isa,
           "PYTHONPATH": os.pathsep.join([package_root, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    body = "import sys, test_nbits as t; sys.exit(1 if t.run_battery() else 0)"
    proc = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"isa={isa}: 0 failures" in proc.stdout
