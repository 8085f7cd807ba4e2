"""ScapSparseMatMulNBits' accuracy_level on the Python side (issue 13): the numpy reference at
accuracy_level 4 (several rows of A quantised to int8 per block) against a loop-written reading of
the contract, the rows that keep the float path (one row, Inf / NaN), the attribute's checks, and
the rewriter carrying a MatMulNBits' accuracy_level into the new node. No compiled library needed:
the kernels' own tests at accuracy_level 4 are in test_nbits.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import tiny_models
from scap_onnx.errors import ScapError
from scap_onnx.graph.model_io import load_model, save_model
from scap_onnx.graph.quantized import unsupported_weights
from scap_onnx.graph.targets import find_targets
from scap_onnx.graph.view import GraphView
from scap_onnx.op.contract import OP_TYPE_NBITS, opset_import
from scap_onnx.op.nbits import default_zero_point, make_nbits_node, pack_rows
from scap_onnx.op.reference import ScapSparseMatMulNBits, quantize_blocks, scap_sparse_matmul_nbits, sparsify
from scap_onnx.passes.sparsify import rewrite_model

NBITS_NAME = "/model/layers.0/mlp/up_proj/MatMul_Q4"  # tiny_models.make_matmul_nbits' node


def _weights(k: int, n: int, bits: int, block: int, with_zp: bool, seed: int = 0):
    """Random codes uint8 [K, N], scales float32 [k_blocks, N] and zero points (or None)."""
    rng = np.random.default_rng(seed)
    kb = -(-k // block)
    q = rng.integers(0, 1 << bits, (k, n), dtype=np.uint8)
    scales = (rng.random((kb, n)) * 0.1 + 0.01).astype(np.float32)
    zp = rng.integers(0, 1 << bits, (kb, n), dtype=np.uint8) if with_zp else None
    return q, scales, zp


def _op(a, q, scales, zp, *, bits, block, accuracy_level, bias=None, threshold=0.3, offset=0.0,
        threshold_scale=None, channel_offset=None):
    k, n = q.shape
    return scap_sparse_matmul_nbits(a, pack_rows(q, bits), scales, zp, bias, threshold_scale, channel_offset,
                                    k=k, n=n, bits=bits, block_size=block, threshold=threshold, offset=offset,
                                    accuracy_level=accuracy_level)


def _contract_by_loops(d, q, scales, zp, bias, *, bits: int, block: int):
    """The accuracy_level 4 rule, one scalar at a time: (qa, sa, Y) for D [rows, K] after the drop rule."""
    rows, k = d.shape
    n = q.shape[1]
    kb = -(-k // block)
    qa = np.zeros((rows, k), np.int64)
    sa = np.zeros((rows, kb), np.float32)
    y = np.zeros((rows, n), np.float32)
    for m in range(rows):
        for b in range(kb):
            ks = range(b * block, min((b + 1) * block, k))
            amax = np.float32(0)
            for i in ks:
                amax = max(amax, np.float32(abs(d[m, i])))
            if amax == 0:
                continue  # the block adds 0
            inv = np.float32(127) / amax
            for i in ks:
                qa[m, i] = int(np.rint(np.float32(d[m, i] * inv)))
            sa[m, b] = amax / np.float32(127)
            for c in range(n):
                z = default_zero_point(bits) if zp is None else int(zp[b, c])
                isum = sum(int(qa[m, i]) * (int(q[i, c]) - z) for i in ks)
                scale = np.float32(scales[b, c])  # a float16 scale converted exactly
                y[m, c] = np.float32(y[m, c] + np.float32(np.float32(sa[m, b] * scale) * np.float32(isum)))
        if bias is not None:
            y[m] = (y[m] + bias).astype(np.float32)
    return qa, sa, y


@pytest.mark.parametrize("compact", [False, True], ids=["f32-bytes", "f16-packed"])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("bits, block", [(4, 16), (4, 32), (8, 16), (8, 32)])
def test_int8_activations_follow_the_contract(bits, block, with_zp, compact):
    """K = 40 (the last block cut short), A [2, 3, K] with an offset and a channel offset, a row
    whose second block is all dropped (amax = 0): the reference's qa and sa equal the loops'
    exactly, and so does Y (the same float32 operations in the same order). ``compact``: float16
    scales and (4 bits) zero points packed as the rewriter writes them, read by the reference as
    the loops read their float32 values and bytes."""
    k, n = 40, 7
    q, scales, zp = _weights(k, n, bits, block, with_zp)
    if compact:
        scales = scales.astype(np.float16)
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((2, 3, k)) * 2).astype(np.float32)
    a[0, 1, 16:32] = 0.25  # within the threshold of the offset: dropped
    channel_offset = (rng.standard_normal(k) * 0.1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    kw = dict(threshold=0.3, offset=0.25, channel_offset=channel_offset)
    d = sparsify(a.reshape(-1, k), kw["threshold"], kw["offset"], None, channel_offset)
    assert not d[1, 16:32].any()
    qa_loops, sa_loops, y_loops = _contract_by_loops(d, q, scales, zp, bias, bits=bits, block=block)
    qa, sa = quantize_blocks(d, block)
    np.testing.assert_array_equal(qa, qa_loops)
    np.testing.assert_array_equal(sa, sa_loops)
    assert np.abs(qa).max() == 127 and qa.dtype == np.int8
    op_zp = pack_rows(zp, bits) if compact and zp is not None else zp
    y = _op(a, q, scales, op_zp, bits=bits, block=block, accuracy_level=4, bias=bias, **kw)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    np.testing.assert_array_equal(y.reshape(-1, n), y_loops)


def test_rounding_is_half_to_even():
    """amax 127 makes inv 1: D = 0.5, 1.5, 2.5 round to 0, 2, 2 (rint), not away from zero."""
    d = np.array([[0.5, 1.5, 2.5, -2.5, 127.0] + [0.0] * 11], np.float32)
    qa, sa = quantize_blocks(d, 16)
    assert qa[0, :5].tolist() == [0, 2, 2, -2, 127] and sa.tolist() == [[1.0]]


@pytest.mark.parametrize("shape", [(48,), (1, 48), (1, 1, 48)])
def test_one_row_keeps_the_float_path(shape):
    q, scales, zp = _weights(48, 9, 4, 16, True)
    a = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y4 = _op(a, q, scales, zp, bits=4, block=16, accuracy_level=4)
    np.testing.assert_array_equal(y4, _op(a, q, scales, zp, bits=4, block=16, accuracy_level=0))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_below_4_keep_the_float_path(level):
    q, scales, zp = _weights(48, 9, 8, 32, False)
    a = np.random.default_rng(3).standard_normal((5, 48)).astype(np.float32)
    np.testing.assert_array_equal(_op(a, q, scales, zp, bits=8, block=32, accuracy_level=level),
                                  _op(a, q, scales, zp, bits=8, block=32, accuracy_level=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_with_inf_or_nan_take_the_float_path(dtype):
    """Row 1 holds a NaN and row 3 an Inf: their outputs are those of accuracy_level 0; an Inf in a
    channel the drop rule drops (threshold_scale +inf) does not count (row 2); the other rows are
    the int8 path's, which differs from the float one."""
    k, n = 48, 9
    q, scales, zp = _weights(k, n, 4, 16, True)
    a = np.random.default_rng(4).standard_normal((5, k)).astype(dtype)
    a[1, 7], a[3, 30], a[2, 5] = np.nan, np.inf, np.inf
    threshold_scale = np.ones(k, np.float32)
    threshold_scale[5] = np.inf  # channel 5 is always dropped
    kw = dict(bits=4, block=16, threshold_scale=threshold_scale)
    y4 = _op(a, q, scales, zp, accuracy_level=4, **kw)
    y0 = _op(a, q, scales, zp, accuracy_level=0, **kw)
    assert y4.dtype == dtype
    np.testing.assert_array_equal(y4[[1, 3]], y0[[1, 3]])
    assert np.isnan(y4[1]).all() and not np.isfinite(y4[3]).any()
    finite_rows = [0, 2, 4]
    np.testing.assert_array_equal(y4[finite_rows], _op(a[finite_rows], q, scales, zp, accuracy_level=4, **kw))
    assert np.isfinite(y4[finite_rows]).all() and not np.array_equal(y4[finite_rows], y0[finite_rows])
    np.testing.assert_array_equal(_op(a[[1, 3]], q, scales, zp, accuracy_level=4, **kw), y0[[1, 3]])  # no int8 row


