"""Byte-budget allocation (``--budget B``): the sparsity of every site chosen so that the weight
bytes skipped per token reach B at the least output error.

Each site (an input shared by one or more target MatMuls) has an error curve in stats.json: the
relative output error ``||drop(x - m) @ W|| / ||x @ W||`` of its targets on the calibration rows,
at a grid of sparsities, for each centre candidate (calibrator.output_errors). With the centre the
site's centring picks at each sparsity (the default method's ``margin`` rule), that is e_s(p), and
skipping a share p of the site's inputs skips p * b_s bytes (b_s: its targets' weight bytes).

The allocation minimises sum_s (g_s e_s(p_s))^2 subject to sum_s p_s b_s = B sum_s b_s, g_s the
site's gain: how much of its layer error reaches the model's output, measured once per site
(calibration.sensitivity; stats without gains are refused). Layer errors alone are a poor currency: the same
relative error costs far more in the first and last layers (docs/results.md). TEAL's greedy search
raises, in small steps, the sparsity of whichever layer adds the least error per byte; here each
curve is measured once, and the steps are the segments of its lower convex hull over (bytes
skipped, cost): taking the segments of all sites in order of cost per byte until the budget is
met is the Lagrangian optimum on the hulls (equal marginal cost per byte everywhere), free of a
step size. The last segment is taken in part. Sites allocated 0 stay dense.

B is a share of the calibrated targets' weight bytes (lm_head and other non-targets are neither
counted nor skipped), on the calibration data; measured on other text the share moves a little,
as a uniform SPEC's does.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from ..errors import ScapError
from ..graph.targets import Target
from .stats import SiteStats, Stats

_TARGET_FIELDS = {f.name for f in fields(Target)}
#: What `calibrate` and `rewrite` skip when given neither a SPEC nor a budget: 40 % of the targets'
#: weight bytes. SmolLM2: 32 % of all FC bytes (lm_head included) for +4.1 % perplexity on fortunes
#: and +10.2 % on KJV, where uniform 0.4 reads +8.7 % and +16.9 % and the old default SPEC 0.5
#: +42 % and +55 % (docs/results.md).
DEFAULT_BUDGET = 0.4


def parse_budget(value) -> float:
    """B as a float in (0, 1); ScapError (one line) for anything else."""
    try:
        b = float(value)
    except (TypeError, ValueError):
        raise ScapError(f"--budget {value!r} is not a number (a share of FC weight bytes to skip, e.g. 0.35)") from None
    if not (0.0 < b < 1.0) or math.isnan(b):
        raise ScapError(f"--budget {value!r} is outside (0, 1): it is the share of FC weight bytes to skip per token")
    return b


def default_target(sparsity, budget, weighted: bool = False) -> tuple:
    """(SPEC, budget) to calibrate for, from those asked (either may be None): neither asked, the
    budget DEFAULT_BUDGET, or for a weighted method (``wina``: its error curves are those of the
    unweighted rule, so they cannot steer an allocation) the uniform SPEC DEFAULT_BUDGET."""
    if sparsity is None and budget is None:
        return (DEFAULT_BUDGET, None) if weighted else (None, DEFAULT_BUDGET)
    return sparsity, budget


def site_bytes(site: SiteStats) -> int:
    """Weight bytes of the site's targets (Target.weight_bytes: codes of quantized weights)."""
    return sum(Target(**{k: v for k, v in t.items() if k in _TARGET_FIELDS}).weight_bytes for t in site.targets)


