"""The real CLI on the real exported models: SmolLM2-135M (decoder with past) and all-MiniLM-L6-v2.

Calibrations are small here (a few thousand tokens, session-scoped fixtures in conftest.py) to keep
the suite short; tools/measure_calibration.py measures the acceptance numbers on 16k tokens.
"""

import json

import numpy as np
import onnx
import pytest

from conftest import SMOL_SPEC, run_cli
from scap_onnx.calibration.budget import DEFAULT_BUDGET
from scap_onnx.calibration.data import open_data
from scap_onnx.calibration.stats import Stats
from scap_onnx.evaluation.options import ValidateOptions
from scap_onnx.evaluation.sparsity import measure_sparsity, role_summary
from scap_onnx.evaluation.validate import validate
from scap_onnx.graph.model_io import load_model, save_model
from scap_onnx.op.contract import OP_TYPE, targets_of
from scap_onnx.passes.sparsify import rewrite_model


def _data(model, text, tokens, seq_len=128):
    return open_data(text, onnx.load(str(model), load_external_data=False), model, seq_len=seq_len, max_tokens=tokens)


def _count_scap(path):
    """(ScapSparseMatMul nodes, targets they compute): fused nodes compute several."""
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == OP_TYPE]
    return len(nodes), sum(len(targets_of(n)) for n in nodes)