@pytest.mark.parametrize("bits, block, with_zp", [(4, 32, True), (4, 128, False), (8, 64, True)])
def test_int8_activations_stay_within_a_percent_of_the_float_path(bits, block, with_zp):
    k, n = 512, 64
    q, scales, zp = _weights(k, n, bits, block, with_zp)
    a = np.random.default_rng(5).standard_normal((16, k)).astype(np.float32)
    y4 = _op(a, q, scales, zp, bits=bits, block=block, accuracy_level=4, threshold=0.5)
    y0 = _op(a, q, scales, zp, bits=bits, block=block, accuracy_level=0, threshold=0.5)
    rel = np.linalg.norm(y4 - y0) / np.linalg.norm(y0)
    assert 0 < rel < 0.01, rel


# ----------------------------------------------------------------------------- the attribute
@pytest.mark.parametrize("level", [5, -1])
def test_a_bad_accuracy_level_is_a_one_line_error_naming_the_node(level):
    with pytest.raises(ScapError) as e:
        make_nbits_node("a", "b", "s", "y", k=32, n=8, bits=4, block_size=32, threshold=0.1, name="up",
                        accuracy_level=level)
    assert "\n" not in str(e.value) and "accuracy_level" in str(e.value) and "'up'" in str(e.value)
    with pytest.raises(ScapError, match="accuracy_level"):
        scap_sparse_matmul_nbits(np.zeros((2, 32), np.float32), np.zeros((32, 16), np.uint8),
                                 np.ones((1, 8), np.float32), k=32, n=8, bits=4, block_size=32, threshold=0.1,
                                 accuracy_level=level)


