"""Weight-aware (WINA-style) thresholds, calibration method ``wina`` (scap_onnx.calibration.weighting).

The oracle: channel norms and scores computed here with numpy from the model's initializers and
activations captured with onnxruntime, the op's rule from scap_onnx.op.reference.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli
from scap_onnx.api import rewrite
from scap_onnx.calibration.calibrator import calibrate
from scap_onnx.calibration.capture import Capture
from scap_onnx.calibration.data import open_data
from scap_onnx.calibration.stats import Stats
from scap_onnx.errors import ScapError
from scap_onnx.evaluation.sparsity import measure_sparsity
from scap_onnx.graph.model_io import ModelSource
from scap_onnx.graph.targets import find_targets
from scap_onnx.op.contract import OP_TYPE
from scap_onnx.op.reference import drop_rule

ZERO_CHANNEL = 5


@pytest.fixture(scope="module")
def zeroed(tiny, tmp_path_factory):
    """The tiny decoder with channel ZERO_CHANNEL of layer 0's down projection weighing nothing
    (its weight row zeroed): w_k = 0 there, so the scale must be +inf."""
    folder = tmp_path_factory.mktemp("wina") / "decoder"
    shutil.copytree(tiny["decoder"].parent, folder)
    proto = onnx.load(str(folder / "model.onnx"))
    down = next(t for t in find_targets(proto) if t.role == "down" and t.layer == 0)
    init = next(i for i in proto.graph.initializer if i.name == down.weight)
    w = numpy_helper.to_array(init).copy()
    (w.T if down.trans_b else w)[ZERO_CHANNEL] = 0.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def wina_stats(zeroed, tiny):
    # passes = layers + 1: every site is calibrated on its inputs with upstream sites sparsified
    # (weight-aware thresholds upstream too), so the targets are reached exactly on this data
    return calibrate(zeroed, tiny["calib"], sparsity="0.5", max_tokens=2048, seq_len=64, passes=3, method="wina")


def _data(model, text, tokens=2048):
    proto = onnx.load(str(model), load_external_data=False)
    return open_data(text, proto, model, seq_len=64, max_tokens=tokens)


def _numpy_norms(model, site) -> np.ndarray:
    """sqrt(sum over the site's targets of the squared norms of weight row k), from the initializers."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    sq = 0.0
    for t in site.targets:
        w = inits[t["weight"]].astype(np.float64)
        w = w.T if t.get("trans_b") else w
        sq = sq + (w ** 2).sum(axis=1)
    return np.sqrt(sq)


def test_threshold_scale_is_median_norm_over_row_norm(zeroed, wina_stats):
    assert wina_stats.calibration["method"] == "wina"
    for s in wina_stats.sites:
        w = _numpy_norms(zeroed, s)
        pos = w[w > 0]
        expected = np.where(w > 0, np.median(pos) / np.where(w > 0, w, 1), np.inf)
        scale = np.asarray(s.threshold_scale)
        assert scale.shape == (s.k,)
        np.testing.assert_allclose(scale, expected, rtol=1e-6)
        # median 1 (up to the two middle norms' gap: K is even)
        assert np.median(scale[np.isfinite(scale)]) == pytest.approx(1.0, rel=0.02)
        assert np.std(scale[np.isfinite(scale)]) > 0.01  # the weighting does something
        if "down" in s.roles and s.layer == 0:
            assert np.isinf(scale[ZERO_CHANNEL]) and np.isfinite(np.delete(scale, ZERO_CHANNEL)).all()
        else:
            assert np.isfinite(scale).all()
    shared = [s for s in wina_stats.sites if len(s.targets) > 1]
    assert {r for s in shared for r in s.roles} >= {"q", "k", "v", "gate", "up"}  # norms over several consumers


def test_scores_reach_target_on_calibration_data(zeroed, tiny, wina_stats):
    """On the dense activations of the first site (layer 0's q/k/v read the embeddings' norm, which no
    sparsified site changes): the fraction of scores |x - m| * w_k <= t is the target, and the op's
    rule with (threshold, threshold_scale) drops exactly the elements with small scores."""
    site = wina_stats.sites[0]
    with ModelSource(zeroed) as src:
        cap = Capture(src, {site.input: onnx.TensorProto.FLOAT})
        xs = [cap.run(feeds)[site.input].reshape(-1, site.k) for feeds, _ in _data(zeroed, tiny["calib"]).batches()]
    x = np.concatenate(xs)
    w = _numpy_norms(zeroed, site)
    c = np.median(w[w > 0])
    score = np.abs(x.astype(np.float64) - site.offset) * w
    by_score = score <= site.threshold * c
    assert by_score.mean() == pytest.approx(0.5, abs=0.005)
    _, dropped = drop_rule(x, site.threshold, site.offset, np.asarray(site.threshold_scale, np.float32))
    assert (dropped != by_score).mean() < 1e-3  # float32 rounding at the boundary only
    # the channels with the heaviest weights keep more of their elements than the lightest
    order = np.argsort(w)
    q = max(site.k // 4, 1)
    assert dropped[:, order[-q:]].mean() < dropped[:, order[:q]].mean()


def test_rewritten_model_reaches_targets(zeroed, tiny, wina_stats, tmp_path):
    """With upstream-aware passes every rewritten node drops the target fraction on the calibration
    data, counted by the op's own rule on the rewritten model's inputs (threshold_scale included),
    and the zero-norm channel is dropped entirely."""
    out = tmp_path / "sparse.onnx"
    rewrite(zeroed, out, stats=wina_stats)
    proto = onnx.load(str(out))
    nodes = [n for n in proto.graph.node if n.op_type == OP_TYPE]
    assert nodes and all(len(n.input) >= 4 and n.input[3] for n in nodes)  # threshold_scale present
    per_target = measure_sparsity(out, _data(zeroed, tiny["calib"]), use_library=False)
    assert len(per_target) == 14
    for name, v in per_target.items():
        assert abs(v["sparsity"] - 0.5) < 0.01, (name, v)


def test_stats_round_trip_and_retarget(zeroed, tiny, wina_stats, tmp_path):
    path = tmp_path / "stats.json"
    wina_stats.save(path)
    back = Stats.load(path)
    assert back.to_dict() == wina_stats.to_dict()
    assert back.plan() == wina_stats.plan()
    d = json.loads(path.read_text())
    assert all(len(s["channel_norms"]) == s["k"] and s["score_histogram"]["layout"] for s in d["sites"])
    # another sparsity from the stored score histogram, without recalibrating: first site exact
    plan = back.plan("0.3")
    site = back.sites[0]
    p = plan[site.targets[0]["name"]]
    assert p.threshold_scale == site.threshold_scale and p.offset == site.score_centre
    assert p.threshold == pytest.approx(site.score_histogram.threshold(0.3) / np.median(
        np.asarray(site.channel_norms)[np.asarray(site.channel_norms) > 0]), rel=1e-9)
    out = tmp_path / "s03.onnx"
    rewrite(zeroed, out, stats=back, sparsity="0.3")
    first = measure_sparsity(out, _data(zeroed, tiny["calib"]), use_library=False)[site.targets[0]["name"]]
    assert abs(first["sparsity"] - 0.3) < 0.01
    # a stats file whose norms are broken is refused with a one-line reason
    d["sites"][0]["channel_norms"] = d["sites"][0]["channel_norms"][:-1]
    path.write_text(json.dumps(d))
    with pytest.raises(ScapError, match="invalid channel_norms"):
        Stats.load(path)


def test_encoder_centred_sites_are_scored_at_their_centre(tiny):
    """Sites whose centre is not zero get their scores from a pass at that centre: the score
    histogram then holds (x - m) * w, whose threshold at 0 gives the target."""
    st = calibrate(tiny["encoder"], tiny["calib"], sparsity="0.5", max_tokens=1024, seq_len=64, method="wina")
    assert any(s.offset != 0.0 for s in st.sites)  # GELU's down inputs: a KDE-mode centre
    for s in st.sites:
        assert s.score_centre == s.offset and s.score_histogram.total == s.histogram.total
        assert s.threshold == pytest.approx(s.tau(0.5, s.offset))


def test_cli_rewrite_method_wina_validates(tiny, tmp_path):
    out = tmp_path / "w.onnx"
    p = run_cli("rewrite", tiny["decoder"], "--data", tiny["calib"], "--sparsity", "0.5", "--tokens", 512,
                "--seq-len", 64, "--method", "wina", "-o", out, "--save-stats", tmp_path / "w.json", check=True)
    assert "rewrote 14 targets" in p.stdout
    assert json.loads((tmp_path / "w.json").read_text())["calibration"]["method"] == "wina"
    rep = tmp_path / "r.json"
    run_cli("validate", tiny["decoder"], out, "--data", tiny["eval"], "--no-latency", "--tokens", 256,
            "--seq-len", 64, "--report", rep, check=True)
    r = json.loads(rep.read_text())
    assert 0.3 < r["sparsity"]["weighted_sparse_targets"] < 0.7
    assert np.isfinite(r["accuracy"]["perplexity"]["change_pct"])