@pytest.fixture(scope="module")
def smol_sparse(smollm2, smol_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol_sparse") / "sparse.onnx"
    p = run_cli("rewrite", smollm2, "--stats", smol_stats, "-o", out, check=True)
    assert "rewrote 90 targets" in p.stdout
    return out


def test_smollm2_rewrite_passes_checker_and_reaches_targets(smollm2, smol_sparse, texts):
    onnx.checker.check_model(str(smol_sparse))
    assert _count_scap(smol_sparse) == (60, 90)  # gate + up fused in each layer
    # calibrated on pydoc, measured on the King James Bible
    per_node = measure_sparsity(smol_sparse, _data(smollm2, texts["kjv"], 512))
    summary = role_summary(per_node, {"up": 0.35, "gate": 0.35, "down": 0.55})
    assert set(summary) == {"up", "gate", "down"} and all(v["targets"] == 30 for v in summary.values())
    for role, v in summary.items():
        assert abs(v["mean_error"]) < 0.05, (role, v)
        assert abs(v["worst_error"]) < 0.12, (role, v)


def test_smollm2_threshold_zero_reproduces_dense_logits(smollm2, smol_stats, texts, tmp_path):
    """Calibrated offsets with threshold 0: the folded biases (and the token scaling of o and down)
    give back the dense logits."""
    import onnxruntime as ort

    from scap_onnx.graph.model_io import ModelSource
    from scap_onnx.op.session import open_session

    st = Stats.load(smol_stats)
    plan = {name: (0.0, p.offset, p.token_scaled) for name, p in st.plan("0.5").items()}
    assert len(plan) == 210 and sum(off != 0 for _, off, _ in plan.values()) >= 30
    assert sum(scaled for _, _, scaled in plan.values()) == 60  # o and down of 30 layers
    model, names = rewrite_model(load_model(smollm2), plan)
    out = tmp_path / "t0.onnx"
    save_model(model, out)
    del model
    feeds, _ = next(iter(_data(smollm2, texts["kjv"], 64, seq_len=64).batches()))
    dense = ort.InferenceSession(str(smollm2), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    with ModelSource(out) as src:
        proto = onnx.ModelProto()
        proto.CopyFrom(src.proto)
        sess = open_session(proto, data_dir=src.data_dir)  # the op library when built
        sparse = sess.run(["logits"], feeds)[0]
    rel = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
    assert rel < 1e-4, rel
    assert np.abs(sparse - dense).max() / np.abs(dense).max() < 1e-4


def test_smollm2_zero_threshold_scales_reproduce_dense_logits(smollm2, smol_stats, texts, tmp_path):
    """Issue 16's acceptance: threshold_scale vectors of zero with the calibrated (non-zero)
    thresholds, channel offsets folded into the biases with the calibrated offsets, gate and up
    fused over their shared vectors: the compiled op gives back the dense logits within 1e-4."""
    import onnxruntime as ort

    from scap_onnx.graph.model_io import ModelSource
    from scap_onnx.graph.targets import find_targets
    from scap_onnx.op.contract import Sparsification
    from scap_onnx.op.session import library_available, open_session
    from scap_onnx.passes.fuse import fuse_shared_inputs

    assert library_available()
    st = Stats.load(smol_stats)
    targets = {t.name: t for t in find_targets(onnx.load(str(smollm2), load_external_data=False))}
    rng = np.random.default_rng(16)
    channel_offsets = {}  # one per input, so that targets sharing it share the vectors
    plan = {}
    for name, p in st.plan("0.5").items():
        t = targets[name]
        coff = channel_offsets.setdefault(t.input, (0.02 * rng.standard_normal(t.k)).astype(np.float32))
        plan[name] = Sparsification(p.threshold, p.offset, p.token_scaled, np.zeros(t.k, np.float32), coff)
    assert all(s.threshold > 0 for s in plan.values())
    model, names = rewrite_model(load_model(smollm2), plan)
    assert len(names) == 210 and fuse_shared_inputs(model) == 60  # q/k/v and gate/up of 30 layers
    out = tmp_path / "scale0.onnx"
    save_model(model, out)
    del model
    nodes = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == OP_TYPE]
    assert nodes and all(len(n.input) == 5 and n.input[3] and n.input[4] for n in nodes)
    feeds, _ = next(iter(_data(smollm2, texts["kjv"], 64, seq_len=64).batches()))
    dense = ort.InferenceSession(str(smollm2), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    with ModelSource(out) as src:
        proto = onnx.ModelProto()
        proto.CopyFrom(src.proto)
        sess = open_session(proto, data_dir=src.data_dir, use_library=True)
        sparse = sess.run(["logits"], feeds)[0]
    rel = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
    assert rel < 1e-4, rel
    assert np.abs(sparse - dense).max() / np.abs(dense).max() < 1e-4


def test_smollm2_retarget_all_roles_without_recalibrating(smollm2, smol_stats, tmp_path):
    out = tmp_path / "s40.onnx"
    p = run_cli("rewrite", smollm2, "--stats", smol_stats, "--sparsity", "0.4", "-o", out, check=True)
    assert "rewrote 210 targets" in p.stdout and "calibrate pass" not in p.stderr
    assert _count_scap(out) == (120, 210)  # q + k + v and gate + up fused in each layer
    p = run_cli("inspect", smollm2, "--stats", smol_stats, "--sparsity", "0.4", "--json", check=True)
    rows = json.loads(p.stdout)["targets"]
    assert len(rows) == 210 and {r["sparsity"] for r in rows} == {0.4}


def test_smollm2_inspect(smollm2):
    p = run_cli("inspect", smollm2, check=True)
    assert "210 targets, 120 distinct inputs" in p.stdout


def test_stats_of_one_model_rejected_for_another(minilm, smol_stats, tmp_path):
    p = run_cli("rewrite", minilm, "--stats", smol_stats, "-o", tmp_path / "x.onnx")
    assert p.returncode == 2 and "different model" in p.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_minilm_gelu_offsets_and_cosine(minilm, minilm_stats, texts, tmp_path):
    st = Stats.load(minilm_stats)
    downs = [s for s in st.sites if s.roles == ["down"]]
    assert len(downs) == 6
    for s in downs:  # output.dense reads GELU outputs, whose mode is below zero
        assert s.offset_kind != "zero" and s.offset < 0, (s.input, s.offset_kind, s.offset)
    # Same sparsity everywhere, offsets as calibrated vs all zero.
    mode_out = tmp_path / "mode.onnx"
    run_cli("rewrite", minilm, "--stats", minilm_stats, "-o", mode_out, check=True)
    zero_plan = {}
    for s in st.sites:
        tau = s.histogram.threshold(s.sparsity, 0.0)
        for t in s.targets:
            zero_plan[t["name"]] = (tau, 0.0, s.token_scaled)
    model, _ = rewrite_model(load_model(minilm), zero_plan)
    zero_out = tmp_path / "zero.onnx"
    save_model(model, zero_out)
    opts = ValidateOptions(max_tokens=2048, seq_len=128, latency=False)
    cos_mode = validate(minilm, mode_out, texts["kjv"], opts)["accuracy"]["embedding"]["cosine_mean"]
    cos_zero = validate(minilm, zero_out, texts["kjv"], opts)["accuracy"]["embedding"]["cosine_mean"]
    print(f"MiniLM 50% all roles: cosine mode-centred {cos_mode:.4f} vs offset 0 {cos_zero:.4f}")
    assert cos_mode > cos_zero


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """An empty scap-onnx cache: the built-in corpus must be prepared from the packages."""
    return tmp_path_factory.mktemp("fresh_cache")


@pytest.mark.parametrize("family", ["smollm2", "minilm"])
def test_rewrite_alone_calibrates_on_the_built_in_corpus(family, request, fresh_cache, tmp_path, monkeypatch):
    """`scap-onnx rewrite MODEL` with no --stats and no --data (a decoder and an encoder, both
    optimum exports): one line says what it calibrates on (the default: a byte budget, gains measured),
    and the result pairs with its model.
    (Fewer tokens than the default, to keep the suite short.)"""
    from scap_onnx.evaluation.pairing import open_pair

    model = request.getfixturevalue(family)
    monkeypatch.setenv("SCAP_ONNX_CACHE", str(fresh_cache))
    out = tmp_path / "sparse.onnx"
    p = run_cli("rewrite", model, "-o", out, "--tokens", 512, "--seq-len", 128, "--passes", 1, check=True)
    corpus = fresh_cache / "texts" / "pydoc.txt"
    assert corpus.is_file()
    line = [x for x in p.stderr.splitlines() if "built-in corpus" in x]
    assert line == [f"rewrite: no --stats or --data: calibrating on the built-in corpus {corpus} (512 tokens, "
                    f"method scap-margin, budget {DEFAULT_BUDGET:g})"]
    assert "rewrote" in p.stdout and len(open_pair(model, out).scap) > 0
