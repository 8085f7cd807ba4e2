"""Byte-budget allocation (``--budget B``, scap_onnx.calibration.budget) on the tiny decoder and MiniLM.

The oracle for the allocation's error: the targets' relative output errors recomputed here with
numpy from activations captured with onnxruntime, the weights from the initializers and the op's
rule from scap_onnx.op.reference; bytes skipped are counted by the op's rule on the rewritten model.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli
from scap_onnx.api import rewrite
from scap_onnx.calibration import budget as budget_mod
from scap_onnx.calibration.budget import (DEFAULT_BUDGET, allocate, apply_budget, parse_budget, planned_bytes_share,
                                          site_bytes)
from scap_onnx.calibration.calibrator import calibrate
from scap_onnx.calibration.capture import Capture, Upstream
from scap_onnx.calibration.data import open_data
from scap_onnx.calibration.sensitivity import (GAIN_TOKENS, MIXES, Measured, PlanProbe, apply_checked_budget,
                                              choose_mix, site_scalars)
from scap_onnx.calibration.spec import Spec
from scap_onnx.calibration.stats import Stats
from scap_onnx.errors import ScapError
from scap_onnx.evaluation.metrics import Metrics
from scap_onnx.evaluation.sparsity import measure_sparsity
from scap_onnx.graph.model_io import ModelSource
from scap_onnx.op.contract import Sparsification, node_attribute, scap_nodes, targets_of
from scap_onnx.op.reference import drop_rule
from scap_onnx.op.session import library_available, open_session, run_session


def _data(model, text, tokens=2048, seq_len=64):
    proto = onnx.load(str(model), load_external_data=False)
    return open_data(text, proto, model, seq_len=seq_len, max_tokens=tokens)


@pytest.fixture(scope="module")
def dec_stats(tiny):
    return calibrate(tiny["decoder"], tiny["calib"], sparsity="0.5", max_tokens=2048, seq_len=64, budget=0.4)


def _weighted_bytes(per_target: dict, stats: Stats) -> float:
    nbytes = {t["name"]: budget_mod.site_bytes(type(s)(**{**s.__dict__, "targets": [t]}))
              for s in stats.sites for t in s.targets}
    total = sum(nbytes.values())
    return sum(v["sparsity"] * nbytes[name] for name, v in per_target.items()) / total


@pytest.mark.parametrize("b", [0.25, 0.45])
def test_budget_reaches_b_in_measured_bytes(tiny, dec_stats, tmp_path, b):
    """The plan skips B of the targets' bytes on the calibration data (planned and measured by the op's
    rule on the rewritten model's own inputs: dense activations upstream of nothing else than the
    first layer, so near, not exact), and measured on other text it stays near B."""
    st = apply_budget(Stats.from_dict(dec_stats.to_dict()), b)
    assert st.calibration["budget"] == b
    assert planned_bytes_share(st) == pytest.approx(b, abs=1e-6)
    sparsities = {s.sparsity or 0.0 for s in st.sites}
    assert len(sparsities) > 2  # an allocation, not a uniform SPEC
    out = tmp_path / "budget.onnx"
    res = rewrite(tiny["decoder"], out, stats=st)
    assert set(res.plan) <= {t["name"] for s in st.sites for t in s.targets}
    on_calib = _weighted_bytes(measure_sparsity(out, _data(tiny["decoder"], tiny["calib"]), use_library=False), st)
    on_eval = _weighted_bytes(measure_sparsity(out, _data(tiny["decoder"], tiny["eval"]), use_library=False), st)
    assert abs(on_calib - b) < 0.03, on_calib
    assert abs(on_eval - b) < 0.05, on_eval


def _layer_errors(model, stats: Stats, plan: dict, text) -> float:
    """Sum over sites of site_cost(mean over the site's targets of ||drop(x) W|| / ||x W||), on dense
    activations of ``text`` (numpy; the op's rule from the reference); a site left dense adds 0."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    names = [s.input for s in stats.sites]
    with ModelSource(model) as src:
        cap = Capture(src, {n: onnx.TensorProto.FLOAT for n in names})
        xs = {n: [] for n in names}
        for feeds, _ in _data(model, text, tokens=1024).batches():
            for n, v in cap.run(feeds).items():
                xs[n].append(v.reshape(-1, v.shape[-1]))
    total = 0.0
    for s in stats.sites:
        planned = [t for t in s.targets if t["name"] in plan]
        if not planned:
            continue
        x = np.concatenate(xs[s.input]).astype(np.float32)
        errs = []
        for t in s.targets:
            p = plan[t["name"]]
            w = inits[t["weight"]].astype(np.float32)
            w = w.T if t.get("trans_b") else w
            d, dropped = drop_rule(x, p.threshold, p.offset)
            errs.append(np.linalg.norm(np.where(dropped, d, 0) @ w) / np.linalg.norm(x @ w))
        total += float(budget_mod.site_cost(s, np.float64(np.mean(errs))))
    return total


def test_allocation_error_below_uniform(tiny, dec_stats):
    """At the same bytes skipped on the calibration data, the allocation's summed layer error
    (recomputed with numpy on 1,024 calibration tokens) is at most the uniform SPEC's."""
    for b in (0.3, 0.5):
        uniform = dec_stats.plan(Spec(default=b), centring="margin")
        st = apply_budget(Stats.from_dict(dec_stats.to_dict()), b)
        alloc = st.plan()
        e_alloc = _layer_errors(tiny["decoder"], st, alloc, tiny["calib"])
        e_uniform = _layer_errors(tiny["decoder"], st, uniform, tiny["calib"])
        assert e_alloc < 0.98 * e_uniform, (b, e_alloc, e_uniform)


def test_allocation_is_optimal_on_the_curves(dec_stats):
    """Against every allocation that moves one grid step of bytes from one site to another: none
    lowers the objective on the lower convex hulls of the stored curves (the allocation is the
    Lagrangian optimum there; the sites at hull vertices, all but one, are on the curves themselves)."""
    sites = dec_stats.sites
    b = 0.4
    alloc = allocate(sites, b, "margin")
    curves = {}
    for s in sites:
        p, e = budget_mod.error_curve(s, "margin")
        e = budget_mod.site_cost(s, e)
        h = budget_mod.lower_hull(p, e)
        curves[s.input] = (p[h], e[h])
    nbytes = {s.input: site_bytes(s) for s in sites}

    def cost(a):
        return sum(np.interp(a[n], *curves[n]) for n in a)

    base = cost(alloc)
    for src in sites:
        for dst in sites:
            if src is dst or src.k != dst.k:
                continue
            moved = dict(alloc)
            step = 0.05
            moved[src.input] -= step
            moved[dst.input] += step * nbytes[src.input] / nbytes[dst.input]
            if moved[src.input] < 0 or moved[dst.input] > 0.95:
                continue
            assert cost(moved) >= base - 1e-9, (src.input, dst.input)


def test_stats_file_carries_the_plan(tiny, dec_stats, tmp_path):
    """calibrate --budget writes the plan into stats.json; rewrite --stats needs no data and gives
    the same nodes; rewrite --stats --budget re-allocates from the stored curves."""
    out = tmp_path / "stats.json"
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--budget", "0.35", "--tokens", 2048,
                "--seq-len", 64, "-o", out, check=True)
    assert "budget 0.35: each input's sparsity allocated" in p.stdout
    d = json.loads(out.read_text())
    assert d["calibration"]["budget"] == 0.35
    st = Stats.load(out)
    assert planned_bytes_share(st) == pytest.approx(0.35, abs=1e-6)
    m1 = tmp_path / "a.onnx"
    run_cli("rewrite", tiny["decoder"], "--stats", out, "-o", m1, check=True)
    plan = st.plan()
    nodes = scap_nodes(onnx.load(str(m1)))
    assert {t for n in nodes for t in (targets_of(n) or [n.name])} == set(plan)
    for n in nodes:
        for t in targets_of(n) or [n.name]:
            assert node_attribute(n, "threshold") == pytest.approx(plan[t].threshold, rel=1e-6)
    m2 = tmp_path / "b.onnx"
    p = run_cli("rewrite", tiny["decoder"], "--stats", out, "--budget", "0.5", "-o", m2, check=True)
    assert "rewrote" in p.stdout
    more = measure_sparsity(m2, _data(tiny["decoder"], tiny["calib"]), use_library=False)
    less = measure_sparsity(m1, _data(tiny["decoder"], tiny["calib"]), use_library=False)
    assert _weighted_bytes(more, st) > _weighted_bytes(less, st) + 0.1


def test_bad_budgets_exit_2(tiny, tmp_path):
    for bad in ("0", "1", "-0.2", "1.5", "x", "nan"):
        for cmd in (["calibrate", tiny["decoder"], "--data", tiny["calib"], "-o", tmp_path / "s.json"],
                    ["rewrite", tiny["decoder"], "--data", tiny["calib"], "-o", tmp_path / "m.onnx"]):
            p = run_cli(*cmd, "--budget", bad)
            assert p.returncode == 2 and "--budget" in p.stderr and p.stderr.count("\n") == 1, (bad, p.stderr)
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "m.onnx").exists()
    p = run_cli("rewrite", tiny["decoder"], "--data", tiny["calib"], "--budget", "0.3", "--sparsity", "0.4",
                "-o", tmp_path / "m.onnx")
    assert p.returncode == 2 and "not both" in p.stderr
    for bad in (0.0, 1.0, "abc", None):
        with pytest.raises(ScapError, match="--budget"):
            parse_budget(bad)
    assert parse_budget("0.25") == 0.25


