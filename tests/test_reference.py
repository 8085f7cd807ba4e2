"""The numpy reference of ScapSparseMatMul (the oracle of every kernel) against plain loops, and its
onnx.reference OpRun."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from scap_onnx.op.contract import make_node, opset_import
from scap_onnx.op.reference import ScapSparseMatMulOpRun, check_attributes, scap_sparse_matmul, sparsify


def loop_reference(a, b, bias, threshold, offset):
    """The contract written out element by element: for every row of A and every k, d = A - offset in
    float32; skip it when |d| <= threshold, else add d * B[k] (float64). Then bias, cast to A's type."""
    k_dim, n_dim = b.shape
    rows = a.reshape(-1, k_dim)
    out = np.zeros((rows.shape[0], n_dim), np.float64)
    for m in range(rows.shape[0]):
        for k in range(k_dim):
            d = np.float32(rows[m, k]) - np.float32(offset)
            if abs(d) <= np.float32(threshold):
                continue
            for n in range(n_dim):
                out[m, n] += float(d) * float(b[k, n])
        if bias is not None:
            out[m] += bias.astype(np.float64)
    return out.reshape(*a.shape[:-1], n_dim).astype(a.dtype)


def _data(shape, n, dtype, seed, specials=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    flat[::4] = 0
    flat[1::7] = 0.25  # exactly offset + 0 or offset + threshold for some cases below
    flat[2::9] = 0.75
    if specials and flat.size >= 6:
        flat[3] = np.nan
        flat[5] = -np.inf
    b = rng.standard_normal((shape[-1], n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    return a, b, bias


CASES = [
    # shape of A, N
    ((5,), 3),
    ((1, 7), 4),
    ((3, 1), 5),
    ((2, 3, 9), 6),
    ((2, 1, 2, 5), 2),
    ((0, 4), 3),
    ((4, 6), 1),
]
ATTRS = [(0.0, 0.0), (0.5, 0.25), (0.5, -0.5), (math.inf, 0.0), (0.0, 0.75)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("threshold, offset", ATTRS, ids=[f"t{t}-o{o}" for t, o in ATTRS])
@pytest.mark.parametrize("shape, n", CASES, ids=[f"{s}x{n}" for s, n in CASES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_reference_matches_loops(dtype, threshold, offset, shape, n, with_bias):
    a, b, bias = _data(shape, n, dtype, seed=len(shape) * 31 + n)
    bias = bias if with_bias else None
    y = scap_sparse_matmul(a, b, bias, threshold=threshold, offset=offset)
    expected = loop_reference(a, b, bias, threshold, offset)
    assert y.dtype == a.dtype and y.shape == (*shape[:-1], n)
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float32 else 1e-3, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 0.5, math.inf])
def test_nan_kept_and_inf_handled(threshold):
    a, b, bias = _data((3, 8), 5, np.float32, seed=7, specials=True)
    with np.errstate(invalid="ignore"):
        y = scap_sparse_matmul(a, b, bias, threshold=threshold, offset=0.25)
        expected = loop_reference(a, b, bias, threshold, 0.25)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    if threshold < math.inf:
        assert np.isnan(y[0]).all()  # row 0 holds the NaN: it propagates through every column
    else:
        # |NaN| <= inf is false (kept); |-inf - offset| <= inf is true (dropped).
        assert np.isnan(y[0]).all() and np.isfinite(y[1:]).all()


def test_sparsify_is_the_drop_rule():
    a = np.array([0.0, 0.25, 0.5, 0.75, 1.0, -0.25, np.nan, np.inf], np.float32)
    d = sparsify(a, threshold=0.25, offset=0.5)
    expected = np.array([-0.5, 0, 0, 0, 0.5, -0.75, np.nan, np.inf], np.float32)
    np.testing.assert_array_equal(d, expected)
    assert d.dtype == np.float32
    # threshold 0, offset 0 drops exact zeros (of either sign) only
    tiny = np.array([-0.0, 0.0, 1e-30], np.float32)
    np.testing.assert_array_equal(sparsify(tiny, 0.0), [0, 0, tiny[2]])


def test_threshold_zero_offset_zero_is_matmul():
    a, b, bias = _data((4, 3, 11), 9, np.float32, seed=3)
    y = scap_sparse_matmul(a, b, bias, threshold=0.0)
    np.testing.assert_allclose(y, a @ b + bias, rtol=1e-5, atol=1e-5)


def test_dropped_rows_of_b_are_skipped_even_when_not_finite():
    """A dropped activation skips its row of B: Inf / NaN there must not turn into 0 * Inf = NaN."""
    a = np.array([[0.0, 1.0, 0.1], [2.0, 0.0, 0.0]], np.float32)
    b = np.array([[np.inf, 1.0], [2.0, 3.0], [np.nan, 4.0]], np.float32)
    y = scap_sparse_matmul(a, b, threshold=0.2)
    np.testing.assert_array_equal(y, [[2.0, 3.0], [np.inf, 2.0]])
    np.testing.assert_array_equal(y, loop_reference(a, b, None, 0.2, 0.0))


@pytest.mark.parametrize(
    "threshold, offset, message",
    [(-0.5, 0.0, r"threshold must be >= 0, got -0\.5"), (math.nan, 0.0, "threshold must be >= 0, got nan"),
     (-math.inf, 0.0, "threshold must be >= 0, got -inf"), (0.5, math.nan, "offset must not be NaN")],
    ids=["negative", "nan", "minus_inf", "nan_offset"],
)
def test_bad_attributes_rejected(threshold, offset, message):
    a, b, _ = _data((2, 3), 4, np.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        check_attributes(threshold, offset)
    with pytest.raises(ValueError, match=message):
        scap_sparse_matmul(a, b, threshold=threshold, offset=offset)


@pytest.mark.parametrize(
    "a_shape, b_shape, bias_shape, message",
    [((2, 3), (3,), None, r"B must be 2-D, got shape \(3,\)"),
     ((2, 3), (3, 4, 1), None, r"B must be 2-D, got shape \(3, 4, 1\)"),
     ((2, 3), (4, 4), None, r"A's last dimension must equal B's first \(4\), got shape \(2, 3\)"),
     ((), (3, 4), None, r"A's last dimension must equal B's first \(3\), got shape \(\)"),
     ((2, 3), (3, 4), (3,), r"bias must have shape \(4,\), got \(3,\)"),
     ((2, 3), (3, 4), (1, 4), r"bias must have shape \(4,\), got \(1, 4\)")],
    ids=["b1d", "b3d", "k_mismatch", "a_scalar", "bias_len", "bias_2d"],
)
def test_bad_shapes_rejected(a_shape, b_shape, bias_shape, message):
    bias = None if bias_shape is None else np.ones(bias_shape, np.float32)
    with pytest.raises(ValueError, match=message):
        scap_sparse_matmul(np.ones(a_shape, np.float32), np.ones(b_shape, np.float32), bias, threshold=0.0)


def _op_run():
    return ScapSparseMatMulOpRun


def _evaluator_model(dtype, with_bias, threshold, offset):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info("a", elem, None), helper.make_tensor_value_info("b", elem, None)]
    if with_bias:
        inputs.append(helper.make_tensor_value_info("bias", elem, None))
    node = make_node("a", "b", "y", threshold=threshold, offset=offset, bias="bias" if with_bias else None, name="n")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("threshold, offset", [(0.0, 0.0), (0.5, 0.25), (math.inf, -1.0)])
def test_reference_evaluator_equals_reference(dtype, with_bias, threshold, offset):
    a, b, bias = _data((2, 3, 13), 6, dtype, seed=11)
    model = _evaluator_model(dtype, with_bias, threshold, offset)
    feeds = {"a": a, "b": b, **({"bias": bias} if with_bias else {})}
    (y,) = ReferenceEvaluator(model, new_ops=[_op_run()]).run(None, feeds)
    expected = scap_sparse_matmul(a, b, bias if with_bias else None, threshold=threshold, offset=offset)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(y, expected)


def test_reference_evaluator_with_initializer_and_two_nodes():
    a, b, bias = _data((4, 8), 8, np.float32, seed=5)
    graph = helper.make_graph(
        [
            make_node("a", "w", "h", threshold=0.3, offset=0.1, bias="bias", name="n1"),
            make_node("h", "w", "y", threshold=0.0, name="n2"),
        ],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(b, "w"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 10
    (y,) = ReferenceEvaluator(model, new_ops=[_op_run()]).run(None, {"a": a})
    h = scap_sparse_matmul(a, b, bias, threshold=0.3, offset=0.1)
    np.testing.assert_array_equal(y, scap_sparse_matmul(h, b, threshold=0.0))


@pytest.mark.parametrize("threshold", [-1.0, math.nan])
def test_reference_evaluator_rejects_bad_threshold(threshold):
    a, b, _ = _data((2, 5), 3, np.float32, seed=1)
    model = _evaluator_model(np.float32, False, threshold, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        ReferenceEvaluator(model, new_ops=[_op_run()]).run(None, {"a": a, "b": b})


def test_reference_evaluator_rejects_missing_threshold():
    a, b, _ = _data((2, 5), 3, np.float32, seed=1)
    model = _evaluator_model(np.float32, False, 0.0, 0.0)
    node = model.graph.node[0]
    kept = [attr for attr in node.attribute if attr.name != "threshold"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with pytest.raises(ValueError, match="ScapSparseMatMul requires the 'threshold' attribute"):
        ReferenceEvaluator(model, new_ops=[_op_run()]).run(None, {"a": a, "b": b})


def test_documented_new_ops_usage():
    """ReferenceEvaluator keys new_ops by (op_domain, class name): the class must bear the op's name."""
    a, b, _ = _data((2, 5), 3, np.float32, seed=1)
    model = _evaluator_model(np.float32, False, 0.5, 0.0)
    (y,) = ReferenceEvaluator(model, new_ops=[ScapSparseMatMulOpRun]).run(None, {"a": a, "b": b})
    np.testing.assert_array_equal(y, scap_sparse_matmul(a, b, threshold=0.5))
