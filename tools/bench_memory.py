#!/usr/bin/env python3
"""Peak memory of an onnxruntime session over a model of about 1 GB of weights: ScapSparseMatMul
against onnxruntime's MatMul on the same weights.

Each model is saved with external data; a fresh child process creates the session, runs it once
(decode shape, then a batch of 32 rows) and reports its peak resident set size, so the two
measurements do not share an allocator.

    python tools/bench_memory.py [--gib 1.0] [--json bench_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scap_onnx.op.contract import make_node, opset_import  # noqa: E402

K = N = 4096


def build(kind: str, layers: int, folder: Path) -> Path:
    """`layers` chained [K, K] layers (MatMul or ScapSparseMatMul), saved with external data."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "A"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((K, N), np.float32) / 64).astype(np.float32), f"W{i}"))
        out = f"H{i}"
        if kind == "dense":
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        else:
            nodes.append(make_node(prev, f"W{i}", out, threshold=0.01, name=f"sparse{i}"))
        prev = out
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17)] + ([opset_import()] if kind == "sparse" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    path = folder / f"{kind}.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location=f"{kind}.onnx.data")
    return path


# VmHWM, not getrusage: ru_maxrss survives fork + exec and would report the parent's peak.
CHILD = r"""
import sys, numpy as np, onnxruntime as ort, scap_onnx
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
path, sparse = sys.argv[1], sys.argv[2] == "sparse"
options = scap_onnx.session_options() if sparse else ort.SessionOptions()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
after_load = peak_kib()
for rows in (1, 32):
    session.run(None, {"A": np.random.default_rng(0).standard_normal((rows, 4096), np.float32)})
print(after_load, peak_kib())
"""


def peak_rss_mib(path: Path, kind: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), kind], check=True, capture_output=True, text=True,
                         env=dict(os.environ))
    load_kib, run_kib = (int(x) for x in out.stdout.split())
    return load_kib / 1024, run_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="weights in the model, GiB")
    parser.add_argument("--json", type=Path, default=Path("bench_memory.json"))
    args = parser.parse_args()
    layers = max(1, round(args.gib * (1 << 30) / (K * N * 4)))
    weights_mib = layers * K * N * 4 / (1 << 20)
    report = {"weights_mib": weights_mib, "layers": layers, "shape": [K, N]}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dense", "sparse"):
            path = build(kind, layers, Path(tmp))
            load, run = peak_rss_mib(path, kind)
            report[kind] = {"peak_rss_after_load_mib": load, "peak_rss_after_run_mib": run}
            print(f"{kind:>6}: peak RSS after session creation {load:8.0f} MiB, after runs {run:8.0f} MiB "
                  f"(weights {weights_mib:.0f} MiB)", flush=True)
    report["sparse_over_dense"] = report["sparse"]["peak_rss_after_run_mib"] / report["dense"]["peak_rss_after_run_mib"]
    print(f"sparse / dense peak RSS: {report['sparse_over_dense']:.2f}")
    tmp_json = args.json.with_suffix(".tmp")
    tmp_json.write_text(json.dumps(report, indent=2))
    os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
