"""Models quantized with onnxruntime's own MatMulNBits quantizer (onnxruntime.quantization.
matmul_nbits_quantizer.MatMulNBitsQuantizer: 4 bits, block 32, symmetric and asymmetric) through
the same commands as float models: inspect shows the weight format, calibrate + rewrite +
validate run through the real command line, and with threshold 0 (calibrated offsets, token
scaling) the rewritten model gives the int4 dense model's logits to float rounding (float32 scales;
with the default float16 ones, those of the int4 model with its scales rounded to float16). The
rewriter's block parameters: zero points packed, scales float16 where the rule allows, or float32
(--nbits-scales). Bad quantized input (bits 2, g_idx) exits 2 with one line naming the node.

The ScapSparseMatMulNBits nodes run with the compiled library only (there is no lowering), so the
tests that run a rewritten model need it (SCAP_ONNX_LIBRARY or the packaged build).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import tiny_models
from conftest import SMOL_SPEC, run_cli
from scap_onnx.calibration.data import open_data
from scap_onnx.calibration.stats import Stats
from scap_onnx.errors import ScapError
from scap_onnx.graph.model_io import ModelSource, load_model, save_model
from scap_onnx.graph.targets import find_all_targets, find_targets
from scap_onnx.graph.view import GraphView
from scap_onnx.op.contract import OP_TYPE_NBITS, scap_nodes, targets_of
from scap_onnx.evaluation.pairing import open_pair
from scap_onnx.op.nbits import (dequantize_matmul_nbits, matmul_nbits_scales, matmul_nbits_zero_points, row_bytes,
                                zero_points_kn)
from scap_onnx.op.session import library_available, open_session
from scap_onnx.passes.sparsify import rewrite_model

needs_library = pytest.mark.skipif(not library_available(), reason="ScapSparseMatMulNBits runs with the compiled library only")
#: Threshold 0 against the int4 dense model: both multiply by the same dequantised float32 weights
#: and accumulate in float32, in other orders; the folded bias adds offset * colsum(W) back. The
#: float model's test (test_real_models.py) holds to the same bound.
REL_TOL = 1e-4
#: The default float16 scales against the int4 model itself: each scale, so each dequantised weight,
#: moves by at most 2^-11 of itself (scap_onnx.op.nbits.block_scales_for_layout); to first order each
#: of the tiny decoder's 14 rewritten targets adds at most about 2^-11 of its output to the logits'
#: relative error, and the roundings, of either sign, partly cancel (measured: 1.4e-3 to 1.6e-3).
F16_REL_TOL = 14 * 2.0 ** -11
NBITS_NAME = "/model/layers.0/mlp/up_proj/MatMul_Q4"  # tiny_models.make_matmul_nbits' node


def quantize(src: Path, folder: Path, *, symmetric: bool, block_size: int = 32) -> Path:
    """``src`` through onnxruntime's MatMulNBitsQuantizer (4 bits, accuracy_level 0: dequantised
    weights, float GEMM) into ``folder``/model.onnx, with the tokenizer beside it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    folder.mkdir(parents=True, exist_ok=True)
    level = logging.getLogger().level
    logging.disable(logging.INFO)  # the quantizer logs every node
    try:
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=0)
        q.process()
        out = folder / "model.onnx"
        onnx.save_model(q.model.model, str(out))
    finally:
        logging.disable(logging.NOTSET)
        logging.getLogger().setLevel(level)
    for f in src.parent.glob("tokenizer*.json"):
        shutil.copy(f, folder)
    return out


def _logits(session, feeds) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


def _threshold_zero(model: Path, stats: Path, out: Path, spec: str = "0.5", nbits_scales: str = "float32") -> dict:
    """The model rewritten with threshold 0 and the calibrated offsets (and token scaling) of every
    target (float32 scales by default: exactly the source's)."""
    st = Stats.load(stats)
    plan = {name: (0.0, p.offset, p.token_scaled) for name, p in st.plan(spec).items()}
    rewritten, _ = rewrite_model(load_model(model), plan, nbits_scales)
    save_model(rewritten, out)
    return plan


def _with_float16_scales(model: Path, out: Path) -> Path:
    """``model`` with every MatMulNBits' scales rounded to float16 (stored float32 still): the
    weights a rewrite with float16 scales multiplies by."""
    proto = onnx.load(str(model))
    scales = {n.input[2] for n in proto.graph.node if n.op_type == "MatMulNBits"}
    for t in proto.graph.initializer:
        if t.name in scales:
            rounded = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(rounded, t.name))
    onnx.save(proto, str(out))
    return out


