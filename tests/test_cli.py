"""The real command line (python -m scap_onnx.cli -> main()) on tiny models and bad input."""

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_cli
from scap_onnx.op.contract import targets_of
from scap_onnx.op.contract import OP_TYPE


@pytest.fixture(scope="module")
def dec_stats(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "stats.json"
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--sparsity", "up=0.35,gate=0.35,down=0.55",
                "--tokens", 1024, "--seq-len", 64, "-o", out, check=True)
    assert "calibrated 14 targets (8 inputs) on 1024 tokens" in p.stdout
    return out


def test_calibrate_writes_stats(dec_stats):
    d = json.loads(dec_stats.read_text())
    assert d["format"] == "scap-onnx-stats" and len(d["sites"]) == 8
    assert d["calibration"]["spec"] == "up=0.35,gate=0.35,down=0.55"
    assert oct(dec_stats.stat().st_mode & 0o777) != "0o600"


def test_rewrite_from_stats_and_retarget(tiny, dec_stats, tmp_path):
    out = tmp_path / "a.onnx"
    p = run_cli("rewrite", tiny["decoder"], "--stats", dec_stats, "-o", out, check=True)
    assert "rewrote 6 targets in 4 nodes" in p.stdout  # up + gate (one node) and down, of 2 layers
    onnx.checker.check_model(str(out))
    p = run_cli("rewrite", tiny["decoder"], "--stats", dec_stats, "--sparsity", "0.4", "-o", tmp_path / "b.onnx", check=True)
    assert "rewrote 14 targets in 8 nodes" in p.stdout  # q/k/v and gate/up fused
    m = onnx.load(str(tmp_path / "b.onnx"))
    assert sum(len(targets_of(n)) for n in m.graph.node if n.op_type == OP_TYPE) == 14


def test_rewrite_with_data_in_one_step(tiny, tmp_path):
    shutil.copytree(tiny["encoder"].parent, tmp_path / "enc")
    model = tmp_path / "enc" / "model.onnx"
    p = run_cli("rewrite", model, "--data", tiny["jsonl"], "--sparsity", "0.5", "--tokens", 512, "--seq-len", 32,
                "--save-stats", tmp_path / "s.json", check=True)
    default_out = tmp_path / "enc" / "model_scap.onnx"
    assert default_out.exists() and (tmp_path / "s.json").exists()
    assert "rewrote 12 targets" in p.stdout


def test_several_data_files_are_mixed(tiny, tmp_path):
    out = tmp_path / "mix.json"
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--data", tiny["eval"], "--sparsity", "0.5",
                "--tokens", 1024, "--seq-len", 64, "--passes", 1, "-o", out, check=True)
    assert "on 1024 tokens" in p.stdout
    mix = json.loads(out.read_text())["calibration"]["data"]["mix"]
    assert [m["path"] for m in mix] == [str(tiny["calib"]), str(tiny["eval"])]
    p = run_cli("rewrite", tiny["decoder"], "-d", tiny["calib"], "-d", tiny["eval"], "--sparsity", "0.5", "--tokens", 512,
                "--seq-len", 64, "--passes", 1, "-o", tmp_path / "m.onnx", "--save-stats", tmp_path / "m.json", check=True)
    assert "rewrote 14 targets" in p.stdout
    assert len(json.loads((tmp_path / "m.json").read_text())["calibration"]["data"]["mix"]) == 2


def test_inspect(tiny, dec_stats, tmp_path):
    p = run_cli("inspect", tiny["decoder"], check=True)
    assert "14 targets, 8 distinct inputs" in p.stdout and "/model/layers.1/mlp/down_proj/MatMul" in p.stdout
    p = run_cli("inspect", tiny["decoder"], "--json", "--stats", dec_stats, check=True)
    rows = json.loads(p.stdout)["targets"]
    down = [r for r in rows if r["role"] == "down"]
    assert len(rows) == 14 and all(r["sparsity"] == 0.55 for r in down)
    q = [r for r in rows if r["role"] == "q"][0]
    assert set(q["shared_with"]) == {q["name"].replace("q_proj", "k_proj"), q["name"].replace("q_proj", "v_proj")}
    p = run_cli("inspect", tiny["decoder"], "--targets", "lm_head", check=True)
    assert "1 targets" in p.stdout
    run_cli("rewrite", tiny["decoder"], "--stats", dec_stats, "-o", tmp_path / "s.onnx", check=True)
    p = run_cli("inspect", tmp_path / "s.onnx", check=True)
    assert "4 ScapSparseMatMul nodes already in the model, computing 6 targets" in p.stdout


def test_help_lists_commands():
    p = run_cli("--help", check=True)
    for cmd in ("calibrate", "rewrite", "inspect"):
        assert cmd in p.stdout


# ----------------------------------------------------------------------------- bad input -> exit 2
def _bad(*args, match):
    p = run_cli(*args)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    return lines[0]


def test_not_onnx(tiny, tmp_path):
    _bad("calibrate", tiny["calib"], "--data", tiny["calib"], "-o", tmp_path / "s.json", match="not an ONNX model")
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(0).bytes(1000))
    _bad("inspect", tmp_path / "junk.onnx", match="not an ONNX model")
    _bad("rewrite", tmp_path / "missing.onnx", "--stats", tmp_path / "s.json", match="does not exist")