def test_rewrite_alone_with_budget_on_minilm(minilm, texts, tmp_path):
    """`scap-onnx rewrite MODEL --budget B`, nothing else: calibrated on the built-in corpus, gains
    measured, the plan allocated; measured by the op's rule on the rewritten model, the share of
    FC weight bytes skipped lands near B on the calibration text and stays near it on KJV."""
    from scap_onnx.evaluation.options import ValidateOptions
    from scap_onnx.evaluation.validate import validate

    out = tmp_path / "sparse.onnx"
    saved = tmp_path / "stats.json"
    p = run_cli("rewrite", minilm, "--budget", "0.35", "-o", out, "--tokens", 1024, "--seq-len", 128,
                "--save-stats", saved, check=True)
    assert [x for x in p.stderr.splitlines() if "built-in corpus" in x][0].endswith("method scap-margin, budget 0.35)")
    st = Stats.load(saved)
    assert st.calibration["budget"] == 0.35 and st.calibration["gain"]["sparsity"] == 0.35
    assert all(s.gain is not None and s.gain > 0 for s in st.sites)
    assert len({s.sparsity for s in st.sites}) > 3
    opts = ValidateOptions(max_tokens=1024, seq_len=128, latency=False, threads=2)
    on_calib = validate(minilm, out, texts["pydoc"], opts)["sparsity"]["weighted"]
    on_kjv = validate(minilm, out, texts["kjv"], opts)["sparsity"]["weighted"]
    assert abs(on_calib - 0.35) < 0.02, on_calib
    assert abs(on_kjv - 0.35) < 0.06, on_kjv


