"""Sparsity / quality / speed sweep: calibrate once, rewrite at several levels and methods, validate each.

    scap-onnx sweep MODEL.onnx --data CAL.txt [--eval-data EVAL.txt] [--levels 0.3,0.4,0.5,0.6,0.7] -o DIR

Methods (each at every level s, all targets but lm_head):

``teal``       TEAL-style baseline: zero-centred static thresholds (offset 0), the same sparsity s
               for every role, from activations of the dense model (one calibration pass).
``oneshot``    the one-shot of issue 16: the TEAL-style statistics (dense activations, static), the
               histogram's mode as the centre of down projections' inputs, zero elsewhere.
``scap-zero``  SCAP without mode-centering: offset 0, sparsity s for every role, thresholds from
               upstream-aware calibration (the later passes see upstream targets sparsified),
               token-scaled for o and down (scap_onnx.op.token_norm), the calibration of method
               ``scap-search`` (scap_onnx.calibration.methods), the default until issue 16.
``scap-mode``  SCAP with mode-centering as it was the default until issue 16: as scap-zero, but each
               input's centre is the calibrated candidate (histogram mode, KDE mode, median or zero)
               with the least output error.
``scap-role``  SCAP per role: mode-centred, with per-role sparsities in the proportions of the
               paper's Llama-2 setting (up/gate 0.35 : down 0.55, attention at the mean), scaled
               so that the weight-byte-weighted mean sparsity over the targets is s.
``default``    the default calibration method (``calibrate`` without ``--method``), its statistics
               and centring.
``budget``     the default method's statistics and centring, each input's sparsity allocated from its
               error curve and gain so that the targets' weight bytes skipped are s, as
               ``calibrate --budget s`` does (scap_onnx.calibration.budget; gains measured at each
               level, the allocation checked against the uniform plan): what ``calibrate`` does
               with neither a SPEC nor a budget, at s = 0.4.
``wina``       weight-aware per-channel thresholds (``--method wina``; not in the default set: one
               more calibration).

Calibration happens once per kind of statistics: dense activations for ``teal`` and ``oneshot``
(1 pass, static), upstream-aware token-scaled for the SCAP methods (``--passes``, default 2), the
default method's own (shared with another kind when its settings are the same), each at the
middle level of the sweep; every point then takes its thresholds from the stored histograms
(stats.json keeps them), so the methods differ only in centring and sparsity allocation. The
dense model runs once over the evaluation data (its outputs are cached on disk for the whole
sweep); latency is measured for every point against the dense model, interleaved, as
`scap-onnx validate` does.

Output folder: ``sweep.json`` (format ``scap-onnx-sweep``), ``sweep.md`` (tables),
``pareto.png``, ``stats_<kind>.json`` (teal, scap, default), ``stats_budget_<level>.json`` (the
budget method's plans) and ``reports/<method>_<level>.json``
(+ .md) per point. ``sweep.json`` keys: ``model``, ``data`` (calibration), ``eval_data``,
``levels``, ``methods``, ``calibration`` (per stats kind: tokens, passes, spec, seconds),
``environment`` (as in validate), ``rows`` (one per point, the dense row first: ``method``,
``level``, ``spec``, ``sparsity`` (measured, share of FC weight bytes skipped),
``sparsity_targets`` (share of the rewritten MatMuls' bytes), ``roles`` (measured mean per role),
``quality`` (the y axis: perplexity change in % for causal LMs, 1 - mean cosine in % for
encoders), and the report's ``perplexity_dense`` / ``perplexity_sparse`` / ``top1_agreement`` /
``kl_mean`` / ``cosine_mean`` / ``cosine_min``, ``speedup`` (decode step, or one batch for
encoders), ``dense_tokens_per_s`` / ``sparse_tokens_per_s``, ``report``), ``comparison`` (per
level: teal vs scap-mode quality and whether SCAP is at or above the baseline), ``against_teal``
(every other point against TEAL-style at its measured sparsity: quality, TEAL's, ratio), ``seconds``.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from ..calibration.budget import apply_budget
from ..calibration.calibrator import calibrate
from ..calibration.data import open_data
from ..calibration.sensitivity import CHECK_RULE, CHECK_TOKENS, GAIN_TOKENS, MIXES, PlanProbe, apply_checked_budget
from ..calibration.methods import get_method
from ..calibration.spec import Spec
from ..calibration.stats import Stats, TargetPlan
from ..errors import ScapError
from ..evaluation.accuracy import DenseCache
from ..evaluation.options import ValidateOptions
from ..evaluation.report import write_report
from ..evaluation.validate import validate
from ..graph.model_io import ModelSource, load_proto
from ..passes.pipeline import rewrite_file
from ..progress import NullProgress, Progress
from .cached import reusable_stats
from .sweep_compare import against_baseline, compare
from .sweep_report import row_line, write_sweep

FORMAT = "scap-onnx-sweep"
VERSION = 1
#: method -> (kind of statistics, centring (stats.CENTRINGS; None: the statistics' own), allocation:
#: "uniform" (the level for every role), "role" (ROLE_PROFILE) or "budget" (calibration.budget))
METHOD_PLANS = {
    "teal": ("teal", "zero", "uniform"),
    "oneshot": ("teal", "mode-down", "uniform"),
    "scap-zero": ("scap", "zero", "uniform"),
    "scap-mode": ("scap", "search", "uniform"),
    "scap-role": ("scap", "search", "role"),
    "default": ("default", None, "uniform"),
    "budget": ("budget", None, "budget"),
    "wina": ("wina", None, "uniform"),
}
METHODS = tuple(METHOD_PLANS)
#: The sweep's methods unless --methods names others (wina needs a calibration of its own).
DEFAULT_METHODS = tuple(m for m in METHODS if m != "wina")
DEFAULT_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Per-role sparsity relative to the mean, after the paper's Llama-2-7B setting (up/gate 35 %,
#: down 55 %; attention at the MLP mean); scaled per model so the byte-weighted mean is the level.
ROLE_PROFILE = {"q": 1.0, "k": 1.0, "v": 1.0, "qkv": 1.0, "o": 1.0, "gate": 0.84, "up": 0.84, "gate_up": 0.84,
                "down": 1.32, "other": 1.0}
MAX_SPARSITY = 0.95

def parse_levels(text: str | list[float]) -> list[float]:
    if isinstance(text, (list, tuple)):
        vals = [float(v) for v in text]
    else:
        try:
            vals = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ScapError(f"--levels {text!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise ScapError("--levels names no sparsity level")
    for v in vals:
        if not (0.0 < v < 1.0):
            raise ScapError(f"sparsity level {v} is outside (0, 1)")
    return sorted(set(vals))


def parse_methods(text: str | list[str]) -> list[str]:
    vals = list(text) if isinstance(text, (list, tuple)) else [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in vals if m not in METHODS]
    if bad or not vals:
        raise ScapError(f"unknown method {bad[0] if bad else text!r} (methods: {', '.join(METHODS)})")
    return [m for m in METHODS if m in vals]


def role_spec(stats, level: float) -> dict[str, float]:
    """Per-role sparsities in ROLE_PROFILE's proportions with byte-weighted mean ``level``."""
    nbytes: dict[str, int] = {}
    for s in stats.sites:
        for t in s.targets:
            nbytes[t["role"]] = nbytes.get(t["role"], 0) + int(t["k"]) * int(t["n"])
    total = sum(nbytes.values())
    weighted = sum(ROLE_PROFILE.get(r, 1.0) * b for r, b in nbytes.items())
    c = total / weighted if weighted else 1.0
    return {r: round(min(MAX_SPARSITY, level * ROLE_PROFILE.get(r, 1.0) * c), 4) for r in nbytes}


