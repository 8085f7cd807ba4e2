#!/usr/bin/env python3
"""Benchmark ScapSparseMatMulNBits against onnxruntime's MatMulNBits on the same quantized weights.

The method of tools/bench_kernel.py: each measurement runs a model of C independent nodes over C
copies of the weights (codes differ per copy, so that no copy is shared), C chosen so that the
copies exceed the last-level cache twice over; for each accuracy_level asked (default 0 and 4),
MatMulNBits and the op at that same level (the op quantises several rows of A to int8 at 4, as
MatMulNBits does; one row and levels 0-3 run its float path) run interleaved, all levels together,
and the medians of the repeats are compared: "acc4" is the op at 4 against MatMulNBits at 4. The
same run measures the machine's streaming read bandwidth (onnxruntime's ReduceSum over 8 times
the cache, on as many threads), so every level also shows the rate at which the op streamed the
kept rows of B_packed (scales and zero points not counted). Beside the wall-clock ratios, the
ratios of CPU time per call (the process's, all its threads, over the same interleaved repeats): on
a machine that others share, a thread's wall time depends on how often it was scheduled, its CPU
time much less so.

Weights: random codes, scales and zero points (block-quantization statistics do not matter for the
time), packed as MatMulNBits takes them and repacked for the op by scap_onnx.op.nbits as the
rewriter writes them (float16 scales and packed 4-bit zero points by default; ``--nbits-scales
float32`` for float32 scales). Inputs: exactly round(sparsity * K) elements of each row have
|A| <= 1 (the op's threshold).

    python tools/bench_nbits.py                          # issue 13's M = 1 grid, 2 threads
    python tools/bench_nbits.py --shapes 2048x2048 --m 1 16 128 --sparsity 0 0.5
    python tools/bench_nbits.py --baseline-library /path/to/main/build/libscap_onnx_ops.so
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scap_onnx  # noqa: E402
from bench_kernel import (THRESHOLD, Runner, copies_for, cpu_name, last_level_cache_bytes,  # noqa: E402
                          read_bandwidth, session, sparse_input)
from scap_onnx.op.contract import opset_import  # noqa: E402
from scap_onnx.op.nbits import DEFAULT_NBITS_SCALES, NBITS_SCALES, make_nbits_node, repack_matmul_nbits  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]


def matmul_nbits_weights(k: int, n: int, bits: int, block: int, zero_points: bool, rng: np.random.Generator):
    """Random MatMulNBits inputs: B [N, k_blocks, blob], scales [N * k_blocks], zero points or None."""
    kb = -(-k // block)
    blob = block * bits // 8
    b = rng.integers(0, 256, size=(n, kb, blob), dtype=np.uint8)
    if k % block:  # codes past K are never read; keep them 0 as a quantizer would
        codes_per_byte = 8 // bits
        b.reshape(n, -1)[:, -(-k // codes_per_byte):] = 0
    scales = (rng.random(n * kb, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = None
    if zero_points:
        zp = rng.integers(0, 256, size=n * (-(-kb * bits // 8)), dtype=np.uint8)
    return b, scales, zp


def build_model(kind: str, k: int, n: int, bits: int, block: int, weights: list, accuracy: int = 0) -> onnx.ModelProto:
    """C nodes sharing input A, each over its own copy of the weights: MatMulNBits (kind "ort") or
    ScapSparseMatMulNBits (kind "scap", weights already repacked), both at ``accuracy``."""
    nodes, inits, outputs = [], [], []
    for c, (b, scales, zp) in enumerate(weights):
        inits += [numpy_helper.from_array(b, f"B{c}"), numpy_helper.from_array(scales, f"S{c}")]
        if zp is not None:
            inits.append(numpy_helper.from_array(zp, f"Z{c}"))
        if kind == "ort":
            inputs = ["A", f"B{c}", f"S{c}"] + ([f"Z{c}"] if zp is not None else [])
            nodes.append(helper.make_node("MatMulNBits", inputs, [f"Y{c}"], domain="com.microsoft", K=k, N=n,
                                          bits=bits, block_size=block, accuracy_level=accuracy))
        else:
            nodes.append(make_nbits_node("A", f"B{c}", f"S{c}", f"Y{c}", k=k, n=n, bits=bits, block_size=block,
                                         threshold=THRESHOLD, zero_points=f"Z{c}" if zp is not None else None,
                                         name=f"scap{c}", accuracy_level=accuracy))
        outputs.append(helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    if kind == "scap":
        opsets.append(opset_import())
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def run_grid(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    cache = last_level_cache_bytes()
    rng = np.random.default_rng(1)
    bandwidth = read_bandwidth(8 * cache, args.threads, args.repeats)
    print(f"# streaming read bandwidth, {args.threads} thread(s): {bandwidth:.1f} GB/s", flush=True)
    results = []
    for shape in args.shapes:
        k, n = (int(x) for x in shape.split("x"))
        base = matmul_nbits_weights(k, n, args.bits, args.block, args.zero_points, np.random.default_rng(0))
        packed = repack_matmul_nbits(*base, k=k, n=n, bits=args.bits, block_size=args.block,
                                     nbits_scales=args.nbits_scales)
        copy_bytes = sum(x.nbytes for x in packed if x is not None)
        copies = copies_for(copy_bytes, cache)
        # Per copy, codes XORed with a different byte: distinct initializers, same statistics.
        orts = [(base[0] ^ np.uint8(17 * c % 256), base[1], base[2]) for c in range(copies)]
        scaps = [(packed[0] ^ np.uint8(17 * c % 256), packed[1], packed[2]) for c in range(copies)]
        sessions = {}
        for acc in args.accuracy:  # MatMulNBits and the op at the same level, side by side
            sessions[f"ort{acc}"] = session(build_model("ort", k, n, args.bits, args.block, orts, acc), args.threads,
                                            sparse=False)
            scap_model = build_model("scap", k, n, args.bits, args.block, scaps, acc)
            sessions[f"scap{acc}"] = session(scap_model, args.threads, sparse=True)
            if args.baseline_library is not None:  # another build of the op library, same process
                sessions[f"base{acc}"] = session(scap_model, args.threads, sparse=True,
                                                 library=args.baseline_library)
        del orts, scaps
        row_bytes = packed[0].shape[1]
        for m, sparsity in ((m, s) for m in args.m for s in args.sparsity):
            a = sparse_input(m, k, sparsity, np.float32, rng)
            runners = {name: Runner(sess, {"A": a}) for name, sess in sessions.items()}
            times = {name: [] for name in runners}
            cpu = {name: [] for name in runners}
            order = list(runners)
            for r in range(args.repeats):  # interleaved, in turns: no session always runs after the same one
                for name in order[r % len(order):] + order[:r % len(order)]:
                    runner = runners[name]
                    cpu0 = time.process_time()
                    times[name].append(runner.time() / copies)
                    cpu[name].append((time.process_time() - cpu0) / copies)
            med = {name: statistics.median(t) for name, t in times.items()}
            med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
            kept_rows = int(np.count_nonzero(np.any(np.abs(a) > THRESHOLD, axis=0)))
            row = dict(k=k, n=n, m=m, sparsity=sparsity, copies=copies, threads=args.threads)
            text = f"{k:>6}x{n:<6} M={m:<4} s={sparsity:.2f}"
            for acc in args.accuracy:
                scap, ort_ = f"scap{acc}", f"ort{acc}"
                kept_gbps = kept_rows * row_bytes / med[scap] / 1e9
                row.update({f"{scap}_ms": med[scap] * 1e3, f"{scap}_cpu_ms": med_cpu[scap] * 1e3,
                            f"{ort_}_ms": med[ort_] * 1e3, f"speedup{acc}": med[ort_] / med[scap],
                            f"cpu_speedup{acc}": med_cpu[ort_] / med_cpu[scap], f"kept_gbps{acc}": kept_gbps,
                            f"bandwidth_share{acc}": kept_gbps / bandwidth})
                text += (f"  acc{acc}: scap {row[f'{scap}_ms']:8.3f} ms, ort {row[f'{ort_}_ms']:8.3f} ms"
                         f" x{row[f'speedup{acc}']:5.2f} (CPU x{row[f'cpu_speedup{acc}']:5.2f})")
                if f"base{acc}" in med:
                    row[f"baseline{acc}_ms"] = med[f"base{acc}"] * 1e3
                    row[f"cpu_speedup_baseline{acc}"] = med_cpu[f"base{acc}"] / med_cpu[scap]
                    text += (f" baseline {row[f'baseline{acc}_ms']:8.3f} ms"
                             f" (CPU x{row[f'cpu_speedup_baseline{acc}']:5.2f})")
                text += f" kept {kept_gbps:5.1f} GB/s ({row[f'bandwidth_share{acc}']:.0%})"
            print(text, flush=True)
            results.append(row)
        del sessions
    return dict(
        machine=dict(cpu=cpu_name(), cores=os.cpu_count(), last_level_cache_bytes=cache,
                     onnxruntime=ort.__version__, library=scap_onnx.get_library_path(),
                     isa=scap_onnx.kernel_isa(), load_average_before=load_before,
                     load_average_after=os.getloadavg()),
        method=("median of interleaved repeats; ort<acc> = onnxruntime MatMulNBits with that accuracy_level on "
                "the same codes, scales and zero points, scap<acc> = the op with the same accuracy_level"),
        bits=args.bits, block_size=args.block, zero_points=args.zero_points, repeats=args.repeats,
        op_scales=args.nbits_scales,
        bandwidth_gbps=bandwidth, results=results,
    )


def markdown_table(report: dict, accuracy: list[int]) -> str:
    head = "| K x N | M | sparsity |" + "".join(f" scap{a} ms | acc{a} ms | vs acc{a} | CPU vs acc{a} |"
                                                f" scap{a} kept GB/s | scap{a} share of read BW |" for a in accuracy)
    lines = [head, "|" + "---|" * (3 + 6 * len(accuracy))]
    for r in report["results"]:
        line = f"| {r['k']}x{r['n']} | {r['m']} | {r['sparsity']:.2f} |"
        line += "".join(f" {r[f'scap{a}_ms']:.3f} | {r[f'ort{a}_ms']:.3f} | {r[f'speedup{a}']:.2f}x |"
                        f" {r[f'cpu_speedup{a}']:.2f}x | {r[f'kept_gbps{a}']:.1f} | {r[f'bandwidth_share{a}']:.0%} |"
                        for a in accuracy)
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN weight shapes")
    parser.add_argument("--m", nargs="+", type=int, default=[1], help="rows of A")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.5, 0.7])
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--no-zero-points", dest="zero_points", action="store_false")
    parser.add_argument("--nbits-scales", choices=NBITS_SCALES, default=DEFAULT_NBITS_SCALES,
                        help="the op's scales as the rewriter's option of that name writes them (the random "
                             "scales are in float16's range, so float16 rounds them)")
    parser.add_argument("--accuracy", nargs="+", type=int, default=[0, 4],
                        help="accuracy_level(s): MatMulNBits and the op at each, side by side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--baseline-library", type=Path, default=None,
                        help="another build of the op library, timed interleaved with this one (CPU-time ratio)")
    parser.add_argument("--json", type=Path, default=Path("bench_nbits.json"), help="where to write the results")
    args = parser.parse_args()
    report = run_grid(args)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.json)
    print()
    print(markdown_table(report, args.accuracy))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
