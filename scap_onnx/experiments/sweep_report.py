"""The sweep's outputs: sweep.md (a table per method and level), pareto.png (quality against FC
bytes skipped and speed) and sweep.json, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.report import environment_line, pyplot, save_figure
from ..graph.fileio import atomic_write_text

LABELS = {"dense": "dense", "teal": "TEAL-style (zero-centred, uniform)",
          "oneshot": "one-shot (dense, static, mode for down)", "scap-zero": "SCAP, no mode-centering",
          "scap-mode": "SCAP, mode-centred", "scap-role": "SCAP, mode-centred, per-role",
          "default": "default method", "budget": "byte-budget allocation (default's centres)",
          "wina": "WINA-style weight-aware thresholds"}


def row_line(r: dict) -> str:
    q = r.get("quality")
    qs = "-" if q is None else f"{q:+.2f}"
    sp = "-" if r.get("sparsity") is None else f"{100 * r['sparsity']:.1f}%"
    su = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
    return f"{r['method']:10s} level {r['level']:.2f}: FC bytes skipped {sp}, {r.get('quality_name', 'quality')} {qs}, speedup {su}"


# ----------------------------------------------------------------------------- output
def sweep_markdown(res: dict) -> str:
    rows = res["rows"]
    qname = next((r.get("quality_name") for r in rows if r.get("quality_name")), "quality change")
    lm = any("perplexity_sparse" in r for r in rows)
    kind = next((r.get("latency_kind") for r in rows if r.get("latency_kind")), "decode")
    lines = [f"#### Sweep: {Path(res['model']).parent.name}/{Path(res['model']).name}", ""]
    env = res.get("environment") or {}
    if env:
        lines.append(f"Machine: {environment_line(env)}.")
    cal = res.get("calibration", {})
    cal_txt = "; ".join(f"{k}: {v.get('tokens')} tokens, {v.get('passes')} pass(es)" for k, v in cal.items())
    ev = res.get("eval", {})
    win = f" in windows of {ev.get('seq_len')}" if ev.get("kind") == "text" else ""
    skip = f", after skipping {ev['skip_tokens']}" if ev.get("skip_tokens") and ev.get("kind") == "text" else ""
    if ev.get("phase") and ev.get("kind") == "text":
        skip += f", spread windows at phase {ev['phase']:g} (held out from calibration's)"
    lines.append(f"Calibration on {Path(res['data']).name} ({cal_txt}); evaluation on {Path(res['eval_data']).name} "
                 f"({ev.get('tokens')} tokens{win}{skip}); speedups: {ev.get('warmup')} warm-up + "
                 f"{ev.get('repeats')} rounds per point, dense and sparse interleaved.")
    lines.append("")
    head = "| method | level | SPEC | FC bytes skipped | " + ("perplexity | Δ ppl | top-1 agree | KL mean |" if lm
                                                              else "cosine mean | cosine min |")
    head += f" {kind} speedup |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [LABELS.get(r["method"], r["method"]), f"{r['level']:.2f}", f"`{r.get('spec', '-')}`",
                 f"{100 * (r.get('sparsity') or 0):.1f}%"]
        if lm:
            cells += [f"{r.get('perplexity_sparse', float('nan')):.3f}", f"{r.get('quality', 0):+.2f}%",
                      f"{100 * r.get('top1_agreement', float('nan')):.1f}%", f"{r.get('kl_mean', float('nan')):.4f}"]
        else:
            cells += [f"{r.get('cosine_mean', float('nan')):.5f}", f"{r.get('cosine_min', float('nan')):.5f}"]
        cells.append("-" if r.get("speedup") is None else f"{r['speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    comp = res.get("comparison") or []
    if comp:
        lines += ["", f"SCAP mode-centred vs the TEAL-style baseline at each level ({qname}, lower is better; "
                  "the measured sparsities differ a little, so TEAL is also shown interpolated to SCAP's):", "",
                  "| level | TEAL-style | TEAL at SCAP's sparsity | SCAP mode-centred | verdict |",
                  "|---:|---:|---:|---:|---|"]
        for c in comp:
            verdict = "SCAP at or above baseline" if c["scap_at_or_above_baseline"] else "**SCAP below baseline**"
            same = c.get("teal_quality_at_scap_sparsity")
            lines.append(f"| {c['level']:.2f} | {c['teal_quality']:+.3f} ({100 * c['teal_sparsity']:.1f}% skipped) | "
                         f"{'-' if same is None else f'{same:+.3f}'} | "
                         f"{c['scap_mode_quality']:+.3f} ({100 * c['scap_mode_sparsity']:.1f}% skipped) | {verdict} |")
    vs = [c for c in res.get("against_teal") or [] if c.get("ratio") is not None]
    if vs:
        lines += ["", f"Each point against TEAL-style at the same measured sparsity (TEAL interpolated between its "
                  f"points and dense; ratio of {qname}, below 1 is better):", "",
                  "| method | level | FC bytes skipped | quality | TEAL there | ratio |", "|---|---:|---:|---:|---:|---:|"]
        for c in vs:
            lines.append(f"| {LABELS.get(c['method'], c['method'])} | {c['level']:.2f} | {100 * c['sparsity']:.1f}% | "
                         f"{c['quality']:+.3f} | {c['baseline_quality']:+.3f} | {c['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(res: dict, path: Path) -> Path:
    plt = pyplot()
    rows = res["rows"]
    qname = next((r.get("quality_name") for r in rows if r.get("quality_name")), "quality change")
    kind = next((r.get("latency_kind") for r in rows if r.get("latency_kind")), "decode")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"teal": "s", "oneshot": "v", "scap-zero": "^", "scap-mode": "o", "scap-role": "D", "default": "*", "budget": "P",
               "wina": "X"}
    for m in res["methods"]:
        pts = sorted([r for r in rows if r["method"] == m], key=lambda r: r["level"])
        if not pts:
            continue
        dense = [r for r in rows if r["method"] == "dense"]
        seq = dense + pts
        a1.plot([100 * (r["sparsity"] or 0) for r in seq], [r.get("quality") or 0 for r in seq],
                marker=markers.get(m, "o"), ms=4, label=LABELS.get(m, m))
        a2.plot([r.get("speedup") or 1 for r in seq], [r.get("quality") or 0 for r in seq],
                marker=markers.get(m, "o"), ms=5, ls="none", label=LABELS.get(m, m))
        for r in pts:  # label each point with its level
            a2.annotate(f"{r['level']:g}", (r.get("speedup") or 1, r.get("quality") or 0), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    for ax in (a1, a2):
        ax.set_ylabel(qname + " (lower is better; symlog)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3, which="both")
        ax.axhline(0, color="k", lw=0.5)
    a1.set_xlabel("measured sparsity: share of FC weight bytes skipped (%)")
    a2.set_xlabel(f"{kind} speedup (x, dense = 1)")
    a1.legend(fontsize=8)
    env = res.get("environment") or {}
    fig.suptitle(f"{Path(res['model']).parent.name}: quality vs sparsity vs speed "
                 f"({env.get('threads')} threads, {env.get('provider')})", fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write_sweep(res: dict, out_dir: Path) -> dict:
    atomic_write_text(out_dir / "sweep.json", json.dumps(res, indent=1) + "\n")
    md = sweep_markdown(res)
    atomic_write_text(out_dir / "sweep.md", md)
    png = plot_pareto(res, out_dir / "pareto.png") if res["rows"] else None
    return {"json": out_dir / "sweep.json", "markdown": out_dir / "sweep.md", "markdown_text": md, "plot": png}
