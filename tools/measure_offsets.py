#!/usr/bin/env python
"""Mode-centring vs offset 0 at the same sparsity on an encoder: embedding cosine to the dense model.

Calibrates (--calib text), then rewrites twice with the same sparsity per input: once with the
calibrated offsets, once with offset 0 and tau = quantile(|x|, s); reports the offsets chosen
for each role (e.g. the post-GELU output.dense inputs) and the mean cosine between mean-pooled
embeddings of the dense and each sparse model on --eval text.

    python tools/measure_offsets.py --model ~/.cache/scap-onnx/models/all-minilm-l6-v2/model.onnx \
        --calib ~/.cache/scap-onnx/texts/pydoc.txt --eval ~/.cache/scap-onnx/texts/kjv.txt --spec 0.5 down=0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scap_onnx.calibration.calibrator import calibrate  # noqa: E402
from scap_onnx.graph.model_io import load_proto  # noqa: E402
from scap_onnx.calibration.data import open_data  # noqa: E402
from scap_onnx.evaluation.options import ValidateOptions  # noqa: E402
from scap_onnx.evaluation.sparsity import measure_sparsity, role_summary  # noqa: E402
from scap_onnx.evaluation.validate import validate  # noqa: E402
from scap_onnx.progress import make_progress  # noqa: E402
from scap_onnx.graph.model_io import load_model, save_model  # noqa: E402
from scap_onnx.passes.sparsify import rewrite_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--spec", nargs="+", default=["0.5"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    progress = make_progress()
    proto = load_proto(args.model)
    data = open_data(args.eval, proto, args.model, seq_len=args.seq_len, max_tokens=args.eval_tokens)
    del proto
    report = {"model": str(args.model), "calib": str(args.calib), "eval": str(args.eval), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="scap-offsets-"))
    for spec in args.spec:
        stats = calibrate(args.model, args.calib, sparsity=spec, max_tokens=args.tokens, seq_len=args.seq_len,
                          passes=args.passes, progress=progress)
        plan = stats.plan(None)
        zero = {}
        offsets = {}
        for s in stats.sites:
            if s.sparsity is None:
                continue
            tau0 = s.histogram.threshold(s.sparsity, 0.0)
            for t in s.targets:
                if t["name"] in plan:
                    zero[t["name"]] = (tau0, 0.0, s.token_scaled)
            offsets.setdefault("/".join(s.roles), []).append({"layer": s.layer, "offset": round(s.offset, 5),
                                                              "kind": s.offset_kind, "threshold": round(s.threshold, 5)})
        res = {"spec": spec, "offsets": offsets}
        for label, p in (("mode", plan), ("zero", zero)):
            model, _ = rewrite_model(load_model(args.model), p)
            out = work / f"{label}.onnx"
            save_model(model, out)
            del model
            agree = validate(args.model, out, data, ValidateOptions(latency=False))["accuracy"]["embedding"]
            summ = role_summary(measure_sparsity(out, data))
            res[label] = {"cosine_mean": agree["cosine_mean"], "cosine_min": agree["cosine_min"],
                          "measured": {r: round(v["mean"], 4) for r, v in summ.items()}}
        report["runs"].append(res)
        print(json.dumps({"spec": spec, "cos_mode": round(res["mode"]["cosine_mean"], 5),
                          "cos_zero": round(res["zero"]["cosine_mean"], 5),
                          "down_offsets": [o["offset"] for o in offsets.get("down", [])],
                          "measured_mode": res["mode"]["measured"], "measured_zero": res["zero"]["measured"]}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    if hasattr(progress, "stop"):
        progress.stop()


if __name__ == "__main__":
    main()