def stats_kinds(passes: int) -> dict[str, tuple[int, tuple[str, ...], str]]:
    """Kind of statistics -> (passes, token-scaled roles, calibration method). ``default`` (the
    default method's settings) is left out when another kind has its settings: see :func:`kind_for`."""
    scap = get_method("scap-search")
    kinds = {"teal": (1, (), "scap-search"), "scap": (passes, scap.token_scaled_roles, "scap-search")}
    if kind_for("default", kinds) == "default":
        d = get_method(None)
        kinds["default"] = (d.passes, d.token_scaled_roles, d.name)
    w = get_method("wina")
    kinds["wina"] = (w.passes, w.token_scaled_roles, w.name)
    return kinds


def kind_for(kind: str, kinds: dict) -> str:
    """The kind of statistics that serves ``kind``: ``default`` is served by another kind calibrated
    with the default method's passes and token scaling (the centring is applied when planning);
    ``wina``'s statistics (weight norms and scores) are their own, and so are ``budget``'s (the
    default's with each site's gain measured, allocated per level by :func:`_with_budget`)."""
    if kind != "default" or get_method(None).weighted:
        return kind
    d = get_method(None)
    for k, (p, roles, _) in kinds.items():
        if k not in ("default", "wina", "budget") and (p, tuple(roles)) == (d.passes, d.token_scaled_roles):
            return k
    return "default"