def _nbits_model(q, scales, zp, *, bits: int, block: int, accuracy_level: int) -> onnx.ModelProto:
    k, n = q.shape
    inits = [numpy_helper.from_array(pack_rows(q, bits), "b"), numpy_helper.from_array(scales, "s")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
    node = make_nbits_node("a", "b", "s", "y", k=k, n=n, bits=bits, block_size=block, threshold=0.3,
                           zero_points="z" if zp is not None else None, name="scap", accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()], ir_version=10)


@pytest.mark.parametrize("level", [0, 4])
def test_the_node_carries_the_level_and_the_evaluator_reads_it(level):
    """make_nbits_node writes accuracy_level only when it is not 0; onnx.reference's evaluator with
    the OpRun computes the level's rule."""
    q, scales, zp = _weights(40, 8, 4, 16, True)
    model = _nbits_model(q, scales, zp, bits=4, block=16, accuracy_level=level)
    attrs = {x.name: helper.get_attribute_value(x) for x in model.graph.node[0].attribute}
    assert attrs.get("accuracy_level") == (level or None)
    a = np.random.default_rng(6).standard_normal((4, 40)).astype(np.float32)
    (y,) = ReferenceEvaluator(model, new_ops=[ScapSparseMatMulNBits]).run(None, {"a": a})
    np.testing.assert_array_equal(y, _op(a, q, scales, zp, bits=4, block=16, accuracy_level=level))
    if level:
        assert not np.array_equal(y, _op(a, q, scales, zp, bits=4, block=16, accuracy_level=0))


