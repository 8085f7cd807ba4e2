"""The op's optional per-channel inputs, threshold_scale (3) and channel_offset (4), on the Python
side: the numpy reference against the rule written out element by element, onnx.reference's OpRun,
the lowering and the onnxruntime-extensions fallback in real onnxruntime sessions against the
reference, and the rewriter (bias folding of offset + channel_offset, fusion only of members whose
vectors are equal) on the tiny models. The compiled kernels: tests/test_channels_op.py.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conftest import reference_op
from scap_onnx.calibration.capture import Upstream, build_capture_model
from scap_onnx.graph.model_io import ModelSource, load_model, save_model
from scap_onnx.graph.targets import find_targets
from scap_onnx.op.contract import OP_TYPE, Sparsification, make_node, opset_import, targets_of
from scap_onnx.op.fallback import fallback_session
from scap_onnx.op.lowering import lower_model
from scap_onnx.op.reference import ScapSparseMatMulNBits, channel_thresholds, scap_sparse_matmul
from scap_onnx.op.session import open_session
from scap_onnx.passes.fuse import fuse_shared_inputs
from scap_onnx.passes.sparsify import rewrite_model
from scap_onnx.errors import ScapError

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
K, N = 37, 11


def channel_data(shape, k, n, dtype, seed, *, specials=True):
    """A, B, bias, threshold_scale (with 0, +inf and ties) and channel_offset for a [.., K] x [K, N] case."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.0, 2.0, k).astype(np.float32)
    channel_offset = rng.standard_normal(k).astype(np.float32)
    if specials and k > 3:
        scale[0], scale[1], scale[2] = 0.0, np.inf, 1.0
    a = (rng.standard_normal((*shape, k)) + channel_offset).astype(dtype)
    if specials and a.size:
        flat = a.reshape(-1, k)
        flat[:, 3 % k] = channel_offset[3 % k]  # D = 0 exactly
        flat.reshape(-1)[rng.choice(flat.size, max(1, flat.size // 50), replace=False)] = np.nan
    b = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    return a, b, bias, scale, channel_offset


def rule_by_element(a, b, bias, scale, channel_offset, threshold, offset):
    """The contract written out one element at a time, in float32 then float64 sums."""
    rows = a.reshape(-1, a.shape[-1]).astype(np.float32)
    y = np.zeros((rows.shape[0], b.shape[1]))
    for m, row in enumerate(rows):
        for k, x in enumerate(row):
            d = np.float32(x - np.float32(offset))
            d = np.float32(d - (channel_offset[k] if channel_offset is not None else 0))
            s = 1.0 if scale is None else float(scale[k])
            tau = s if (threshold == 0 and s == math.inf) or (s == 0 and threshold == math.inf) else \
                np.float32(np.float32(threshold) * np.float32(s))
            if not abs(d) <= tau:
                y[m] += float(d) * b[k].astype(np.float64)
    y = y + (0 if bias is None else bias.astype(np.float64))
    return y.reshape(*a.shape[:-1], b.shape[1]).astype(a.dtype)


@pytest.mark.parametrize("threshold, offset", [(0.0, 0.0), (0.6, 0.25), (math.inf, -0.5)])
@pytest.mark.parametrize("vectors", ["scale", "offset", "both"])
def test_reference_is_the_rule(threshold, offset, vectors):
    a, b, bias, scale, coff = channel_data((3,), K, N, np.float32, 1)
    scale = scale if vectors != "offset" else None
    coff = coff if vectors != "scale" else None
    with np.errstate(invalid="ignore"):
        got = scap_sparse_matmul(a, b, bias, scale, coff, threshold=threshold, offset=offset)
    np.testing.assert_allclose(got, rule_by_element(a, b, bias, scale, coff, threshold, offset), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isnan(got), np.isnan(a).any(axis=-1, keepdims=True) & np.ones_like(got, bool))


def test_channel_thresholds_let_the_scale_decide_zero_times_inf():
    scale = np.array([0.0, np.inf, 2.0, 0.5], np.float32)
    assert channel_thresholds(0.0, scale).tolist() == [0.0, math.inf, 0.0, 0.0]
    assert channel_thresholds(math.inf, scale).tolist() == [0.0, math.inf, math.inf, math.inf]
    assert channel_thresholds(3.0, scale).tolist() == [0.0, math.inf, 6.0, 1.5]


def test_scale_zero_keeps_nonzeros_and_inf_drops_the_channel():
    a = np.array([[0.0, 1e-30, -3.0, 5.0]], np.float32)
    b = np.eye(4, dtype=np.float32)
    got = scap_sparse_matmul(a, b, None, np.array([0, 0, np.inf, 1], np.float32), threshold=10.0)
    assert got.tolist() == [[0.0, np.float32(1e-30), 0.0, 0.0]]


@pytest.mark.parametrize("scale, coff, message", [
    (np.ones(K - 1, np.float32), None, "threshold_scale must have shape"),
    (None, np.zeros(K + 1, np.float32), "channel_offset must have shape"),
    (np.full(K, -1.0, np.float32), None, "threshold_scale must be >= 0"),
    (np.full(K, np.nan, np.float32), None, "threshold_scale must be >= 0"),
])
def test_reference_rejects_bad_vectors(scale, coff, message):
    a, b, bias, _, _ = channel_data((2,), K, N, np.float32, 2)
    with pytest.raises(ValueError, match=message):
        scap_sparse_matmul(a, b, bias, scale, coff, threshold=0.5)


def vector_model(b, bias, scale, coff, *, threshold, offset, dtype, as_inputs=False):
    """One ScapSparseMatMul over initializers B (and bias, vectors; graph inputs with as_inputs)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(b.astype(dtype), "B")]
    inputs = [helper.make_tensor_value_info("A", elem, None)]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(dtype), "bias"))
    for name, v in (("scale", scale), ("coff", coff)):
        if v is not None:
            (inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(v)])) if as_inputs
             else inits.append(numpy_helper.from_array(v, name)))
    node = make_node("A", "B", "Y", threshold=threshold, offset=offset, bias="bias" if bias is not None else None,
                     threshold_scale="scale" if scale is not None else None,
                     channel_offset="coff" if coff is not None else None, name="scap")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 9
    return model


def vector_feeds(a, scale, coff, as_inputs):
    return {"A": a, **({"scale": scale} if as_inputs and scale is not None else {}),
            **({"coff": coff} if as_inputs and coff is not None else {})}


CASES = [  # (with bias, vectors present, as graph inputs)
    (True, "both", False), (False, "both", False), (False, "scale", True), (True, "offset", True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("with_bias, vectors, as_inputs", CASES)
def test_opruns_and_lowering_equal_the_reference(dtype, with_bias, vectors, as_inputs):
    a, b, bias, scale, coff = channel_data((2, 5), K, N, dtype, 3)
    bias = bias if with_bias else None
    scale, coff = (scale if vectors != "offset" else None), (coff if vectors != "scale" else None)
    model = vector_model(b, bias, scale, coff, threshold=0.7, offset=0.1, dtype=dtype, as_inputs=as_inputs)
    want = scap_sparse_matmul(a, b, bias, scale, coff, threshold=0.7, offset=0.1)
    feeds = vector_feeds(a, scale, coff, as_inputs)
    (got,) = ReferenceEvaluator(model, new_ops=[reference_op()]).run(None, feeds)
    np.testing.assert_array_equal(got, want)
    lowered = lower_model(onnx.ModelProto.FromString(model.SerializeToString()), lambda name: True)
    (got,) = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    tol = 1e-5 if dtype == np.float32 else 2e-2  # the float16 lowering subtracts in float16
    if dtype == np.float16:  # and so may round D to the other side of a tie: compare where it agrees
        d16 = (a - np.float16(0.1)) - (coff.astype(np.float16) if coff is not None else 0)
        d32 = (a.astype(np.float32) - np.float32(0.1)) - (coff if coff is not None else 0)
        tau = channel_thresholds(0.7, scale) if scale is not None else np.float32(0.7)
        if ((np.abs(d16) <= tau.astype(np.float16)) != (np.abs(d32) <= tau)).any():
            pytest.skip("a float16 rounding moved an element across its threshold")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin].astype(np.float32), want[fin].astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("with_bias, vectors, as_inputs", CASES)
def test_fallback_equals_the_reference(with_bias, vectors, as_inputs):
    pytest.importorskip("onnxruntime_extensions")
    a, b, bias, scale, coff = channel_data((4,), K, N, np.float32, 4)
    bias = bias if with_bias else None
    scale, coff = (scale if vectors != "offset" else None), (coff if vectors != "scale" else None)
    model = vector_model(b, bias, scale, coff, threshold=0.5, offset=-0.2, dtype=np.float32, as_inputs=as_inputs)
    (got,) = fallback_session(model).run(None, vector_feeds(a, scale, coff, as_inputs))
    want = scap_sparse_matmul(a, b, bias, scale, coff, threshold=0.5, offset=-0.2)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6, atol=1e-6)


def test_fallback_rejects_a_bad_constant_vector_naming_the_node():
    pytest.importorskip("onnxruntime_extensions")
    _, b, _, scale, _ = channel_data((1,), K, N, np.float32, 5)
    scale[4] = -1.0
    with pytest.raises(ValueError, match="node 'scap'.*threshold_scale must be >= 0"):
        fallback_session(vector_model(b, None, scale, None, threshold=0.5, offset=0.0, dtype=np.float32))


def test_nbits_oprun_takes_the_vectors_after_bias():
    from scap_onnx.op.nbits import make_nbits_node, pack_rows

    rng = np.random.default_rng(6)
    k, n, block = 32, 8, 16
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (2, n)).astype(np.float32)
    a, _, _, scale, coff = channel_data((3,), k, n, np.float32, 7)
    node = make_nbits_node("a", "b", "s", "y", k=k, n=n, bits=4, block_size=block, threshold=0.4,
                           threshold_scale="ts", channel_offset="co")
    assert list(node.input) == ["a", "b", "s", "", "", "ts", "co"]
    inits = [numpy_helper.from_array(v, nm) for nm, v in (("b", pack_rows(q, 4)), ("s", scales), ("ts", scale),
                                                          ("co", coff))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    (got,) = ReferenceEvaluator(model, new_ops=[ScapSparseMatMulNBits]).run(None, {"a": a})
    w = ((q.astype(np.float32) - 8) * scales[np.arange(k) // block]).astype(np.float32)
    np.testing.assert_array_equal(got, scap_sparse_matmul(a, w, None, scale, coff, threshold=0.4))


# ----------------------------------------------------------------------------- the rewriter
def _plan(model_path, seed, *, threshold, zero_scale=False, token_scaled=False):
    """A plan with per-channel vectors for every target (targets sharing an input share them)."""
    rng = np.random.default_rng(seed)
    targets = find_targets(onnx.load(str(model_path)))
    by_input = {}
    for t in targets:
        if t.input not in by_input:
            by_input[t.input] = (np.zeros(t.k, np.float32) if zero_scale else rng.uniform(0, 2, t.k).astype(np.float32),
                                 (0.1 * rng.standard_normal(t.k)).astype(np.float32))
    return {t.name: Sparsification(threshold, 0.05, token_scaled, *by_input[t.input]) for t in targets}


def _feeds(model_path):
    from scap_onnx.calibration.data import feeds_from_ids, model_inputs

    proto = onnx.load(str(model_path), load_external_data=False)
    return feeds_from_ids(model_inputs(proto), np.random.default_rng(0).integers(3, 50, (2, 12)))


def _run_reference(path, feeds):
    ref = ReferenceEvaluator(str(path), new_ops=[reference_op()])
    return ref.run(None, {k: v for k, v in feeds.items() if k in ref.input_names})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("token_scaled", [False, True])
@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_zero_scales_with_channel_offsets_keep_the_function(tiny, tmp_path, key, token_scaled):
    """threshold_scale of zeros (threshold 0.5) and channel offsets folded into the bias: the dense model."""
    plan = _plan(tiny[key], 1, threshold=0.5, zero_scale=True, token_scaled=token_scaled)
    model, names = rewrite_model(load_model(tiny[key]), plan)
    assert len(names) == len(plan)
    fuse_shared_inputs(model)
    save_model(model, tmp_path / "z.onnx")
    nodes = [n for n in onnx.load(str(tmp_path / "z.onnx")).graph.node if n.op_type == OP_TYPE]
    assert all(len(n.input) == 5 and n.input[3] and n.input[4] for n in nodes)
    feeds = _feeds(tiny[key])
    dense = ort.InferenceSession(str(tiny[key]), providers=["CPUExecutionProvider"])
    want = dense.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in dense.get_inputs()}})[0]
    assert _rel(_run_reference(tmp_path / "z.onnx", feeds), want) < 1e-5


@pytest.mark.parametrize("key", ["decoder", "encoder"])
def test_rewritten_vectors_match_the_capture_graph(tiny, tmp_path, key):
    """The rewritten model (reference op, fused) equals the dense graph whose target inputs are
    sparsified in standard ops with the same vectors (what calibration runs): the folded bias, the
    lowering's Where(|x - m| <= tau, m, x) and the op agree."""
    plan = _plan(tiny[key], 2, threshold=0.4)
    model, _ = rewrite_model(load_model(tiny[key]), plan)
    assert fuse_shared_inputs(model) > 0
    save_model(model, tmp_path / "v.onnx")
    feeds = _feeds(tiny[key])
    got = _run_reference(tmp_path / "v.onnx", feeds)
    src = ModelSource(tiny[key])
    targets = find_targets(src.proto)
    cfg = [Upstream(t.input, plan[t.name], 1, [t.name]) for t in targets]
    out = src.proto.graph.output[0].name
    sess = open_session(build_capture_model(src.proto, {out: 1}, cfg), data_dir=src.data_dir)
    want = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    assert _rel(got, want) < 1e-4


def test_fusion_only_over_equal_vectors(tiny):
    base = _plan(tiny["decoder"], 3, threshold=0.4)
    model, _ = rewrite_model(load_model(tiny["decoder"]), base)
    fused = fuse_shared_inputs(model)
    assert fused > 0
    # Different scales for every target: nothing shares a pass any more.
    rng = np.random.default_rng(4)
    apart = {name: Sparsification(s.threshold, s.offset, False, rng.uniform(0, 2, len(s.threshold_scale)),
                                  s.channel_offset) for name, s in base.items()}
    model, _ = rewrite_model(load_model(tiny["decoder"]), apart)
    assert fuse_shared_inputs(model) == 0
    assert all(len(targets_of(n)) == 1 for n in model.graph if n.op_type == OP_TYPE)


def test_rewriter_rejects_bad_vectors(tiny):
    plan = _plan(tiny["decoder"], 5, threshold=0.4)
    name, s = next(iter(plan.items()))
    bad_scale = np.array(s.threshold_scale, np.float32)
    bad_scale[0] = -1
    for wrong in (Sparsification(0.4, 0.0, False, bad_scale[:-1]), Sparsification(0.4, 0.0, False, bad_scale),
                  Sparsification(0.4, 0.0, False, None, np.full(len(bad_scale), np.inf, np.float32))):
        with pytest.raises(ScapError, match=name):
            rewrite_model(load_model(tiny["decoder"]), {name: wrong})


def test_measured_sparsity_follows_the_vectors(tiny, tmp_path):
    """measure_sparsity counts by the op's rule with the node's vectors: scales of +inf drop every
    element, scales of 0 only exact zeros, whatever the threshold attribute says."""
    from scap_onnx.calibration.data import open_data
    from scap_onnx.evaluation.sparsity import measure_sparsity

    measured = {}
    for label, value in (("inf", np.inf), ("zero", 0.0)):
        plan = {name: Sparsification(0.4, s.offset, False, np.full(len(s.threshold_scale), value, np.float32),
                                     s.channel_offset)
                for name, s in _plan(tiny["decoder"], 6, threshold=0.4).items()}
        model, _ = rewrite_model(load_model(tiny["decoder"]), plan)
        save_model(model, tmp_path / f"{label}.onnx")
        data = open_data(tiny["calib"], onnx.load(str(tiny["decoder"]), load_external_data=False), tiny["decoder"],
                         seq_len=32, max_tokens=256)
        measured[label] = measure_sparsity(tmp_path / f"{label}.onnx", data, use_library=False)
    assert measured["inf"] and all(v["sparsity"] == 1.0 for v in measured["inf"].values())
    assert all(v["sparsity"] < 0.01 for v in measured["zero"].values())
