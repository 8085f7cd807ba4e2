#!/usr/bin/env python3
"""What every mix of a checked byte budget costs on other texts: is the check's pick the texts' pick?

`calibrate --budget B` measures the allocated plan, the uniform plan of the same bytes and mixes of
the two on its calibration text and keeps one by its perplexity change and noise
(scap_onnx.calibration.sensitivity.choose_mix). This feeds the same mixes, rebuilt from a budget stats.json
(its stored gains), to the same one-session probe over each text given, and prints each mix's
perplexity change with the paired standard error of its per-token NLL difference to uniform: the
noise the check's choice has to beat. Causal LMs only.

    python tools/budget_mixes.py MODEL.onnx stats_budget_0.3.json [more stats...] \\
        --text pydoc.txt:2048 fortunes.txt:8192 kjv.txt:8192 --out mixes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scap_onnx.calibration.data import open_data  # noqa: E402
from scap_onnx.calibration.sensitivity import PlanProbe, mix_sparsities, paired_se, probe_plan  # noqa: E402
from scap_onnx.calibration.stats import Stats  # noqa: E402
from scap_onnx.graph.model_io import ModelSource  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("stats", nargs="+", help="stats.json files written by calibrate --budget (or sweep's budget)")
    ap.add_argument("--text", nargs="+", required=True, help="TEXT[:TOKENS] (default 8192 tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON of every perplexity change")
    args = ap.parse_args()

    plans = [Stats.load(p) for p in args.stats]
    result = {}
    with ModelSource(args.model) as source:
        for spec in args.text:
            path, _, n = spec.partition(":")
            tokens = int(n or 8192)
            data = open_data(path, source.proto, args.model, seq_len=args.seq_len, max_tokens=tokens)
            probe = PlanProbe(plans[0].sites, source, data, args.threads, tokens=args.seq_len, check_tokens=tokens)
            if not probe.lm:
                raise SystemExit("budget_mixes: a causal LM's logits and input_ids are needed")
            for st in plans:
                budget = st.calibration["budget"]
                check = st.calibration.get("budget_check", {})
                centring = check.get("centring")  # the check's own, so that the mixes are the ones it measured
                measured = {lam: probe.measure(probe_plan(st.sites, mix, centring))
                            for lam, mix in mix_sparsities(st.sites, budget, centring).items()}
                cells = []
                for lam, m in measured.items():
                    diff = m.samples - measured[0.0].samples
                    cells.append(f"{lam:g}: {m.loss * 100:+.2f}% "
                                 f"({diff.mean():+.4f}±{paired_se(diff) if lam else 0.0:.4f} nats)")
                kept = check.get("mix")
                print(f"{Path(path).name} {probe.check_tokens} tokens, B {budget:g} (check kept {kept}): "
                      + " | ".join(cells), flush=True)
                result[f"{Path(path).name}/{budget:g}"] = {f"{lam:g}": m.loss for lam, m in measured.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
