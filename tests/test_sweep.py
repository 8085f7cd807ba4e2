"""`scap-onnx sweep` through the real CLI on a tiny random-weight Llama (.npz feeds) and on MiniLM
(text, encoder), plus the plans each method makes from the same statistics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import run_cli
from random_families import tiny_family
from random_llama import tiny_llama
from scap_onnx.op.contract import channel_input_names, scap_nodes
from scap_onnx.op.session import library_available
from scap_onnx.calibration.stats import Stats
from scap_onnx.errors import ScapError
from scap_onnx.calibration.methods import get_method
from scap_onnx.experiments.sweep import DEFAULT_METHODS, ROLE_PROFILE, parse_levels, plan_for, role_spec, stats_kinds


@pytest.fixture(scope="module")
def llama_sweep(tmp_path_factory):
    folder = tiny_llama(0)
    out = tmp_path_factory.mktemp("sweep_llama")
    lat = [] if library_available() else ["--no-latency"]
    p = run_cli("sweep", folder / "model.onnx", "--data", folder / "calib.npz", "--eval-data", folder / "eval.npz",
                "--levels", "0.3,0.5", "--kv-len", 32, "--repeats", 2, "--warmup", 1, "-o", out, *lat, check=True)
    return folder, out, p


def test_sweep_cli_rows_tables_and_chart(llama_sweep):
    folder, out, p = llama_sweep
    res = json.loads((out / "sweep.json").read_text())
    assert res["format"] == "scap-onnx-sweep" and res["levels"] == [0.3, 0.5] and res["methods"] == list(DEFAULT_METHODS)
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["dense"] + [m for m in DEFAULT_METHODS for _ in (0, 1)]
    assert rows[0]["quality"] == 0 and rows[0]["speedup"] == 1.0
    for r in rows[1:]:
        assert r["perplexity_sparse"] > 1 and 0 < r["top1_agreement"] <= 1 and r["kl_mean"] >= 0
        # the measured share of the rewritten MatMuls' bytes is near the level (random feeds, other seed)
        assert abs(r["sparsity_targets"] - r["level"]) < 0.06, r
        assert (out / "reports" / f"{r['method']}_{r['level']:g}.json").is_file()
        if library_available():
            assert r["speedup"] > 0 and r["latency_kind"] == "decode"
    assert res["calibration"]["teal"]["passes"] == 1 and res["calibration"]["scap"]["passes"] == 2
    assert set(res["calibration"]) == set(stats_kinds(2)) - {"wina"} | {"budget"}
    md = (out / "sweep.md").read_text()
    assert "TEAL-style" in md and "SCAP, mode-centred, per-role" in md and "verdict" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "models").exists() and not (out / ".dense_cache").exists()
    assert "| method | level |" in p.stdout


def test_sweep_rows_are_their_reports(llama_sweep):
    """Each row's numbers are those of its per-point validate report (reports/<method>_<level>.json);
    the dense row's are the reports' dense numbers."""
    _, out, _ = llama_sweep
    res = json.loads((out / "sweep.json").read_text())
    dense_row, rows = res["rows"][0], res["rows"][1:]
    for r in rows:
        path = out / "reports" / f"{r['method']}_{r['level']:g}.json"
        rep = json.loads(path.read_text())
        assert r["report"] == str(path)
        sp, acc, ppl = rep["sparsity"], rep["accuracy"], rep["accuracy"]["perplexity"]
        assert r["sparsity"] == sp["weighted"] and r["sparsity_targets"] == sp["weighted_sparse_targets"], r
        assert r["roles"] == {role: v["mean"] for role, v in sp["roles"].items()}
        assert set(r["roles"]) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert (r["perplexity_dense"], r["perplexity_sparse"]) == (ppl["dense"], ppl["sparse"]), r
        assert r["quality"] == ppl["change_pct"] and r["quality_name"] == "perplexity change %"
        assert r["quality"] == pytest.approx(100 * (ppl["sparse"] / ppl["dense"] - 1), rel=1e-9)
        assert r["top1_agreement"] == acc["top1_agreement"] and r["kl_mean"] == acc["kl"]["mean"], r
        if library_available():
            dec = rep["latency"]["decode"]
            assert r["latency_kind"] == "decode"
            assert (r["speedup"], r["paired_speedup"]) == (dec["speedup"], dec.get("paired_speedup"))
            assert (r["dense_tokens_per_s"], r["sparse_tokens_per_s"]) == \
                   (dec["dense_tokens_per_s"], dec["sparse_tokens_per_s"])
        else:
            assert "latency" not in rep and r["speedup"] is None and r["latency_kind"] is None
        # one dense model, evaluated once (cached) for the whole sweep
        assert ppl["dense"] == dense_row["perplexity_dense"] == dense_row["perplexity_sparse"]
    assert dense_row["top1_agreement"] == 1.0 and dense_row["kl_mean"] == 0.0
    assert dense_row["dense_tokens_per_s"] == dense_row["sparse_tokens_per_s"] == rows[0]["dense_tokens_per_s"]


def _teal_quality_at(rows, sparsity):
    """TEAL's quality at a measured sparsity: linear between its points and the dense point (0, 0);
    None outside them."""
    pts = sorted([(0.0, 0.0)] + [(r["sparsity"], r["quality"]) for r in rows if r["method"] == "teal"])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= sparsity <= x1:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (sparsity - x0) / (x1 - x0)
    return None


def test_sweep_comparison_from_rows(llama_sweep):
    """The comparison recomputed here from the rows as sweep.compare defines it (SCAP mode-centred vs
    TEAL at the same measured sparsity, TEAL interpolated; beyond TEAL's points, better quality at no
    less sparsity); and what it shows on this model: SCAP mode-centred loses clearly less
    perplexity than TEAL at both levels. Measured (deterministic: fixed seeds; the same with
    SCAP_ONNX_ISA=portable): perplexity change 0.019 % vs TEAL's 0.048 % at 0.3, 0.076 % vs 0.104 %
    at 0.5 (ratios 0.40 and 0.73)."""
    _, out, _ = llama_sweep
    res = json.loads((out / "sweep.json").read_text())
    rows = res["rows"]
    expected = []
    for level in (0.3, 0.5):
        (t,) = [r for r in rows if r["method"] == "teal" and r["level"] == level]
        (s,) = [r for r in rows if r["method"] == "scap-mode" and r["level"] == level]
        same = _teal_quality_at(rows, s["sparsity"])
        ok = s["quality"] <= same if same is not None else (
            s["quality"] <= t["quality"] and s["sparsity"] >= t["sparsity"])
        expected.append({"level": level, "teal_quality": t["quality"], "scap_mode_quality": s["quality"],
                         "teal_sparsity": t["sparsity"], "scap_mode_sparsity": s["sparsity"],
                         "teal_quality_at_scap_sparsity": same, "scap_at_or_above_baseline": ok})
    assert [set(c) for c in res["comparison"]] == [set(e) for e in expected]
    for c, e in zip(res["comparison"], expected):
        exact = {k for k, v in e.items() if not isinstance(v, float)}  # the verdict; None (no TEAL point)
        assert {k: c[k] for k in exact} == {k: e[k] for k in exact}, c
        assert {k: c[k] for k in set(e) - exact} == pytest.approx({k: e[k] for k in set(e) - exact}, rel=1e-12), c
    for c in res["comparison"]:
        assert c["teal_quality_at_scap_sparsity"] is not None  # SCAP's sparsity within TEAL's points
        assert c["scap_at_or_above_baseline"] is True
        assert 0 < c["scap_mode_quality"] < 0.9 * c["teal_quality_at_scap_sparsity"], c


def test_sweep_plans(llama_sweep):
    _, out, _ = llama_sweep
    stats = {kind: Stats.load(out / f"stats_{kind}.json") for kind in set(stats_kinds(2)) - {"wina"}}
    stats["budget"] = Stats.load(out / "stats_budget_0.5.json")  # plan_for allocates 0.4 from its gains
    scap = stats["scap"]
    names = {t["name"] for s in scap.sites for t in s.targets}
    for m in DEFAULT_METHODS:
        plan, spec = plan_for(m, 0.4, stats)
        assert set(plan) == names or (m == "budget" and set(plan) <= names), m
        if m in ("teal", "scap-zero"):
            assert all(p.offset == 0.0 for p in plan.values())
        if m == "oneshot":  # the mode for down's inputs only
            assert {n for n, p in plan.items() if p.offset != 0.0} <= {n for n in names if "down_proj" in n}
        # the TEAL-style statistics and the default's are static; SCAP's token-scale o and down
        scaled = {name for name, p in plan.items() if p.token_scaled}
        static = m in ("teal", "oneshot") or (m in ("default", "budget") and not get_method(None).token_scaled_roles)
        assert scaled == (set() if static else {n for n in set(plan) if "o_proj" in n or "down_proj" in n}), m
    # teal thresholds come from the dense-activation statistics, scap-zero's from the upstream-aware ones
    t_plan, _ = plan_for("teal", 0.4, stats)
    z_plan, _ = plan_for("scap-zero", 0.4, stats)
    assert t_plan != z_plan
    # mode-centring picks non-zero centres somewhere
    m_plan, _ = plan_for("scap-mode", 0.4, stats)
    assert any(p.offset != 0.0 for p in m_plan.values())


def test_role_spec_keeps_byte_weighted_mean(llama_sweep):
    _, out, _ = llama_sweep
    scap = Stats.load(out / "stats_scap.json")
    for level in (0.3, 0.5, 0.7):
        spec = role_spec(scap, level)
        nbytes = {}
        for s in scap.sites:
            for t in s.targets:
                nbytes[t["role"]] = nbytes.get(t["role"], 0) + t["k"] * t["n"]
        mean = sum(spec[r] * b for r, b in nbytes.items()) / sum(nbytes.values())
        assert abs(mean - level) < 1e-3
        assert spec["down"] / spec["up"] == pytest.approx(ROLE_PROFILE["down"] / ROLE_PROFILE["up"], rel=1e-3)


def test_sweep_minilm_text(minilm, texts, tmp_path):
    """Encoder on text: quality is 1 - cosine of pooled embeddings; latency is one batch."""
    lat = [] if library_available() else ["--no-latency"]
    run_cli("sweep", minilm, "--data", texts["pydoc"], "--eval-data", texts["kjv"], "--levels", "0.4",
            "--methods", "teal,scap-mode", "--tokens", 1024, "--seq-len", 128, "--eval-tokens", 256,
            "--repeats", 2, "--warmup", 1, "-o", tmp_path, *lat, check=True)
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["dense", "teal", "scap-mode"]
    for r in res["rows"][1:]:
        assert r["quality_name"] == "1 - cosine %" and 0 <= r["quality"] < 50
        assert 0.5 < r["cosine_mean"] <= 1
        if lat == []:
            assert r["latency_kind"] == "batch"
    assert len(res["comparison"]) == 1


def test_sweep_bad_input(tmp_path):
    folder = tiny_llama(0)
    for args, msg in (
        (["--levels", "0.3,1.2"], "outside"),
        (["--levels", "x"], "not a comma-separated list"),
        (["--methods", "teal,magic"], "unknown method"),
    ):
        p = run_cli("sweep", folder / "model.onnx", "--data", folder / "calib.npz", "--eval-data",
                    folder / "eval.npz", "-o", tmp_path, *args)
        assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = run_cli("sweep", folder / "model.onnx", "--data", folder / "calib.npz", "-o", tmp_path)
    assert p.returncode == 2 and "--eval-data" in p.stderr
    with pytest.raises(ScapError, match="--levels names no sparsity level"):
        parse_levels("")
    with pytest.raises(ScapError, match=r"sparsity level 0\.0 is outside \(0, 1\)"):
        parse_levels([0.0, 0.5])
    assert np.allclose(parse_levels("0.5,0.3,0.5"), [0.3, 0.5])


def test_sweep_against_teal(llama_sweep):
    """Every other point against TEAL-style at its own measured sparsity, recomputed from the rows."""
    _, out, _ = llama_sweep
    res = json.loads((out / "sweep.json").read_text())
    rows = res["rows"]
    got = res["against_teal"]
    assert [(c["method"], c["level"]) for c in got] == \
           [(r["method"], r["level"]) for r in rows if r["method"] not in ("dense", "teal")]
    for c in got:
        same = _teal_quality_at(rows, c["sparsity"])
        assert (c["baseline_quality"] is None) == (same is None), c
        if same is not None:
            assert c["baseline_quality"] == pytest.approx(same, rel=1e-12)
            assert c["ratio"] == pytest.approx(c["quality"] / same, rel=1e-12)
    assert "against TEAL-style at the same measured sparsity" in (out / "sweep.md").read_text()


def test_sweep_default_is_teal_on_random_weights(llama_sweep):
    """On this random-weight model no offset candidate cuts the output error by the margin, so the
    default (one pass, static, ``margin``) reads the TEAL-style statistics and keeps zero centres:
    the same points as TEAL-style; the one-shot's mode for down loses a little more at 0.5
    (measured 0.113 % against 0.106 %). The same points up to rounding: the op sums a batch in either
    of two orders, whichever it timed faster on the machine (custom_ops/timed_choice.h), and a last
    bit that differs can move an activation across a later threshold (measured: 2e-5 relative)."""
    _, out, _ = llama_sweep
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    for level in (0.3, 0.5):
        (d,) = [r for r in rows if r["method"] == "default" and r["level"] == level]
        (t,) = [r for r in rows if r["method"] == "teal" and r["level"] == level]
        assert d["sparsity"] == t["sparsity"]
        assert d["quality"] == pytest.approx(t["quality"], rel=1e-3)


def test_sweep_budget_beats_teal_on_minilm(minilm, texts, tmp_path):
    """The ordering the sweep measures on MiniLM (pydoc -> fortunes, fixed windows: deterministic):
    the byte-budget allocation loses clearly less than TEAL-style at the same measured share of FC
    bytes skipped. Measured: 1 - cosine 1.36 % at 30.0 % against TEAL's 4.22 % there (ratio 0.32);
    at 0.5, 10.83 % at 49.9 % against TEAL's 16.02 % at 49.7 % (0.68). Asserted with margins wider
    than the differences between evaluation texts (docs/results.md)."""
    run_cli("sweep", minilm, "--data", texts["pydoc"], "--eval-data", texts["fortunes"], "--levels", "0.3,0.5",
            "--methods", "teal,budget", "--tokens", 1024, "--seq-len", 128, "--eval-tokens", 512, "--no-latency",
            "-o", tmp_path, check=True)
    res = json.loads((tmp_path / "sweep.json").read_text())
    for level in (0.3, 0.5):
        st = Stats.load(tmp_path / f"stats_budget_{level:g}.json")
        assert all(s.gain is not None and s.gain >= 0 for s in st.sites)
        assert st.calibration["gain"]["sparsity"] == level and st.calibration["budget"] == level
        assert st.calibration["sweep"]["centring"] == get_method(None).centring  # the default's, as calibrate
        assert "budget_check" in st.calibration
    rows = {(r["method"], r["level"]): r for r in res["rows"]}
    vs = {c["level"]: c for c in res["against_teal"] if c["method"] == "budget"}
    assert vs[0.3]["ratio"] is not None and vs[0.3]["ratio"] < 0.6, vs[0.3]
    # at 0.5 the allocation skips as many bytes as TEAL's sparsest point, or more, for less loss
    b, t = rows[("budget", 0.5)], rows[("teal", 0.5)]
    assert b["sparsity"] > t["sparsity"] - 0.005 and b["quality"] < 0.9 * t["quality"], (b, t)
    assert "byte-budget allocation" in (tmp_path / "sweep.md").read_text()


def test_sweep_reruns_only_the_check_when_only_the_check_changed(tmp_path):
    """A cached budget plan made under another check rule keeps its gains (here marked: tripled
    plus one, which a measurement would not reproduce) and runs the check again; cached under other
    gain settings, its gains are measured again."""
    folder = tiny_family("qwen2")
    args = ("sweep", folder / "model.onnx", "--data", folder / "calib.npz", "--eval-data", folder / "eval.npz",
            "--levels", "0.4", "--methods", "budget", "--no-latency", "-o", tmp_path)
    run_cli(*args, check=True)
    path = tmp_path / "stats_budget_0.4.json"
    st = Stats.load(path)
    measured = {s.input: s.gain for s in st.sites}
    for s in st.sites:
        s.gain = 3.0 * s.gain + 1.0
    st.calibration["sweep"]["check_rule"] = "an older rule"
    st.calibration["budget_check"]["rule"] = "an older rule"
    st.save(path)
    run_cli(*args, check=True)
    again = Stats.load(path)
    assert {s.input: s.gain for s in again.sites} == pytest.approx({k: 3.0 * g + 1.0 for k, g in measured.items()})
    assert again.calibration["budget_check"]["rule"] == again.calibration["sweep"]["check_rule"] != "an older rule"
    again.calibration["sweep_gains"]["gain_tokens"] += 1  # gains made otherwise: measured again
    again.calibration["sweep"]["check_rule"] = "an older rule"
    again.save(path)
    run_cli(*args, check=True)
    assert {s.input: s.gain for s in Stats.load(path).sites} == pytest.approx(measured)


def test_sweep_wina_keeps_threshold_scale(tmp_path):
    """`--methods wina`: its own statistics (norms, scores), and its plans reach the rewriter with their
    per-channel threshold_scale (the rewritten nodes carry it), compared on the same axis as TEAL's."""
    folder = tiny_family("qwen2")
    run_cli("sweep", folder / "model.onnx", "--data", folder / "calib.npz", "--eval-data", folder / "eval.npz",
            "--levels", "0.4", "--methods", "teal,wina", "--no-latency", "--keep-models", "-o", tmp_path, check=True)
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["dense", "teal", "wina"]
    assert [c["method"] for c in res["against_teal"]] == ["wina"]
    st = Stats.load(tmp_path / "stats_wina.json")
    assert st.calibration["method"] == "wina" and all(s.weighted for s in st.sites)
    plan, _ = plan_for("wina", 0.4, {"wina": st})
    assert plan and all(p.threshold_scale is not None for p in plan.values())
    nodes = scap_nodes(onnx.load(str(tmp_path / "models" / "wina_0.4.onnx"), load_external_data=False))
    assert nodes and all(channel_input_names(n)[0] is not None for n in nodes)
