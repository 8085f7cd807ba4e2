"""The one lowering of ScapSparseMatMul to standard ONNX ops (scap_onnx.op.lowering), in real
onnxruntime sessions, against the numpy reference: what runs wherever the library is not used."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from scap_onnx.errors import ScapError
from scap_onnx.op.contract import make_node, opset_import
from scap_onnx.op.lowering import lower_model
from scap_onnx.op.reference import scap_sparse_matmul

K, N = 6, 5


def _model(b: np.ndarray, dtype=np.float32, *, bias: np.ndarray | None = None, constant_node: bool = False,
            threshold: float = 0.5, offset: float = 0.0) -> onnx.ModelProto:
    """Y = ScapSparseMatMul(A, B[, bias]); B an initializer or the output of a Constant node."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    weight = numpy_helper.from_array(b.astype(dtype), "B")
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["B"], value=weight))
    else:
        inits.append(weight)
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(dtype), "bias"))
    nodes.append(make_node("A", "B", "Y", threshold=threshold, offset=offset,
                           bias="bias" if bias is not None else None, name="scap"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", elem, [None, K])],
                              [helper.make_tensor_value_info("Y", elem, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def _same_specials(got: np.ndarray, want: np.ndarray) -> None:
    """NaN and +-Inf in the same places (with the same signs), finite values close."""
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isposinf(got), np.isposinf(want))
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_inf_in_a_dropped_row_of_b_is_skipped():
    """A dropped element skips its row of B, as the kernels and the reference do: the lowering
    must not compute 0 * Inf = NaN (the earlier Where(drop, 0, d) @ B did)."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((K, N)).astype(np.float32)
    b[1, 2] = np.inf
    b[3, 0] = -np.inf
    b[4, 4] = np.nan
    a = rng.standard_normal((4, K)).astype(np.float32) + 2.0  # kept ...
    a[:, 1] = 0.1  # ... but rows 1, 3 and 4 of B are dropped in every row of A
    a[:, 3] = -0.2
    a[:, 4] = 0.3
    want = scap_sparse_matmul(a, b, threshold=0.5)
    assert np.isfinite(want).all()
    got = _run(lower_model(_model(b)), a)
    _same_specials(got, want)


def test_inf_in_kept_rows_keeps_its_sign_and_nan_where_signs_meet():
    rng = np.random.default_rng(1)
    b = rng.standard_normal((K, N)).astype(np.float32)
    b[0, 1] = np.inf
    b[2, 1] = -np.inf  # meets +Inf in column 1 when rows 0 and 2 are both kept
    b[5, 3] = np.nan
    a = np.array([[2.0, 0.0, 0.1, 0.0, 1.0, 0.0],     # row 0 kept (+), row 2 dropped: col 1 -> +Inf
                  [-2.0, 0.0, 0.1, 0.0, 1.0, 0.0],    # row 0 kept (-): col 1 -> -Inf
                  [2.0, 0.0, 3.0, 0.0, 1.0, 0.0],     # rows 0 and 2 kept: +Inf + -Inf -> NaN
                  [0.0, 0.0, 0.0, 0.0, 1.0, 2.0],     # row 5 kept: NaN in column 3
                  [np.nan, 0.0, 0.0, 0.0, 0.0, 0.0]],  # NaN in A is never dropped
                 np.float32)
    want = scap_sparse_matmul(a, b, threshold=0.5)
    got = _run(lower_model(_model(b)), a)
    _same_specials(got, want)
    assert np.isposinf(got[0, 1]) and np.isneginf(got[1, 1]) and np.isnan(got[2, 1]) and np.isnan(got[3, 3])


@pytest.mark.parametrize("constant_node", [False, True])
def test_float16_weights_lower_with_float16_constants(constant_node):
    """A float16 model (its weight a Constant node too) lowers to a model onnxruntime loads: the
    offset, threshold and zero take B's type (the earlier lowering fell back to float32 for a
    Constant-node weight, which onnxruntime refused)."""
    rng = np.random.default_rng(2)
    b = rng.standard_normal((K, N)).astype(np.float16)
    bias = rng.standard_normal(N).astype(np.float16)
    a = rng.standard_normal((3, K)).astype(np.float16)
    model = _model(b, np.float16, bias=bias, constant_node=constant_node, threshold=0.4, offset=0.1)
    got = _run(lower_model(model), a)
    want = scap_sparse_matmul(a, b, bias, threshold=0.4, offset=0.1)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("finite", [True, False])
def test_both_forms_match_the_reference(finite):
    """With B known finite the short form; otherwise the form that handles non-finite rows."""
    rng = np.random.default_rng(3)
    b = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    a = rng.standard_normal((7, K)).astype(np.float32)
    model = lower_model(_model(b, bias=bias, offset=0.2), (lambda name: finite))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == (1 if finite else 6)
    np.testing.assert_allclose(_run(model, a), scap_sparse_matmul(a, b, bias, threshold=0.5, offset=0.2),
                               rtol=1e-5, atol=1e-5)


def test_unknown_element_type_is_refused():
    model = _model(np.ones((K, N), np.float32))
    model.graph.initializer.pop()  # B is now neither a constant nor declared
    del model.graph.input[:]
    with pytest.raises(ScapError, match="element type of 'B' is unknown"):
        lower_model(model)