def test_budget_needs_gains(tiny, tmp_path):
    """Stats calibrated for a SPEC hold no gains: --budget on them is refused in one line (layer
    errors alone allocate badly, docs/calibration.md), not silently planned."""
    out = tmp_path / "spec.json"
    run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--sparsity", "0.5", "--tokens", 1024,
            "--seq-len", 64, "-o", out, check=True)
    p = run_cli("rewrite", tiny["decoder"], "--stats", out, "--budget", "0.3", "-o", tmp_path / "m.onnx")
    assert p.returncode == 2 and "no gain" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "m.onnx").exists()


def _logits(model, feeds_list, use_library):
    sess = open_session(str(model), use_library=use_library)
    name = sess.get_outputs()[0].name
    return [run_session(sess, [name], f)[0].astype(np.float64) for f in feeds_list]


def test_probe_measures_what_the_rewritten_model_computes(tiny, dec_stats, tmp_path):
    """PlanProbe (every site sparsified by fed scalars, one session): dense when nothing is fed, and
    the error of a plan is the relative change of the logits of the model rewritten with that plan
    (ScapSparseMatMul through onnxruntime), on the same tokens."""
    st = dec_stats
    with ModelSource(tiny["decoder"]) as src:
        ds = _data(tiny["decoder"], tiny["calib"], tokens=1024)
        probe = PlanProbe(st.sites, src, ds, threads=1)
        assert probe.error({}) == 0.0
        plan = {s.input: site_scalars(s, s.sparsity) for s in st.sites if s.sparsity}
        got = probe.error(plan)
        loss = probe.measure(plan).loss
        assert probe.measure({}).loss == 0.0
        one = st.sites[0]  # alone, against a capture graph with the rule's constants (calibration's own path)
        m, tau = site_scalars(one, 0.5)
        alone = probe.error({one.input: (m, tau)})
        out_name = src.proto.graph.output[0].name
        fixed = Capture(src, {out_name: onnx.TensorProto.FLOAT}, [Upstream(
            one.input, Sparsification(tau, m, one.token_scaled, one.threshold_scale), onnx.TensorProto.FLOAT,
            [t["name"] for t in one.targets])])
        ys = [fixed.run(f)[out_name].astype(np.float64) for f in probe.feeds]
    feeds = probe.feeds  # the first GAIN_TOKENS tokens of the data
    assert sum(int(np.prod(f["input_ids"].shape)) for f in feeds) >= GAIN_TOKENS
    out = tmp_path / "planned.onnx"
    rewrite(tiny["decoder"], out, stats=st)
    dense = _logits(tiny["decoder"], feeds, False)
    sparse = _logits(out, feeds, library_available())
    want = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(sparse, dense))) / np.sqrt(sum((b * b).sum() for b in dense))
    assert got == pytest.approx(want, rel=1e-3) and got > 0.01
    want_alone = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ys, dense))) / np.sqrt(sum((b * b).sum() for b in dense))
    assert alone == pytest.approx(want_alone, rel=1e-6) and alone > 0
    # the check's loss of a causal LM: validate's perplexity change (evaluation.metrics) on its windows
    assert probe.lm and probe.check_tokens >= GAIN_TOKENS
    metrics = Metrics(["logits"], "causal-lm")
    for f, d, sp in zip(probe.check_feeds, _logits(tiny["decoder"], probe.check_feeds, False),
                        _logits(out, probe.check_feeds, library_available())):
        metrics.add(f, {"logits": d}, {"logits": sp}, int(f["input_ids"].size))
    want_ppl = np.expm1((metrics.nll_s - metrics.nll_d) / metrics.n_nll)
    assert loss == pytest.approx(want_ppl, rel=1e-3, abs=1e-6) and loss != 0.0


