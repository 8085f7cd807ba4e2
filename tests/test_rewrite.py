import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from conftest import reference_op

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
from scap_onnx.api import rewrite
from scap_onnx.calibration.calibrator import calibrate
from scap_onnx.calibration.capture import Upstream, build_capture_model
from scap_onnx.graph import model_io
from scap_onnx.graph.model_io import ModelSource
from scap_onnx.calibration.data import feeds_from_ids, model_inputs
from scap_onnx.errors import ScapError
from scap_onnx.op.lowering import lower_model
from scap_onnx.op.session import library_available, open_session
from scap_onnx.op.contract import DOMAIN, OP_TYPE, Sparsification, targets_of
from scap_onnx.graph.model_io import load_model, save_model
from scap_onnx.passes.sparsify import rewrite_model
from scap_onnx.graph.targets import find_targets


@pytest.fixture(scope="module")
def stats(tiny):
    # token-scaled o and down (method scap-search): the rewrite of both kinds of target is tested here
    return {k: calibrate(tiny[k], tiny["calib"], sparsity="0.5", max_tokens=1024, seq_len=64, passes=2,
                         method="scap-search") for k in ("decoder", "encoder")}


def _feeds(model_path, n=12, seed=0):
    proto = onnx.load(str(model_path), load_external_data=False)
    ids = np.random.default_rng(seed).integers(3, 50, (2, n))
    return feeds_from_ids(model_inputs(proto), ids)


def _dense(model_path, feeds):
    s = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _reference(model_path, feeds):
    ref = ReferenceEvaluator(str(model_path), new_ops=[reference_op()])
    return ref.run(None, {k: v for k, v in feeds.items() if k in ref.input_names})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_structure(tiny, stats, tmp_path, key):
    out = tmp_path / "sparse.onnx"
    before = _hash(tiny[key])
    res = rewrite(tiny[key], out, stats=stats[key])
    assert _hash(tiny[key]) == before  # input untouched
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    scap = [n for n in m.graph.node if n.op_type == OP_TYPE]
    targets = find_targets(onnx.load(str(tiny[key])))
    members = [name for n in scap for name in targets_of(n)]
    assert len(members) == len(targets) == len(res.rewritten)
    assert set(members) == {t.name for t in targets}  # names traceable to the MatMuls
    # q/k/v and gate/up read one input at one sparsity: one node each, followed by a Split
    fused = [n for n in scap if len(targets_of(n)) > 1]
    assert len(fused) == (4 if key == "decoder" else 2)
    splits = {n.input[0]: n for n in m.graph.node if n.op_type == "Split"}
    assert all(len(splits[n.output[0]].output) == len(targets_of(n)) for n in fused)
    assert all(n.domain == DOMAIN for n in scap)
    assert any(o.domain == DOMAIN and o.version == 1 for o in m.opset_import)
    assert not [n for n in m.graph.node if n.op_type == "MatMul" and n.name in {t.name for t in targets}]
    scaled = [n for n in scap if "/scap_token_norm" in n.input[0]]  # o and down: op(x / n) * n
    assert {r for n in scaled for r in ("o_proj", "down_proj", "attention/output", "output/dense")
            if r in n.name} and len(scaled) == 4
    if key == "encoder":  # the bias Adds were folded, or follow the token scale
        assert all(len(n.input) == 3 for n in scap if n not in scaled)
        assert len([n for n in m.graph.node if n.op_type == "Add" and n.name.endswith("/scap_bias_add")]) == 4
        assert not [n for n in m.graph.node if n.op_type == "Add" and n.name.endswith("/dense/Add")]
    assert [o.name for o in m.graph.output] == [o.name for o in onnx.load(str(tiny[key])).graph.output]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("token_scaled", [False, True])
@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_threshold_zero_keeps_the_function(tiny, stats, tmp_path, key, token_scaled):
    """Offsets folded into the bias: with threshold 0 the rewritten model is the dense model, also
    with every target token-scaled (op(x / n) * n, then the original bias)."""
    plan = {name: (0.0, p.offset if p.offset else 0.25, token_scaled) for name, p in stats[key].plan().items()}
    model, names = rewrite_model(load_model(tiny[key]), plan)
    save_model(model, tmp_path / "t0.onnx")
    feeds = _feeds(tiny[key])
    assert _rel(_reference(tmp_path / "t0.onnx", feeds), _dense(tiny[key], feeds)) < 1e-5


@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_sparse_numerics_match_the_contract(tiny, stats, tmp_path, key):
    """The rewritten model (numpy reference op) equals the dense graph with inputs sparsified in
    standard ops, Where(|x - m| <= tau, m, x), which is what calibration runs."""
    out = tmp_path / "sparse.onnx"
    rewrite(tiny[key], out, stats=stats[key])
    feeds = _feeds(tiny[key])
    got = _reference(out, feeds)
    src = ModelSource(tiny[key])
    st = stats[key]
    cfg = [Upstream(s.input, Sparsification(s.threshold, s.offset, s.token_scaled), 1, [t["name"] for t in s.targets])
           for s in st.sites]
    assert {s.roles[0] for s in st.sites if s.token_scaled} == {"o", "down"}
    out_name = src.proto.graph.output[0].name
    sess = open_session(build_capture_model(src.proto, {out_name: 1}, cfg), data_dir=src.data_dir)
    want = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    assert _rel(got, want) < 1e-4
    assert _rel(got, _dense(tiny[key], feeds)) > 1e-3  # and it is sparse


