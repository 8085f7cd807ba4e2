"""Calibration: per sparsified input, a centre m and a threshold tau from activation statistics.

For each site (an input tensor shared by one or more target MatMuls) the calibration data flow
through onnxruntime once per pass; the site's values stream into a :class:`Histogram` and a
fixed-size reservoir of rows (memory independent of the number of tokens). Offset candidates come
from the histogram (mode of a fine histogram, mode of a smoother box-kernel density, median,
zero); each is scored by the relative error it causes at the layer's output on the reservoir rows,
``||drop(x - m, tau_m) @ W|| / ||x @ W||`` with ``tau_m = quantile(|x - m|, s)``, at a grid of
sparsities; the site's centring (stats.CENTRINGS, from the calibration method: methods.py) then
picks the centre at the SPEC's sparsity, by default the best candidate only where it cuts that
error by a clear margin, else zero.

Weight-aware thresholds (method ``wina``, scap_onnx.calibration.weighting): the targets' weight row
norms are read before the pass, and a second histogram per site streams the scores (x - m) * w. The
centre is decided from the first histogram after the pass; the pass scores at centre 0, so a site
whose centre comes out non-zero gets one more pass over the data, for those sites only.

Upstream-aware calibration (``passes`` >= 2): pass p runs the model with every site already
sparsified with the thresholds and offsets of pass p-1 (in standard ONNX ops), so each site's
statistics are those of the inputs it will see at run time. A site's input depends only on sites
upstream of it, so after p passes the first p-1 layers are exactly calibrated layer by layer; in
practice the thresholds settle after one refinement pass. Measured on SmolLM2 (docs/calibration.md):
with 2 passes, held-out text of the calibration domain reaches the targets within 0.1 point at every
layer (1 pass: about 1 point off in deep layers). The default method calibrates in one pass all the
same: at equal measured sparsity one pass lost no quality (docs/calibration.md, issue 16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..graph.genai import resolve_model
from ..errors import ScapError
from ..graph.model_io import ModelSource
from ..graph.targets import Site, find_targets, group_sites
from ..op.contract import Sparsification
from ..op.nbits import weight_kn
from ..op.session import base_options
from ..progress import NullProgress, Progress
from .budget import default_target, parse_budget
from .sensitivity import PlanProbe, apply_checked_budget
from .capture import Capture, Upstream
from .data import DataReader, open_data
from .histogram import Histogram, fine_mode, robust_scale
from .methods import get_method
from .spec import Spec, parse_spec, shared_sparsity
from .stats import CANDIDATE_ORDER, SiteStats, Stats
from .weighting import channel_norms, scores

#: Sparsities at which candidate errors are stored (so other SPECs re-target without calibrating, and
#: --budget allocates from each site's error curve: steps of 0.05, calibration.budget).
ERROR_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_SAMPLE_ROWS = 128
_ELEM = {"float32": 1, "float16": 10}


class RowReservoir:
    """A uniform sample of at most ``size`` rows of a stream of [..., K] arrays (algorithm R)."""

    def __init__(self, k: int, size: int, seed: int = 0):
        self.rows = np.empty((size, k), dtype=np.float32)
        self.size = size
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        start = self.seen
        fill = min(max(self.size - start, 0), n)
        if fill:
            self.rows[start : start + fill] = x[:fill]
        if n > fill:
            idx = np.arange(start + fill, start + n)
            slots = (self.rng.random(idx.size) * (idx + 1)).astype(np.int64)
            take = np.flatnonzero(slots < self.size)
            for t in take:  # later rows overwrite earlier ones, as the sequential algorithm does
                self.rows[slots[t]] = x[fill + t]
        self.seen += n

    @property
    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, self.size)]


def offset_candidates(h: Histogram) -> dict[str, float]:
    """Centre candidates from a histogram, near-duplicates removed (earlier in CANDIDATE_ORDER kept)."""
    scale = robust_scale(h)
    raw = {"zero": 0.0, "median": float(h.quantile(0.5))}
    if scale > 0:
        raw["mode"] = fine_mode(h)
        raw["kde"] = h.mode(scale / 10)
    out: dict[str, float] = {}
    tol = 1e-3 * scale if scale > 0 else 0.0
    for kind in CANDIDATE_ORDER:
        v = raw.get(kind)
        if v is None or not np.isfinite(v):
            continue
        if all(abs(v - w) > tol for w in out.values()):
            out[kind] = float(v)
    return out


def output_errors(
    sample: np.ndarray,
    weights: list[np.ndarray],
    h: Histogram,
    candidates: dict[str, float],
    sparsities: list[float],
) -> dict[str, list[float]]:
    """Mean over the site's weights of ||drop(x - m) @ W|| / ||x @ W|| per candidate and sparsity.

    The dropped parts for all sparsities of a candidate go through one GEMM per weight; a weight
    wider than tall is applied through its Gram matrix W W^T (||d W||^2 = d W W^T d^T), cheaper then.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    r = x.shape[0]
    grams = [w @ w.T if w.shape[1] > w.shape[0] else None for w in weights]

    def sq_norms(d: np.ndarray, w: np.ndarray, g: np.ndarray | None) -> np.ndarray:
        y = d @ g if g is not None else d @ w
        return ((y * d).sum(1) if g is not None else (y * y).sum(1)).astype(np.float64)

    dense = [float(np.sqrt(max(sq_norms(x, w, g).sum(), 0.0))) for w, g in zip(weights, grams)]
    out: dict[str, list[float]] = {}
    for kind, m in candidates.items():
        d = x - np.float32(m)
        ad = np.abs(d)
        blocks = np.empty((len(sparsities) * r, x.shape[1]), dtype=np.float32)
        for i, sp in enumerate(sparsities):
            tau = np.float32(h.threshold(sp, m))
            np.multiply(d, ad <= tau, out=blocks[i * r : (i + 1) * r])
        errs = np.zeros(len(sparsities))
        for w, g, nd in zip(weights, grams, dense):
            sq = sq_norms(blocks, w, g).reshape(len(sparsities), r).sum(1)
            errs += np.sqrt(np.maximum(sq, 0.0)) / nd if nd > 0 else 0.0
        out[kind] = (errs / max(len(weights), 1)).tolist()
    return out