def test_checked_budget_records_what_it_measured(tiny, dec_stats):
    """calibrate --budget measures the allocated plan, the uniform one and mixes between them, all at
    B of the bytes; the plan it keeps measures, run again, what the check recorded for its mix."""
    check = dec_stats.calibration["budget_check"]
    errors = {float(k): v for k, v in check["errors"].items()}
    assert set(errors) == set(MIXES)
    assert planned_bytes_share(dec_stats) == pytest.approx(0.4, abs=1e-5)
    with ModelSource(tiny["decoder"]) as src:
        probe = PlanProbe(dec_stats.sites, src, _data(tiny["decoder"], tiny["calib"]), threads=1)
        kept = probe.measure({s.input: site_scalars(s, s.sparsity) for s in dec_stats.sites if s.sparsity}).loss
    assert check["criterion"] == probe.criterion and probe.criterion.startswith("perplexity change")
    assert kept == pytest.approx(errors[check["mix"]], rel=1e-6)


def test_default_is_the_budget(tiny, tmp_path):
    """Neither --sparsity nor --budget: calibrate allocates DEFAULT_BUDGET with measured gains and
    says so; both together exit 2 in one line."""
    out = tmp_path / "s.json"
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--tokens", 1024, "--seq-len", 64, "-o", out,
                check=True)
    assert f"budget {DEFAULT_BUDGET:g}: each input's sparsity allocated" in p.stdout
    st = Stats.load(out)
    assert st.calibration["budget"] == DEFAULT_BUDGET and "budget_check" in st.calibration
    assert planned_bytes_share(st) == pytest.approx(DEFAULT_BUDGET, abs=1e-5)
    p = run_cli("calibrate", tiny["decoder"], "--data", tiny["calib"], "--sparsity", "0.4", "--budget", "0.4",
                "-o", tmp_path / "both.json")
    assert p.returncode == 2 and "not both" in p.stderr and p.stderr.count("\n") == 1


