"""Reports of `scap-onnx validate` (and `sweep`): JSON, a markdown table, PNG plots.

The validate report (``format: "scap-onnx-validate"``, ``version: 1``) has these keys; times are
milliseconds, sparsities fractions in [0, 1]:

``created``            UTC time the run finished (ISO 8601)
``dense``/``sparse``   ``path``, ``bytes`` (model plus external data); sparse: ``scap_nodes`` (fused nodes count once) and ``scap_targets``
``model_kind``         ``causal-lm`` (logits + input_ids), ``encoder`` (input_ids, no logits) or ``generic``
``data``               ``path``, ``kind`` (text|npz), ``seq_len``, ``sampling`` (spread|contiguous),
                       ``phase``, ``skip_tokens``, ``tokenizer``,
                       ``batch_size``, ``max_tokens``; ``tokens`` and ``batches`` actually evaluated
``environment``        ``cpu_model``, ``isa`` (notable CPU flags), ``kernel_isa`` (the op library's
                       kernel family on this CPU), ``cores_logical``, ``cores_physical``,
                       ``memory_bytes``, ``threads``, ``thread_pool``, ``spinning``, ``provider``, ``onnxruntime``,
                       ``numpy``, ``python``, ``platform``, ``scap_onnx``, ``library`` (path),
                       ``load_average`` / ``load_average_end`` (1/5/15-min, start and end of the run:
                       a loaded machine makes timings noisy)
``accuracy``           ``tokens``, ``batches``, ``op`` (library, or lowered to standard ops when the
                       library is missing);
                       ``outputs``: per model output ``rel_error`` = ||sparse - dense|| / ||dense||
                       over all batches, ``max_abs_error``;
                       causal LMs: ``perplexity`` {``dense``, ``sparse``, ``change``, ``change_pct``,
                       ``nll_dense``, ``nll_sparse``, ``tokens`` (predicted tokens)},
                       ``top1_agreement`` (fraction of positions where both argmax agree),
                       ``kl`` {``mean``, ``p50``, ``p99``, ``max``, ``positions``}: KL(P_dense || P_sparse)
                       of the next-token distributions, nats;
                       encoders: ``embedding`` {``output``, ``pooling``, ``cosine_mean``,
                       ``cosine_min``, ``rows``}: cosine of mean-pooled embeddings per row
``sparsity``           measured on the evaluation data: ``nodes`` (per ScapSparseMatMul: ``role``,
                       ``layer``, ``k``, ``n``, ``threshold``, ``offset``, ``sparsity``), ``roles``
                       (per role: ``targets``, ``mean``, ``min``, ``max``, ``weighted``; with a SPEC
                       also ``target``, ``mean_error``, ``worst_error``), ``weighted`` (share of all FC
                       weight bytes skipped), ``weighted_sparse_targets`` (share of the rewritten
                       MatMuls' bytes skipped), ``fc_bytes``, ``fc_bytes_sparse_targets``,
                       ``ideal_fc_speedup`` (= fc_bytes / (fc_bytes - skipped bytes))
``latency``            ``threads``, ``provider``, ``thread_pool`` (``shared``: one onnxruntime
                       intra-op pool for both sessions, in a child process; ``separate``: one
                       each), ``spinning``;
                       ``decode`` (decoders with a KV cache:
                       one new token after ``kv_len`` cached tokens), ``prefill`` (``tokens`` prompt
                       tokens, no cache) or ``batch`` (other models: one batch, ``shapes``), each
                       with ``dense_ms`` / ``sparse_ms`` {``median``, ``p10``, ``p90``, ``mean``,
                       ``min``, ``n``}, ``speedup`` (ratio of medians), ``paired_speedup`` (median of
                       per-round ratios), ``dense_tokens_per_s`` / ``sparse_tokens_per_s``,
                       ``warmup``, ``repeats``; ``genai_decode`` (onnxruntime-genai folders: decode
                       through og.Generator, scap_onnx.evaluation.genai_decode): ``prompt_tokens``,
                       ``new_tokens``, ``dense_tokens_per_s`` / ``sparse_tokens_per_s`` (medians),
                       ``speedup``, ``paired_speedup``, the per-round rates
``seconds``            wall time of the whole validation

The sweep report (``format: "scap-onnx-sweep"``) is described in :mod:`scap_onnx.experiments.sweep`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..graph.fileio import atomic_path, atomic_write_text


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def environment_line(env: dict) -> str:
    isa = ", ".join(env.get("isa") or []) or "?"
    return (f"{env.get('cpu_model')} ({env.get('cores_logical')} logical cores; ISA {isa}; kernel "
            f"{env.get('kernel_isa')}), {env.get('threads')} threads, onnxruntime {env.get('onnxruntime')}, "
            f"{env.get('provider')}, {_pool(env)}, load average "
            f"{_load(env.get('load_average'))} -> {_load(env.get('load_average_end'))}")


def _pool(env: dict) -> str:
    if env.get("thread_pool") == "shared":
        return "one thread pool shared by both sessions (spinning)"
    return f"a thread pool per session, spinning {'on' if env.get('spinning') else 'off'}"


def _load(v) -> str:
    return "?" if not v else f"{v[0]:.1f}"


def markdown(report: dict) -> str:
    """The validate report as markdown: a summary table, then measured sparsity per role."""
    dense, sparse = Path(report["dense"]["path"]).name, Path(report["sparse"]["path"]).name
    lines = [f"### scap-onnx validate: {dense} vs {sparse} ({report['model_kind']})", ""]
    lines.append(f"Machine: {environment_line(report['environment'])}.")
    data = report.get("data", {})
    dtxt = f"{Path(data.get('path', '?')).name}"
    if data.get("tokens") is not None:
        dtxt += f", {data['tokens']} tokens in {data.get('batches')} batches"
    if data.get("seq_len") and data.get("kind") == "text":
        dtxt += f" of {data['seq_len']}"
        if data.get("skip_tokens"):
            dtxt += f" (after skipping {data['skip_tokens']})"
        elif data.get("sampling") == "spread":
            dtxt += ", spread across the file" + (f" at phase {data['phase']:g}" if data.get("phase") else "")
    lines += [f"Data: {dtxt}.", "", "| metric | dense | sparse | change |", "|---|---:|---:|---:|"]
    acc = report.get("accuracy") or {}
    if "perplexity" in acc:
        p = acc["perplexity"]
        lines.append(f"| perplexity | {p['dense']:.4f} | {p['sparse']:.4f} | {p['change']:+.4f} ({p['change_pct']:+.2f}%) |")
    if "top1_agreement" in acc:
        lines.append(f"| next-token top-1 agreement | | {_pct(acc['top1_agreement'], 2)} | |")
    if "kl" in acc:
        k = acc["kl"]
        lines.append(f"| KL(dense ‖ sparse), nats: mean / p99 | | {k['mean']:.4g} / {k['p99']:.4g} | |")
    if "embedding" in acc:
        e = acc["embedding"]
        lines.append(f"| cosine of pooled embeddings: mean / min | | {e['cosine_mean']:.5f} / {e['cosine_min']:.5f} | |")
    outs = acc.get("outputs") or {}
    if outs:
        first = next(iter(outs))
        lines.append(f"| relative error of `{first}` | | {outs[first]['rel_error']:.3g} | |")
        if len(outs) > 1:
            worst = max(outs.items(), key=lambda kv: kv[1]["rel_error"])
            lines.append(f"| worst relative error of {len(outs)} outputs (`{worst[0]}`) | | {worst[1]['rel_error']:.3g} | |")
    sp = report.get("sparsity")
    if sp:
        lines.append(f"| FC weight bytes skipped (measured) | 0% | {_pct(sp['weighted'])} | ideal FC-only speedup {sp['ideal_fc_speedup']:.2f}x |")
    lat = report.get("latency") or {}
    if "decode" in lat:
        d = lat["decode"]
        lines.append(f"| decode tokens/s (KV cache {d['kv_len']}) | {d['dense_tokens_per_s']:.2f} | "
                     f"{d['sparse_tokens_per_s']:.2f} | **{d['speedup']:.2f}x** |")
        lines.append(f"| decode step ms, median [p10-p90] | {_ms(d['dense_ms'])} | {_ms(d['sparse_ms'])} | "
                     f"paired {d['paired_speedup']:.2f}x |")
    if "genai_decode" in lat:
        d = lat["genai_decode"]
        lines.append(f"| og.Generator decode tokens/s ({d['prompt_tokens']}-token prompt, {d['new_tokens']} new) | "
                     f"{d['dense_tokens_per_s']:.2f} | {d['sparse_tokens_per_s']:.2f} | **{d['speedup']:.2f}x** |")
    if "prefill" in lat:
        d = lat["prefill"]
        lines.append(f"| prefill tokens/s ({d['tokens']} tokens) | {d['dense_tokens_per_s']:.1f} | "
                     f"{d['sparse_tokens_per_s']:.1f} | {d['speedup']:.2f}x |")
    if "batch" in lat:
        d = lat["batch"]
        shapes = ", ".join(f"{k} {v}" for k, v in list(d.get("shapes", {}).items())[:1])
        lines.append(f"| one batch ms ({shapes}), median [p10-p90] | {_ms(d['dense_ms'])} | {_ms(d['sparse_ms'])} | "
                     f"{d['speedup']:.2f}x |")
    if lat:
        first = next((lat[k] for k in ("decode", "prefill", "batch") if k in lat), None)
        if first:
            pool = "one thread pool" if lat.get("thread_pool") == "shared" else "a thread pool each"
            lines.append(f"\nLatency: {first['warmup']} warm-up + {first['repeats']} timed rounds, dense and sparse "
                         f"alternating in one process on {pool}; speedup = ratio of medians.")
    if sp and sp.get("roles"):
        lines += ["", "| role | targets | target | measured mean | min | max |", "|---|---:|---:|---:|---:|---:|"]
        for role, r in sp["roles"].items():
            lines.append(f"| {role} | {r['targets']} | {_pct(r.get('target'))} | {_pct(r['mean'])} | "
                         f"{_pct(r['min'])} | {_pct(r['max'])} |")
    return "\n".join(lines) + "\n"


def _ms(s: dict) -> str:
    return f"{s['median']:.2f} [{s['p10']:.2f}-{s['p90']:.2f}]"


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_latency(report: dict, path: Path) -> Path | None:
    lat = report.get("latency") or {}
    parts = [(k, lat[k]) for k in ("decode", "prefill", "batch") if k in lat]
    if not parts:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3.4), squeeze=False)
    for ax, (name, d) in zip(axes[0], parts):
        meds = [d["dense_ms"]["median"], d["sparse_ms"]["median"]]
        lo = [meds[0] - d["dense_ms"]["p10"], meds[1] - d["sparse_ms"]["p10"]]
        hi = [d["dense_ms"]["p90"] - meds[0], d["sparse_ms"]["p90"] - meds[1]]
        ax.bar(["dense", "sparse"], meds, yerr=[lo, hi], color=["#888888", "#2a7ab9"], capsize=4)
        title = {"decode": f"decode step (KV {d.get('kv_len')})", "prefill": f"prefill ({d.get('tokens')} tokens)",
                 "batch": "one batch"}[name]
        ax.set_title(f"{title}\n{d['speedup']:.2f}x", fontsize=9)
        ax.set_ylabel("ms (median, p10-p90)")
    env = report.get("environment", {})
    fig.suptitle(f"{Path(report['sparse']['path']).name}: {env.get('threads')} threads, {env.get('provider')}",
                 fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_sparsity(report: dict, path: Path) -> Path | None:
    sp = report.get("sparsity")
    if not sp or not sp.get("nodes"):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    by_role: dict[str, list[tuple[int, float]]] = {}
    for i, n in enumerate(sp["nodes"].values()):
        x = n["layer"] if n["layer"] is not None else i
        by_role.setdefault(n["role"], []).append((x, n["sparsity"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (role, pts) in zip(colors * 3, by_role.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1, color=c, label=role)
        target = sp["roles"].get(role, {}).get("target")
        if target is not None:
            ax.axhline(target, color=c, ls="--", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("measured sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=4)
    ax.set_title(f"measured sparsity per layer (dashed: targets); FC bytes skipped {100 * sp['weighted']:.1f}%",
                 fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write_report(report: dict, path: str | Path) -> dict:
    """Write the JSON report, ``<stem>.md`` and ``<stem>_latency.png`` / ``<stem>_sparsity.png``
    beside it (atomically). Returns the paths and the markdown text."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix == ".json" else path
    atomic_write_text(path, json.dumps(report, indent=1, allow_nan=True) + "\n")
    md = markdown(report)
    md_path = base.with_name(base.name + ".md")
    atomic_write_text(md_path, md)
    plots = [p for p in (plot_latency(report, base.with_name(base.name + "_latency.png")),
                         plot_sparsity(report, base.with_name(base.name + "_sparsity.png"))) if p]
    return {"json": path, "markdown": md_path, "markdown_text": md, "plots": plots}