def _compare_threshold_zero(dense: Path, sparse: Path, feeds) -> tuple[float, float]:
    d = _logits(ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]), feeds)
    with ModelSource(sparse) as src:
        proto = onnx.ModelProto()
        proto.CopyFrom(src.proto)
        s = _logits(open_session(proto, data_dir=src.data_dir, use_library=True), feeds)
    rel = float(np.linalg.norm(s - d) / np.linalg.norm(d))
    return rel, float(np.abs(s - d).max() / np.abs(d).max())


# ----------------------------------------------------------------------------- the tiny decoder
@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory) -> dict:
    """The tiny decoder (K of 64 and 128: whole blocks of 32) quantized symmetric and asymmetric."""
    root = tmp_path_factory.mktemp("tiny_int4")
    dense = tiny_models.make_decoder(root / "float" / "model.onnx", hidden=64, inter=128, kv=32)
    out = tiny_models.make_texts(root)
    out["sym"] = quantize(dense, root / "sym", symmetric=True)
    out["asym"] = quantize(dense, root / "asym", symmetric=False)
    return out


def test_zero_threshold_scales_give_the_int4_logits(tiny_int4, tmp_path):
    """ScapSparseMatMulNBits with per-channel inputs (5 and 6): threshold_scale of zeros at threshold
    0.5, channel offsets folded into the dequantised weights' products: the int4 model's logits."""
    from scap_onnx.op.contract import Sparsification

    model = tiny_int4["asym"]
    rng = np.random.default_rng(16)
    plan = {t.name: Sparsification(0.5, 0.1, t.role in ("o", "down"), np.zeros(t.k, np.float32),
                                   (0.05 * rng.standard_normal(t.k)).astype(np.float32))
            for t in find_targets(onnx.load(str(model), load_external_data=False))}
    rewritten, names = rewrite_model(load_model(model), plan, nbits_scales="float32")
    save_model(rewritten, tmp_path / "scale0.onnx")
    nodes = scap_nodes(onnx.load(str(tmp_path / "scale0.onnx")))
    assert len(names) == 14 and all(n.op_type == OP_TYPE_NBITS and len(n.input) == 7 and n.input[5] and n.input[6]
                                    for n in nodes)
    proto = onnx.load(str(model), load_external_data=False)
    feeds, _ = next(iter(open_data(tiny_int4["eval"], proto, model, seq_len=64, max_tokens=64).batches()))
    rel, worst = _compare_threshold_zero(model, tmp_path / "scale0.onnx", feeds)
    assert rel < REL_TOL and worst < REL_TOL, (rel, worst)


@needs_library
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_fused_nbits_nodes_compute_what_the_separate_ones_do(tiny_int4, kind, tmp_path):
    """Targets that read one input under one drop rule (q, k and v; gate and up) fuse into one
    ScapSparseMatMulNBits over their repacked weights side by side (B_packed, scales, packed zero
    points concatenated along N); its outputs are the separate nodes' to float rounding."""
    from scap_onnx.passes.pipeline import rewrite_file

    model = tiny_int4[kind]
    plan = {t.name: (0.3, 0.05, False) for t in find_targets(onnx.load(str(model), load_external_data=False))}
    rewrite_file(model, tmp_path / "fused.onnx", plan)
    rewrite_file(model, tmp_path / "separate.onnx", plan, fuse=False)
    fused = scap_nodes(onnx.load(str(tmp_path / "fused.onnx")))
    separate = scap_nodes(onnx.load(str(tmp_path / "separate.onnx")))
    assert len(separate) == 14 and all(len(targets_of(n)) == 1 for n in separate)
    assert sorted(len(targets_of(n)) for n in fused) == [1] * 4 + [2] * 2 + [3] * 2  # o, down; gate+up; q+k+v
    widths = {n.name: int(next(a.i for a in n.attribute if a.name == "N")) for n in fused}
    assert sorted(widths.values()) == [64, 64, 64, 64, 128, 128, 256, 256]
    proto = onnx.load(str(model), load_external_data=False)
    feeds, _ = next(iter(open_data(tiny_int4["eval"], proto, model, seq_len=64, max_tokens=64).batches()))
    got = []
    for name in ("fused", "separate"):
        with ModelSource(tmp_path / f"{name}.onnx") as src:
            p = onnx.ModelProto()
            p.CopyFrom(src.proto)
            got.append(_logits(open_session(p, data_dir=src.data_dir, use_library=True), feeds))
    assert float(np.linalg.norm(got[0] - got[1]) / np.linalg.norm(got[1])) < 1e-5