# ----------------------------------------------------------------------------- the rewriter
def _rewritten_node(model_path, tmp_path) -> onnx.NodeProto:
    (t,) = find_targets(onnx.load(str(model_path)))
    rewritten, done = rewrite_model(load_model(model_path), {t.name: (0.2, 0.0)})
    assert done == [t.name]
    save_model(rewritten, tmp_path / "s.onnx")
    (node,) = [n for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.op_type == OP_TYPE_NBITS]
    return node


def _accuracy_attribute(node: onnx.NodeProto):
    return next((helper.get_attribute_value(x) for x in node.attribute if x.name == "accuracy_level"), None)


@pytest.mark.parametrize("level", [None, 0, 4])
def test_the_rewriter_keeps_a_matmul_nbits_accuracy_level(tmp_path, level):
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", k=80, n=40, accuracy_level=level)
    (t,) = find_targets(onnx.load(str(model)))
    assert t.accuracy_level == (level or 0)
    assert t.weight_format == "int4 block 32 asym" + (" accuracy_level 4" if level else "")
    assert _accuracy_attribute(_rewritten_node(model, tmp_path)) == (level or None)


def test_a_matmul_nbits_with_an_invalid_accuracy_level_stays_dense(tmp_path):
    model = onnx.load(str(tiny_models.make_matmul_nbits(tmp_path / "m.onnx", accuracy_level=7)))
    assert unsupported_weights(GraphView.from_proto(model)) == [
        ("MatMulNBits", NBITS_NAME, "has accuracy_level = 7 (0 to 4 are valid)")]
    with pytest.raises(ScapError, match="accuracy_level = 7"):
        find_targets(model)


def test_a_qdq_target_gets_accuracy_level_0(tmp_path):
    """An int8 QDQ weight was a float MatMul in the source: its node has no accuracy_level."""
    rng = np.random.default_rng(7)
    k, n = 64, 24
    inits = [numpy_helper.from_array(rng.integers(-128, 128, (k, n)).astype(np.int8), "W_q"),
             numpy_helper.from_array(np.float32(0.02), "W_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="/model/layers.0/mlp/up_proj/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits)
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    (t,) = find_targets(onnx.load(str(model)))
    assert t.qdq and t.accuracy_level == 0
    assert _accuracy_attribute(_rewritten_node(model, tmp_path)) is None


@pytest.mark.parametrize("zero_points", [False, True])
def test_at_threshold_0_the_rewritten_node_follows_matmul_nbits_at_its_level(tmp_path, zero_points):
    """The rewritten node (onnx.reference with the OpRun) against onnxruntime's MatMulNBits at the
    same accuracy_level, 8 rows: close to float rounding at 0 and at 4 (not bit-equal by contract),
    while the two levels differ by the int8 quantisation (about 5e-3). float32 scales, as the
    source's: float16 ones would add their own rounding (2e-4 here)."""
    x = np.random.default_rng(8).standard_normal((8, 256)).astype(np.float32)
    outputs = {}
    for level in (0, 4):
        model = tiny_models.make_matmul_nbits(tmp_path / f"m{level}.onnx", k=256, n=64, zero_points=zero_points,
                                              accuracy_level=level)
        dense = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        rewritten, _ = rewrite_model(load_model(model), {NBITS_NAME: (0.0, 0.0)}, nbits_scales="float32")
        save_model(rewritten, tmp_path / f"s{level}.onnx")
        evaluator = ReferenceEvaluator(onnx.load(str(tmp_path / f"s{level}.onnx")), new_ops=[ScapSparseMatMulNBits])
        outputs[level] = dense, evaluator.run(None, {"X": x})[0]
    if np.allclose(outputs[4][0], outputs[0][0], rtol=1e-6, atol=1e-6):
        pytest.skip("onnxruntime's MatMulNBits does not quantise A at accuracy_level 4 on this CPU")
    for level, (dense, sparse) in outputs.items():
        rel = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
        assert rel < 1e-5, (level, rel)
    rel = np.linalg.norm(outputs[4][1] - outputs[0][1]) / np.linalg.norm(outputs[0][1])
    assert 1e-3 < rel < 1e-2, rel
