"""`scap-onnx validate` on real models: SmolLM2-135M (decoder with KV cache), all-MiniLM-L6-v2
(encoder) and a tiny random-weight Llama (tools/make_random_llama.py, .npz feeds).

Kept short: a few windows of 64-128 tokens, few timing rounds. Perplexity is checked against two
independent computations: token-by-token decoding through the KV cache with torch's cross
entropy (SmolLM2, dense and sparse), and the transformers torch model itself (random Llama).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SMOL_SPEC, run_cli
from scap_onnx.op.library import kernel_isa
from scap_onnx.op.session import library_available
from scap_onnx.evaluation.latency import interleaved
from scap_onnx.evaluation.options import ValidateOptions
from scap_onnx.evaluation.pairing import open_pair
from scap_onnx.evaluation.validate import validate

from random_llama import tiny_llama

needs_library = pytest.mark.skipif(not library_available(), reason="ScapSparseMatMul library not built")
FAST = ["--repeats", "3", "--warmup", "1", "--prefill-repeats", "1"]


@pytest.fixture(scope="session")
def random_llama():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def random_llama_other():
    return tiny_llama(1)


@pytest.fixture(scope="module")
def smol_sparse(smollm2, smol_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_smol") / "sparse.onnx"
    run_cli("rewrite", smollm2, "--stats", smol_stats, "--sparsity", SMOL_SPEC, "-o", out, "--no-check", check=True)
    return out


@pytest.fixture(scope="module")
def llama_pair(random_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_llama") / "sparse.onnx"
    run_cli("rewrite", random_llama / "model.onnx", "--data", random_llama / "calib.npz", "--sparsity", "0.4",
            "-o", out, check=True)
    return random_llama / "model.onnx", out


# ----------------------------------------------------------------------------- SmolLM2
@needs_library
def test_validate_cli_smollm2_report(smollm2, smol_sparse, texts, tmp_path):
    rep_path = tmp_path / "r" / "report.json"
    p = run_cli("validate", smollm2, smol_sparse, "--data", texts["kjv"], "--tokens", 256, "--seq-len", 128,
                "--kv-len", 64, "--sparsity", SMOL_SPEC, "--report", rep_path, "--threads", 2, *FAST, check=True)
    assert "perplexity" in p.stdout and "decode tokens/s" in p.stdout and str(rep_path) in p.stdout
    rep = json.loads(rep_path.read_text())
    assert rep["format"] == "scap-onnx-validate" and rep["model_kind"] == "causal-lm"
    acc = rep["accuracy"]
    ppl = acc["perplexity"]
    assert ppl["tokens"] == 2 * 127
    assert 1 < ppl["dense"] < 1000 and 1 < ppl["sparse"] < 1000
    assert math.isclose(ppl["change_pct"], 100 * (ppl["sparse"] / ppl["dense"] - 1), rel_tol=1e-9)
    assert 0.3 < acc["top1_agreement"] <= 1 and acc["kl"]["mean"] > 0 and acc["kl"]["positions"] == 256
    assert set(acc["outputs"]) == {"logits"} | {f"present.{i}.{kv}" for i in range(30) for kv in ("key", "value")}
    sp = rep["sparsity"]
    assert len(sp["nodes"]) == 90 and set(sp["roles"]) == {"up", "gate", "down"}
    for role, target in (("up", 0.35), ("gate", 0.35), ("down", 0.55)):
        assert sp["roles"][role]["target"] == target
        assert abs(sp["roles"][role]["mean"] - target) < 0.12
    assert 0.1 < sp["weighted"] < sp["weighted_sparse_targets"] < 0.6 and sp["ideal_fc_speedup"] > 1
    # all FC weights a decode step reads: 30 layers of q/k/v/o/gate/up/down and the tied lm_head
    # (the embedding through a Transpose)
    assert sp["fc_bytes"] == 4 * (30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576)
    assert sp["fc_bytes_sparse_targets"] == 4 * 30 * 3 * 576 * 1536
    lat = rep["latency"]
    dec = lat["decode"]
    assert dec["kv_len"] == 64 and dec["repeats"] == 3 and dec["dense_ms"]["n"] == 3
    assert dec["speedup"] > 0 and dec["dense_tokens_per_s"] > 0
    assert lat["prefill"]["tokens"] == 64
    env = rep["environment"]
    assert env["threads"] == 2 and env["provider"] == "CPUExecutionProvider" and env["onnxruntime"]
    assert env["cpu_model"] and isinstance(env["isa"], list)
    assert env["kernel_isa"] == kernel_isa()  # what the library reports (test_kernel_isa_names_the_kernels)
    assert lat["thread_pool"] == env["thread_pool"] == "shared" and lat["spinning"]  # a fresh process: one pool
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| perplexity |" in md and "| up |" in md
    for png in ("report_latency.png", "report_sparsity.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_library
def _decode_nll(session, window: np.ndarray) -> float:
    """Sum of -log p(token t+1 | tokens <= t) decoding one token at a time through the KV cache,
    with torch's cross entropy: independent of validate's windowed forward pass and numpy maths."""
    import torch

    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values")}
    logits = []
    for t, tok in enumerate(window):
        feeds = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, t + 1), np.int64),
                 "position_ids": np.array([[t]], np.int64), **past}
        out = dict(zip(names, session.run(None, feeds)))
        logits.append(out["logits"][0, -1])
        past = {k: out[k.replace("past_key_values", "present")] for k in past}
    lg = torch.from_numpy(np.stack(logits[:-1])).double()
    return float(torch.nn.functional.cross_entropy(lg, torch.from_numpy(window[1:]).long(), reduction="sum"))


def _window_nll(session, window: np.ndarray) -> float:
    """The same sum from one forward pass over the window (a plain session, torch's cross entropy)."""
    import torch

    feeds = {"input_ids": window[None], "attention_mask": np.ones((1, window.size), np.int64),
             "position_ids": np.arange(window.size, dtype=np.int64)[None]}
    feeds.update({i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
                  for i in session.get_inputs() if i.name.startswith("past_key_values")})
    lg = torch.from_numpy(session.run(["logits"], feeds)[0][0, :-1]).double()
    return float(torch.nn.functional.cross_entropy(lg, torch.from_numpy(window[1:]).long(), reduction="sum"))


@needs_library
def test_perplexity_matches_independent_computation(smollm2, smol_sparse, texts, monkeypatch):
    """Dense: token-by-token decoding agrees to 1e-4. Sparse: a plain session over the same windows
    agrees to 1e-5 when both sum windows in one order (SCAP_ONNX_GEMM=packed: otherwise the op
    times two orders against each other on its first calls, and the first windows of the two
    sessions may round differently); token-by-token decoding only to a few percent, because hard
    thresholds make the sparse model discontinuous: rounding differences between the one-row and
    many-row paths flip an element at a threshold now and then, and the flips multiply through the
    layers. Measured with this test's statistics (smol_stats) on AVX-512 CPUs, where each build of
    the kernels draws other roundings: on these 2 x 47 predictions 1.1% (AVX2, AVX-512 and AMX),
    2.6% (portable), then on a Zen 5 0.6% and, after the one-row split changed from 4 to 8 tasks,
    5.1%; over 1016 tokens of KJV (8 windows of 128) 2.1%, then 1.1% and 3.5% for the same two
    builds (a correct op in both: the split matches the reference to 2e-7). Hence 8%: a check of
    the decode path (KV cache, positions), not of the op's last bits."""
    import onnxruntime as ort

    from scap_onnx.calibration.data import open_data
    import scap_onnx
    from scap_onnx.op.session import base_options

    monkeypatch.setenv("SCAP_ONNX_GEMM", "packed")  # read when a session's kernels are made
    seq, n = 48, 2
    rep = validate(smollm2, smol_sparse, texts["kjv"], ValidateOptions(seq_len=seq, max_tokens=n * seq,
                                                                         latency=False, threads=2))
    ppl = rep["accuracy"]["perplexity"]
    assert ppl["tokens"] == n * (seq - 1)
    # the windows validate evaluated (spread across the file by default), read again
    ds = open_data(texts["kjv"], onnx.load(str(smollm2), load_external_data=False), smollm2, seq_len=seq,
                   max_tokens=n * seq)
    windows = [f["input_ids"][0] for f, _ in ds.batches()]
    assert len(windows) == n
    dense = ort.InferenceSession(str(smollm2), base_options(2, spinning=False), providers=["CPUExecutionProvider"])
    sparse = ort.InferenceSession(str(smol_sparse), scap_onnx.session_options(base_options(2, spinning=False)), providers=["CPUExecutionProvider"])

    def ppl_of(fn, sess):
        return math.exp(sum(fn(sess, w) for w in windows) / (n * (seq - 1)))

    assert math.isclose(ppl["dense"], ppl_of(_decode_nll, dense), rel_tol=1e-4)
    assert math.isclose(ppl["sparse"], ppl_of(_window_nll, sparse), rel_tol=1e-5)
    assert math.isclose(ppl["sparse"], ppl_of(_decode_nll, sparse), rel_tol=0.08)


def test_measured_sparsity_matches_measure_module(smollm2, smol_sparse, texts, monkeypatch):
    """validate's per-node sparsity (A captured beside the dense comparison) equals measure_sparsity's
    on the sparse model alone, when both sum in one order (SCAP_ONNX_GEMM=packed; see
    test_perplexity_matches_independent_computation)."""
    from scap_onnx.calibration.data import open_data
    from scap_onnx.evaluation.sparsity import measure_sparsity

    monkeypatch.setenv("SCAP_ONNX_GEMM", "packed")

    rep = validate(smollm2, smol_sparse, texts["kjv"], ValidateOptions(seq_len=64, max_tokens=128, latency=False))
    ds = open_data(texts["kjv"], onnx.load(str(smollm2), load_external_data=False), smollm2, seq_len=64, max_tokens=128)
    other = measure_sparsity(smol_sparse, ds)
    mine = rep["sparsity"]["nodes"]
    assert set(mine) == set(other)
    for name, v in other.items():
        assert abs(mine[name]["sparsity"] - v["sparsity"]) < 1e-6, name


# ----------------------------------------------------------------------------- random Llama (.npz)
def test_perplexity_matches_torch_model(random_llama, llama_pair):
    """Dense perplexity on the .npz feeds equals transformers' own LlamaForCausalLM (torch)."""
    import torch
    from transformers import LlamaForCausalLM

    dense, sparse = llama_pair
    rep = validate(dense, sparse, random_llama / "eval.npz", ValidateOptions(latency=False, max_tokens=512))
    model = LlamaForCausalLM.from_pretrained(random_llama / "hf", torch_dtype=torch.float32).eval()
    with np.load(random_llama / "eval.npz") as z:
        ids = torch.from_numpy(z["input_ids"])
    n = rep["data"]["tokens"] // ids.shape[1]
    with torch.no_grad():
        loss = model(ids[:n], labels=ids[:n]).loss.item()  # mean over n * (S - 1) predictions
    assert rep["accuracy"]["perplexity"]["tokens"] == n * (ids.shape[1] - 1)
    assert math.isclose(rep["accuracy"]["perplexity"]["dense"], math.exp(loss), rel_tol=1e-4)
    # the per-output errors cover logits and every present tensor
    assert set(rep["accuracy"]["outputs"]) == {o.name for o in onnx.load(str(dense), load_external_data=False).graph.output}


@needs_library
def test_validate_npz_decoder_latency_and_sparsity(random_llama, llama_pair, tmp_path):
    dense, sparse = llama_pair
    rep_path = tmp_path / "llama.json"
    run_cli("validate", dense, sparse, "--data", random_llama / "eval.npz", "--kv-len", 100, "-r", rep_path, *FAST,
            check=True)
    rep = json.loads(rep_path.read_text())
    assert rep["data"]["kind"] == "npz"
    roles = rep["sparsity"]["roles"]
    assert set(roles) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(abs(r["mean"] - 0.4) < 0.1 for r in roles.values())
    dec = rep["latency"]["decode"]
    assert dec["kv_len"] == 100 and not dec["tokens_tiled"] and dec["sparse_tokens_per_s"] > 0


@needs_library
def test_latency_thread_pools(random_llama, llama_pair):
    """The shared pool is made in a separate process, so the caller's own sessions keep their pools;
    --thread-pool separate times in this process with a pool per session."""
    import onnxruntime as ort

    dense, sparse = llama_pair
    for pool in ("shared", "separate"):
        opts = ValidateOptions(accuracy=False, threads=1, repeats=2, warmup=0, prefill_repeats=1, kv_len=8,
                               thread_pool=pool)
        rep = validate(dense, sparse, random_llama / "eval.npz", opts)
        assert rep["latency"]["thread_pool"] == rep["environment"]["thread_pool"] == pool
        assert rep["latency"]["spinning"] is (pool == "shared")
        assert rep["latency"]["decode"]["dense_ms"]["n"] == 2 and rep["latency"]["decode"]["sparse_tokens_per_s"] > 0
        own = ort.SessionOptions()
        own.intra_op_num_threads = 1
        assert ort.InferenceSession(str(dense), own, providers=["CPUExecutionProvider"]).get_inputs()
    # Accuracy only: the environment names the pools the accuracy sessions had.
    rep = validate(dense, sparse, random_llama / "eval.npz", ValidateOptions(latency=False, max_tokens=64, seq_len=32))
    assert rep["environment"]["thread_pool"] == "separate" and rep["environment"]["spinning"] is False


def test_timing_process_errors_are_one_line():
    from scap_onnx.errors import ScapError
    from scap_onnx.evaluation.fresh_process import run_in_fresh_process
    from scap_onnx.evaluation.latency import TimingJob
    from scap_onnx.evaluation.pairing import ModelPair

    missing = ModelPair(Path("/nonexistent/dense.onnx"), Path("/nonexistent/sparse.onnx"), [], [], "generic", {}, [], 0)
    job = TimingJob(missing, {"feeds": {}, "tokens": 0}, ValidateOptions(), 1, "CPUExecutionProvider", True)
    with pytest.raises(ScapError, match="cannot load dense.onnx") as e:
        run_in_fresh_process("scap_onnx.evaluation.latency:time_job", job, "latency")
    assert "\n" not in str(e.value)
    with pytest.raises(ScapError, match=r"the latency process failed \(exit code 1\): AttributeError") as e:
        run_in_fresh_process("scap_onnx.evaluation.latency:time_job", ("not the arguments",), "latency")
    assert "\n" not in str(e.value)


@needs_library
def test_latency_from_a_script_without_main_guard(random_llama, llama_pair, tmp_path):
    """The timing process must not re-run the caller's script (as multiprocessing's spawn would)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    dense, sparse = llama_pair
    # Run from a folder that holds another, broken scap_onnx: the timing process must not pick it up.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "scap_onnx").mkdir(parents=True)
    (elsewhere / "scap_onnx" / "__init__.py").write_text("raise ImportError('the wrong scap_onnx')\n")
    script = tmp_path / "user_script.py"
    script.write_text(
        "from scap_onnx.evaluation.options import ValidateOptions\n"
        "from scap_onnx.evaluation.validate import validate\n"
        "print('script body ran')\n"
        f"opts = ValidateOptions(accuracy=False, threads=1, repeats=1, warmup=0, prefill_repeats=1, kv_len=8)\n"
        f"rep = validate({str(dense)!r}, {str(sparse)!r}, {str(random_llama / 'eval.npz')!r}, opts)\n"
        "print('pool', rep['latency']['thread_pool'])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if env.get("SCAP_ONNX_LIBRARY"):  # a library given relative to this folder stays found
        env["SCAP_ONNX_LIBRARY"] = str(Path(env["SCAP_ONNX_LIBRARY"]).resolve())
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                       cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("script body ran") == 1 and "pool shared" in p.stdout


def test_interleaved_alternates_order():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times["a"]) == len(times["b"]) == 4


# ----------------------------------------------------------------------------- MiniLM (encoder)
@pytest.fixture(scope="module")
def minilm_sparse(minilm, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_minilm") / "sparse.onnx"
    run_cli("rewrite", minilm, "--data", texts["pydoc"], "--sparsity", "0.4", "--tokens", 1024, "--seq-len", 128,
            "-o", out, check=True)
    return out


def test_validate_encoder_minilm(minilm, minilm_sparse, texts, tmp_path):
    lat = library_available()
    rep = validate(minilm, minilm_sparse, texts["kjv"],
                   ValidateOptions(seq_len=128, max_tokens=512, repeats=3, warmup=1, latency=lat))
    assert rep["model_kind"] == "encoder"
    e = rep["accuracy"]["embedding"]
    assert e["rows"] == 4 and 0.5 < e["cosine_min"] <= e["cosine_mean"] <= 1.0
    assert e["output"] == "last_hidden_state"
    assert 0 < rep["accuracy"]["outputs"]["last_hidden_state"]["rel_error"] < 1
    assert "perplexity" not in rep["accuracy"]
    assert {"q", "k", "v", "o", "up", "down"} <= set(rep["sparsity"]["roles"])
    if lat:
        b = rep["latency"]["batch"]
        assert b["shapes"]["input_ids"] == [1, 128] and b["speedup"] > 0 and "decode" not in rep["latency"]


# ----------------------------------------------------------------------------- bad input
def _bad(*args):
    p = run_cli("validate", *args, "--no-latency", "--tokens", 64, "--seq-len", 32)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def random_llama_one_layer():
    """Another architecture: the random Llama's shape with one layer (fewer past/present tensors)."""
    from random_llama import TINY, tool

    return tool().make_random_llama(**{**TINY, "layers": 1}, seed=0)


def test_bad_input_exits_2(random_llama, llama_pair, random_llama_other, random_llama_one_layer, tmp_path):
    """Random-Llama models only (fast; no SmolLM2). Text data reads through a word-level tokenizer
    (tests/tiny_models.py, ids < the random Llama's vocabulary of 256) given with --tokenizer."""
    from tiny_models import write_tokenizer

    dense, sparse = llama_pair
    npz = random_llama / "eval.npz"
    tok = tmp_path / "tok"
    tok.mkdir()
    write_tokenizer(tok, bert=False)
    assert "no ScapSparseMatMul nodes" in _bad(dense, dense, "--data", npz)
    assert "give the original dense model first" in _bad(sparse, sparse, "--data", npz)
    assert "--thread-pool must be one of shared, separate" in _bad(dense, sparse, "--data", npz, "--thread-pool", "mine")
    assert "--spinning applies to --thread-pool separate only" in _bad(dense, sparse, "--data", npz, "--spinning")
    assert "weight" in _bad(random_llama_other / "model.onnx", sparse, "--data", npz)  # same shapes, other weights
    # another architecture
    assert "do not match: their inputs differ" in _bad(random_llama_one_layer / "model.onnx", sparse, "--data", npz)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no evaluation data: " + f"{empty} holds fewer than 32 tokens" in _bad(dense, sparse, "--data", empty,
                                                                                 "--tokenizer", tok)
    short = tmp_path / "short.txt"
    short.write_text("In the beginning.\n")
    assert "no evaluation data: " + f"{short} holds fewer than 32 tokens" in _bad(dense, sparse, "--data", short,
                                                                                 "--tokenizer", tok)
    assert "no tokenizer: text data needs the model's tokenizer.json" in _bad(dense, sparse, "--data", short)
    empty_npz = tmp_path / "empty.npz"
    with np.load(npz) as z:
        np.savez(empty_npz, **{k: z[k][:0] for k in z.files})
    assert "no evaluation data" in _bad(dense, sparse, "--data", empty_npz)
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_text("not a model")
    assert "not an ONNX model" in _bad(not_onnx, sparse, "--data", npz)
    assert "does not exist" in _bad(dense, sparse, "--data", tmp_path / "missing.txt")
    p = run_cli("validate", dense, sparse, "--data", npz, "--provider", "NoSuchExecutionProvider")
    assert p.returncode == 2 and "not available" in p.stderr


def test_open_pair_kind_and_past(random_llama, llama_pair):
    pair = open_pair(*llama_pair)
    assert pair.kind == "causal-lm" and len(pair.scap) == 14
    assert pair.past["past_key_values.0.key"] == "present.0.key" and len(pair.past) == 4