class _ScriptedProbe:
    """Stands in for PlanProbe in the check's selection only: every gain run reads 0.01, then the
    mixes' losses come from ``mix_losses`` in MIXES order (the measured probe is tested above)."""

    criterion = "scripted"

    def __init__(self, mix_losses):
        self._losses = list(mix_losses)
        self.tokens = GAIN_TOKENS

    def error(self, plan):
        return 0.01

    def measure(self, plan):
        return Measured(self._losses.pop(0))


@pytest.mark.parametrize("best", MIXES)
def test_check_applies_the_mix_measured_best(dec_stats, best):
    """Whichever mix measures best is the plan applied: all sites at B for the uniform plan, the
    allocation itself for 1, and every site's sparsity on the line between them otherwise."""
    st = Stats.from_dict(dec_stats.to_dict())
    b = 0.4
    errors = [0.5 if lam != best else 0.1 for lam in MIXES]
    apply_checked_budget(st, _ScriptedProbe(errors), b)
    alloc = allocate(st.sites, b)
    assert st.calibration["budget_check"]["mix"] == best
    for s in st.sites:
        want = best * alloc[s.input] + (1 - best) * b
        assert (s.sparsity or 0.0) == pytest.approx(want, abs=1e-6), s.input
    assert planned_bytes_share(st) == pytest.approx(b, abs=1e-5)


def _noisy(mean, rng, n=2048, sd=0.5):
    """Per-token NLL changes of mean ``mean``: one shared draw, so pairs differ by exactly the shift."""
    base = rng.standard_normal(n) * sd
    return base - base.mean() + mean


@pytest.mark.parametrize("gap_se, kept", [(0.5, 0.5), (3.0, 0.0)])
def test_check_keeps_the_most_allocated_mix_within_noise(gap_se, kept):
    """Uniform measures least; half the allocation is worse by ``gap_se`` standard errors of the
    paired difference. Within one, the more allocated mix is kept (its loss is not worse beyond its
    noise); at three, uniform. Mixes worse by far are never kept."""
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(2048)  # the two plans' per-token disagreement
    se = noise.std(ddof=1) / np.sqrt(noise.size)
    uniform = _noisy(0.01, rng)
    half = uniform + noise - noise.mean() + gap_se * se
    far = uniform + noise - noise.mean() + 10 * se
    measured = {0.0: Measured(float(np.expm1(uniform.mean())), uniform),
                0.5: Measured(float(np.expm1(half.mean())), half),
                1.0: Measured(float(np.expm1(far.mean())), far)}
    assert choose_mix(measured) == kept
    # without per-token samples (an encoder's output error) the least loss decides
    assert choose_mix({lam: Measured(m.loss) for lam, m in measured.items()}) == 0.0
    # a mix whose logits overflowed (NaN loss) is never kept, nor taken for the best, in MIXES order
    broken = Measured(float("nan"), np.full_like(uniform, np.nan))
    assert choose_mix({1.0: broken, 0.5: measured[0.5], 0.0: measured[0.0]}) == kept
    assert choose_mix({1.0: measured[1.0], 0.5: measured[0.5], 0.0: broken}) == 0.5  # far is 10 - gap SE above
    assert choose_mix({lam: broken for lam in MIXES}) == 0.0  # nothing finite: uniform
