#!/usr/bin/env python3
"""Benchmark ScapSparseMatMul against onnxruntime's own MatMul on the same shapes, in one run.

Each measurement runs a model of C independent nodes over C copies of the weight matrix, with C
chosen so that the copies exceed the last-level cache twice over: like a decoder's layers, no
weight is in cache when its node runs. Dense (onnxruntime's float32 MatMul) and sparse runs are
interleaved and the medians of the repeats are compared. The same run measures the machine's
streaming read bandwidth (onnxruntime's ReduceSum over 8 times the cache, on as many threads), so
every row also shows the bandwidth the op reached on the weight rows it kept.

    python tools/bench_kernel.py                      # the full grid of issue 2 (about 30 min)
    python tools/bench_kernel.py --quick              # K = N = 4096, M = 1 and 128 only
    python tools/bench_kernel.py --shapes 4096x4096 --m 1 --threads 2 --json out.json
    python tools/bench_kernel.py --m 8 --gemm sparse packed   # forced paths side by side (break-even points)
    python tools/bench_kernel.py --shapes 4096x4096 --m 1 --sparsity 0.5 --channels none scale both

With --gemm, each value of SCAP_ONNX_GEMM (read when a session is made) gets its own sparse session,
and all of them are interleaved with the dense one: one row per value. With --baseline-library, each
sparse variant runs on that other build of the op library as well (rows marked "baseline").

Every row gives the speedup in wall time and in the process's CPU time (medians of each). On a host
shared with other jobs the CPU-time ratio is the steadier one for compute-bound shapes on one thread
(time spent waiting for a core does not count); wall time is what a user gets.

--channels runs the op without per-channel inputs (none), with a threshold_scale of ones (scale),
or with it and a channel_offset of zeros (both): the same elements dropped, so the rows differ by the
cost of the per-channel check alone; every variant is interleaved with the others (in turns) and the
dense runs, and each variant after the first is also given as the median of its per-repeat ratios to
the first (vs_first in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scap_onnx  # noqa: E402
from scap_onnx.op.contract import make_node, opset_import  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "2048x5632"]
THRESHOLD = 1.0  # inputs are built so that exactly the requested share of |A - 0| is <= 1


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 512 MiB when it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else 512 << 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copies_for(weight_bytes: int, cache_bytes: int, minimum: int = 2) -> int:
    return max(minimum, -(-2 * cache_bytes // weight_bytes))


def build_model(kind: str, k: int, n: int, copies: int, dtype: type, channels: str = "none") -> onnx.ModelProto:
    """C nodes sharing input A, each over its own copy of B: MatMul or ScapSparseMatMul (with
    per-channel inputs of its own per `channels`: see the module docstring)."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    weights = (np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(dtype)
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        # Distinct values per copy: onnxruntime may share identical initializers, which would let
        # every node read one copy from cache.
        inits.append(numpy_helper.from_array(weights * np.asarray(1 + c / 1024, weights.dtype), f"B{c}"))
        if kind == "dense":
            nodes.append(helper.make_node("MatMul", ["A", f"B{c}"], [f"Y{c}"]))
        else:
            vectors = {}
            if channels in ("scale", "both"):
                inits.append(numpy_helper.from_array(np.ones(k, np.float32), f"scale{c}"))
                vectors["threshold_scale"] = f"scale{c}"
            if channels == "both":
                inits.append(numpy_helper.from_array(np.zeros(k, np.float32), f"channel_offset{c}"))
                vectors["channel_offset"] = f"channel_offset{c}"
            nodes.append(make_node("A", f"B{c}", f"Y{c}", threshold=THRESHOLD, name=f"sparse{c}", **vectors))
        outputs.append(helper.make_tensor_value_info(f"Y{c}", elem, None))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("A", elem, [None, k])], outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([opset_import()] if kind == "sparse" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def read_bandwidth(total_bytes: int, threads: int, repeats: int) -> float:
    """Streaming read bandwidth in GB/s: onnxruntime's ReduceSum over total_bytes of float32 (64 rows,
    each summed), on `threads` intra-op threads. numpy cannot measure it: its float32 sum is bound by
    its pairwise summation and its integer reductions by their scalar loops (on a Zen 5 EPYC 12-22
    and 15-33 GB/s where ReduceSum reads 36-40 GB/s). onnxruntime's MatMul with one row streams its
    weights up to 15% faster still (44 GB/s there), so a "share of read bandwidth" can exceed 100%."""
    rows = 64
    data = np.ones((rows, max(1, total_bytes // 4 // rows)), np.float32)
    node = helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=0)
    graph = helper.make_graph([node], "read", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(data.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess.run(None, {"X": data})
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {"X": data})
        rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def session(model: onnx.ModelProto, threads: int, sparse: bool, gemm: str | None = None,
            library: Path | None = None) -> ort.InferenceSession:
    """A session of `threads` intra-op threads; gemm, when given, is SCAP_ONNX_GEMM while the sparse
    kernels are made (they read it then); library, when given, is another build of the op library
    (before / after a kernel change, in one run)."""
    if library is not None:
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
    else:
        options = scap_onnx.session_options(intra_op_threads=threads) if sparse else ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Interleaved sessions each own a thread pool: spinning workers of the session that just ran
    # would steal the cores from the next one.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    saved = os.environ.get("SCAP_ONNX_GEMM")
    if gemm is not None:
        os.environ["SCAP_ONNX_GEMM"] = gemm
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    finally:
        if gemm is not None:
            if saved is None:
                del os.environ["SCAP_ONNX_GEMM"]
            else:
                os.environ["SCAP_ONNX_GEMM"] = saved


def sparse_input(m: int, k: int, sparsity: float, dtype: type, rng: np.random.Generator) -> np.ndarray:
    """Rows with exactly round(sparsity * K) elements of magnitude <= THRESHOLD, at random places."""
    a = rng.uniform(1.1, 3.0, (m, k)) * rng.choice([-1.0, 1.0], (m, k))
    dropped = int(round(sparsity * k))
    for row in a:
        row[rng.permutation(k)[:dropped]] = rng.uniform(-0.9, 0.9, dropped)
    return a.astype(dtype)


# Runs before timing: the op packs B on its first several-row call and then times its register tiles
# against its pair lists on the next calls of each kind (custom_ops/timed_choice.h: two calls each),
# keeping the faster; what is timed is the steady state after that.
WARM_UP_RUNS = 5


class Runner:
    """A session with its input and outputs bound once, so repeats time the graph alone."""

    def __init__(self, sess: ort.InferenceSession, feeds: dict[str, np.ndarray]):
        self.sess = sess
        self.binding = sess.io_binding()
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        for out in sess.get_outputs():
            self.binding.bind_output(out.name, "cpu")
        for _ in range(WARM_UP_RUNS):  # also allocates outputs
            sess.run_with_iobinding(self.binding)

    def time(self) -> float:
        start = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - start

    def times(self) -> tuple[float, float]:
        """Wall time and the process's CPU time of one run. On a shared host the CPU time is the
        steadier measure of work: time spent waiting for a core does not count."""
        cpu = time.process_time()
        wall = self.time()
        return wall, time.process_time() - cpu


def run_grid(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    cache = last_level_cache_bytes()
    rng = np.random.default_rng(1)
    results = []
    bandwidth = {}
    for threads in args.threads:
        bandwidth[threads] = read_bandwidth(8 * cache, threads, args.repeats)
        print(f"# streaming read bandwidth, {threads} thread(s): {bandwidth[threads]:.1f} GB/s", flush=True)
        for shape in args.shapes:
            k, n = (int(x) for x in shape.split("x"))
            # Every M reads weights from memory, as a model's layers do (tall A too: onnxruntime's
            # MatMul gains more than the op from weights that sit in cache). One session per dtype
            # serves every M.
            dense_copies = copies_for(k * n * 4, cache)
            dense = session(build_model("dense", k, n, dense_copies, np.float32), threads, sparse=False)
            sparse_sessions = {}
            for dname in args.dtypes:
                copies = copies_for(k * n * np.dtype(dname).itemsize, cache)
                model_for = {ch: build_model("sparse", k, n, copies, np.dtype(dname).type, ch) for ch in args.channels}
                libraries = [None] + ([args.baseline_library] if args.baseline_library is not None else [])
                sparse_sessions[dname] = (
                    {(gemm, ch, lib): session(model_for[ch], threads, sparse=True, gemm=gemm, library=lib)
                     for gemm in args.gemm for ch in args.channels for lib in libraries}, copies)
            for m, sparsity in ((m, s) for m in args.m for s in args.sparsity):
                a32 = sparse_input(m, k, sparsity, np.float32, rng)
                dense_runner = Runner(dense, {"A": a32})
                for dname, (sessions, copies) in sparse_sessions.items():
                    a = a32.astype(np.dtype(dname))
                    runners = {variant: Runner(sess, {"A": a}) for variant, sess in sessions.items()}
                    dense_t, sparse_t = [], {variant: [] for variant in runners}
                    dense_cpu, sparse_cpu = [], {variant: [] for variant in runners}
                    order = list(runners)
                    for r in range(args.repeats):  # interleaved, the sparse variants in turns
                        wall, cpu = dense_runner.times()
                        dense_t.append(wall / dense_copies)
                        dense_cpu.append(cpu / dense_copies)
                        for variant in order[r % len(order):] + order[:r % len(order)]:
                            wall, cpu = runners[variant].times()
                            sparse_t[variant].append(wall / copies)
                            sparse_cpu[variant].append(cpu / copies)
                    d_med = statistics.median(dense_t)
                    d_cpu = statistics.median(dense_cpu)
                    kept_rows = np.count_nonzero(np.any(np.abs(a.astype(np.float32)) > THRESHOLD, axis=0))
                    kept_bytes = kept_rows * n * np.dtype(dname).itemsize
                    first = order[0]
                    for (gemm, ch, lib), times in sparse_t.items():
                        s_med = statistics.median(times)
                        kept_bw = kept_bytes / s_med / 1e9
                        row = dict(k=k, n=n, m=m, dtype=dname, threads=threads, sparsity=sparsity, channels=ch,
                                   copies=copies, dense_ms=d_med * 1e3, sparse_ms=s_med * 1e3, speedup=d_med / s_med,
                                   cpu_speedup=d_cpu / statistics.median(sparse_cpu[(gemm, ch, lib)]),
                                   kept_gbps=kept_bw, bandwidth_share=kept_bw / bandwidth[threads])
                        if gemm is not None:
                            row["gemm"] = gemm
                        if lib is not None:
                            row["library"] = str(lib)
                        paired = ""
                        if (gemm, ch, lib) != first:  # against the first variant, repeat by repeat: drift cancels
                            row["vs_first"] = statistics.median(t / t0 for t, t0 in zip(times, sparse_t[first]))
                            paired = f"  vs first {row['vs_first']:.3f}"
                        results.append(row)
                        label = (f" {gemm}" if gemm is not None else "") + (" baseline" if lib is not None else "") + f" {ch:<5}"
                        print(f"{k:>6}x{n:<6} M={m:<4} {dname:<8} t={threads} s={sparsity:.2f}{label}  "
                              f"dense {row['dense_ms']:8.3f} ms  sparse {row['sparse_ms']:8.3f} ms  "
                              f"x{row['speedup']:5.2f} (CPU x{row['cpu_speedup']:5.2f})  kept {kept_bw:5.1f} GB/s "
                              f"({row['bandwidth_share']:.0%})"
                              f"{paired}", flush=True)
            del dense, sparse_sessions
    return dict(
        machine=dict(cpu=cpu_name(), cores=os.cpu_count(), last_level_cache_bytes=cache,
                     onnxruntime=ort.__version__, library=scap_onnx.get_library_path(),
                     load_average_before=load_before, load_average_after=os.getloadavg()),
        method="median of interleaved repeats; dense = onnxruntime float32 MatMul on the same shapes",
        repeats=args.repeats,
        bandwidth_gbps=bandwidth,
        results=results,
    )


def markdown_table(report: dict) -> str:
    lines = ["| K x N | M | weights | threads | sparsity | per-channel | dense ms | sparse ms | speedup | CPU-time speedup "
             "| kept GB/s | share of read BW |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        variant = " ".join(x for x in (r.get("gemm"), "baseline" if "library" in r else None) if x)
        variant = f" ({variant})" if variant else ""
        lines.append(f"| {r['k']}x{r['n']} | {r['m']} | {r['dtype']} | {r['threads']} | {r['sparsity']:.2f}{variant} | "
                     f"{r.get('channels', 'none')} | "
                     f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | "
                     f"{r['kept_gbps']:.1f} | {r['bandwidth_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN weight shapes")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 128], help="rows of A")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--channels", nargs="+", default=["none"], choices=["none", "scale", "both"],
                        help="per-channel inputs of the sparse runs (module docstring)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gemm", nargs="+", default=[None], help="SCAP_ONNX_GEMM values to compare (forced paths)")
    parser.add_argument("--baseline-library", type=Path, default=None,
                        help="another build of the op library, timed as further sparse variants in the same run")
    parser.add_argument("--quick", action="store_true", help="K = N = 4096, M = 1 and 128, 2 threads")
    parser.add_argument("--json", type=Path, default=Path("bench_kernel.json"), help="where to write the results")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.m, args.threads = ["4096x4096"], [1, 128], [2]
    report = run_grid(args)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.json)
    print()
    print(markdown_table(report))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