@dataclass
class PassResult:
    histograms: dict[str, Histogram]
    samples: dict[str, np.ndarray]
    score_histograms: dict[str, Histogram]  # sites scored: histogram of (x - m) * w
    tokens: int
    batches: int
    seconds: float


def upstream_entries(site: SiteStats, spec: Spec) -> list[Upstream]:
    """How the next pass sparsifies a decided site: one entry per threshold its targets get (targets sharing the input may ask for different
    sparsities, and then read differently sparsified copies, as in the rewritten model)."""
    by_threshold: dict[float, list[str]] = {}
    for t in site.targets:
        wanted = spec.sparsity(t["role"])
        if wanted is not None:
            tau = site.threshold_for(wanted, site.offset, site.sparsity, site.threshold)
            by_threshold.setdefault(tau, []).append(t["name"])
    return [Upstream(site.input, Sparsification(tau, site.offset, site.token_scaled, site.threshold_scale),
                     _ELEM[site.dtype], names)
            for tau, names in by_threshold.items()]


def _run_pass(source, sites, data, sparsify, sample_rows, progress, label, options, providers,
              token_scaled: set[str], scored: dict[str, tuple[float, np.ndarray]]) -> PassResult:
    """One run over the data; ``scored``: site input -> (centre, channel norms) whose scores to histogram."""
    capture = Capture(source, {s.input: _ELEM[s.dtype] for s in sites}, sparsify, options, providers, token_scaled)
    hists = {s.input: Histogram() for s in sites}
    score_hists = {name: Histogram() for name in scored if name in hists}
    res = {s.input: RowReservoir(s.k, sample_rows, seed=i) for i, s in enumerate(sites)}
    t0 = time.perf_counter()
    tokens = batches = 0
    task = progress.task(label, data.max_tokens if data.is_text else None)
    try:
        for feeds, n_tok in data.batches():
            outs = capture.run(feeds)
            for name, arr in outs.items():
                hists[name].add(arr)
                res[name].add(arr)
                if name in score_hists:
                    score_hists[name].add(scores(arr, *scored[name]))
            del outs
            tokens += n_tok
            batches += 1
            task.advance(n_tok)
    finally:
        task.close()
    del capture
    return PassResult(hists, {k: r.sample.copy() for k, r in res.items()}, score_hists, tokens, batches,
                      time.perf_counter() - t0)


