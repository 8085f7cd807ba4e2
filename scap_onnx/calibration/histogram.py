"""Streaming, mergeable, bounded-memory histograms of activations.

Bins are fixed by the float32 bit pattern: the sign, the exponent and the top ``MANTISSA_BITS``
bits of the mantissa, so every bin spans a relative width of 2**-MANTISSA_BITS (0.8 %) of the
values in it, from 2**MIN_EXP to 2**MAX_EXP on either side of zero, with separate counts for
exact zeros, values nearer zero than 2**MIN_EXP, values beyond 2**MAX_EXP (infinities too) and
NaN. Fixed bins make histograms exactly mergeable (add the counts) across batches and processes,
and memory is the same whatever the number of values: about 200 KB per histogram.

Relative resolution is what activations need: their bulk sits within a small range around the
centre while outliers reach thousands, and quantiles of ``|x - m|`` are needed at a few percent
of the bulk's scale. Within a bin, values are taken as uniformly spread (linear interpolation
of the CDF); exact zeros are a point mass.
"""

from __future__ import annotations

import math

import numpy as np

MANTISSA_BITS = 7
MIN_EXP = -48
MAX_EXP = 48
_SHIFT = 23 - MANTISSA_BITS
_PER_OCTAVE = 1 << MANTISSA_BITS
_K_LO = (127 + MIN_EXP) << MANTISSA_BITS  # first in-range bin key
_K_HI = (127 + MAX_EXP) << MANTISSA_BITS  # one past the last
NBINS = _K_HI - _K_LO  # in-range bins per sign
# Layout of the count vector: [neg side (NBINS+2) | pos side (NBINS+2) | zero | nan];
# each side: [underflow, NBINS bins, overflow] in increasing |x|.
_SIDE = NBINS + 2
_ZERO = 2 * _SIDE
_NAN = _ZERO + 1
SIZE = _NAN + 1


def _magnitude_edges() -> np.ndarray:
    """|x| edges of the side layout: underflow [0, 2^MIN_EXP), bins, overflow [2^MAX_EXP, +inf)."""
    k = np.arange(_K_LO, _K_HI + 1, dtype=np.int64)
    e = (k >> MANTISSA_BITS) - 127
    frac = 1.0 + (k & (_PER_OCTAVE - 1)) / _PER_OCTAVE
    inner = np.ldexp(frac, e.astype(np.int32))
    return np.concatenate([[0.0], inner, [np.inf]])


_MAG = _magnitude_edges()  # NBINS + 3 edges for NBINS + 2 intervals


