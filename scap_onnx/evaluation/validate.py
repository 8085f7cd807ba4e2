"""Validate a sparse model against its dense original: accuracy, measured sparsity and latency.

    scap-onnx validate DENSE.onnx SPARSE.onnx --data held_out.txt [--report report.json]

Accuracy (one pass over the data, dense and sparse on the same feeds):

- causal LMs (a ``logits`` output and an ``input_ids`` input): perplexity of both models over
  windows of the text (each window scored on its own, every next token after the first), the
  change; next-token top-1 agreement and KL(P_dense || P_sparse) of the next-token distributions
  over every position;
- encoders (``input_ids`` but no ``logits``): cosine of the mean-pooled (attention-masked)
  embeddings of each row;
- any model, any data (.npz feeds too): relative error ||sparse - dense|| / ||dense|| per output.

Measured sparsity: the sparse model runs with the inputs A of its ScapSparseMatMul nodes as
extra outputs; per node the fraction of elements with ``|A - offset| <= threshold``, per role,
and weighted by weight size: the share of all FC weight bytes (MatMuls with a constant 2-D B,
lm_head included) that the kernels skip, with the speedup that share would give if decoding
were nothing but reading FC weights (``ideal_fc_speedup``).

Latency: both models in sessions with the same options, interleaved (scap_onnx.evaluation.latency).
onnxruntime-genai folders (genai_config.json beside the model; DENSE and SPARSE may name the folders)
also get decode tokens/s through ``og.Generator`` (scap_onnx.evaluation.genai_decode), the prompt the
first ``kv_len`` tokens of the data.

The report (JSON; keys in :mod:`scap_onnx.evaluation.report`) names the CPU model and ISA, the
kernel the op library chose, thread count, onnxruntime version and execution provider.

The pieces: pairing (the two models, by the rewriter's node metadata), accuracy (one pass over the
data: metrics and sparsity), latency, environment; this module runs them in order.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..calibration.data import DataReader
from ..calibration.spec import parse_spec
from ..graph.genai import is_genai_folder, resolve_model
from ..graph.targets import ROLES
from ..op.contract import scap_nodes
from ..op.session import default_threads, provider_name
from ..progress import NullProgress, Progress
from .accuracy import DenseCache, measure_accuracy
from .environment import environment
from .eval_data import open_eval_data
from .genai_decode import GenaiDecodeJob, measure_genai_decode
from .latency import DECODE_TOKENS, measure_latency, token_stream
from .options import ValidateOptions
from .pairing import open_pair

REPORT_FORMAT = "scap-onnx-validate"
REPORT_VERSION = 1


def validate(dense: str | Path, sparse: str | Path, data: str | Path | DataReader, options: ValidateOptions | None = None,
             *, progress: Progress | None = None, dense_cache: DenseCache | None = None) -> dict:
    """Validate SPARSE against DENSE on DATA (a file, or a DataSource); returns the report dict (see scap_onnx.evaluation.report)."""
    opts = options or ValidateOptions()
    opts.check()
    progress = progress or NullProgress()
    started = time.perf_counter()
    folders = (Path(dense), Path(sparse)) if is_genai_folder(dense) and is_genai_folder(sparse) else None
    dense, sparse = resolve_model(dense), resolve_model(sparse)
    pair = open_pair(dense, sparse)
    provider = provider_name(opts.provider)
    threads = opts.threads or default_threads()
    ds = data if isinstance(data, DataReader) else open_eval_data(pair, data, opts)
    env = environment(threads, provider, opts.spinning)
    env["thread_pool"] = "separate"  # the accuracy sessions; latency below records its own
    report: dict = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dense": {"path": str(pair.dense_path.resolve()), "bytes": _model_bytes(pair.dense_path)},
        "sparse": {"path": str(pair.sparse_path.resolve()), "bytes": _model_bytes(pair.sparse_path),
                   "scap_nodes": len(scap_nodes(pair.sparse_proto)), "scap_targets": len(pair.scap)},
        "model_kind": pair.kind,
        "data": {**ds.describe(), "max_tokens": ds.max_tokens},
        "environment": env,
    }
    seen: list[np.ndarray] = []
    need = opts.kv_len + DECODE_TOKENS

    def sink(ids):
        if sum(c.size for c in seen) < need:
            seen.append(ids.reshape(-1).copy())

    if opts.accuracy:
        acc, sp = measure_accuracy(pair, ds, opts, progress, dense_cache, sink)
        report["data"]["tokens"] = acc["tokens"]
        report["data"]["batches"] = acc["batches"]
        report["accuracy"] = acc
        report["sparsity"] = sp
    if opts.latency:
        report["latency"] = measure_latency(pair, ds, opts, seen, progress)
        for key in ("thread_pool", "spinning"):  # what the timing really ran on
            report["environment"][key] = report["latency"][key]
        if folders is not None:
            prompt = token_stream(ds, opts.kv_len, seen)[0].tolist()
            task = progress.task("latency: decode through og.Generator (in a separate process)", None)
            report["latency"]["genai_decode"] = measure_genai_decode(GenaiDecodeJob(
                folders[0], folders[1], prompt, warmup=max(1, opts.warmup), repeats=opts.repeats, threads=threads))
            task.close()
    report["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _model_bytes(path: Path) -> int:
    total = path.stat().st_size
    for extra in (path.with_name(path.name + ".data"), path.with_name(path.name + "_data"),
                  path.with_suffix(".onnx_data")):
        if extra.is_file():
            total += extra.stat().st_size
    return total


def targets_from_spec(spec: str | None) -> dict[str, float] | None:
    """Role -> target sparsity from a SPEC (for the report's measured-vs-target columns)."""
    if not spec:
        return None
    s = parse_spec(spec)
    return {r: s.sparsity(r) for r in ROLES if s.sparsity(r) is not None}


def default_report_path(sparse: Path) -> Path:
    return sparse.with_name(sparse.stem + ".report.json")
