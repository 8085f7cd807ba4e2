"""`scap-onnx demo`: the whole pipeline on the embedded default, SmolLM2-135M-Instruct.

1. prepare SmolLM2 (ONNX with KV cache) and the two texts if they are not cached yet
   (:mod:`scap_onnx.prepare`; needs the ``prepare`` extra the first time);
2. calibrate on the Python documentation (``--tokens``, default 16384) by the default calibration
   method (scap_onnx.calibration.methods);
3. rewrite at ``--sparsity`` (default ``up=0.35,gate=0.35,down=0.55``, the paper's Llama-2 setting);
4. validate on another text, Debian's fortunes (modern English, like the calibration text, so the
   SPEC's sparsities hold there: docs/calibration.md); ``--eval-text kjv`` takes the King James
   Bible, whose archaic English lands 2-4 points below them, and ``--eval-text pydoc`` windows of
   the calibration text half-way between the calibration windows: perplexity, agreement, KL,
   measured sparsity, decode / prefill latency;
5. print the table, the headline numbers and where the report is.

Everything goes to ``--output`` (default ``$SCAP_ONNX_CACHE/demo``, i.e. ``~/.cache/scap-onnx/demo``):
``stats.json``, ``model_scap.onnx``, ``report.json`` / ``report.md`` / ``report_*.png``.

``--int4`` runs the same steps on what an int4 user deploys: SmolLM2 built by onnxruntime-genai's
model builder (int4, block 32, accuracy level 4; :func:`scap_onnx.prepare.prepare_smollm2_int4`),
rewritten into the onnxruntime-genai folder ``model_scap/`` (the op library inside), validated as
above plus decode through ``og.Generator``; default output ``$SCAP_ONNX_CACHE/demo-int4``.
Statistics are reused when the model, text and settings are unchanged (``--recalibrate`` forces).
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import api
from ..calibration.calibrator import calibrate
from ..calibration.methods import DEFAULT_METHOD, get_method
from ..calibration.spec import parse_spec
from ..errors import ScapError
from ..evaluation.options import ValidateOptions
from ..evaluation.report import write_report
from ..evaluation.validate import targets_from_spec, validate
from ..prepare import cache_dir, prepare_smollm2, prepare_smollm2_int4, prepare_texts
from .cached import reusable_stats

DEFAULT_SPEC = "up=0.35,gate=0.35,down=0.55"
EVAL_TEXTS = ("fortunes", "kjv", "pydoc")


def default_output(int4: bool = False) -> Path:
    return cache_dir() / ("demo-int4" if int4 else "demo")


def run_demo(
    output: Path | None = None,
    *,
    sparsity: str = DEFAULT_SPEC,
    tokens: int = 16384,
    seq_len: int = 256,
    passes: int | None = None,
    eval_text: str = "fortunes",
    eval_tokens: int = 4096,
    kv_len: int = 256,
    repeats: int = 20,
    threads: int | None = None,
    recalibrate: bool = False,
    int4: bool = False,
    progress=None,
    log=print,
) -> dict:
    """Run the demo; returns {"report": dict, "files": {...}, "seconds": {...}}."""
    spec = str(parse_spec(sparsity))
    if eval_text not in EVAL_TEXTS:
        raise ScapError(f"--eval-text must be one of {', '.join(EVAL_TEXTS)}, got {eval_text!r}")
    output = Path(output) if output else default_output(int4)
    output.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    what = "SmolLM2-135M-Instruct int4 (onnxruntime-genai builder)" if int4 else "SmolLM2-135M-Instruct"
    log(f"[1/4] preparing {what} and the texts (cached after the first run) ...")
    try:
        folder = prepare_smollm2_int4() if int4 else prepare_smollm2()
        texts = prepare_texts()
    except ImportError as e:
        extra = "'prepare' and 'genai' extras" if int4 else "'prepare' extra"
        raise ScapError(f"preparing the demo model needs the {extra} ({e}); see README") from None
    model = folder / "model.onnx"
    times["prepare"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    stats_path = output / "stats.json"
    cal_data = texts["pydoc"]
    passes = get_method(None).passes if passes is None else passes
    want = {"spec": spec, "tokens": tokens, "seq_len": seq_len, "passes": passes, "data": str(cal_data.resolve()),
            "method": DEFAULT_METHOD}
    stats = None if recalibrate else reusable_stats(stats_path, model, "demo", want)
    if stats is None:
        log(f"[2/4] calibrating on {cal_data.name} ({tokens} tokens, {passes} passes, SPEC {spec}) ...")
        stats = calibrate(model, cal_data, sparsity=spec, max_tokens=tokens, seq_len=seq_len, passes=passes,
                          threads=threads, progress=progress, method=DEFAULT_METHOD)
        stats.calibration["demo"] = want
        stats.save(stats_path)
    else:
        log(f"[2/4] reusing calibration statistics {stats_path}")
    times["calibrate"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    # int4: the whole onnxruntime-genai folder, which og.Model loads as it is
    dense, sparse = (folder, output / "model_scap") if int4 else (model, output / "model_scap.onnx")
    log(f"[3/4] rewriting -> {sparse}")
    result = api.rewrite(dense, sparse, stats=stats, sparsity=spec, check=False)
    times["rewrite"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    # pydoc: windows half-way between the calibration windows (spread sampling), held out
    eval_data, phase = texts[eval_text], 0.5 if eval_text == "pydoc" else 0.0
    log(f"[4/4] validating on {eval_data.name} ({eval_tokens} tokens), then timing decode (KV cache {kv_len}) ...")
    opts = ValidateOptions(max_tokens=eval_tokens, seq_len=seq_len, phase=phase, kv_len=kv_len,
                           repeats=repeats, threads=threads, targets=targets_from_spec(spec))
    rep = validate(dense, sparse, eval_data, opts, progress=progress)
    rep["demo"] = {"spec": spec, "int4": int4, "rewritten": len(result.rewritten), "calibration_text": str(cal_data),
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
    og = rep.get("latency", {}).get("genai_decode")
    if og:
        lines.append(f"og.Generator dense {og['dense_tokens_per_s']:.2f} tok/s   sparse {og['sparse_tokens_per_s']:.2f} "
                     f"tok/s   speedup {og['speedup']:.2f}x   ({og['prompt_tokens']}-token prompt, "
                     f"{og['new_tokens']} new tokens)")
    sp = rep.get("sparsity")
    if sp:
        lines.append(f"sparsity     {100 * sp['weighted']:.1f}% of FC weight bytes skipped (measured)")
    return lines
