"""onnxruntime-genai folders: SmolLM2-135M built int4 by onnxruntime-genai's model builder
(scap_onnx.prepare.prepare_smollm2_int4), calibrated, rewritten and validated through the real command
line with the folder as MODEL; the rewritten folder generates text with og.Generator, also after being
moved; threshold 0 gives the dense folder's greedy tokens; a folder whose genai_config.json names
missing files exits 2 with one line.

The rewritten folders hold ScapSparseMatMulNBits nodes, which run with the compiled library only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from conftest import SMOL_SPEC, prepared, run_cli, under_ci
from scap_onnx.calibration.data import model_inputs
from scap_onnx.calibration.stats import Stats
from scap_onnx.calibration.text import load_tokenizer
from scap_onnx.graph.genai import CONFIG_NAME, open_genai_folder, write_genai_folder
from scap_onnx.graph.model_io import external_files, load_model, load_proto, save_model
from scap_onnx.op.library import get_library_path
from scap_onnx.op.session import library_available
from scap_onnx.passes.sparsify import rewrite_model

from scap_onnx.evaluation.genai_decode import load_genai_model
from scap_onnx.prepare.genai import greedy_tokens

try:
    import onnxruntime_genai as og
except ImportError as e:  # the 'genai' extra; CI installs it, so there a missing one fails the run
    if under_ci():
        raise
    pytest.skip(f"onnxruntime-genai is not installed: {e}", allow_module_level=True)

needs_library = pytest.mark.skipif(not library_available(), reason="ScapSparseMatMulNBits runs with the compiled library only")


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _prompts(text: Path, folder: Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from different places of a real text."""
    tok = load_tokenizer(folder / "tokenizer.json")
    ids = tok.encode(text.read_text(encoding="utf-8")[:200_000], add_special_tokens=False).ids
    step = len(ids) // (n + 1)
    return [ids[(i + 1) * step:(i + 1) * step + length] for i in range(n)]


# ----------------------------------------------------------------------------- SmolLM2 int4
@pytest.fixture(scope="module")
def genai_folder(texts) -> Path:
    return prepared("prepare_smollm2_int4")


