"""`scap-onnx demo`: the whole pipeline on the embedded default, SmolLM2-135M-Instruct.

1. prepare SmolLM2 (ONNX with KV cache) and the two texts if they are not cached yet
   (:mod:`scap_onnx.prepare`; needs the ``prepare`` extra the first time);
2. calibrate on the Python documentation (``--tokens``, default 16384, upstream-aware, 2 passes);
3. rewrite at ``--sparsity`` (default ``up=0.35,gate=0.35,down=0.55``, the paper's Llama-2 setting);
4. validate on another text, Debian's fortunes (modern English, like the calibration text, so the
   SPEC's sparsities hold there: docs/calibration.md); ``--eval-text kjv`` takes the King James
   Bible, whose archaic English lands 2-4 points below them, and ``--eval-text pydoc`` windows of
   the calibration text half-way between the calibration windows: perplexity, agreement, KL,
   measured sparsity, decode / prefill latency;
5. print the table, the headline numbers and where the report is.

Everything goes to ``--output`` (default ``$SCAP_ONNX_CACHE/demo``, i.e. ``~/.cache/scap-onnx/demo``):
``stats.json``, ``model_scap.onnx``, ``report.json`` / ``report.md`` / ``report_*.png``.
Statistics are reused when the model, text and settings are unchanged (``--recalibrate`` forces).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .errors import ScapError
from .token_scale import DEFAULT_ROLES as TOKEN_ROLES
from .validate import ValidateOptions, _cli, targets_from_spec, validate

DEFAULT_SPEC = "up=0.35,gate=0.35,down=0.55"
EVAL_TEXTS = ("fortunes", "kjv", "pydoc")


def default_output() -> Path:
    from .prepare import cache_dir

    return cache_dir() / "demo"


def _reusable_stats(path: Path, model: Path, data: Path, spec: str, tokens: int, seq_len: int, passes: int):
    from .api import model_fingerprint
    from .stats import Stats

    if not path.is_file():
        return None
    try:
        st = Stats.load(path)
    except ScapError:
        return None
    cal = st.calibration
    want = {"spec": spec, "tokens": tokens, "seq_len": seq_len, "passes": passes, "data": str(data.resolve()),
            "token_scaled_roles": list(TOKEN_ROLES)}
    if st.model.get("fingerprint") != model_fingerprint(model) or cal.get("demo") != want:
        return None
    return st


def run_demo(
    output: Path | None = None,
    *,
    sparsity: str = DEFAULT_SPEC,
    tokens: int = 16384,
    seq_len: int = 256,
    passes: int = 2,
    eval_text: str = "fortunes",
    eval_tokens: int = 4096,
    kv_len: int = 256,
    repeats: int = 20,
    threads: int | None = None,
    recalibrate: bool = False,
    progress=None,
    log=print,
) -> dict:
    """Run the demo; returns {"report": dict, "files": {...}, "seconds": {...}}."""
    from .api import rewrite
    from .calibrate import calibrate
    from .prepare import prepare_smollm2, prepare_texts
    from .report import write_report
    from .spec import parse_spec

    spec = str(parse_spec(sparsity))
    if eval_text not in EVAL_TEXTS:
        raise ScapError(f"--eval-text must be one of {', '.join(EVAL_TEXTS)}, got {eval_text!r}")
    output = Path(output) if output else default_output()
    output.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    log("[1/4] preparing SmolLM2-135M-Instruct and the texts (cached after the first run) ...")
    try:
        folder = prepare_smollm2()
        texts = prepare_texts()
    except ImportError as e:
        raise ScapError(f"preparing the demo model needs the 'prepare' extra ({e}); see README") from None
    model = folder / "model.onnx"
    times["prepare"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    stats_path = output / "stats.json"
    cal_data = texts["pydoc"]
    stats = None if recalibrate else _reusable_stats(stats_path, model, cal_data, spec, tokens, seq_len, passes)
    if stats is None:
        log(f"[2/4] calibrating on {cal_data.name} ({tokens} tokens, {passes} passes, SPEC {spec}) ...")
        stats = calibrate(model, cal_data, sparsity=spec, max_tokens=tokens, seq_len=seq_len, passes=passes,
                          threads=threads, progress=progress)
        stats.calibration["demo"] = {"spec": spec, "tokens": tokens, "seq_len": seq_len, "passes": passes,
                                     "data": str(cal_data.resolve()), "token_scaled_roles": list(TOKEN_ROLES)}
        stats.save(stats_path)
    else:
        log(f"[2/4] reusing calibration statistics {stats_path}")
    times["calibrate"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    sparse = output / "model_scap.onnx"
    log(f"[3/4] rewriting -> {sparse}")
    result = rewrite(model, sparse, stats=stats, sparsity=spec, check=False)
    times["rewrite"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    # pydoc: windows half-way between the calibration windows (spread sampling), held out
    eval_data, phase = texts[eval_text], 0.5 if eval_text == "pydoc" else 0.0
    log(f"[4/4] validating on {eval_data.name} ({eval_tokens} tokens), then timing decode (KV cache {kv_len}) ...")
    opts = ValidateOptions(max_tokens=eval_tokens, seq_len=seq_len, phase=phase, kv_len=kv_len,
                           repeats=repeats, threads=threads, targets=targets_from_spec(spec))
    rep = validate(model, sparse, eval_data, opts, progress=progress)
    rep["demo"] = {"spec": spec, "rewritten": len(result.rewritten), "calibration_text": str(cal_data),
                   "calibration_tokens": stats.calibration.get("tokens"), "seconds": times}
    times["validate"] = round(time.perf_counter() - t0, 1)
    files = write_report(rep, output / "report.json")
    return {"report": rep, "files": files, "seconds": times, "sparse": sparse}


def summary_lines(rep: dict) -> list[str]:
    lines = []
    acc = rep.get("accuracy", {})
    if "perplexity" in acc:
        p = acc["perplexity"]
        lines.append(f"perplexity   dense {p['dense']:.3f}   sparse {p['sparse']:.3f}   change {p['change_pct']:+.2f}%"
                     f"   ({Path(rep['data']['path']).name}, {p['tokens']} tokens)")
    dec = rep.get("latency", {}).get("decode")
    if dec:
        lines.append(f"decode       dense {dec['dense_tokens_per_s']:.2f} tok/s   sparse {dec['sparse_tokens_per_s']:.2f} "
                     f"tok/s   speedup {dec['speedup']:.2f}x   (KV cache {dec['kv_len']}, "
                     f"{rep['environment']['threads']} threads)")
    sp = rep.get("sparsity")
    if sp:
        lines.append(f"sparsity     {100 * sp['weighted']:.1f}% of FC weight bytes skipped (measured)")
    return lines


import typer  # noqa: E402


@_cli
def demo_command(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: ~/.cache/scap-onnx/demo)."),
    sparsity: str = typer.Option(DEFAULT_SPEC, "--sparsity", "-s", help="SPEC to rewrite at."),
    tokens: int = typer.Option(16384, "--tokens", help="Calibration tokens (Python documentation)."),
    eval_text: str = typer.Option("fortunes", "--eval-text",
                                  help="fortunes or kjv (other texts than the calibration's) or pydoc (its held-out part)."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Evaluation tokens."),
    kv_len: int = typer.Option(256, "--kv-len", help="Decode step: tokens already in the KV cache."),
    repeats: int = typer.Option(20, "--repeats", help="Timed decode rounds (dense and sparse interleaved)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: physical cores)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Calibrate again even if matching statistics exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """The embedded default end to end: prepare SmolLM2-135M, calibrate, rewrite (up=0.35,gate=0.35,down=0.55), validate; prints perplexity, decode tokens/s and speedup."""
    from .progress import make_progress

    t0 = time.perf_counter()
    progress = make_progress(quiet)
    try:
        res = run_demo(output, sparsity=sparsity, tokens=tokens, eval_text=eval_text, eval_tokens=eval_tokens,
                       kv_len=kv_len, repeats=repeats, threads=threads, recalibrate=recalibrate, progress=progress,
                       log=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    finally:
        stop = getattr(progress, "stop", None)
        if stop:
            stop()
    typer.echo(res["files"]["markdown_text"])
    for line in summary_lines(res["report"]):
        typer.echo(line)
    files = res["files"]
    typer.echo(f"report: {files['json']} (+ {files['markdown'].name}" + "".join(f", {p.name}" for p in files["plots"])
               + f"); sparse model: {res['sparse']}; {time.perf_counter() - t0:.0f}s in all")
