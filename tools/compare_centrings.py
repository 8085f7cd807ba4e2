#!/usr/bin/env python
"""Compare calibration centrings on one model at one SPEC, every plan from the same statistics.

    python tools/compare_centrings.py MODEL --calib CAL --eval EVAL --spec SPEC --out OUT.json \
        PASSES:TOKEN_SCALED:TOKENS:CENTRING[:METHOD] ...

Each configuration names the statistics (calibration passes, token-scaled roles joined by '+' or
'none', calibration tokens) and a centring of scap_onnx.calibration.stats.CENTRINGS, optionally the
calibration method whose statistics to collect (default scap-search; ``wina`` adds weight-aware
scores, and its sites keep their calibrated centre); statistics are calibrated once per (passes,
token-scaled, tokens, method) and cached beside OUT. Every plan is
rewritten and validated (accuracy only) on the same evaluation windows: measured share of FC
bytes skipped, per-role sparsity and quality (perplexity change, or 1 - cosine for encoders).
docs/calibration.md (issue 16) has the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scap_onnx.calibration.calibrator import calibrate  # noqa: E402
from scap_onnx.calibration.spec import parse_roles  # noqa: E402
from scap_onnx.calibration.stats import Stats  # noqa: E402
from scap_onnx.evaluation.accuracy import DenseCache  # noqa: E402
from scap_onnx.evaluation.options import ValidateOptions  # noqa: E402
from scap_onnx.evaluation.validate import validate  # noqa: E402
from scap_onnx.experiments.sweep import _row  # noqa: E402
from scap_onnx.passes.pipeline import rewrite_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("configs", nargs="+", help="PASSES:TOKEN_SCALED:TOKENS:CENTRING[:METHOD], e.g. 2:none:2048:margin")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--spec", default="up=0.35,gate=0.35,down=0.55")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = args.out.parent
    opts = ValidateOptions(max_tokens=args.eval_tokens, seq_len=args.seq_len, latency=False, threads=args.threads)
    cache = DenseCache(work / f".dense_{args.model.parent.name}")
    res = {"model": str(args.model), "spec": args.spec, "calib": str(args.calib), "eval": str(args.eval), "rows": []}
    stats: dict = {}
    for cfg in args.configs:
        passes, scaled, tokens, centring, *rest = cfg.split(":")
        method = rest[0] if rest else "scap-search"
        key = (passes, scaled, tokens, method)
        if key not in stats:
            tag = "" if method == "scap-search" else f"_{method}"
            path = work / f"stats_{args.model.parent.name}_{passes}_{scaled}_{tokens}{tag}_{args.spec.replace(',', '_')}.json"
            if path.exists():
                stats[key] = Stats.load(path)
            else:
                stats[key] = calibrate(args.model, args.calib, sparsity=args.spec, passes=int(passes),
                                       token_scaled_roles=parse_roles(scaled.replace("+", ",")),
                                       max_tokens=int(tokens), seq_len=args.seq_len, threads=args.threads,
                                       method=method)
                stats[key].save(path)
        plan = stats[key].plan(args.spec, centring=centring)
        sparse = work / f"sparse_{args.model.parent.name}.onnx"
        rewrite_file(args.model, sparse, plan, fuse=True, check=False)
        rep = validate(args.model, sparse, args.eval, opts, dense_cache=cache)
        r = _row(centring, 0.0, args.spec, rep, None)
        row = {"config": cfg, "fc_bytes_skipped": r["sparsity"], "roles": r["roles"], "quality": r.get("quality"),
               "quality_name": r.get("quality_name"), "kl_mean": r.get("kl_mean"),
               "offsets": sorted({p.offset_kind for p in plan.values()})}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