def test_no_targets(tiny, tmp_path):
    _bad("inspect", tiny["no_targets"], match="no target MatMuls")
    _bad("calibrate", tiny["no_targets"], "--data", tiny["calib"], "--tokenizer", tiny["decoder"].parent,
         "-o", tmp_path / "s.json", match="no target MatMuls")
    _bad("inspect", tiny["decoder"], "--targets", "zzz*", match="matches none")


def test_stats_from_another_model(tiny, dec_stats, tmp_path):
    _bad("rewrite", tiny["encoder"], "--stats", dec_stats, "-o", tmp_path / "x.onnx", match="different model")
    _bad("inspect", tiny["encoder"], "--stats", dec_stats, match="different model")
    (tmp_path / "notstats.json").write_text('{"a": 1}')
    _bad("rewrite", tiny["decoder"], "--stats", tmp_path / "notstats.json", "-o", tmp_path / "x.onnx",
         match="not a scap-onnx stats file")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("spec", ["1", "1.5", "-0.1", "up=1.0", "nan", "up=0.3,foo=0.2"])
def test_sparsity_outside_range(tiny, dec_stats, tmp_path, spec):
    _bad("rewrite", tiny["decoder"], "--stats", dec_stats, "--sparsity", spec, "-o", tmp_path / "x.onnx",
         match="sparsity" if "foo" not in spec else "unknown role")
    _bad("calibrate", tiny["decoder"], "--data", tiny["calib"], "--sparsity", spec, "-o", tmp_path / "s.json",
         match="sparsity" if "foo" not in spec else "unknown role")


def test_missing_tokenizer(tiny, tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(tiny["decoder"], tmp_path / "m" / "model.onnx")
    _bad("calibrate", tmp_path / "m" / "model.onnx", "--data", tiny["calib"], "-o", tmp_path / "s.json",
         match="no tokenizer")
    _bad("rewrite", tmp_path / "m" / "model.onnx", "--data", tiny["calib"], match="no tokenizer")
    # without --data a text model calibrates on the built-in corpus; one without a tokenizer cannot
    _bad("rewrite", tmp_path / "m" / "model.onnx", "-o", tmp_path / "x.onnx",
         match="needs --stats or --data: model.onnx has no tokenizer.json beside it")
    _bad("calibrate", tmp_path / "m" / "model.onnx", "--data", tiny["calib"], "--tokenizer", tmp_path,
         "-o", tmp_path / "s.json", match="no tokenizer")
    assert not (tmp_path / "s.json").exists()


def test_other_bad_input(tiny, dec_stats, tmp_path):
    _bad("rewrite", tmp_path / "missing.onnx", "-o", tmp_path / "x.onnx", match="does not exist")
    _bad("rewrite", tiny["decoder"], "--stats", dec_stats, "--data", tiny["calib"], match="not both")
    _bad("calibrate", tiny["decoder"], "-o", tmp_path / "s.json", match="--data")
    _bad("calibrate", tiny["decoder"], "--data", tmp_path / "nope.txt", "-o", tmp_path / "s.json", match="does not exist")
    _bad("rewrite", tiny["decoder"], "--stats", dec_stats, "-o", tiny["decoder"], match="overwrite")


def test_folders_where_files_are_expected(tiny, dec_stats, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    _bad("calibrate", tiny["decoder"], "--data", tiny["calib"], "-o", folder, match="is a folder")
    _bad("rewrite", tiny["decoder"], "--stats", dec_stats, "-o", folder, match="is a folder")
    _bad("rewrite", tiny["decoder"], "--stats", dec_stats, "-o", tmp_path / "x.onnx", "--save-stats", folder,
         match="is a folder")
    assert not (tmp_path / "x.onnx").exists()  # checked before anything is written
    _bad("inspect", tiny["decoder"].parent, match="give the model file")


def test_zero_tokens(tiny, tmp_path):
    _bad("calibrate", tiny["decoder"], "--data", tiny["calib"], "--tokens", "0", "-o", tmp_path / "s.json",
         match="--tokens")


def test_quantized_model_is_named_as_such(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "W")
    node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"], name="/model/layers.0/mlp/up_proj/MatMulInteger")
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("X", TensorProto.INT8, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "q.onnx")
    _bad("inspect", tmp_path / "q.onnx", match="already quantized (MatMulInteger)")


def test_calibrate_method(tiny, tmp_path):
    """--method picks passes, tokens, token scaling and centring; an explicit option overrides its part;
    an unknown method is a one-line error."""
    out = tmp_path / "oneshot.json"
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "-s", "up=0.35,gate=0.35,down=0.55",
                "--method", "oneshot", "--seq-len", 64, "-o", out, check=True)
    assert "1 pass(es)" in p.stdout
    d = json.loads(out.read_text())
    cal = d["calibration"]
    assert (cal["method"], cal["centring"], cal["passes"], cal["token_scaled_roles"]) == ("oneshot", "mode-down", 1, [])
    assert cal["tokens"] <= 2048
    for s in d["sites"]:
        assert s["centring"] == "mode-down" and not s["token_scaled"]
        if s["sparsity"] is not None:
            assert (s["offset_kind"] == "mode") == ("down" in s["roles"]), s["roles"]
            assert s["offset_kind"] == "mode" or s["offset"] == 0.0
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--method", "oneshot", "--passes", 2,
                "--seq-len", 64, "-o", tmp_path / "two.json", check=True)
    assert json.loads((tmp_path / "two.json").read_text())["calibration"]["passes"] == 2
    _bad("calibrate", tiny["decoder"], "--data", tiny["calib"], "--method", "magic", "-o", tmp_path / "x.json",
         match="unknown calibration method 'magic'")