def _decide(site: Site, hist: Histogram, sample: np.ndarray, weights, sparsity: float | None, grid: list[float],
            token_scaled: bool, centring: str):
    cands = offset_candidates(hist)
    errs = output_errors(sample, weights, hist, cands, grid) if grid and sample.size else {}
    st = SiteStats(
        input=site.input,
        targets=[{k: v for k, v in t.to_dict().items()} for t in site.targets],
        dtype=site.dtype,
        histogram=hist,
        candidates=cands,
        error_grid=list(grid),
        errors=errs,
        sparsity=sparsity,
        token_scaled=token_scaled,
        centring=centring,
    )
    if sparsity is not None:
        st.offset_kind, st.offset = st.choose_offset(sparsity)
        st.threshold = hist.threshold(sparsity, st.offset)
    return st


def calibrate(
    model: str | Path,
    data: str | Path | Sequence[str | Path] | DataReader,
    *,
    sparsity: str | float | Spec | None = None,
    targets: str | None = None,
    tokenizer: str | Path | None = None,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 1,
    sampling: str = "spread",
    passes: int | None = None,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    progress: Progress | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    token_scaled_roles: Sequence[str] | None = None,
    method: str | None = None,
    budget: float | None = None,
) -> Stats:
    """Calibrate ``model`` on ``data`` for ``sparsity`` (a SPEC) and return the statistics.

    ``data``: a text file or .npz, or a list of text files whose windows are mixed (``max_tokens``
    split evenly between them).

    ``passes``: 1 calibrates on dense activations; each further pass recalibrates with all
    upstream sites sparsified as the previous pass decided.

    ``token_scaled_roles``: sites read by a target of these roles get thresholds relative to each
    token's norm (scap_onnx.op.token_norm); () keeps every threshold static.

    ``method``: a name of scap_onnx.calibration.methods.METHODS (default DEFAULT_METHOD); it sets
    ``passes``, ``max_tokens``, ``token_scaled_roles`` where they are None, and the centring.

    ``budget``: the share of the targets' weight bytes to skip; every site's sparsity is then
    allocated from its error curve (calibration.budget) and checked against the uniform plan
    (calibration.sensitivity) rather than taken from ``sparsity``, which then only sets what the
    upstream-aware passes before the last one sparsify (default: B everywhere). Neither given:
    calibration.budget.default_target.
    """
    chosen_method = get_method(method)
    sparsity, budget = default_target(sparsity, budget, chosen_method.weighted)
    if budget is not None:
        budget = parse_budget(budget)
    if sparsity is None:
        sparsity = budget
    passes = chosen_method.passes if passes is None else passes
    max_tokens = chosen_method.max_tokens if max_tokens is None else max_tokens
    if token_scaled_roles is None:
        token_scaled_roles = chosen_method.token_scaled_roles
    spec = parse_spec(sparsity)
    model = resolve_model(model)  # an onnxruntime-genai folder: its decoder model
    if passes < 1:
        raise ScapError("--passes must be at least 1")
    if sample_rows < 1:
        raise ScapError("--sample-rows must be at least 1")
    progress = progress or NullProgress()
    started = time.perf_counter()
    with ModelSource(model) as source:
        chosen = find_targets(source.proto, targets)
        sites = group_sites(chosen)
        scaled = {s.input for s in sites if any(t.role in token_scaled_roles for t in s.targets)}
        if isinstance(data, DataReader):
            ds = data
        else:
            ds = open_data(data, source.proto, model, tokenizer=tokenizer, seq_len=seq_len,
                           max_tokens=max_tokens, batch_size=batch_size, sampling=sampling)
        site_sparsity = {}
        for s in sites:
            site_sparsity[s.input] = shared_sparsity([spec.sparsity(t.role) for t in s.targets])
        def weights_of(site: Site) -> list[np.ndarray]:
            # read when needed, one site at a time: never all weights in Python at once
            # (float32 [K, N]: a MatMulNBits weight dequantised)
            return [weight_kn(t, source.weight) for t in site.targets]

        # weight-aware: w_k per site, read one site at a time before the passes (None: unweighted)
        norms = {s.input: channel_norms(weights_of(s)) for s in sites} if chosen_method.weighted else {}
        sparsify = None
        result: PassResult | None = None
        history = []
        decided: dict[str, SiteStats] = {}
        for p in range(1, passes + 1):
            result = _run_pass(source, sites, ds, sparsify, sample_rows, progress,
                               f"calibrate pass {p}/{passes}", base_options(threads), providers, scaled,
                               {k: (0.0, w) for k, w in norms.items()})
            last = p == passes
            decided = {}
            for s in sites:
                sp = site_sparsity[s.input]
                if last:
                    grid = sorted(set(ERROR_GRID) | ({sp} if sp is not None else set()))
                else:
                    grid = [sp] if sp is not None else []
                w = weights_of(s) if grid else []
                decided[s.input] = _decide(s, result.histograms[s.input], result.samples[s.input], w, sp, grid,
                                           s.input in scaled, chosen_method.centring)
                del w
            if norms:
                _add_scores(decided, result, norms, lambda todo: _run_pass(
                    source, todo, ds, sparsify, sample_rows, progress, f"score pass {p}/{passes}",
                    base_options(threads), providers, scaled,
                    {s.input: (decided[s.input].offset, norms[s.input]) for s in todo}), sites, site_sparsity)
            history.append({
                "pass": p, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                "thresholds": {k: v.threshold for k, v in decided.items() if v.sparsity is not None},
            })
            if not last:
                sparsify = [entry for st in decided.values() if st.sparsity is not None
                            for entry in upstream_entries(st, spec)]
        assert result is not None
        stats = Stats(
            model={"path": str(Path(model).resolve()), "fingerprint": source.fingerprint,
                   "targets": len(chosen), "sites": len(sites)},
            calibration={
                "spec": str(spec), "data": ds.describe(), "tokens": result.tokens, "batches": result.batches,
                "method": chosen_method.name, "centring": chosen_method.centring,
                "passes": passes, "sample_rows": sample_rows, "targets": targets,
                "token_scaled_roles": list(token_scaled_roles),
                "seconds": round(time.perf_counter() - started, 2),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "scap_onnx": __version__,
                "threshold_change": _threshold_change(history),
            },
            sites=[decided[s.input] for s in sites],
        )
        if budget is not None:
            apply_checked_budget(stats, PlanProbe(stats.sites, source, ds, threads, providers), budget,
                                 progress=progress)
    return stats


def _add_scores(decided: dict[str, SiteStats], result: PassResult, norms: dict[str, np.ndarray], rerun,
                sites: list[Site], site_sparsity: dict) -> None:
    """Attach the weight-aware scores to the decided sites and set their thresholds from them. Sites
    whose centre is not 0 are scored again at their centre (``rerun(sites)``: a pass over the data)."""
    hists = dict(result.score_histograms)
    todo = [s for s in sites if decided[s.input].offset != 0.0]
    if todo:
        hists.update(rerun(todo).score_histograms)
    for s in sites:
        st = decided[s.input]
        st.channel_norms = norms[s.input].tolist()
        st.score_histogram = hists[s.input]
        st.score_centre = st.offset
        if site_sparsity[s.input] is not None:
            st.threshold = st.tau(site_sparsity[s.input], st.offset)


def _threshold_change(history: list[dict]) -> list[float]:
    """Median relative change of thresholds between consecutive passes (convergence record)."""
    out = []
    for a, b in zip(history, history[1:]):
        ch = [abs(b["thresholds"][k] - v) / v for k, v in a["thresholds"].items() if v > 0 and k in b["thresholds"]]
        out.append(round(float(np.median(ch)), 6) if ch else 0.0)
    return out
