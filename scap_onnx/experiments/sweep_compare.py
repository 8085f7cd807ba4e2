"""The sweep's comparisons: each method's quality against TEAL-style's at the same measured share
of FC bytes skipped (TEAL interpolated between its points and the dense point)."""

from __future__ import annotations

import numpy as np


def interp_quality(rows: list[dict], method: str, sparsity: float) -> float | None:
    """Quality of ``method`` at a measured sparsity, linear between its points (dense at 0)."""
    pts = sorted([(0.0, 0.0)] + [(r["sparsity"], r["quality"]) for r in rows
                                 if r["method"] == method and r.get("quality") is not None
                                 and r.get("sparsity") is not None])
    xs = [p[0] for p in pts]
    if len(pts) < 2 or not (xs[0] <= sparsity <= xs[-1]):
        return None
    return float(np.interp(sparsity, xs, [p[1] for p in pts]))


def compare(rows: list[dict], levels: list[float]) -> list[dict]:
    """Per level: TEAL-style vs SCAP mode-centred quality loss (lower is better), at the same
    nominal level and at the same measured sparsity (TEAL interpolated between its points)."""
    out = []
    by = {(r["method"], r["level"]): r for r in rows}
    for lv in levels:
        t, s = by.get(("teal", lv)), by.get(("scap-mode", lv))
        if not t or not s or t.get("quality") is None or s.get("quality") is None:
            continue
        same = interp_quality(rows, "teal", s["sparsity"]) if s.get("sparsity") is not None else None
        if same is not None:  # the fair comparison: equal measured sparsity
            ok = s["quality"] <= same
        else:  # SCAP beyond TEAL's sparsest point: better quality at higher sparsity
            ok = s["quality"] <= t["quality"] and (s["sparsity"] or 0) >= (t["sparsity"] or 0)
        out.append({"level": lv, "teal_quality": t["quality"], "scap_mode_quality": s["quality"],
                    "teal_sparsity": t["sparsity"], "scap_mode_sparsity": s["sparsity"],
                    "teal_quality_at_scap_sparsity": same, "scap_at_or_above_baseline": bool(ok)})
    return out


def against_baseline(rows: list[dict], baseline: str = "teal") -> list[dict]:
    """Every point of the other methods against ``baseline`` at the same measured sparsity (the
    baseline interpolated between its points and dense): its quality, the baseline's there and their
    ratio (lower is better; None beyond the baseline's points)."""
    out = []
    for r in rows:
        if r["method"] in ("dense", baseline) or r.get("quality") is None or r.get("sparsity") is None:
            continue
        base = interp_quality(rows, baseline, r["sparsity"])
        ratio = r["quality"] / base if base not in (None, 0.0) else None
        out.append({"method": r["method"], "level": r["level"], "sparsity": r["sparsity"], "quality": r["quality"],
                    "baseline": baseline, "baseline_quality": base, "ratio": ratio})
    return out