def bin_counts(x: np.ndarray) -> np.ndarray:
    """Counts of an array's values in the fixed layout (length SIZE, int64).

    One pass: a bincount of the top 16 bits of each float (sign, exponent, 7 mantissa bits),
    folded into the layout; exact zeros and NaN, which share keys with their neighbours, are
    counted separately only when those keys occur.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.zeros(SIZE, dtype=np.int64)
    if x.size == 0:
        return out
    raw = np.bincount(x.view(np.uint32) >> np.uint32(16), minlength=1 << 16).astype(np.int64)
    inf_key = 0xFF << MANTISSA_BITS  # keys >= this: inf or NaN
    nan_total = 0
    if raw[inf_key : 1 << 15].any() or raw[(1 << 15) + inf_key :].any():
        nan_total = int(np.count_nonzero(np.isnan(x)))
        for base in (0, 1 << 15):
            sure = int(raw[base + inf_key + 1 : base + (1 << 15)].sum())  # mantissa bits set above bit 16
            raw[base + inf_key + 1 : base + (1 << 15)] = 0
            nan_total -= sure
            out[_NAN] += sure
        for base in (0, 1 << 15):  # NaN with a small payload share the key of infinity
            take = min(nan_total, int(raw[base + inf_key]) - int(np.count_nonzero(x == (np.inf if base == 0 else -np.inf))))
            take = max(take, 0)
            raw[base + inf_key] -= take
            out[_NAN] += take
            nan_total -= take
    zeros = 0
    if raw[0] or raw[1 << 15]:
        zeros = int(np.count_nonzero(x == 0))
        out[_ZERO] = zeros
        take = min(zeros, int(raw[0]))
        raw[0] -= take
        raw[1 << 15] -= zeros - take
    for base, side in ((1 << 15, 0), (0, _SIDE)):  # negative keys -> side 0, positive -> side 1
        k = raw[base : base + (1 << 15)]
        out[side] = k[:_K_LO].sum()
        out[side + 1 : side + 1 + NBINS] = k[_K_LO:_K_HI]
        out[side + NBINS + 1] = k[_K_HI:].sum()
    return out


class Histogram:
    """A mergeable histogram of float values with fixed relative-width bins (see module doc)."""

    __slots__ = ("counts", "_cache")

    def __init__(self, counts: np.ndarray | None = None):
        self._cache = None
        self.counts = np.zeros(SIZE, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        if self.counts.shape != (SIZE,):
            raise ValueError(f"histogram counts must have length {SIZE}")

    # -- building
    def add(self, x: np.ndarray) -> "Histogram":
        self.counts += bin_counts(x)
        self._cache = None
        return self

    def merge(self, other: "Histogram") -> "Histogram":
        self.counts += other.counts
        self._cache = None
        return self

    def copy(self) -> "Histogram":
        return Histogram(self.counts.copy())

    @property
    def total(self) -> int:
        """Number of values seen, NaN included."""
        return int(self.counts.sum())

    @property
    def nan(self) -> int:
        return int(self.counts[_NAN])

    @property
    def zeros(self) -> int:
        return int(self.counts[_ZERO])

    # -- continuous view: the CDF as a piecewise-linear part plus point masses
    def _model(self):
        """(knots, cumulative counts at knots, point positions, cumulative point counts, n)."""
        if self._cache is None:
            self._cache = self._build_model()
        return self._cache

    def _build_model(self):
        neg = self.counts[:_SIDE][::-1].astype(np.float64)  # from -inf towards 0
        pos = self.counts[_SIDE : 2 * _SIDE].astype(np.float64)
        lo = np.concatenate([-_MAG[1:][::-1], _MAG[:-1]])
        hi = np.concatenate([-_MAG[:-1][::-1], _MAG[1:]])
        c = np.concatenate([neg, pos])
        finite = np.isfinite(lo) & np.isfinite(hi)
        # Overflow bins are open-ended: a point mass at their finite edge. Exact zeros: a point at 0.
        pts = np.concatenate([np.where(np.isfinite(lo[~finite]), lo[~finite], hi[~finite]), [0.0]])
        pc = np.concatenate([c[~finite], [float(self.zeros)]])
        order = np.argsort(pts, kind="stable")
        pts, pc = pts[order], pc[order]
        keep = finite & (c > 0)
        lo, hi, c = lo[keep], hi[keep], c[keep]
        knots = np.empty(2 * lo.size)
        knots[0::2], knots[1::2] = lo, hi
        cum = np.concatenate([[0.0], np.cumsum(c)])
        fk = np.empty(2 * lo.size)
        fk[0::2], fk[1::2] = cum[:-1], cum[1:]
        n = float(c.sum() + pc.sum())
        return knots, fk, pts, np.cumsum(pc), n

    def _count_below(self, x: np.ndarray, inclusive: bool) -> np.ndarray:
        knots, fk, pts, pcum, _ = self._model()
        cont = np.interp(x, knots, fk) if knots.size else np.zeros_like(x)
        j = np.searchsorted(pts, x, side="right" if inclusive else "left")
        points = np.where(j > 0, pcum[np.maximum(j - 1, 0)], 0.0)
        return cont + points

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        """Fraction of the non-NaN values <= t (interpolated within bins; zeros a point mass)."""
        t = np.asarray(t, dtype=np.float64)
        n = self._model()[4]
        if n == 0:
            return np.zeros_like(t)
        return self._count_below(t, True) / n

    def mass_within(self, m: float, t: np.ndarray | float) -> np.ndarray:
        """Fraction of non-NaN values with |x - m| <= t: the sparsity that (m, t) gives."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        n = self._model()[4]
        if n == 0:
            return np.zeros_like(t)
        return (self._count_below(m + t, True) - self._count_below(m - t, False)) / n

    def quantile(self, q: float | np.ndarray) -> np.ndarray | float:
        """Value x with cdf(x) = q (interpolated within bins), NaN when empty."""
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        knots, fk, pts, pcum, n = self._model()
        if n == 0:
            out = np.full(qs.shape, np.nan)
        else:
            # Merge both parts into one monotone step/linear function sampled at knots and points.
            xs = np.concatenate([knots, pts, pts])
            xs.sort(kind="stable")
            f_right = self._count_below(xs, True)
            f_left = self._count_below(xs, False)
            # At each x the function jumps from f_left to f_right: interleave to a monotone curve.
            xx = np.repeat(xs, 2)
            ff = np.empty(2 * xs.size)
            ff[0::2], ff[1::2] = f_left, f_right
            ff = np.maximum.accumulate(ff)
            target = qs * n
            j = np.clip(np.searchsorted(ff, target, side="left"), 0, ff.size - 1)
            jm = np.maximum(j - 1, 0)
            span = ff[j] - ff[jm]
            w = np.where(span > 0, (target - ff[jm]) / np.where(span > 0, span, 1), 1.0)
            out = xx[jm] + np.clip(w, 0, 1) * (xx[j] - xx[jm])
        return out if np.ndim(q) else float(out[0])

    def threshold(self, sparsity: float, offset: float = 0.0) -> float:
        """tau = quantile(|x - offset|, sparsity): the least t with mass_within(offset, t) >= sparsity.

        mass_within(offset, t) is piecewise linear in t with breakpoints at the distances from
        ``offset`` to every bin edge and point mass, so the answer is exact for the histogram.
        """
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        knots, _, pts, _, n = self._model()
        if sparsity == 0.0 or n == 0:
            return 0.0
        ts = np.unique(np.abs(np.concatenate([[offset], knots, pts]) - offset))
        mass = np.maximum.accumulate(self.mass_within(offset, ts))
        j = int(np.searchsorted(mass, sparsity - 1e-12, side="left"))
        if j == 0:
            return 0.0
        if j >= ts.size:
            return float(ts[-1])
        # Between breakpoints the mass grows linearly up to its left limit at ts[j], then may jump
        # (a point mass at distance ts[j]): then ts[j] itself is the answer.
        m0 = mass[j - 1]
        m1 = max(float(self._mass_strictly_within(offset, ts[j])), m0)
        if sparsity > m1:
            return float(ts[j])
        w = 1.0 if m1 <= m0 else (sparsity - m0) / (m1 - m0)
        return float(ts[j - 1] + np.clip(w, 0.0, 1.0) * (ts[j] - ts[j - 1]))

    def _mass_strictly_within(self, m: float, t: float) -> float:
        """Fraction with |x - m| < t (point masses at distance exactly t excluded)."""
        n = self._model()[4]
        if n == 0:
            return 0.0
        hi = self._count_below(np.array([m + t]), False)
        lo = self._count_below(np.array([m - t]), True)
        return float((hi - lo)[0] / n)

    def window_mean(self, lo: float, hi: float) -> float:
        """Mean of the non-NaN values in [lo, hi] (uniform within bins, point masses exact); NaN when
        the window holds none."""
        knots, fk, pts, pcum, n = self._model()
        if n == 0 or not hi >= lo:
            return float("nan")
        # continuous part: between consecutive breakpoints the density is constant, so each piece
        # contributes its mass times its midpoint
        xs = np.unique(np.clip(np.concatenate([[lo, hi], knots]), lo, hi))
        f = np.interp(xs, knots, fk) if knots.size else np.zeros_like(xs)
        dm = np.diff(f)
        total = float(dm.sum())
        moment = float((dm * 0.5 * (xs[1:] + xs[:-1])).sum())
        pc = np.diff(np.concatenate([[0.0], pcum]))
        inside = (pts >= lo) & (pts <= hi)
        total += float(pc[inside].sum())
        moment += float((pc[inside] * pts[inside]).sum())
        return moment / total if total > 0 else float("nan")

    def mode(self, bandwidth: float) -> float:
        """Peak of the density smoothed with a box kernel of half-width ``bandwidth``, searched
        between the 1st and 99th percentiles on a grid finer than the bandwidth."""
        lo_q, hi_q = self.quantile(np.array([0.01, 0.99]))
        if not (np.isfinite(lo_q) and np.isfinite(hi_q)) or hi_q <= lo_q or bandwidth <= 0:
            return float(self.quantile(0.5))
        step = min(bandwidth / 4, (hi_q - lo_q) / 400)
        grid = np.arange(lo_q, hi_q + step, step)
        mass = self.cdf(grid + bandwidth) - self.cdf(grid - bandwidth)
        best = np.flatnonzero(mass >= mass.max() * (1 - 1e-9))
        return float(grid[best].mean())  # centre of a flat top

    # -- serialisation: the non-empty span of each side
    def to_dict(self) -> dict:
        def span(arr: np.ndarray) -> dict:
            nz = np.flatnonzero(arr)
            if nz.size == 0:
                return {"start": 0, "counts": []}
            return {"start": int(nz[0]), "counts": arr[nz[0] : nz[-1] + 1].tolist()}

        return {
            "layout": f"f32-m{MANTISSA_BITS}-e{MIN_EXP}..{MAX_EXP}",
            "neg": span(self.counts[:_SIDE]),
            "pos": span(self.counts[_SIDE : 2 * _SIDE]),
            "zero": self.zeros,
            "nan": self.nan,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        if d.get("layout") != f"f32-m{MANTISSA_BITS}-e{MIN_EXP}..{MAX_EXP}":
            raise ValueError(f"unknown histogram layout {d.get('layout')!r}")
        counts = np.zeros(SIZE, dtype=np.int64)
        for side, base in (("neg", 0), ("pos", _SIDE)):
            s = d[side]
            vals = np.asarray(s["counts"], dtype=np.int64)
            start = int(s["start"])
            if start < 0 or start + vals.size > _SIDE or (vals < 0).any():
                raise ValueError("histogram counts out of range")
            counts[base + start : base + start + vals.size] = vals
        counts[_ZERO] = int(d["zero"])
        counts[_NAN] = int(d["nan"])
        return cls(counts)


def robust_scale(h: Histogram) -> float:
    """Interquartile range (a scale for bandwidths), or the 1-99 % range when the IQR is 0."""
    q = h.quantile(np.array([0.01, 0.25, 0.75, 0.99]))
    iqr = float(q[2] - q[1])
    if iqr > 0 and math.isfinite(iqr):
        return iqr
    return float(q[3] - q[0]) if math.isfinite(q[3] - q[0]) else 0.0


def fine_mode(h: Histogram) -> float:
    """The histogram's mode at a bandwidth of 1 % of its robust scale (the ``mode`` offset candidate)."""
    scale = robust_scale(h)
    return h.mode(scale / 100) if scale > 0 else float(h.quantile(0.5))


def balanced_centre(h: Histogram, sparsity: float, start: float = 0.0, iterations: int = 60) -> float:
    """The centre m whose dropped values average m itself: m = mean of x over |x - m| <= tau(m), with
    tau(m) the threshold giving ``sparsity`` (a mean shift with a box window that keeps the
    sparsity; from ``start``, until m moves by less than 1e-4 tau).

    Then the dropped parts of x - m average zero over the tensor, so dropping adds no error common
    to every token: a constant error at every token is a bias that the residual stream carries
    to every later layer, while zero-mean errors partly cancel. A centre picked by output error
    alone (mode, KDE mode, median) can sit off that point and add such a bias (docs/calibration.md).
    """
    if not 0.0 < sparsity < 1.0 or h.total - h.nan == 0:
        return float(start)
    m = float(start)
    for _ in range(iterations):
        tau = h.threshold(sparsity, m)
        new = h.window_mean(m - tau, m + tau)
        if not math.isfinite(new):
            break
        done = abs(new - m) <= 1e-4 * tau
        m = float(new)
        if done:
            break
    return m
