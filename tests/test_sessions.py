"""The session factory (scap_onnx.op.session) and the rewrite pipeline's errors, as a user meets
them: one-line ScapErrors, the op lowered where the library is missing, model-local functions kept
in the graphs validate runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scap_onnx.api import rewrite
from scap_onnx.calibration.capture import build_capture_model
from scap_onnx.calibration.data import open_data
from scap_onnx.errors import ScapError
from scap_onnx.evaluation.accuracy import model_perplexity
from scap_onnx.op.session import base_options, open_session
from scap_onnx.passes.pipeline import rewrite_file


def test_rewrite_file_reports_bad_plans_as_scap_errors(tiny, tmp_path):
    """The passes run in an onnx_ir PassManager, which wraps errors in a PassError: the user still
    gets the one-line reason."""
    with pytest.raises(ScapError, match="not target MatMuls of this model"):
        rewrite_file(tiny["decoder"], tmp_path / "s.onnx", {"no such node": (0.1, 0.0)})
    name = "/model/layers.0/mlp/down_proj/MatMul"
    with pytest.raises(ScapError, match="invalid threshold"):
        rewrite_file(tiny["decoder"], tmp_path / "s.onnx", {name: (float("nan"), 0.0)})
    assert not (tmp_path / "s.onnx").exists()


def test_a_missing_library_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SCAP_ONNX_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(ScapError, match="library not found"):
        open_session(tiny["decoder"], use_library=True)


def test_perplexity_of_a_sparse_model_without_the_library(tiny, tmp_path, monkeypatch):
    """No library: the rewritten model's ScapSparseMatMul nodes are lowered to standard ops; the
    perplexity equals the one with the library (where built) and is finite."""
    out = tmp_path / "s.onnx"
    rewrite(tiny["decoder"], out, data=tiny["calib"], sparsity="0.5", max_tokens=256, seq_len=32, passes=1)
    ds = open_data(tiny["eval"], onnx.load(str(tiny["decoder"]), load_external_data=False), tiny["decoder"],
                   seq_len=32, max_tokens=128)
    with_lib = model_perplexity(out, ds)
    monkeypatch.setenv("SCAP_ONNX_LIBRARY", str(tmp_path / "missing.so"))
    lowered = model_perplexity(out, ds)
    assert np.isfinite(lowered["perplexity"]) and lowered["tokens"] == with_lib["tokens"]
    assert abs(lowered["perplexity"] / with_lib["perplexity"] - 1) < 1e-4
    with pytest.raises(ScapError, match="'logits' output"):
        model_perplexity(tiny["encoder"], ds)


def test_capture_graphs_keep_model_local_functions():
    """A model whose output goes through a model-local function: the graph validate runs (a
    capture of its outputs) still holds the function."""
    double = helper.make_function("local", "Double", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                  [helper.make_opsetid("", 17)])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["h"]),
                               helper.make_node("Double", ["h"], ["Y"], domain="local")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, functions=[double], opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("local", 1)])
    model.ir_version = 8
    cap = build_capture_model(model, {"Y": TensorProto.FLOAT, "h": TensorProto.FLOAT})
    assert [f.name for f in cap.functions] == ["Double"]
    sess = open_session(cap, options=base_options(1))
    x = np.arange(4, dtype=np.float32)[None]
    y, h = sess.run(None, {"X": x})
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(h, x)