@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_fusion_keeps_the_outputs(tiny, stats, tmp_path, key):
    """Fused nodes (one pass over q/k/v's and gate/up's weights side by side) compute what the
    separate nodes do, in the numpy reference and with the library."""
    rewrite(tiny[key], tmp_path / "fused.onnx", stats=stats[key])
    rewrite(tiny[key], tmp_path / "separate.onnx", stats=stats[key], fuse=False)
    fused, separate = onnx.load(str(tmp_path / "fused.onnx")), onnx.load(str(tmp_path / "separate.onnx"))
    assert len([n for n in fused.graph.node if n.op_type == OP_TYPE]) < \
        len([n for n in separate.graph.node if n.op_type == OP_TYPE])
    assert all(len(targets_of(n)) == 1 for n in separate.graph.node if n.op_type == OP_TYPE)
    # the separate weights are gone: the fused model is no larger
    assert len(fused.graph.initializer) <= len(separate.graph.initializer)
    feeds = _feeds(tiny[key])
    assert _rel(_reference(tmp_path / "fused.onnx", feeds), _reference(tmp_path / "separate.onnx", feeds)) < 1e-6
    if library_available():
        from scap_onnx import session_options

        got = {}
        for name in ("fused", "separate"):
            sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), session_options(),
                                        providers=["CPUExecutionProvider"])
            got[name] = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
        for a, b in zip(got["fused"], got["separate"]):
            assert _rel(a, b) < 1e-5


def test_fusion_needs_one_drop_rule(tiny, stats, tmp_path):
    """gate and up at different sparsities drop different elements: they stay two nodes."""
    rewrite(tiny["decoder"], tmp_path / "s.onnx", stats=stats["decoder"], sparsity="gate=0.3,up=0.6")
    scap = [n for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.op_type == OP_TYPE]
    assert len(scap) == 4 and all(len(targets_of(n)) == 1 for n in scap)
    assert not [n for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.op_type == "Split"]


def test_lowered_ops_equal_reference(tiny, stats, tmp_path):
    out = tmp_path / "sparse.onnx"
    rewrite(tiny["encoder"], out, stats=stats["encoder"])
    m = lower_model(onnx.load(str(out)))
    feeds = _feeds(tiny["encoder"])
    low = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert _rel(low, _reference(out, feeds)) < 1e-5


