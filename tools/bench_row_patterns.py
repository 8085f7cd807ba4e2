#!/usr/bin/env python3
"""Decode (M = 1) speed of ScapSparseMatMul by the layout of the kept rows, on one shared pool.

bench_kernel.py gives each session a thread pool of its own with spinning off, so that interleaved
sessions do not steal each other's cores. A decoder runs its nodes on one pool whose threads spin, as
validate times it. This benchmark does the same for one weight shape: C independent nodes (weights
beyond the last-level cache) read one input, onnxruntime's MatMul against the op, and the op's input
keeps the same share of rows either scattered at random (runs of 1) or in runs of R adjacent rows.

    python tools/bench_row_patterns.py --shape 1536x576 --sparsity 0.55
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scap_onnx  # noqa: E402
from bench_kernel import THRESHOLD, build_model, copies_for, last_level_cache_bytes  # noqa: E402


def runs_input(k: int, sparsity: float, run: int, rng: np.random.Generator) -> np.ndarray:
    """One row of A whose kept elements (|a| > THRESHOLD) form runs of `run` adjacent columns."""
    groups = k // run
    kept_groups = rng.permutation(groups)[: int(round(groups * (1 - sparsity)))]
    kept = np.zeros(k, bool)
    for g in kept_groups:
        kept[g * run:(g + 1) * run] = True
    return np.where(kept, 2.0, 0.5).astype(np.float32)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1536x576", help="KxN weight shape")
    parser.add_argument("--sparsity", type=float, default=0.55)
    parser.add_argument("--runs", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32], help="kept-run lengths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    k, n = (int(x) for x in args.shape.split("x"))

    ort.set_global_thread_pool_sizes(args.threads, 1)  # one pool, spinning: onnxruntime's default

    def session(kind: str, copies: int) -> ort.InferenceSession:
        options = scap_onnx.session_options() if kind == "sparse" else ort.SessionOptions()
        options.use_per_session_threads = False
        model = build_model(kind, k, n, copies, np.float32)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    copies = copies_for(k * n * 4, last_level_cache_bytes())
    dense, sparse = session("dense", copies), session("sparse", copies)
    rng = np.random.default_rng(1)
    runs = {"MatMul": (dense, runs_input(k, 0.0, 1, rng))}
    runs |= {f"op, runs of {r}": (sparse, runs_input(k, args.sparsity, r, rng)) for r in args.runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved
        for name, (sess, a) in runs.items():
            start = time.perf_counter()
            sess.run(None, {"A": a})
            times[name].append((time.perf_counter() - start) / copies)
    dense_us = statistics.median(times["MatMul"]) * 1e6
    print(f"# {k}x{n}, M=1, {args.threads} threads on one shared pool, {copies} weight copies, "
          f"sparsity {args.sparsity}, medians of {args.repeats}")
    print("| kernel | us per node | speedup | proportional |")
    print("|---|---:|---:|---:|")
    for name in runs:
        us = statistics.median(times[name]) * 1e6
        share = 1.0 if name == "MatMul" else 1 - args.sparsity
        print(f"| {name} | {us:.1f} | {dense_us / us:.2f}x | {1 / share:.2f}x |")


if __name__ == "__main__":
    main()