def test_targets_of_a_quantized_model(tiny_int4):
    for kind, fmt in (("sym", "int4 block 32"), ("asym", "int4 block 32 asym")):
        proto = onnx.load(str(tiny_int4[kind]), load_external_data=False)
        targets = find_all_targets(GraphView.from_proto(proto))
        assert len(targets) == 15 and all(t.op == "MatMulNBits" for t in targets)
        assert [t.role for t in targets[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
        assert targets[-1].role == "lm_head" and [t.layer for t in targets[:14:7]] == [0, 1]
        assert {t.weight_format for t in targets} == {fmt} and {t.bits for t in targets} == {4}
        down = targets[6]
        assert (down.k, down.n, down.block_size, down.dtype) == (128, 64, 32, "float32")
        assert (down.zero_points is not None) == (kind == "asym")


def test_inspect_shows_the_weight_format(tiny_int4, tmp_path):
    p = run_cli("inspect", tiny_int4["asym"], check=True)
    assert "14 targets, 8 distinct inputs" in p.stdout and "format" in p.stdout.splitlines()[1]
    assert "int4 block 32 asym" in p.stdout and "/model/layers.1/mlp/down_proj/MatMul_Q4" in p.stdout
    rows = json.loads(run_cli("inspect", tiny_int4["sym"], "--json", check=True).stdout)["targets"]
    assert len(rows) == 14 and {r["format"] for r in rows} == {"int4 block 32"}
    float_rows = json.loads(run_cli("inspect", tiny_int4["sym"].parent.parent / "float" / "model.onnx", "--json",
                                    check=True).stdout)["targets"]
    assert {r["format"] for r in float_rows} == {"float32"}


@needs_library
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_calibrate_rewrite_validate_through_the_cli(tiny_int4, kind, tmp_path):
    model = tiny_int4[kind]
    stats, sparse, report = tmp_path / "stats.json", tmp_path / "sparse.onnx", tmp_path / "report.json"
    p = run_cli("calibrate", model, "--data", tiny_int4["calib"], "--sparsity", "0.5", "--tokens", 2048,
                "--seq-len", 64, "-o", stats, check=True)
    assert "calibrated 14 targets (8 inputs)" in p.stdout
    p = run_cli("rewrite", model, "--stats", stats, "--sparsity", SMOL_SPEC, "-o", sparse, check=True)
    assert "rewrote 6 targets in 4 nodes ->" in p.stdout  # each layer's gate and up fused: one input, one rule
    onnx.checker.check_model(str(sparse))
    proto = onnx.load(str(sparse))
    nodes = scap_nodes(proto)
    assert len(nodes) == 4 and {n.op_type for n in nodes} == {OP_TYPE_NBITS}
    assert not [n for n in proto.graph.node if n.op_type == "MatMulNBits" and "mlp" in n.name]
    assert sorted(len(targets_of(n)) for n in nodes) == [1, 1, 2, 2]
    assert "4 ScapSparseMatMulNBits nodes already in the model, computing 6 targets; NBits scales float16" \
        in run_cli("inspect", sparse, check=True).stdout
    run_cli("validate", model, sparse, "--data", tiny_int4["eval"], "--tokens", 1024, "--seq-len", 64,
            "--sparsity", SMOL_SPEC, "--repeats", 3, "--warmup", 1, "--report", report, check=True)
    r = json.loads(report.read_text())
    assert r["sparse"]["scap_targets"] == 6
    roles = r["sparsity"]["roles"]
    assert set(roles) == {"gate", "up", "down"}
    for role, v in roles.items():
        assert abs(v["mean_error"]) < 0.1, (role, v)
    assert 0 < r["sparsity"]["weighted"] < 1 and r["accuracy"]["op"] == "library"


@needs_library
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_threshold_zero_gives_the_int4_logits(tiny_int4, kind, tmp_path):
    model = tiny_int4[kind]
    stats = tmp_path / "stats.json"
    run_cli("calibrate", model, "--data", tiny_int4["calib"], "--sparsity", "0.5", "--tokens", 1024,
            "--seq-len", 64, "--passes", 1, "--method", "scap-search", "-o", stats, check=True)
    plan = _threshold_zero(model, stats, tmp_path / "t0.onnx")
    assert len(plan) == 14 and sum(off != 0 for _, off, _ in plan.values()) >= 4
    assert sum(scaled for _, _, scaled in plan.values()) == 4  # o and down of 2 layers
    proto = onnx.load(str(model), load_external_data=False)
    feeds, _ = next(iter(open_data(tiny_int4["eval"], proto, model, seq_len=64, max_tokens=64).batches()))
    rel, worst = _compare_threshold_zero(model, tmp_path / "t0.onnx", feeds)
    assert rel < REL_TOL and worst < REL_TOL, (rel, worst)
    # The default float16 scales. Of a model whose scales float16 holds exactly: its logits to
    # float rounding (the op reads float16 scales exactly). Of the model itself: its logits within
    # F16_REL_TOL (the folded bias is the source weights' column sums, the op's weights the rounded ones).
    rounded = _with_float16_scales(model, tmp_path / "rounded.onnx")
    _threshold_zero(rounded, stats, tmp_path / "t0_rounded.onnx", nbits_scales="float16")
    rel, worst = _compare_threshold_zero(rounded, tmp_path / "t0_rounded.onnx", feeds)
    assert rel < REL_TOL and worst < REL_TOL, (rel, worst)
    _threshold_zero(model, stats, tmp_path / "t0_f16.onnx", nbits_scales="float16")
    rel, worst = _compare_threshold_zero(model, tmp_path / "t0_f16.onnx", feeds)
    print(f"tiny int4 {kind}, threshold 0, float16 scales: logits relative error {rel:.2e}, max {worst:.2e}")
    assert rel < F16_REL_TOL and worst < F16_REL_TOL, (rel, worst)


@needs_library
@pytest.mark.parametrize("zero_points", [False, True])
def test_bias_input_and_offset_fold_into_the_dequantised_column_sums(tmp_path, zero_points):
    """A MatMulNBits with a bias input, rewritten with an offset and threshold 0: the new bias is
    the old one plus offset * colsum(dequantised W), so the output is the dense one."""
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", bias=True, zero_points=zero_points, k=80, n=40)
    name = NBITS_NAME
    rewritten, done = rewrite_model(load_model(model), {name: (0.0, 0.75)}, nbits_scales="float32")
    save_model(rewritten, tmp_path / "s.onnx")
    assert done == [name]
    proto = onnx.load(str(tmp_path / "s.onnx"))
    (node,) = proto.graph.node
    assert node.op_type == OP_TYPE_NBITS and len(node.input) == 5 and bool(node.input[3]) == zero_points
    assert not {"W_q", "W_scales", "W_zp", "W_bias"} & {t.name for t in proto.graph.initializer}  # repacked, folded
    x = np.random.default_rng(1).standard_normal((5, 80)).astype(np.float32) + 0.75
    dense = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    sparse = open_session(proto, use_library=True).run(None, {"X": x})[0]
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    # the folded bias, computed from the one dequantisation
    m = onnx.load(str(model))
    arr = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    w = dequantize_matmul_nbits(arr["W_q"], arr["W_scales"], arr.get("W_zp"), k=80, n=40, bits=4, block_size=32)
    bias = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}[node.input[4]]
    np.testing.assert_allclose(bias, arr["W_bias"] + 0.75 * w.sum(0, dtype=np.float64), rtol=1e-5, atol=1e-5)
    # and a threshold that drops: the op's reference over the same repacked weights
    rewritten, _ = rewrite_model(load_model(model), {name: (0.5, 0.75)}, nbits_scales="float32")
    save_model(rewritten, tmp_path / "s2.onnx")
    got = open_session(onnx.load(str(tmp_path / "s2.onnx")), use_library=True).run(None, {"X": x})[0]
    d = x - np.float32(0.75)
    want = np.where(np.abs(d) <= 0.5, 0, d).astype(np.float32) @ w + bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_without_the_library_the_nbits_op_is_refused_in_one_line(tmp_path):
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx")
    rewritten, _ = rewrite_model(load_model(model), {NBITS_NAME: (0.1, 0.0)})
    save_model(rewritten, tmp_path / "s.onnx")
    with pytest.raises(ScapError, match="needs the compiled op library"):
        open_session(onnx.load(str(tmp_path / "s.onnx")), use_library=False)


def test_validate_refuses_another_int4_model(tiny_int4, tmp_path):
    """Pairing checks a NBits node's scales against its target's: the sparse model of one
    quantization does not pair with the other (same graph names and shapes)."""
    stats = tmp_path / "stats.json"
    run_cli("calibrate", tiny_int4["sym"], "--data", tiny_int4["calib"], "--tokens", 512, "--seq-len", 64,
            "--passes", 1, "-o", stats, check=True)
    run_cli("rewrite", tiny_int4["sym"], "--stats", stats, "-o", tmp_path / "s.onnx", check=True)
    other = tmp_path / "other"
    tiny_models.make_decoder(tmp_path / "f2" / "model.onnx", hidden=64, inter=128, kv=32, seed=5)
    other_model = quantize(tmp_path / "f2" / "model.onnx", other, symmetric=True)
    p = run_cli("validate", other_model, tmp_path / "s.onnx", "--data", tiny_int4["eval"], "--tokens", 128,
                "--seq-len", 64)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "differs" in lines[0], p.stderr


# ----------------------------------------------------------------------------- the block parameters written
def _rewritten_block_parameters(model: Path, out: Path, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """The scales and zero points (None when absent) of the one target rewritten, as saved."""
    rewritten, done = rewrite_model(load_model(model), {NBITS_NAME: (0.1, 0.0)}, **kwargs)
    assert done == [NBITS_NAME]
    save_model(rewritten, out)
    proto = onnx.load(str(out))
    (node,) = scap_nodes(proto)
    arr = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return arr[node.input[2]], arr[node.input[3]] if len(node.input) > 3 and node.input[3] else None


def _source_block_parameters(model: Path, *, k: int, n: int, bits: int):
    """The MatMulNBits' scales (in their own type) and zero points, [k_blocks, N]."""
    arr = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    shape = dict(k=k, n=n, block_size=32)
    return (matmul_nbits_scales(arr["W_scales"], **shape),
            matmul_nbits_zero_points(arr["W_zp"], bits=bits, **shape) if "W_zp" in arr else None)


@pytest.mark.parametrize("nbits_scales", ["float16", "float32", None])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_rewrite_packs_4_bit_zero_points_and_writes_the_scales_asked_for(tmp_path, bits, nbits_scales):
    """Zero points: 4 bits packed as B_packed's rows [k_blocks, 16 * ceil(N / 32)], 8 bits one a
    byte, both lossless. Scales (0.01 to 0.11): float16 by default, rounded to nearest; float32: the
    source's, exactly."""
    k, n = 80, 40
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", bits=bits, k=k, n=n)
    kwargs = {} if nbits_scales is None else {"nbits_scales": nbits_scales}
    scales, zp = _rewritten_block_parameters(model, tmp_path / "s.onnx", **kwargs)
    src_scales, src_zp = _source_block_parameters(model, k=k, n=n, bits=bits)
    assert scales.dtype == np.dtype(nbits_scales or "float16") and scales.shape == (3, n)
    np.testing.assert_array_equal(scales, src_scales.astype(scales.dtype))
    assert zp.dtype == np.uint8 and zp.shape == (3, row_bytes(n, bits))
    np.testing.assert_array_equal(zero_points_kn(zp, blocks=3, n=n, bits=bits), src_zp)


@pytest.mark.parametrize("outside", [1e-6, 7e4, np.inf])
def test_a_target_with_a_scale_outside_float16s_normal_range_keeps_float32_scales(tmp_path, outside):
    """1e-6 would be a float16 subnormal (fewer significant bits), 7e4 and Inf overflow it: the
    target keeps all its scales float32, exactly."""
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", k=80, n=40)
    proto = onnx.load(str(model))
    init = next(t for t in proto.graph.initializer if t.name == "W_scales")
    values = numpy_helper.to_array(init).copy()
    values[5] = outside
    init.CopyFrom(numpy_helper.from_array(values, "W_scales"))
    onnx.save(proto, str(model))
    scales, _ = _rewritten_block_parameters(model, tmp_path / "s.onnx")
    assert scales.dtype == np.float32
    np.testing.assert_array_equal(scales, _source_block_parameters(model, k=80, n=40, bits=4)[0])


@pytest.mark.parametrize("nbits_scales", ["float16", "float32"])
def test_float16_source_scales_stay_float16(tmp_path, nbits_scales):
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", k=80, n=40, dtype=np.float16)
    scales, _ = _rewritten_block_parameters(model, tmp_path / "s.onnx", nbits_scales=nbits_scales)
    src_scales, _ = _source_block_parameters(model, k=80, n=40, bits=4)
    assert scales.dtype == src_scales.dtype == np.float16
    np.testing.assert_array_equal(scales, src_scales)


def test_the_cli_writes_the_scales_asked_for_and_inspect_and_validate_read_them(tmp_path):
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", k=80, n=40)
    np.savez(tmp_path / "x.npz", X=np.random.default_rng(3).standard_normal((64, 80)).astype(np.float32))
    for asked in ("float16", "float32", None):
        out = tmp_path / f"s_{asked}.onnx"
        option = () if asked is None else ("--nbits-scales", asked)
        run_cli("rewrite", model, "--data", tmp_path / "x.npz", "--sparsity", "0.3", "-o", out, *option, check=True)
        written = asked or "float16"
        assert f"computing 1 targets; NBits scales {written}" in run_cli("inspect", out, check=True).stdout
        (row,) = json.loads(run_cli("inspect", out, "--json", check=True).stdout)["scap_nodes"]
        assert row["scales"] == written
        assert open_pair(model, out).scap  # validate's pairing reads the scales in either type
    p = run_cli("rewrite", model, "--data", tmp_path / "x.npz", "--sparsity", "0.3", "-o", tmp_path / "bad.onnx",
                "--nbits-scales", "bogus")
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and lines == ["error: --nbits-scales must be one of float16, float32, got 'bogus'"], p.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_the_api_refuses_an_unknown_scales_type_in_one_line(tmp_path):
    from scap_onnx.api import rewrite

    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx")
    with pytest.raises(ScapError, match=r"^--nbits-scales must be one of float16, float32, got 'bfloat16'$"):
        rewrite(model, tmp_path / "s.onnx", data=tmp_path / "x.npz", nbits_scales="bfloat16")
    with pytest.raises(ScapError, match="--nbits-scales"):
        rewrite_model(load_model(model), {NBITS_NAME: (0.1, 0.0)}, nbits_scales="half")


# ----------------------------------------------------------------------------- bad quantized input
@pytest.mark.parametrize("kind, why", [("bits2", "bits = 2"), ("g_idx", "g_idx")])
def test_unsupported_matmul_nbits_exit_2_naming_the_node(tmp_path, kind, why):
    model = tiny_models.make_matmul_nbits(tmp_path / "m.onnx", bits=2 if kind == "bits2" else 4, g_idx=kind == "g_idx")
    np.savez(tmp_path / "x.npz", X=np.ones((2, 64), np.float32))
    with pytest.raises(ScapError, match=why):
        find_targets(onnx.load(str(model)))
    for args in (("inspect", model), ("calibrate", model, "--data", tmp_path / "x.npz", "-o", tmp_path / "s.json"),
                 ("rewrite", model, "--data", tmp_path / "x.npz", "-o", tmp_path / "s.onnx")):
        p = run_cli(*args)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert lines[0].startswith("error: ") and why in lines[0] and "/model/layers.0/mlp/up_proj/MatMul_Q4" in lines[0]
    assert not (tmp_path / "s.onnx").exists() and not (tmp_path / "s.json").exists()


# ----------------------------------------------------------------------------- SmolLM2 int4
@pytest.fixture(scope="module")
def smol_int4(smollm2, tmp_path_factory) -> Path:
    """SmolLM2-135M quantized by onnxruntime's MatMulNBitsQuantizer: 4 bits, block 32, asymmetric."""
    return quantize(smollm2, tmp_path_factory.mktemp("smol_int4"), symmetric=False)


@pytest.fixture(scope="module")
def smol_int4_stats(smol_int4, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_int4_stats") / "stats.json"
    run_cli("calibrate", smol_int4, "--data", texts["pydoc"], "--sparsity", SMOL_SPEC, "--tokens", 2048,
            "--seq-len", 128, "--passes", 2, "--method", "scap-search", "-o", out, check=True)
    return out


def test_smollm2_int4_inspect(smol_int4):
    p = run_cli("inspect", smol_int4, check=True)
    assert "210 targets, 120 distinct inputs" in p.stdout and "int4 block 32 asym" in p.stdout


@needs_library
def test_smollm2_int4_threshold_zero_reproduces_the_int4_logits(smol_int4, smol_int4_stats, texts, tmp_path):
    plan = _threshold_zero(smol_int4, smol_int4_stats, tmp_path / "t0.onnx")
    assert len(plan) == 210 and sum(off != 0 for _, off, _ in plan.values()) >= 30
    assert sum(scaled for _, _, scaled in plan.values()) == 60  # o and down of 30 layers
    proto = onnx.load(str(smol_int4), load_external_data=False)
    feeds, _ = next(iter(open_data(texts["kjv"], proto, smol_int4, seq_len=64, max_tokens=64).batches()))
    rel, worst = _compare_threshold_zero(smol_int4, tmp_path / "t0.onnx", feeds)
    print(f"SmolLM2 int4, threshold 0: logits relative error {rel:.2e}, max {worst:.2e}")
    assert rel < REL_TOL and worst < REL_TOL, (rel, worst)


@needs_library
def test_smollm2_int4_rewrite_validates_on_other_text(smol_int4, smol_int4_stats, texts, tmp_path):
    """Calibrated on pydoc, validated on fortunes: the numbers are printed (not bound here)."""
    sparse, report = tmp_path / "sparse.onnx", tmp_path / "report.json"
    p = run_cli("rewrite", smol_int4, "--stats", smol_int4_stats, "-o", sparse, check=True)
    assert "rewrote 90 targets in 60 nodes ->" in p.stdout
    run_cli("validate", smol_int4, sparse, "--data", texts["fortunes"], "--tokens", 2048, "--seq-len", 128,
            "--sparsity", SMOL_SPEC, "--report", report, check=True)
    r = json.loads(report.read_text())
    ppl, roles = r["accuracy"]["perplexity"], r["sparsity"]["roles"]
    decode = r["latency"].get("decode", {})
    print(f"SmolLM2 int4 {SMOL_SPEC} on fortunes: perplexity {ppl['dense']:.3f} -> {ppl['sparse']:.3f} "
          f"({ppl['change_pct']:+.2f}%), decode speedup {decode.get('speedup', float('nan')):.2f}x, "
          + ", ".join(f"{k} {v['mean']:.3f}" for k, v in sorted(roles.items())))
    assert r["sparse"]["scap_targets"] == 90 and set(roles) == {"gate", "up", "down"}
    for role, v in roles.items():
        assert abs(v["mean_error"]) < 0.08, (role, v)
    assert ppl["change_pct"] < 25


def test_wina_weighs_channels_by_the_dequantised_rows(tiny_int4, tmp_path):
    """--method wina on an int4 model: w_k is the norm of row k of the dequantised weight (over all
    targets reading the input); the rewritten
    ScapSparseMatMulNBits nodes carry the threshold_scale and reach the target on calibration data."""
    from scap_onnx.api import rewrite
    from scap_onnx.calibration.calibrator import calibrate
    from scap_onnx.evaluation.sparsity import measure_sparsity

    model = tiny_int4["asym"]
    st = calibrate(model, tiny_int4["calib"], sparsity="0.5", max_tokens=1024, seq_len=64, method="wina")
    proto = onnx.load(str(model))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for s in st.sites:
        sq = np.zeros(s.k)
        for t in s.targets:
            n = nodes[t["name"]]
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            zp = inits.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
            w = dequantize_matmul_nbits(inits[n.input[1]], inits[n.input[2]], zp, k=a["K"], n=a["N"], bits=a["bits"],
                                        block_size=a["block_size"])
            sq += (w.astype(np.float64) ** 2).sum(1)
        np.testing.assert_allclose(s.channel_norms, np.sqrt(sq), rtol=1e-5)
    sparse = tmp_path / "w.onnx"
    rewrite(model, sparse, stats=st)
    ops = scap_nodes(onnx.load(str(sparse)))
    assert ops and all(len(n.input) > 5 and n.input[5] for n in ops)  # threshold_scale
    if library_available():
        data = open_data(tiny_int4["calib"], proto, model, seq_len=64, max_tokens=1024)
        first = st.sites[0].targets[0]["name"]  # reads the first layer's dense input: exact
        assert abs(measure_sparsity(sparse, data)[first]["sparsity"] - 0.5) < 0.01