def plan_for(method: str, level: float, stats: dict) -> tuple[dict[str, TargetPlan], str]:
    """(plan: target -> TargetPlan, as the rewriter takes it, per-channel threshold_scale
    included; SPEC text) for one sweep point, from ``stats`` (kind of statistics -> Stats)."""
    if method not in METHOD_PLANS:
        raise ScapError(f"unknown method {method!r}")
    kind, centring, allocation = METHOD_PLANS[method]
    kinds = {k: (st.calibration.get("passes"), tuple(st.calibration.get("token_scaled_roles", ())), None)
             for k, st in stats.items()}
    st = stats[kind_for(kind, kinds)]
    if allocation == "budget":
        if st.calibration.get("budget") == level:  # allocated and checked at this level (_with_budget)
            return st.plan(), f"budget {level:g}"
        # on a copy: the stored statistics stay those of the calibration SPEC
        copy = apply_budget(Stats.from_dict(st.to_dict()), level, centring or get_method(None).centring)
        return copy.plan(), f"budget {level:g}"
    if centring is None:
        centring = get_method(None).centring if kind != "wina" else None
    spec = Spec(roles=role_spec(st, level)) if allocation == "role" else Spec(default=level)
    p = st.plan(spec, centring=centring)
    text = str(spec) + (" (offset 0)" if centring == "zero" else "")
    return p, text


def _calibrated(model: Path, data: Path, path: Path, passes: int, level: float, opts: dict, progress,
                token_roles: tuple[str, ...], method: str) -> tuple:
    """Stats from ``path`` when it matches the model and settings, else calibrate and save them.
    ``token_roles``: roles with token-scaled thresholds (none for the TEAL-style baseline)."""
    want = {"passes": passes, "spec": f"{level:g}", "tokens": opts["max_tokens"], "seq_len": opts["seq_len"],
            "data": str(Path(data).resolve()), "token_scaled_roles": list(token_roles), "method": method}
    st = reusable_stats(path, model, "sweep", want)
    if st is not None:
        return st, True
    st = calibrate(model, data, sparsity=level, passes=passes, progress=progress, token_scaled_roles=token_roles,
                   method=method, **opts)
    st.calibration["sweep"] = want
    st.save(path)
    return st, False


def _with_budget(model: Path, data: Path, path: Path, base: Stats, level: float, opts: dict, progress) -> tuple:
    """A copy of ``base`` with the budget ``level`` allocated as ``calibrate --budget`` does (gains
    measured at that level, the allocation checked against the uniform plan:
    calibration.sensitivity), from ``path`` when it was made there for the same statistics. When
    only the check changed since, its gains are kept and the check alone runs again."""
    centring = get_method(None).centring
    gains_want = {**base.calibration.get("sweep", {}), "budget": level, "centring": centring,
                  "gain_tokens": GAIN_TOKENS}
    want = {**gains_want, "mixes": list(MIXES), "check_tokens": CHECK_TOKENS, "check_rule": CHECK_RULE}
    st = reusable_stats(path, model, "sweep", want)
    if st is not None:
        return st, True
    st = Stats.from_dict(base.to_dict())
    gained = reusable_stats(path, model, "sweep_gains", gains_want)
    gains = {g.input: g.gain for g in gained.sites} if gained is not None else {}
    reuse = bool(gains) and set(gains) == {s.input for s in st.sites} and "gain" in gained.calibration
    if reuse:  # the base statistics with the cached gains; only the check runs again
        for s in st.sites:
            s.gain = gains[s.input]
        st.calibration["gain"] = gained.calibration["gain"]
    with ModelSource(model) as source:
        ds = open_data(data, source.proto, model, tokenizer=opts["tokenizer"], seq_len=opts["seq_len"],
                       max_tokens=opts["max_tokens"])
        apply_checked_budget(st, PlanProbe(st.sites, source, ds, opts["threads"]), level, centring, progress,
                             measure_gain=not reuse)
    st.calibration["sweep"], st.calibration["sweep_gains"] = want, gains_want
    st.save(path)
    return st, False


