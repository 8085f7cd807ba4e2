"""`scap-onnx demo` through the real CLI, with small settings (the defaults calibrate on 16k tokens)."""

from __future__ import annotations

import json

import pytest

from scap_onnx.calibration.methods import DEFAULT_METHOD, get_method
from conftest import run_cli
from scap_onnx.op.session import library_available


@pytest.mark.skipif(not library_available(), reason="ScapSparseMatMul library not built")
def test_demo_prints_headline_numbers(smollm2, texts, tmp_path):
    args = ["demo", "-o", tmp_path, "--tokens", 512, "--eval-tokens", 256, "--kv-len", 64, "--repeats", 3]
    p = run_cli(*args, check=True)
    out = p.stdout
    assert "perplexity   dense" in out and "decode       dense" in out and "speedup" in out
    assert f"report: {tmp_path / 'report.json'}" in out
    assert "calibrating on pydoc.txt" in p.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["demo"]["spec"] == "up=0.35,gate=0.35,down=0.55" and rep["demo"]["rewritten"] == 90
    assert rep["data"]["path"].endswith("fortunes.txt") and rep["accuracy"]["perplexity"]["tokens"] == 255
    assert rep["latency"]["decode"]["kv_len"] == 64
    assert {p.name for p in tmp_path.iterdir()} >= {"stats.json", "model_scap.onnx", "report.json", "report.md",
                                                     "report_latency.png", "report_sparsity.png"}
    # a second run reuses the statistics only for the same model, text and settings
    from scap_onnx.experiments.cached import reusable_stats

    stats = tmp_path / "stats.json"
    want = {"spec": rep["demo"]["spec"], "tokens": 512, "seq_len": 256, "passes": get_method(None).passes,
            "data": str(texts["pydoc"].resolve()), "method": DEFAULT_METHOD}
    assert reusable_stats(stats, smollm2, "demo", want) is not None
    assert reusable_stats(stats, smollm2, "demo", {**want, "tokens": 1024}) is None
    assert reusable_stats(stats, smollm2, "demo", {**want, "data": str(texts["kjv"].resolve())}) is None


def test_demo_bad_input(tmp_path):
    p = run_cli("demo", "-o", tmp_path, "--sparsity", "up=2")
    assert p.returncode == 2 and "outside [0, 1)" in p.stderr
    p = run_cli("demo", "-o", tmp_path, "--eval-text", "novel")
    assert p.returncode == 2 and "--eval-text" in p.stderr
