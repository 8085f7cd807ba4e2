#!/usr/bin/env python
"""Measure calibration quality on a real model: target sparsity reached on held-out text, perplexity.

For each --passes value: calibrate on --calib text (upstream-aware for passes >= 2), rewrite for
--spec, then on --eval text measure each ScapSparseMatMul's dropped fraction and the perplexity
of dense and sparse models. Optionally re-target other SPECs from the same stats (--retarget) and
calibrate them directly (--also-spec). Writes a JSON report and prints a summary.

    python tools/measure_calibration.py --model ~/.cache/scap-onnx/models/smollm2-135m-instruct/model.onnx \
        --calib ~/.cache/scap-onnx/texts/pydoc.txt --eval ~/.cache/scap-onnx/texts/kjv.txt \
        --spec up=0.35,gate=0.35,down=0.55 --passes 1 2 3 --also-spec 0.4 --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scap_onnx.api import rewrite  # noqa: E402
from scap_onnx.calibration.calibrator import calibrate  # noqa: E402
from scap_onnx.graph.model_io import load_proto  # noqa: E402
from scap_onnx.calibration.data import open_data  # noqa: E402
from scap_onnx.evaluation.accuracy import model_perplexity as perplexity  # noqa: E402
from scap_onnx.evaluation.sparsity import measure_sparsity, role_summary  # noqa: E402
from scap_onnx.op.session import library_available  # noqa: E402
from scap_onnx.progress import make_progress  # noqa: E402
from scap_onnx.calibration.spec import parse_spec  # noqa: E402
from scap_onnx.calibration.stats import Stats  # noqa: E402
from scap_onnx.calibration.spec import parse_roles  # noqa: E402

ROLES7 = ("q", "k", "v", "o", "gate", "up", "down")


def role_targets(spec_text: str) -> dict[str, float]:
    spec = parse_spec(spec_text)
    return {r: spec.sparsity(r) for r in ROLES7 if spec.sparsity(r) is not None}


def evaluate(model: Path, sparse: Path, spec_text: str, evals: dict, progress, threads: int | None = None) -> dict:
    out = {}
    for name, ds in evals.items():
        per_node = measure_sparsity(sparse, ds, progress=progress, threads=threads)
        summ = role_summary(per_node, role_targets(spec_text))
        ppl = perplexity(sparse, ds, progress=progress, threads=threads)
        worst = max((abs(v["worst_error"]) for v in summ.values() if "worst_error" in v), default=0.0)
        worst_mean = max((abs(v["mean_error"]) for v in summ.values() if "mean_error" in v), default=0.0)
        per_layer: dict[str, list] = {}
        for v in sorted(per_node.values(), key=lambda v: (v["layer"] is None, v["layer"] or 0)):
            per_layer.setdefault(v["role"], []).append(round(v["sparsity"], 4))
        out[name] = {"roles": summ, "per_layer": per_layer, "perplexity": ppl["perplexity"], "worst_target_error": worst,
                     "worst_role_mean_error": worst_mean,
                     "accept": worst_mean <= 0.03 and worst <= 0.08}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True, nargs="+",
                    help="calibration text; several files are mixed (--tokens split evenly between them)")
    ap.add_argument("--eval", type=Path, required=True, nargs="+")
    ap.add_argument("--spec", default="up=0.35,gate=0.35,down=0.55")
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sampling", choices=["spread", "contiguous"], default="spread")
    ap.add_argument("--retarget", nargs="*", default=[], help="SPECs re-targeted from the stats of the last --passes value")
    ap.add_argument("--also-spec", nargs="*", default=[], help="SPECs calibrated directly (with the last --passes value)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--token-scaled", default=None,
                    help="roles with thresholds relative to each token's norm (default: the method's own; 'none')")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scap-measure"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    progress = make_progress()
    proto = load_proto(args.model)
    evals = {}
    for e in args.eval:
        same = e.resolve() in {c.resolve() for c in args.calib}
        key = e.stem + ("+heldout" if same else "")
        if args.sampling == "spread":  # held out: windows between the calibration windows
            evals[key] = open_data(e, proto, args.model, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                                   sampling="spread", phase=0.5 if same else 0.0)
        else:  # held out: after the calibration tokens
            evals[key] = open_data(e, proto, args.model, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                                   sampling="contiguous", skip_tokens=args.tokens if same else 0)
    del proto
    report = {"model": str(args.model), "calib": [str(c) for c in args.calib], "tokens": args.tokens, "eval_tokens": args.eval_tokens,
              "seq_len": args.seq_len, "sampling": args.sampling, "library": library_available(), "dense": {}, "runs": []}
    for name, ds in evals.items():
        report["dense"][name] = perplexity(args.model, ds, progress=progress, threads=args.threads)["perplexity"]
    print(json.dumps({"dense_perplexity": report["dense"]}), flush=True)

    def run(spec_text: str, passes: int, stats: Stats | None = None, label: str = "") -> Stats:
        t0 = time.perf_counter()
        if stats is None:
            stats = calibrate(args.model, args.calib, sparsity=spec_text, max_tokens=args.tokens, seq_len=args.seq_len,
                              passes=passes, sampling=args.sampling, progress=progress, threads=args.threads,
                              token_scaled_roles=parse_roles(args.token_scaled))
            stats.save(args.workdir / f"stats_p{passes}_{spec_text.replace(',', '_').replace('=', '')}.json")
        cal_s = time.perf_counter() - t0
        sparse = args.workdir / "sparse.onnx"
        rewrite(args.model, sparse, stats=stats, sparsity=spec_text, check=False)
        res = {"spec": spec_text, "passes": passes, "mode": label or "calibrated", "calibrate_seconds": round(cal_s, 1),
               "threshold_change": stats.calibration.get("threshold_change"),
               "eval": evaluate(args.model, sparse, spec_text, evals, progress, args.threads)}
        report["runs"].append(res)
        args.out.write_text(json.dumps(report, indent=1))
        brief = {k: {"ppl": round(v["perplexity"], 3), "worst_mean": round(v["worst_role_mean_error"], 4),
                     "worst": round(v["worst_target_error"], 4), "accept": v["accept"],
                     "roles": {r: round(x["mean"], 4) for r, x in v["roles"].items()}} for k, v in res["eval"].items()}
        print(json.dumps({"spec": spec_text, "passes": passes, "mode": res["mode"], **brief}), flush=True)
        return stats

    stats = None
    for p in args.passes:
        stats = run(args.spec, p)
    for spec_text in args.retarget:
        run(spec_text, args.passes[-1], stats=stats, label="retargeted")
    for spec_text in args.also_spec:
        run(spec_text, args.passes[-1])
    if hasattr(progress, "stop"):
        progress.stop()
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()
