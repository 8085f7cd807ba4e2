"""Gemm targets, as optimum exports GPT-2's Conv1D (B [K, N]) and OPT's fc1/fc2 (transB, B [N, K]):
found with their roles, rewritten into ScapSparseMatMul, and exact where nothing is dropped."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conftest import reference_op
from scap_onnx.api import rewrite
from scap_onnx.calibration.calibrator import calibrate
from scap_onnx.op.contract import targets_of
from scap_onnx.op.lowering import lower_model
from scap_onnx.op.session import library_available
from scap_onnx.op.contract import DOMAIN, OP_TYPE
from scap_onnx.graph.model_io import load_model, save_model
from scap_onnx.passes.sparsify import rewrite_model
from scap_onnx.graph.targets import find_targets
from scap_onnx.evaluation.pairing import open_pair

C_FC = "/transformer/h.0/mlp/c_fc/Gemm"  # transB 0, C [N]
FC2 = "/decoder/layers.0/fc2/Gemm"  # transB 1, C [1, N]
OUT_PROJ = "/decoder/layers.0/self_attn/out_proj/Gemm"  # no C
SCALED = "/decoder/layers.0/scaled/Gemm"  # alpha 2: not A @ B


def make_gemm_model(path, seed=0):
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.25):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("W1", 16, 24), init("C1", 24, scale=1.0), init("W2", 16, 24),  # W2 is [N, K]
             init("C2", 1, 16, scale=1.0), init("W3", 16, 8), init("W4", 16, 8)]
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "C1"], ["H"], name=C_FC),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Gemm", ["R", "W2", "C2"], ["Y2"], name=FC2, transB=1),
        helper.make_node("Gemm", ["Y2", "W3"], ["Y3"], name=SCALED, alpha=2.0),
        helper.make_node("Gemm", ["Y2", "W4"], ["Y4"], name=OUT_PROJ),
    ]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", 8]) for y in ("Y3", "Y4")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def gemm_model(tmp_path_factory):
    return make_gemm_model(tmp_path_factory.mktemp("gemm") / "model.onnx")


def _feeds(seed=1, rows=5):
    return {"X": np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)}


def _run(path, feeds, library):
    options = ort.SessionOptions()
    if library:
        from scap_onnx import session_options

        options = session_options(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _sparse_runs(path, feeds, tmp_path):
    """Outputs of a rewritten model lowered to standard ops, and with the op library when it is built."""
    lowered = tmp_path / "lowered.onnx"
    onnx.save(lower_model(onnx.load(str(path))), str(lowered))
    return [_run(lowered, feeds, library=False)] + ([_run(path, feeds, library=True)] if library_available() else [])


def _rewrite(src, dst, plan):
    model, done = rewrite_model(load_model(src), plan)
    save_model(model, dst)
    return done


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gemms_that_are_matmuls_are_targets(gemm_model):
    targets = {t.name: t for t in find_targets(onnx.load(str(gemm_model)))}
    assert set(targets) == {C_FC, FC2, OUT_PROJ}  # alpha 2 is not A @ B
    c_fc, fc2, out_proj = targets[C_FC], targets[FC2], targets[OUT_PROJ]
    assert (c_fc.role, c_fc.k, c_fc.n, c_fc.trans_b, c_fc.bias, c_fc.op) == ("up", 16, 24, False, "C1", "Gemm")
    assert (fc2.role, fc2.k, fc2.n, fc2.trans_b, fc2.bias) == ("down", 24, 16, True, "C2")
    assert (out_proj.role, out_proj.k, out_proj.n, out_proj.bias) == ("o", 16, 8, None)


def test_threshold_zero_with_offsets_keeps_the_function(gemm_model, tmp_path):
    out = tmp_path / "sparse.onnx"
    plan = {C_FC: (0.0, 0.3), FC2: (0.0, -0.2), OUT_PROJ: (0.0, 0.1)}
    assert sorted(_rewrite(gemm_model, out, plan)) == sorted(plan)
    onnx.checker.check_model(str(out))
    feeds = _feeds()
    dense = _run(gemm_model, feeds, library=False)
    for got in _sparse_runs(out, feeds, tmp_path):
        for d, s in zip(dense, got):
            assert _rel(s, d) < 1e-5


def test_transposed_weight_stays_in_the_file(gemm_model, tmp_path):
    out = tmp_path / "sparse.onnx"
    _rewrite(gemm_model, out, {FC2: (0.5, 0.0)})
    m = onnx.load(str(out))
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert inits["W2"] == (16, 24)  # the original [N, K] weight, no second copy
    op = next(n for n in m.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN)
    transpose = next(n for n in m.graph.node if n.output[0] == op.input[1])
    assert transpose.op_type == "Transpose" and transpose.input[0] == "W2"
    assert op.input[2] == "C2/scap_bias" or inits[op.input[2]] == (16,)  # C [1, N] became a [N] bias


def test_sparse_numerics_match_the_reference(gemm_model, tmp_path):
    out = tmp_path / "sparse.onnx"
    _rewrite(gemm_model, out, {C_FC: (0.6, 0.05), FC2: (0.4, -0.1), OUT_PROJ: (0.3, 0.0)})
    feeds = _feeds(seed=2, rows=7)
    ref = ReferenceEvaluator(str(out), new_ops=[reference_op()]).run(None, feeds)
    dense = _run(gemm_model, feeds, library=False)
    assert _rel(ref[1], dense[1]) > 1e-3  # something was dropped
    for got in _sparse_runs(out, feeds, tmp_path):
        for r, s in zip(ref, got):
            assert _rel(s, r) < 1e-5


def test_calibrate_rewrite_and_validate_pairing(gemm_model, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32))
    stats = calibrate(gemm_model, calib, sparsity="0.5", passes=2)
    out = tmp_path / "sparse.onnx"
    res = rewrite(gemm_model, out, stats=stats)
    assert sorted(res.rewritten) == sorted([C_FC, FC2, OUT_PROJ])
    assert res.plan[C_FC].threshold > 0 and res.plan[OUT_PROJ].threshold > 0  # FC2 reads a Relu: 0 may do
    pair = open_pair(gemm_model, out)  # dense and sparse are recognised as a pair through the Transpose
    assert {(s["name"], s["k"], s["n"]) for s in pair.scap} == {(C_FC, 16, 24), (FC2, 24, 16), (OUT_PROJ, 16, 8)}


def test_bias_through_identity_of_a_constant(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((16, 8)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")
    nodes = [
        helper.make_node("Constant", [], ["bc"], value=bias),
        helper.make_node("Identity", ["bc"], ["bi"]),
        helper.make_node("MatMul", ["X", "W"], ["M"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Add", ["M", "bi"], ["Y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    src, out = tmp_path / "m.onnx", tmp_path / "s.onnx"
    onnx.save(model, src)
    feeds = _feeds()
    for offset in (0.0, 0.25):
        _rewrite(src, out, {"/model/layers.0/mlp/up_proj/MatMul": (0.0, offset)})
        for got in _sparse_runs(out, feeds, tmp_path):
            assert _rel(got[0], _run(src, feeds, library=False)[0]) < 1e-5


def test_weights_through_identity_pair_up_in_validate(tmp_path):
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W"),  # [N, K]
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "V")]
    nodes = [
        helper.make_node("Identity", ["W"], ["W_alias"]),  # exporters deduplicate tied weights this way
        helper.make_node("Identity", ["V"], ["V_alias"]),
        helper.make_node("Gemm", ["X", "W_alias"], ["H"], name="/decoder/layers.0/fc1/Gemm", transB=1),
        helper.make_node("MatMul", ["H", "V_alias"], ["Y"], name="/decoder/layers.0/fc2/MatMul"),
    ]
    graph = helper.make_graph(nodes, "i", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    src, out = tmp_path / "m.onnx", tmp_path / "s.onnx"
    onnx.save(model, src)
    plan = {"/decoder/layers.0/fc1/Gemm": (0.5, 0.1), "/decoder/layers.0/fc2/MatMul": (0.2, 0.0)}
    _rewrite(src, out, plan)
    pair = open_pair(src, out)
    assert {(s["name"], s["weight"]) for s in pair.scap} == {(name, w) for name, w in zip(plan, ("W", "V"))}
    feeds = _feeds()
    ref = ReferenceEvaluator(str(out), new_ops=[reference_op()]).run(None, feeds)
    for got in _sparse_runs(out, feeds, tmp_path):
        assert _rel(got[0], ref[0]) < 1e-5


# ----------------------------------------------------------------------------- real exports
@pytest.mark.parametrize("family, gemm_roles", [("gpt2", {"qkv", "o", "up", "down"}), ("opt", {"up", "down"})])
def test_real_exports_through_the_cli(family, gemm_roles, tmp_path):
    import json

    from conftest import run_cli
    from random_families import tiny_family

    folder = tiny_family(family)
    model = folder / "model.onnx"
    targets = find_targets(onnx.load(str(model), load_external_data=False))
    assert {t.role for t in targets if t.op == "Gemm"} == gemm_roles
    stats, sparse, zero = tmp_path / "stats.json", tmp_path / "sparse.onnx", tmp_path / "zero.onnx"
    run_cli("calibrate", model, "--data", folder / "calib.npz", "-s", "0.5", "-o", stats, check=True)
    run_cli("rewrite", model, "--stats", stats, "-o", sparse, check=True)
    run_cli("rewrite", model, "--stats", stats, "-s", "0", "-o", zero, check=True)
    assert sum(len(targets_of(n)) for n in onnx.load(str(sparse)).graph.node if n.op_type == OP_TYPE) == len(targets)

    # Threshold 0 with the calibrated offsets: the dense logits (the folded C and offsets are exact).
    feeds = {k: v[:1] for k, v in np.load(folder / "eval.npz").items()}
    dense = _run(model, feeds, library=False)[0]
    for got in _sparse_runs(zero, feeds, tmp_path):
        assert _rel(got[0], dense) < 1e-4

    # On held-out windows every role lands near its target.
    report = tmp_path / "report.json"
    run_cli("validate", model, sparse, "--data", folder / "eval.npz", "--no-latency", "-s", "0.5", "-r", report,
            check=True)
    roles = json.loads(report.read_text())["sparsity"]["roles"]
    assert set(roles) >= gemm_roles
    for role, r in roles.items():
        assert abs(r["mean"] - 0.5) < 0.1, (role, r)