@pytest.mark.skipif(not library_available(), reason="ScapSparseMatMul library not built")
@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_runs_with_the_library(tiny, stats, tmp_path, key):
    from scap_onnx import session_options

    out = tmp_path / "sparse.onnx"
    rewrite(tiny[key], out, stats=stats[key])
    feeds = _feeds(tiny[key])
    sess = ort.InferenceSession(str(out), session_options(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    assert _rel(got, _reference(out, feeds)) < 1e-5  # the op contract's float32 tolerance


def test_external_data_preserved(tiny, tmp_path):
    src_dir = tiny["decoder_ext"].parent
    before = {p.name: _hash(p) for p in src_dir.iterdir()}
    st = calibrate(tiny["decoder_ext"], tiny["calib"], sparsity="0.5", max_tokens=512, seq_len=64, passes=1)
    out = tmp_path / "sparse.onnx"
    res = rewrite(tiny["decoder_ext"], out, stats=st)
    assert res.external_data == tmp_path / "sparse.onnx.data" and res.external_data.stat().st_size > 0
    assert {p.name: _hash(p) for p in src_dir.iterdir()} == before
    m = onnx.load(str(out), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"] == "sparse.onnx.data" for t in ext)
    feeds = _feeds(tiny["decoder_ext"])
    assert np.isfinite(_reference(out, feeds)).all()
    # the fused weights, concatenated only while saving, went to the data file intact
    rewrite(tiny["decoder_ext"], tmp_path / "separate.onnx", stats=st, fuse=False)
    assert any(len(targets_of(n)) > 1 for n in m.graph.node if n.op_type == OP_TYPE)
    assert _rel(_reference(out, feeds), _reference(tmp_path / "separate.onnx", feeds)) < 1e-6


def test_large_models_get_external_data(tiny, stats, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_BYTES", 1000)
    res = rewrite(tiny["decoder"], tmp_path / "big.onnx", stats=stats["decoder"])
    assert res.external_data is not None and res.external_data.exists()


def test_never_overwrites_input(tiny, stats, tmp_path):
    import shutil

    shutil.copytree(tiny["decoder"].parent, tmp_path / "m")
    model = tmp_path / "m" / "model.onnx"
    before = _hash(model)
    with pytest.raises(ScapError, match="overwrite"):
        rewrite(model, model, stats=stats["decoder"])
    assert _hash(model) == before


def test_plan_errors(tiny):
    with pytest.raises(ScapError, match="not target MatMuls"):
        rewrite_model(load_model(tiny["decoder"]), {"nope": (0.1, 0.0)})
    with pytest.raises(ScapError, match="invalid threshold"):
        rewrite_model(load_model(tiny["decoder"]), {"/model/layers.0/mlp/down_proj/MatMul": (-1.0, 0.0)})


def test_spec_selects_roles(tiny, stats, tmp_path):
    res = rewrite(tiny["decoder"], tmp_path / "s.onnx", stats=stats["decoder"], sparsity="down=0.6")
    m = onnx.load(str(tmp_path / "s.onnx"))
    scap = [n for n in m.graph.node if n.op_type == OP_TYPE]
    assert len(scap) == 2 and all("down_proj" in n.name for n in scap)
    assert all(p.sparsity == 0.6 for p in res.plan.values())


def test_validate_checks_the_weights_of_fused_nodes(tiny, stats, tmp_path):
    """A fused node's weight must be its targets' weights side by side: a model of the same shape
    with other weights is refused, as it is with one node per target."""
    from scap_onnx.evaluation.pairing import open_pair
    from tiny_models import make_decoder

    other = make_decoder(tmp_path / "other" / "model.onnx", seed=7)
    rewrite(tiny["decoder"], tmp_path / "s.onnx", stats=stats["decoder"])
    assert len(open_pair(tiny["decoder"], tmp_path / "s.onnx").scap) == 14
    with pytest.raises(ScapError, match="differs"):
        open_pair(other, tmp_path / "s.onnx")


def test_fused_model_keeps_external_data_when_every_weight_is_fused(tmp_path):
    """A model whose only weights are fused still gets a data file: the choice is made before the
    fused weights, computed while saving, replace the external ones."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), n)
         for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "mlp.gate_proj.weight"], ["g"], name="/mlp/gate_proj/MatMul"),
         helper.make_node("MatMul", ["x", "mlp.up_proj.weight"], ["u"], name="/mlp/up_proj/MatMul")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, 64]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, [None, 64])], list(w.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    st = calibrate(src, tmp_path / "calib.npz", sparsity="0.5", passes=1)
    res = rewrite(src, tmp_path / "s.onnx", stats=st)
    scap = [n for n in onnx.load(str(tmp_path / "s.onnx"), load_external_data=False).graph.node
            if n.op_type == OP_TYPE]
    assert len(scap) == 1 and len(targets_of(scap[0])) == 2
    assert res.external_data == tmp_path / "s.onnx.data" and res.external_data.stat().st_size >= 2 * 32 * 64 * 4
    x = rng.standard_normal((5, 32)).astype(np.float32)
    ref = ReferenceEvaluator(str(tmp_path / "s.onnx"), new_ops=[reference_op()])
    g, u = ref.run(None, {"x": x})
    # each half equals its own MatMul on the sparsified input, with its own weight (a fused weight
    # holding one half twice, or the halves swapped, fails here)
    for out, name in ((g, "gate_proj"), (u, "up_proj")):
        plan = res.plan[f"/mlp/{name}/MatMul"]
        d = x - np.float32(plan.offset)
        d[np.abs(d) <= plan.threshold] = 0
        weight = numpy_helper.to_array(w[f"mlp.{name}.weight"]).astype(np.float64)
        want = d.astype(np.float64) @ weight + np.float64(plan.offset) * weight.sum(0)
        assert out.shape == (5, 64)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_token_scaled_inputs_shared_by_fused_targets(tiny, tmp_path):
    """q/k/v token-scaled: one x / n for the three, one fused node on it, and validate maps the node
    back to the three MatMuls that read x."""
    from scap_onnx.evaluation.pairing import open_pair

    st = calibrate(tiny["decoder"], tiny["calib"], sparsity="0.5", max_tokens=512, seq_len=64, passes=2,
                   token_scaled_roles=("q", "k", "v", "o", "down"))
    assert {s.roles[0] for s in st.sites if s.token_scaled} == {"q", "o", "down"}
    rewrite(tiny["decoder"], tmp_path / "s.onnx", stats=st)
    m = onnx.load(str(tmp_path / "s.onnx"))
    fused_qkv = [n for n in m.graph.node if n.op_type == OP_TYPE and len(targets_of(n)) == 3]
    assert len(fused_qkv) == 2 and all("/scap_token_norm" in n.input[0] for n in fused_qkv)
    assert len([n for n in m.graph.node if n.op_type == "ReduceL2"]) == 6  # q/k/v, o, down of 2 layers
    pair = open_pair(tiny["decoder"], tmp_path / "s.onnx")
    assert len(pair.scap) == 14
    feeds = _feeds(tiny["decoder"])
    got = _reference(tmp_path / "s.onnx", feeds)
    src = ModelSource(tiny["decoder"])
    cfg = [Upstream(s.input, Sparsification(s.threshold, s.offset, s.token_scaled), 1, [t["name"] for t in s.targets])
           for s in st.sites]
    out_name = src.proto.graph.output[0].name
    sess = open_session(build_capture_model(src.proto, {out_name: 1}, cfg), data_dir=src.data_dir)
    want = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    assert _rel(got, want) < 1e-4
