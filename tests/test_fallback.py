"""The onnxruntime-extensions fallback (scap_onnx.op.fallback) against the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime_extensions  # noqa: F401 - a test dependency (pyproject's test extra): missing is a failure
import pytest
from onnx import TensorProto, helper, numpy_helper

from scap_onnx.op.contract import DOMAIN, make_node, opset_import
from scap_onnx.op.fallback import FALLBACK_DOMAIN, fallback_session, to_fallback_model
from scap_onnx.op.reference import scap_sparse_matmul

K, H, N = 17, 33, 7
T1, O1 = 0.5, 0.25  # first node: threshold, offset
T2, O2 = 0.1, -0.125  # second node


def _weights(dtype, seed=0):
    rng = np.random.default_rng(seed)
    b1 = rng.standard_normal((K, H)).astype(dtype)
    bias1 = rng.standard_normal(H).astype(dtype)
    b2 = (rng.standard_normal((H, N)) / 4).astype(dtype)
    return b1, bias1, b2


def _model(dtype, opset=17):
    """a -> ScapSparseMatMul(bias, named 'fc1') -> Relu -> ScapSparseMatMul(no bias, 'fc2') -> y.

    The second node's A (the Relu output) has no declared type, so the conversion has to use CastLike.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    b1, bias1, b2 = _weights(dtype)
    graph = helper.make_graph(
        [
            make_node("a", "b1", "h", threshold=T1, offset=O1, bias="bias1", name="fc1"),
            helper.make_node("Relu", ["h"], ["r"]),
            make_node("r", "b2", "y", threshold=T2, offset=O2, name="fc2"),
        ],
        "two_layers",
        [helper.make_tensor_value_info("a", elem, None)],
        [helper.make_tensor_value_info("y", elem, None)],
        [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(bias1, "bias1"), numpy_helper.from_array(b2, "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), opset_import()])
    model.ir_version = 10
    return model


def _expected(a, dtype):
    b1, bias1, b2 = _weights(dtype)
    h = scap_sparse_matmul(a, b1, bias1, threshold=T1, offset=O1)
    return scap_sparse_matmul(np.maximum(h, 0), b2, threshold=T2, offset=O2)


def _check(y, ref, tol):
    """Same dtype and shape; NaN and Inf at exactly the reference's positions, Inf with its sign; the
    finite values within tol of the largest."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    finite = np.isfinite(ref)
    scale = float(np.abs(ref[finite].astype(np.float64)).max(initial=0.0)) or 1.0
    err = float(np.abs(y[finite].astype(np.float64) - ref[finite].astype(np.float64)).max(initial=0.0)) / scale
    assert err <= tol, err


@pytest.mark.parametrize(
    "dtype, tol", [(np.float32, 1e-6), (np.float16, 3e-3)], ids=["float32", "float16"]
)
@pytest.mark.parametrize("shape", [(K,), (1, K), (5, K), (2, 3, K), (0, K)], ids=str)
def test_fallback_matches_reference(dtype, tol, shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    a = rng.standard_normal(shape).astype(dtype)
    a.reshape(-1)[::5] = 0
    session = fallback_session(_model(dtype))
    (y,) = session.run(None, {"a": a})
    _check(y, _expected(a, dtype), tol)


def _specials(dtype):
    """A (5, K) and B (K, N) with Inf / NaN placed so that every kind of output occurs (threshold 0.5,
    offset 0.25): |A - 0.25| <= 0.5 drops an element (and skips its row of B)."""
    rng = np.random.default_rng(21)
    a = (rng.standard_normal((5, K)) * 2).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    a[:, 0:5] = 0.5  # columns 0-4 of A dropped in every row: rows 0-4 of B are skipped
    a[:, 5:8] = 2.0  # columns 5-7 kept (positive) in every row
    b[0, :] = np.inf  # Inf in dropped rows of B: no effect
    b[1, 2] = -np.inf
    b[2, 3] = np.nan  # NaN in a dropped row of B: no effect either
    b[5, 1] = np.inf  # Inf in a kept row of B: column 1 +Inf in every row ...
    b[6, 4] = -np.inf  # ... column 4 -Inf ...
    b[7, 5], b[6, 5] = np.inf, -np.inf  # ... and column 5 Inf - Inf = NaN
    a[1, 9] = np.inf  # Inf in A (kept): row 1 +-Inf by the signs of B[9] (and NaN where Inf meets -Inf)
    a[2, 10] = -np.inf
    a[3, 11] = np.inf
    b[11, 6] = 0.0  # Inf * 0 = NaN in row 3, column 6
    a[4, 12] = np.nan  # NaN in A: row 4 all NaN
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_inf_in_a_and_b_kept_and_dropped(dtype, with_bias):
    """NaN and Inf positions and signs equal the numpy reference's exactly, with Inf in A (kept) and in
    B (in kept and in dropped rows)."""
    a, b = _specials(dtype)
    bias = np.random.default_rng(22).standard_normal(N).astype(dtype)
    feeds = {"a": a, "b": b, **({"bias": bias} if with_bias else {})}
    (y,) = fallback_session(_single_node_model(with_bias, dtype, threshold=0.5, offset=0.25)).run(None, feeds)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = scap_sparse_matmul(a, b, bias if with_bias else None, threshold=0.5, offset=0.25)
    # the reference shows what the data were built for (so the comparison covers each kind)
    assert np.isposinf(ref[0, 1]) and np.isneginf(ref[0, 4]) and np.isnan(ref[:, 5]).all()
    assert np.isfinite(ref[0, [0, 2, 3, 6]]).all()  # the Inf / NaN in dropped rows of B did nothing
    assert np.isinf(ref[1:4, [0, 2, 3]]).any() and np.isnan(ref[3, 6]) and np.isnan(ref[4]).all()
    assert np.isposinf(ref).any() and np.isneginf(ref).any()
    _check(y, ref, 1e-6 if dtype == np.float32 else 3e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_inf_in_a_dropped_at_infinite_threshold(dtype):
    """threshold Inf drops +-Inf in A (|Inf - offset| <= Inf) but never NaN; Inf in B then meets only
    dropped elements."""
    a, b = _specials(dtype)
    (y,) = fallback_session(_single_node_model(False, dtype, threshold=np.inf, offset=0.25)).run(None, {"a": a, "b": b})
    with np.errstate(invalid="ignore", over="ignore"):
        ref = scap_sparse_matmul(a, b, threshold=np.inf, offset=0.25)
    assert np.isnan(ref[4]).all() and (ref[:4] == 0).all()
    _check(y, ref, 0.0)


def test_fallback_nan_and_inf_propagate():
    a = np.random.default_rng(1).standard_normal((4, K)).astype(np.float32)
    a[1, 3] = np.nan
    a[2, 5] = np.inf
    (y,) = fallback_session(_model(np.float32)).run(None, {"a": a})
    with np.errstate(invalid="ignore"):
        ref = _expected(a, np.float32)
    assert np.isnan(ref[1]).all()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    _check(y, ref, 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_casts_around_the_python_op(dtype):
    """fc1's A has a declared type: float32 runs as is, float16 is cast; fc2's A (Relu's output) is not
    declared, so its result is cast back with CastLike."""
    converted = to_fallback_model(_model(dtype))
    ops = [n.op_type for n in converted.graph.node]
    float16 = dtype == np.float16
    assert ops.count("CastLike") == 1
    assert ops.count("Cast") == (3 + 1 if float16 else 0) + 2  # fc1's inputs and result; fc2's inputs


def test_conversion_rewrites_nodes_and_opsets_and_leaves_input_alone():
    model = _model(np.float32)
    before = model.SerializeToString()
    converted = to_fallback_model(model)
    assert model.SerializeToString() == before
    scap = [n for n in converted.graph.node if n.domain == FALLBACK_DOMAIN]
    assert [(n.op_type, n.name, len(n.input)) for n in scap] == [
        ("ScapSparseMatMulBias", "fc1", 3),
        ("ScapSparseMatMul", "fc2", 2),
    ]
    assert not any(n.domain == DOMAIN for n in converted.graph.node)
    domains = {o.domain for o in converted.opset_import}
    assert FALLBACK_DOMAIN in domains and DOMAIN not in domains


def test_fallback_session_from_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_model(np.float32), path)
    a = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    (y,) = fallback_session(str(path)).run(None, {"a": a})
    _check(y, _expected(a, np.float32), 1e-6)


def test_omitted_optional_bias():
    b = np.random.default_rng(4).standard_normal((K, N)).astype(np.float32)
    node = helper.make_node("ScapSparseMatMul", ["a", "b", ""], ["y"], domain=DOMAIN, threshold=0.3, name="n")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 10
    a = np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)
    (y,) = fallback_session(model).run(None, {"a": a})
    _check(y, scap_sparse_matmul(a, b, threshold=0.3), 1e-6)


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), None], ids=["negative", "nan", "missing"])
def test_bad_attributes_rejected_at_conversion(threshold):
    model = _model(np.float32)
    node = model.graph.node[0]
    del node.attribute[:]
    if threshold is not None:
        node.attribute.append(helper.make_attribute("threshold", threshold))
    with pytest.raises(ValueError, match="fc1"):
        to_fallback_model(model)


def _single_node_model(with_bias, dtype=np.float32, threshold=0.5, offset=0.0):
    """One node named 'one' whose A, B (and bias) are graph inputs."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = ["a", "b", "bias"] if with_bias else ["a", "b"]
    node = helper.make_node("ScapSparseMatMul", inputs, ["y"], domain=DOMAIN, threshold=threshold, offset=offset,
                            name="one")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(x, elem, None) for x in inputs],
        [helper.make_tensor_value_info("y", elem, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(
    "shapes",
    [((2, 3), (3, 4, 1), None), ((2, 3), (4, 4), None), ((), (3, 4), None), ((2, 3), (3, 4), (5,)),
     ((2, 3), (3, 4), (1, 4))],
    ids=["b3d", "k_mismatch", "a_scalar", "bias_len", "bias_2d"],
)
def test_bad_shapes_raise_naming_the_node(shapes):
    """A Python exception inside an onnxruntime-extensions op would abort the process: the fallback
    reports bad shapes through FallbackSession.run instead."""
    a_shape, b_shape, bias_shape = shapes
    session = fallback_session(_single_node_model(bias_shape is not None))
    feeds = {"a": np.ones(a_shape, np.float32), "b": np.ones(b_shape, np.float32)}
    if bias_shape is not None:
        feeds["bias"] = np.ones(bias_shape, np.float32)
    with pytest.raises(RuntimeError, match="'one'"):
        session.run(None, feeds)


def test_session_still_works_after_a_bad_shape():
    session = fallback_session(_model(np.float32))
    with pytest.raises(RuntimeError, match="fc1"):
        session.run(None, {"a": np.ones((2, K + 1), np.float32)})
    # The session still works afterwards.
    a = np.ones((2, K), np.float32)
    (y,) = session.run(None, {"a": a})
    _check(y, _expected(a, np.float32), 1e-6)


def test_undeclared_type_with_old_opset_is_a_clear_error():
    with pytest.raises(ValueError, match="fc2.*opset"):
        to_fallback_model(_model(np.float32, opset=14))