def _row(method: str, level: float, spec: str, rep: dict, report_path: Path | None) -> dict:
    acc = rep.get("accuracy", {})
    sp = rep.get("sparsity", {})
    lat = rep.get("latency", {})
    part = lat.get("decode") or lat.get("batch") or {}
    row = {"method": method, "level": level, "spec": spec,
           "sparsity": sp.get("weighted"), "sparsity_targets": sp.get("weighted_sparse_targets"),
           "roles": {r: v["mean"] for r, v in sp.get("roles", {}).items()},
           "speedup": part.get("speedup"), "paired_speedup": part.get("paired_speedup"),
           "latency_kind": "decode" if "decode" in lat else ("batch" if "batch" in lat else None),
           "dense_tokens_per_s": part.get("dense_tokens_per_s"), "sparse_tokens_per_s": part.get("sparse_tokens_per_s"),
           "report": str(report_path) if report_path else None}
    if "perplexity" in acc:
        p = acc["perplexity"]
        row.update(perplexity_dense=p["dense"], perplexity_sparse=p["sparse"], quality=p["change_pct"],
                   quality_name="perplexity change %")
    if "top1_agreement" in acc:
        row.update(top1_agreement=acc["top1_agreement"], kl_mean=acc["kl"]["mean"])
    if "embedding" in acc:
        e = acc["embedding"]
        row.update(cosine_mean=e["cosine_mean"], cosine_min=e["cosine_min"])
        if "quality" not in row:
            row.update(quality=100.0 * (1.0 - e["cosine_mean"]), quality_name="1 - cosine %")
    if "quality" not in row and acc.get("outputs"):
        first = next(iter(acc["outputs"].values()))
        row.update(quality=100.0 * first["rel_error"], quality_name="relative error %")
    return row


def redraw(out_dir: str | Path) -> dict:
    """Recompute the comparison and rewrite sweep.json / sweep.md / pareto.png of a finished sweep."""
    out_dir = Path(out_dir)
    res = json.loads((out_dir / "sweep.json").read_text())
    res["comparison"] = compare(res["rows"], res["levels"])
    res["against_teal"] = against_baseline(res["rows"])
    return write_sweep(res, out_dir)


