#!/usr/bin/env python3
"""Decode-step latency of several sparse rewrites of one dense decoder, interleaved in one run.

`scap-onnx validate` times one sparse model against its dense model. Comparing two plans (say a
uniform SPEC and a byte-budget allocation at the same bytes) by two validate runs puts minutes and
other jobs between them; here every model runs one decode step per round, in an order that
reverses every round, on one onnxruntime thread pool setting, and the medians and paired ratios
come from the same rounds.

    python tools/bench_decode_plans.py DENSE.onnx A.onnx B.onnx --data TEXT --kv-len 256 --repeats 300

prints, per model, the median decode step, its speedup over dense (ratio of medians and median of
paired ratios) and, for every sparse model after the first, its paired ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scap_onnx.calibration.data import open_data  # noqa: E402
from scap_onnx.evaluation.latency import DECODE_TOKENS, _decoder_feeds, interleaved, token_stream  # noqa: E402
from scap_onnx.evaluation.pairing import open_pair  # noqa: E402
from scap_onnx.op.session import base_options, open_session  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dense", type=Path)
    ap.add_argument("sparse", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, required=True, help="Text (tokenizer beside the dense model) or .npz.")
    ap.add_argument("--kv-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = ap.parse_args()

    pairs = [open_pair(args.dense, s) for s in args.sparse]
    pair = pairs[0]
    if not pair.past:
        raise SystemExit("error: the model has no KV cache inputs: no decode step to time")
    ds = open_data(args.data, pair.sparse_proto, args.dense, seq_len=256, max_tokens=args.kv_len + DECODE_TOKENS + 256)
    ids, _ = token_stream(ds, args.kv_len + DECODE_TOKENS)
    L = args.kv_len
    paths = {"dense": args.dense, **{f"sparse{i}": p for i, p in enumerate(args.sparse)}}
    # spinning off: one pool per session, and spinning pools would take each other's cores
    sessions = {n: open_session(str(p), options=base_options(args.threads, spinning=False),
                                use_library=n != "dense" or None) for n, p in paths.items()}
    prefill = _decoder_feeds(pair, ids[None, :L], 0, None)
    steps = {}
    for name, sess in sessions.items():
        res = dict(zip(pair.outputs, sess.run(pair.outputs, prefill)))
        cache = {o: res[o] for o in pair.past.values()}
        steps[name] = [_decoder_feeds(pair, ids[None, L + j:L + j + 1], L, cache) for j in range(DECODE_TOKENS)]
    count = {n: 0 for n in sessions}

    def step(name):
        def run():
            f = steps[name][count[name] % DECODE_TOKENS]
            count[name] += 1
            return sessions[name].run(None, f)
        return run

    times = {n: np.asarray(t) for n, t in interleaved({n: step(n) for n in sessions}, args.warmup, args.repeats).items()}
    dense = times["dense"]
    out = {"kv_len": L, "repeats": args.repeats, "threads": args.threads, "models": {}}
    print(f"decode step, KV {L}, {args.repeats} interleaved rounds, {args.threads} threads")
    print("| model | median ms | speedup | paired speedup | paired vs first sparse |")
    print("|---|---:|---:|---:|---:|")
    first = times["sparse0"]
    for name, t in times.items():
        row = {"path": str(paths[name]), "median_ms": float(np.median(t) * 1e3),
               "speedup": float(np.median(dense) / np.median(t)), "paired_speedup": float(np.median(dense / t)),
               "paired_vs_first": float(np.median(first / t))}
        out["models"][name] = row
        print(f"| {paths[name].name} | {row['median_ms']:.3f} | {row['speedup']:.3f}x | {row['paired_speedup']:.3f}x | "
              f"{row['paired_vs_first']:.3f}x |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