def error_curve(site: SiteStats, centring: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sparsities, errors) from 0 (error 0) to the grid's end, with the centre ``centring`` (default:
    the site's own) picks at each sparsity (its error curve; the zero candidate's where that centre
    has none)."""
    grid = np.asarray(site.error_grid, dtype=np.float64)
    if grid.size == 0 or not site.errors:
        raise ScapError(f"stats for {site.input!r} hold no error curve; recalibrate to use --budget")
    errs = []
    for p in grid:
        kind, _ = site.choose_offset(float(p), centring)
        curve = site.errors.get(kind, site.errors.get("zero"))
        errs.append(float(curve[int(np.flatnonzero(grid == p)[0])]) if curve is not None else math.inf)
    return np.concatenate([[0.0], grid]), np.concatenate([[0.0], errs])


def site_cost(site: SiteStats, errors: np.ndarray) -> np.ndarray:
    """What the allocation sums over sites: (g_s e_s)^2, the site's share of the squared error at the
    model's output (calibration.sensitivity)."""
    if site.gain is None:
        raise ScapError(f"stats for {site.input!r} hold no gain: calibrate with --budget (it measures each "
                        "input's effect on the model's output) before rewriting with --budget")
    return (errors * site.gain) ** 2


def lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (x[0] included)."""
    hull: list[int] = []
    for i in range(x.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord a-i: not on the lower hull
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(sites: list[SiteStats], budget: float, centring: str | None = None) -> dict[str, float]:
    """Site input -> sparsity (0: dense) whose bytes skipped are ``budget`` of the sites' bytes, at
    the least summed cost (site_cost) on the lower hulls of the curves (see the module doc)."""
    budget = parse_budget(budget)
    nbytes = {s.input: float(site_bytes(s)) for s in sites}
    total = sum(nbytes.values())
    segments = []  # (cost per byte, site, p from, p to)
    reach = 0.0
    for s in sites:
        p, e = error_curve(s, centring)
        ok = np.isfinite(e)
        p, e = p[ok], site_cost(s, e[ok])
        h = lower_hull(p, e)
        reach += p[h[-1]] * nbytes[s.input]
        for a, b in zip(h, h[1:]):
            segments.append(((e[b] - e[a]) / ((p[b] - p[a]) * max(nbytes[s.input], 1.0)), s.input, p[a], p[b]))
    if total <= 0 or reach < budget * total * (1 - 1e-9):
        raise ScapError(f"--budget {budget:g} is beyond what the stored error curves reach "
                        f"({reach / max(total, 1.0):.3f} of the weight bytes)")
    segments.sort(key=lambda seg: seg[0])  # a site's segments come in order: its hull is convex
    out = {s.input: 0.0 for s in sites}
    need = budget * total
    for _, name, p0, p1 in segments:
        if need <= 0:
            break
        step = min(p1 - p0, need / nbytes[name])
        out[name] = p0 + step
        need -= step * nbytes[name]
    return out


def apply_allocation(stats: Stats, alloc: dict[str, float], budget: float, centring: str | None = None) -> Stats:
    """Set every site's sparsity (``alloc``: site input -> sparsity, 0: dense), centre (by
    ``centring``, default the site's own) and threshold (in place; returns ``stats``) and record the
    budget in its calibration, so that ``stats.plan()`` and ``rewrite --stats`` follow it."""
    for s in stats.sites:
        p = alloc[s.input]
        if p <= 0.0:
            s.sparsity, s.offset, s.offset_kind, s.threshold = None, 0.0, "zero", 0.0
            continue
        s.sparsity = float(round(p, 6))
        s.offset_kind, s.offset = s.choose_offset(s.sparsity, centring)
        if centring is not None and not s.weighted:
            s.centring = centring
        s.threshold = s.tau(s.sparsity, s.offset)
    stats.calibration["budget"] = float(budget)
    stats.calibration.pop("budget_check", None)  # that of another allocation, if any
    return stats


def apply_budget(stats: Stats, budget: float, centring: str | None = None) -> Stats:
    """:func:`apply_allocation` of :func:`allocate`, unchecked (calibration.sensitivity's
    apply_checked_budget also measures it against the uniform plan)."""
    return apply_allocation(stats, allocate(stats.sites, budget, centring), budget, centring)


def planned_bytes_share(stats: Stats) -> float:
    """Share of the sites' weight bytes the stored sparsities skip (on the calibration data)."""
    nbytes = {s.input: site_bytes(s) for s in stats.sites}
    total = sum(nbytes.values())
    return sum((s.sparsity or 0.0) * nbytes[s.input] for s in stats.sites) / max(total, 1)