def sweep(
    model: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    eval_data: str | Path | None = None,
    levels: list[float] | str = DEFAULT_LEVELS,
    methods: list[str] | str = DEFAULT_METHODS,
    tokenizer: str | Path | None = None,
    tokens: int = 8192,
    seq_len: int = 256,
    passes: int = 2,
    validate_options: ValidateOptions | None = None,
    keep_models: bool = False,
    progress: Progress | None = None,
    log=None,
) -> dict:
    """Run the sweep; returns the sweep report (also written to ``out_dir``)."""
    progress = progress or NullProgress()
    log = log or (lambda msg: None)
    started = time.perf_counter()
    model, data, out_dir = Path(model), Path(data), Path(out_dir)
    levels = parse_levels(levels)
    methods = parse_methods(methods)
    load_proto(model)  # ScapError now if not a model
    if not data.is_file():
        raise ScapError(f"data file {data} does not exist")
    vopts = validate_options or ValidateOptions()
    if eval_data is None and data.suffix.lower() == ".npz":
        raise ScapError("with .npz calibration feeds give --eval-data (other feeds to evaluate on)")
    if eval_data is None:  # held out from the same text: windows half-way between the calibration windows
        eval_data = data
        vopts.phase = 0.5
    eval_data = Path(eval_data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reports").mkdir(exist_ok=True)
    mid = float(levels[len(levels) // 2])
    cal_opts = dict(tokenizer=tokenizer, max_tokens=tokens, seq_len=seq_len, threads=vopts.threads)
    calibration = {}
    kinds = stats_kinds(passes)
    wanted = {kind_for(METHOD_PLANS[m][0] if m != "budget" else "default", kinds) for m in methods}
    stats: dict = {}
    for kind, (kpasses, token_roles, cal_method) in kinds.items():
        if kind not in wanted:
            continue
        t0 = time.perf_counter()
        stats[kind], reused = _calibrated(model, data, out_dir / f"stats_{kind}.json", kpasses, mid, cal_opts,
                                          progress, token_roles, cal_method)
        calibration[kind] = {"passes": kpasses, "spec": f"{mid:g}", "tokens": stats[kind].calibration.get("tokens"),
                             "token_scaled_roles": list(token_roles),
                             "seconds": round(time.perf_counter() - t0, 1), "reused": reused}
        log(f"{kind} statistics: {calibration[kind]}")
    budget_stats: dict[float, Stats] = {}  # level -> the default's statistics with that budget applied
    if "budget" in methods:
        base = stats[kind_for("default", kinds)]
        calibration["budget"] = {**calibration.get(kind_for("default", kinds), {}), "levels": {}}
        for lv in levels:
            t0 = time.perf_counter()
            budget_stats[lv], reused = _with_budget(model, data, out_dir / f"stats_budget_{lv:g}.json", base, lv,
                                                    cal_opts, progress)
            calibration["budget"]["levels"][f"{lv:g}"] = {**budget_stats[lv].calibration["budget_check"],
                                                          "seconds": round(time.perf_counter() - t0, 1),
                                                          "reused": reused}
            log(f"budget {lv:g}: {calibration['budget']['levels'][f'{lv:g}']}")
    cache = DenseCache(out_dir / ".dense_cache")
    rows: list[dict] = []
    env = None
    eval_info: dict = {}
    dense_row = None
    try:
        for method in methods:
            for lv in levels:
                plan, spec = plan_for(method, lv, {**stats, "budget": budget_stats[lv]} if budget_stats else stats)
                name = f"{method}_{lv:g}"
                sparse_path = out_dir / "models" / f"{name}.onnx"
                rewrite_file(model, sparse_path, plan, check=False)
                rep = validate(model, sparse_path, eval_data, vopts, progress=progress, dense_cache=cache)
                rpath = out_dir / "reports" / f"{name}.json"
                write_report(rep, rpath)
                env = env or rep["environment"]
                eval_info = eval_info or dict(rep.get("data", {}))
                row = _row(method, lv, spec, rep, rpath)
                rows.append(row)
                if dense_row is None:
                    dense_row = {"method": "dense", "level": 0.0, "spec": "-", "sparsity": 0.0,
                                 "sparsity_targets": 0.0, "roles": {}, "quality": 0.0,
                                 "quality_name": row.get("quality_name"), "speedup": 1.0,
                                 "latency_kind": row.get("latency_kind"),
                                 "dense_tokens_per_s": row.get("dense_tokens_per_s"),
                                 "sparse_tokens_per_s": row.get("dense_tokens_per_s")}
                    if "perplexity_dense" in row:
                        dense_row.update(perplexity_dense=row["perplexity_dense"],
                                         perplexity_sparse=row["perplexity_dense"], top1_agreement=1.0, kl_mean=0.0)
                    if "cosine_mean" in row:
                        dense_row.update(cosine_mean=1.0, cosine_min=1.0)
                log(row_line(row))
                if not keep_models:
                    for p in (sparse_path, sparse_path.with_name(sparse_path.name + ".data")):
                        if p.exists():
                            p.unlink()
    finally:
        shutil.rmtree(out_dir / ".dense_cache", ignore_errors=True)
        if not keep_models:
            shutil.rmtree(out_dir / "models", ignore_errors=True)
    rows = ([dense_row] if dense_row else []) + rows
    result = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model.resolve()), "data": str(data.resolve()), "eval_data": str(eval_data.resolve()),
        "eval": {"tokens": eval_info.get("tokens"), "kind": eval_info.get("kind"), "seq_len": vopts.seq_len,
                 "skip_tokens": vopts.skip_tokens, "sampling": vopts.sampling, "phase": vopts.phase, "kv_len": vopts.kv_len, "repeats": vopts.repeats,
                 "warmup": vopts.warmup},
        "levels": levels, "methods": methods, "role_profile": ROLE_PROFILE,
        "calibration": calibration, "environment": env, "rows": rows,
        "comparison": compare(rows, levels),
        "against_teal": against_baseline(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_sweep(result, out_dir)
    return result
