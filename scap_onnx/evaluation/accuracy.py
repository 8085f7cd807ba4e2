"""Accuracy and measured sparsity in one pass over the evaluation data: the dense model and the
sparse one (with its ScapSparseMatMul inputs as extra outputs) on the same feeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..calibration.capture import CAPTURE_PREFIX, build_capture_model
from ..errors import ScapError
from ..graph.model_io import ModelSource
from ..op.session import base_options, default_threads, library_available, open_session, provider_name, run_session
from ..progress import NullProgress, Progress
from ..calibration.lm_loss import ids_of
from .eval_data import batches
from .metrics import Metrics
from .options import ValidateOptions
from .pairing import ModelPair
from .sparsity import SparsityCounter, summarize


class DenseCache:
    """The dense model's outputs per batch, kept on disk, so a sweep runs the dense model once."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key: str | None = None

    def _file(self, i: int) -> Path:
        return self.folder / f"batch{i:05d}.npz"

    def get(self, key: str, i: int) -> dict[str, np.ndarray] | None:
        if key != self.key:
            return None
        f = self._file(i)
        if not f.is_file():
            return None
        with np.load(f) as z:
            return {k: z[k] for k in z.files}

    def put(self, key: str, i: int, outs: dict[str, np.ndarray]) -> None:
        if key != self.key:
            for f in self.folder.glob("batch*.npz"):
                f.unlink()
            self.key = key
        np.savez(self._file(i), **outs)


def _dense_key(pair: ModelPair, ds) -> str:
    st = pair.dense_path.stat()
    return json.dumps([str(pair.dense_path.resolve()), st.st_size, st.st_mtime_ns, ds.describe(), ds.max_tokens])


def measure_accuracy(pair: ModelPair, ds, opts: ValidateOptions, progress: Progress | None = None,
                     dense_cache: DenseCache | None = None, token_sink: Callable | None = None) -> tuple[dict, dict]:
    """(accuracy, sparsity) over the data: both models on each batch, the sparse one with its
    ScapSparseMatMul inputs as extra outputs. ``token_sink(ids)`` sees every batch's input_ids."""
    progress = progress or NullProgress()
    threads = opts.threads or default_threads()
    provider = provider_name(opts.provider)
    # the sparse model's outputs and its ScapSparseMatMul inputs, all as capture outputs
    out_elem = {o.name: o.type.tensor_type.elem_type for o in pair.sparse_proto.graph.output}
    cap_names = list(dict.fromkeys(n["input"] for n in pair.scap))
    wanted = {o: out_elem[o] for o in pair.outputs}
    wanted.update({c: onnx.TensorProto.FLOAT16 if n["itemsize"] == 2 else onnx.TensorProto.FLOAT
                   for n in pair.scap for c in [n["input"]]})
    use_lib = library_available()
    key = _dense_key(pair, ds)
    dense_sess = None
    metrics = Metrics(pair.outputs, pair.kind)
    counter = SparsityCounter(pair.scap)
    src = ModelSource(pair.sparse_path)
    try:
        sparse_sess = open_session(build_capture_model(src.proto, wanted), data_dir=src.data_dir,
                                   options=base_options(threads, spinning=opts.spinning), provider=provider,
                                   use_library=use_lib, weight_is_finite=src.weight_is_finite)
        names = list(wanted)
        cap_out = [f"{CAPTURE_PREFIX}{k}" for k in range(len(names))]
        task = progress.task("validate accuracy", ds.max_tokens if ds.is_text else None)
        for i, (feeds, n_tok) in enumerate(batches(ds)):
            if token_sink is not None:
                ids = ids_of(feeds)
                if ids is not None:
                    token_sink(ids)
            dense = dense_cache.get(key, i) if dense_cache is not None else None
            if dense is None:
                if dense_sess is None:
                    dense_sess = open_session(pair.dense_path, options=base_options(threads, spinning=opts.spinning),
                                              provider=provider)
                dense = dict(zip(pair.outputs, run_session(dense_sess, pair.outputs, feeds)))
                if dense_cache is not None:
                    dense_cache.put(key, i, dense)
            got = dict(zip(names, run_session(sparse_sess, cap_out, feeds)))
            counter.add({c: got[c] for c in cap_names})
            metrics.add(feeds, dense, {o: got[o] for o in pair.outputs}, n_tok)
            del got, dense
            task.advance(n_tok)
        task.close()
    finally:
        src.close()
    accuracy = metrics.result()
    accuracy["op"] = "library" if use_lib else "lowered to standard ONNX ops"
    sparsity = summarize(pair.scap, counter.measured(), pair.fc_bytes, opts.targets)
    return accuracy, sparsity


def model_perplexity(model: str | Path, ds, *, threads: int | None = None, progress: Progress | None = None) -> dict:
    """Perplexity of one causal LM on a DataSource (each window scored on its own), by the same
    metrics validate computes (the model against itself); a rewritten model runs with the library,
    or lowered where it is not built."""
    with ModelSource(model) as src:
        if "logits" not in [o.name for o in src.proto.graph.output]:
            raise ScapError("perplexity needs a model with a 'logits' output (a causal LM export)")
        session = open_session(src.proto, data_dir=src.data_dir, options=base_options(threads),
                               weight_is_finite=src.weight_is_finite)
        metrics = Metrics(["logits"], "causal-lm")
        task = (progress or NullProgress()).task(f"perplexity {Path(model).name}", ds.max_tokens if ds.is_text else None)
        for feeds, n_tok in batches(ds):
            if ids_of(feeds) is None:
                raise ScapError("perplexity needs input_ids in the data")
            out = {"logits": run_session(session, ["logits"], feeds)[0]}
            metrics.add(feeds, out, out, n_tok)
            task.advance(n_tok)
        task.close()
    ppl = metrics.result()["perplexity"]
    return {"perplexity": ppl["dense"], "nll": ppl["nll_dense"], "tokens": ppl["tokens"]}