@pytest.fixture(scope="module")
def genai_stats(genai_folder, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genai_stats") / "stats.json"
    run_cli("calibrate", genai_folder, "--data", texts["pydoc"], "--sparsity", SMOL_SPEC, "--tokens", 2048,
            "--seq-len", 128, "--passes", 2, "--method", "scap-search", "-o", out, check=True)
    return out


@pytest.fixture(scope="module")
def sparse_folder(genai_folder, genai_stats, tmp_path_factory) -> Path:
    before = _snapshot(genai_folder)
    out = tmp_path_factory.mktemp("genai_sparse") / "smollm2-int4-scap"
    p = run_cli("rewrite", genai_folder, "--stats", genai_stats, "-o", out, check=True)
    assert "rewrote 90 targets in 60 nodes ->" in p.stdout
    assert _snapshot(genai_folder) == before  # the input folder is never touched
    return out


def test_the_builder_folder(genai_folder):
    """The builder's folder: int4 block 32 MatMulNBits (q, k and v fused as qkv), GroupQueryAttention
    past key/values whose head size is symbolic in the model and read from the config."""
    p = run_cli("inspect", genai_folder, check=True)
    assert "150 targets, 120 distinct inputs" in p.stdout and "int4 block 32" in p.stdout and " qkv " in p.stdout
    config = json.loads((genai_folder / CONFIG_NAME).read_text())["model"]["decoder"]
    proto = load_proto(genai_folder / "model.onnx")
    past = {i.name: i.dims for i in model_inputs(proto, json.loads((genai_folder / CONFIG_NAME).read_text()))
            if i.name.startswith("past_key_values")}
    assert len(past) == 2 * config["num_hidden_layers"]
    assert all(d[1] == config["num_key_value_heads"] and d[3] == config["head_size"] for d in past.values())
    assert not any(isinstance(d[3], int) for d in (i.dims for i in model_inputs(proto) if i.name in past))


@needs_library
def test_rewritten_folder_generates_text_after_a_move(genai_folder, sparse_folder, texts, tmp_path):
    files = {p.name for p in sparse_folder.iterdir()}
    lib = Path(get_library_path()).name
    assert {"model.onnx", "model.onnx.data", CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", lib} <= files
    assert not [f for f in files if f.startswith(".")]
    config = json.loads((sparse_folder / CONFIG_NAME).read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == lib
    dense_config = json.loads((genai_folder / CONFIG_NAME).read_text())
    dense_config["model"]["decoder"]["session_options"]["custom_ops_library"] = lib
    assert config == dense_config  # nothing else changed

    # a copy (the module's other tests use the folder) renamed into another folder: nothing in it may
    # point at where it was written (the config names the library by file name alone)
    first, moved = tmp_path / "first", tmp_path / "somewhere" / "else"
    shutil.copytree(sparse_folder, first)
    moved.parent.mkdir()
    first.rename(moved)
    model = load_genai_model(moved)
    tokenizer = og.Tokenizer(model)
    prompt = _prompts(texts["fortunes"], moved, 1, 48)[0]
    new = greedy_tokens(model, prompt, 24)
    text = tokenizer.decode(np.asarray(new, dtype=np.int32))
    print(f"sparse SmolLM2 int4 (moved folder) continues with: {text!r}")
    assert len(new) >= 8 and sum(c.isalpha() for c in text) >= 10


def _accuracy_level_0(src: Path, out: Path) -> Path:
    """The genai folder ``src`` with every MatMulNBits at accuracy level 0 (dequantised weights, float
    accumulation: the op's numerics), written as a rewritten folder is."""
    folder = open_genai_folder(src)

    def write(path: Path) -> None:
        model = load_model(folder.model_path)
        for n in model.graph.all_nodes():
            if n.op_type == "MatMulNBits":
                n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
        save_model(model, path)

    return write_genai_folder(folder, out, write, get_library_path(),
                              [folder.model_path] + external_files(load_model(folder.model_path)))


@needs_library
def test_threshold_zero_gives_the_dense_tokens(genai_folder, genai_stats, texts, tmp_path):
    """Threshold 0 with the calibrated offsets and token scaling: greedy search through og.Generator
    gives the dense model's tokens, the dense model at accuracy level 0. At the builder's accuracy
    level 4 every MatMulNBits quantises its activations to int8, and a change at float rounding
    upstream (the folded offsets) flips int8 roundings downstream: logits move by a few percent
    (measured: a float32-rounding change of one gate projection of layer 0 moves SmolLM2's logits
    by 3%), so greedy tokens part after a while; that is printed, not bound."""
    level0 = _accuracy_level_0(genai_folder, tmp_path / "level0")
    folder = open_genai_folder(level0)
    plan = {name: (0.0, p.offset, p.token_scaled) for name, p in Stats.load(genai_stats).plan(SMOL_SPEC).items()}
    assert len(plan) == 90 and sum(off != 0 for _, off, _ in plan.values()) >= 30

    def threshold_zero(path: Path) -> None:  # float32 scales: exactly the source's
        save_model(rewrite_model(load_model(folder.model_path), plan, nbits_scales="float32")[0], path)

    t0 = load_genai_model(write_genai_folder(folder, tmp_path / "t0", threshold_zero, get_library_path(),
                                             [folder.model_path] + external_files(load_model(folder.model_path))))
    dense0, dense4 = load_genai_model(level0), load_genai_model(genai_folder)
    same_as_level4 = 0
    for prompt in _prompts(texts["kjv"], genai_folder, 3, 32):
        got = greedy_tokens(t0, prompt, 16)
        assert got == greedy_tokens(dense0, prompt, 16)
        want4 = greedy_tokens(dense4, prompt, 16)
        same_as_level4 += next((i for i, (a, b) in enumerate(zip(got, want4)) if a != b), len(got))
    print(f"threshold 0 against the builder's accuracy level 4: {same_as_level4} of 48 greedy tokens the same "
          "before they part")


@needs_library
def test_validate_folders_times_og_generator(genai_folder, sparse_folder, texts, tmp_path):
    report = tmp_path / "report.json"
    p = run_cli("validate", genai_folder, sparse_folder, "--data", texts["fortunes"], "--tokens", 1024,
                "--seq-len", 128, "--kv-len", 64, "--repeats", 3, "--warmup", 1, "--prefill-repeats", 1,
                "--sparsity", SMOL_SPEC, "--report", report, check=True)
    r = json.loads(report.read_text())
    g = r["latency"]["genai_decode"]
    print(f"SmolLM2 int4 genai {SMOL_SPEC} on fortunes: perplexity {r['accuracy']['perplexity']['change_pct']:+.2f}%, "
          f"og.Generator {g['dense_tokens_per_s']:.1f} -> {g['sparse_tokens_per_s']:.1f} tok/s")
    assert g["prompt_tokens"] == 64 and len(g["sparse_tokens_per_s_all"]) == 3
    assert g["dense_tokens_per_s"] > 0 and g["sparse_tokens_per_s"] > 0
    assert "og.Generator decode tokens/s" in p.stdout
    assert r["sparse"]["scap_targets"] == 90 and r["accuracy"]["perplexity"]["change_pct"] < 25
    assert all(abs(v["mean_error"]) < 0.08 for v in r["sparsity"]["roles"].values())


# ----------------------------------------------------------------------------- bad input (no real model)
def _bad_folder(root: Path, config, model: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(model, root / "model.onnx")
    (root / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    return root


@pytest.mark.parametrize("command", ["inspect", "calibrate", "rewrite"])
def test_a_folder_naming_missing_files_exits_2(tiny, tmp_path, command):
    cases = {
        "no_model": ({"model": {"decoder": {"filename": "decoder.onnx"}}}, "names files missing from", "decoder.onnx"),
        "no_library": ({"model": {"decoder": {"filename": "model.onnx",
                                              "session_options": {"custom_ops_library": "libgone.so"}}}},
                       "names files missing from", "libgone.so"),
        "not_json": ("{model", "is not valid JSON", CONFIG_NAME),
        "no_decoder": ({"model": {}}, "names no decoder model", CONFIG_NAME),
    }
    for name, (config, why, what) in cases.items():
        folder = _bad_folder(tmp_path / name, config, tiny["decoder"])
        args = {"inspect": [], "calibrate": ["--data", tiny["calib"], "-o", tmp_path / f"{name}.json"],
                "rewrite": ["--data", tiny["calib"], "-o", tmp_path / f"{name}_out"]}[command]
        p = run_cli(command, folder, *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (name, p.stderr)
        assert lines[0].startswith("error: ") and why in lines[0] and what in lines[0], (name, lines)
        assert not (tmp_path / f"{name}.json").exists() and not (tmp_path / f"{name}_out").exists()
