import numpy as np
import pytest

from scap_onnx.calibration.histogram import Histogram, balanced_centre, bin_counts


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # a shifted bulk, exact zeros (as after ReLU) and heavy tails (outliers as in LLM activations)
    return np.concatenate([
        rng.normal(-0.12, 0.05, 200_000), np.zeros(30_000), rng.standard_cauchy(5_000) * 20,
    ]).astype(np.float32)


def test_quantiles_match_numpy(data):
    h = Histogram().add(data)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        exact = np.quantile(data, q)
        assert abs(h.quantile(q) - exact) <= 0.01 * abs(exact) + 1e-6


@pytest.mark.parametrize("m", [0.0, -0.12, 0.3])
@pytest.mark.parametrize("s", [0.1, 0.35, 0.5, 0.9])
def test_threshold_reaches_sparsity(data, m, s):
    h = Histogram().add(data)
    tau = h.threshold(s, m)
    reached = np.mean(np.abs(data - np.float32(m)) <= tau)
    exact = np.quantile(np.abs(data - m), s, method="inverted_cdf")
    assert abs(tau - exact) <= 0.01 * exact + 1e-6
    # the least tau reaching s: exactly s, or more where a point mass (the zeros) sits at distance tau
    assert reached >= s - 0.005
    if tau > 0 and abs(abs(m) - tau) > 1e-3:
        assert abs(reached - s) < 0.005


def test_zero_point_mass(data):
    h = Histogram().add(data)
    assert h.zeros == 30_000
    # 30k zeros + the part of the bulk close to 0 already exceed 10%: tau 0 drops only zeros
    assert h.threshold(30_000 / len(data) * 0.9, 0.0) == 0.0
    assert h.threshold(0.0, 0.3) == 0.0


def test_merge_equals_one_pass(data):
    a = Histogram()
    for chunk in np.array_split(data, 7):
        a.merge(Histogram().add(chunk))
    b = Histogram().add(data)
    assert (a.counts == b.counts).all()


def test_special_values():
    """NaN is counted but left out of every fraction; +-0 are one point mass; infinities and 1e30 count
    as values beyond 2**MAX_EXP. Expected values: numpy's inverted-CDF quantiles of the non-NaN values
    (the histogram interpolates within a bin, so within a bin's 0.8 % relative width)."""
    x = np.array([0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-40, 1e30, 1.0, -2.5], np.float32)
    h = Histogram().add(x)
    assert h.total == x.size and h.nan == 1 and h.zeros == 2
    values = x[~np.isnan(x)]  # 9 values
    # sparsities chosen so that counting the NaN (10 values) or dropping the infinities (7) moves tau
    for s, offset in ((0.5, 0.0), (0.55, 0.0), (0.6, 0.0), (0.5, 1.0)):
        exact = np.quantile(np.abs(values - np.float32(offset)), s, method="inverted_cdf")
        tau = h.threshold(s, offset)
        assert exact > 0 and abs(tau - exact) <= 0.01 * exact, (s, offset, tau, exact)
    assert h.threshold(0.55, 0.0) == pytest.approx(1.0, rel=0.01)  # 5th of 9 |x|: 0, 0, 1e-40, 1e-30, 1
    assert h.quantile(0.5) == 0.0 == np.quantile(values, 0.5, method="inverted_cdf")  # inside the zeros' mass
    assert h.quantile(0.7) == pytest.approx(np.quantile(values, 0.7, method="inverted_cdf"), rel=0.01)  # 1.0
    assert h.mass_within(0.0, 0.0)[0] == pytest.approx(2 / 9)  # the zeros of 9 non-NaN values


def test_serialisation_roundtrip(data):
    h = Histogram().add(data)
    d = h.to_dict()
    assert len(d["pos"]["counts"]) + len(d["neg"]["counts"]) < 30_000
    assert (Histogram.from_dict(d).counts == h.counts).all()
    with pytest.raises(ValueError, match="unknown histogram layout 'other'"):
        Histogram.from_dict({**d, "layout": "other"})


def test_mode_of_shifted_bulk(data):
    h = Histogram().add(data[:200_000])  # the shifted normal alone
    assert abs(h.mode(0.005) + 0.12) < 0.01


def test_memory_is_fixed():
    small = bin_counts(np.ones(10, np.float32))
    big = bin_counts(np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32))
    assert small.shape == big.shape


def test_bad_sparsity():
    h = Histogram().add(np.ones(3, np.float32))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got " + str(bad)):
            h.threshold(bad)


@pytest.mark.parametrize("lo,hi", [(-0.2, -0.05), (-0.01, 0.01), (-1.0, 1.0), (0.0, 50.0)])
def test_window_mean_matches_numpy(data, lo, hi):
    """Mean of the values in [lo, hi] (zeros a point mass, bins taken as uniformly filled)."""
    h = Histogram().add(data)
    inside = data[(data >= lo) & (data <= hi)].astype(np.float64)
    assert abs(h.window_mean(lo, hi) - inside.mean()) <= 0.01 * (hi - lo)
    assert np.isnan(h.window_mean(1e6, 2e6))  # an empty window


@pytest.mark.parametrize("s", [0.35, 0.55])
def test_balanced_centre_is_the_mean_of_what_it_drops(s):
    """A GELU-like input: a spike just below zero and a long positive tail (the inputs of GPT-2's down
    projections). Zero drops values that average well below zero; the balanced centre's dropped
    values average the centre itself, and it moves towards the spike."""
    rng = np.random.default_rng(3)
    x = np.concatenate([-np.abs(rng.normal(0, 0.04, 300_000)), rng.exponential(0.5, 200_000)]).astype(np.float32)
    h = Histogram().add(x)
    m = balanced_centre(h, s)
    tau = h.threshold(s, m)
    dropped = x[np.abs(x - np.float32(m)) <= tau].astype(np.float64)
    assert abs(dropped.mean() - m) < 0.02 * tau
    assert abs(np.mean(np.abs(x - m) <= tau) - s) < 0.005  # and it keeps the sparsity
    t0 = h.threshold(s, 0.0)
    zero_bias = x[np.abs(x) <= t0].astype(np.float64).mean()
    assert zero_bias < -0.2 * t0 and m < 0  # zero's dropped values are biased; the centre moves below 0
    # a symmetric bulk: the balanced centre is its centre
    sym = Histogram().add(rng.normal(0.3, 0.1, 200_000).astype(np.float32))
    assert abs(balanced_centre(sym, s) - 0.3) < 0.005
