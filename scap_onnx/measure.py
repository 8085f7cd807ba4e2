"""Measurements on dense and rewritten models: sparsity reached, perplexity, embedding agreement.

Rewritten models run with the compiled op library when it is available; otherwise (or with
``use_library=False``) ScapSparseMatMul nodes are lowered to the equivalent standard ONNX ops
(D = A - offset; D[|D| <= threshold] = 0; D @ B + bias), so measurements never depend on a build.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .capture import CAPTURE_PREFIX, ModelSource, build_capture_model, default_options
from .data import DataSource
from .errors import ScapError
from .fuse import members_of
from .op import DOMAIN, OP_TYPE
from .progress import NullProgress, Progress
from .targets import role_of, layer_of


def _attr(node: onnx.NodeProto, name: str, default: float = 0.0) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(a.f)
    return default


def scap_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    """Element type of an initializer, also through the Transpose the rewriter puts on a Gemm's B."""
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.output[0] == name:
            name = n.input[0]
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    return onnx.TensorProto.FLOAT


def lower_scap_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ScapSparseMatMul nodes (in place) by standard ops computing the same result."""
    new_nodes = []
    inits = []
    for i, n in enumerate(model.graph.node):
        if not (n.op_type == OP_TYPE and n.domain == DOMAIN):
            new_nodes.append(n)
            continue
        thr, off = _attr(n, "threshold"), _attr(n, "offset")
        et = _elem_type(model, n.input[1])
        npt = helper.tensor_dtype_to_np_dtype(et)
        p = f"scap_lowered::{i}/"
        inits += [numpy_helper.from_array(np.asarray(v, npt), p + k) for k, v in (("offset", off), ("threshold", thr), ("zero", 0.0))]
        a, b = n.input[0], n.input[1]
        mm_out = n.output[0] if len(n.input) < 3 or not n.input[2] else p + "mm"
        new_nodes += [
            helper.make_node("Sub", [a, p + "offset"], [p + "d"], name=p + "Sub"),
            helper.make_node("Abs", [p + "d"], [p + "a"], name=p + "Abs"),
            helper.make_node("LessOrEqual", [p + "a", p + "threshold"], [p + "drop"], name=p + "LessOrEqual"),
            helper.make_node("Where", [p + "drop", p + "zero", p + "d"], [p + "kept"], name=p + "Where"),
            helper.make_node("MatMul", [p + "kept", b], [mm_out], name=n.name or p + "MatMul"),
        ]
        if mm_out != n.output[0]:
            new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=p + "Add"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(inits)
    return model


def library_available() -> bool:
    from .library import get_library_path

    try:
        get_library_path()
        return True
    except FileNotFoundError:
        return False


def _options(model: onnx.ModelProto, threads: int | None, use_library: bool | None):
    """Session options for ``model``; lowers the custom op in place when the library is not used."""
    opts = default_options(threads)
    if scap_nodes(model):
        if use_library is None:
            use_library = library_available()
        if use_library:
            from .library import session_options

            opts = session_options(opts)
        else:
            lower_scap_ops(model)
    return opts


@dataclass
class _Runner:
    """A whole model (or a capture variant) ready to run on DataSource batches."""

    source: ModelSource
    session: object
    outputs: list[str]

    def run(self, feeds):
        names = {i.name for i in self.session.get_inputs()}
        return self.session.run(self.outputs, {k: v for k, v in feeds.items() if k in names})


def _runner(path: str | Path, outputs: list[str] | None, threads, use_library) -> _Runner:
    src = ModelSource(path)
    model = onnx.ModelProto()
    model.CopyFrom(src.proto)  # weight-free: cheap
    opts = _options(model, threads, use_library)
    sess = src.session(model, opts)
    outs = outputs or [o.name for o in sess.get_outputs()]
    return _Runner(src, sess, outs)


def measured_sparsity(
    model: str | Path, data: DataSource, *, threads: int | None = None, use_library: bool | None = None,
    progress: Progress | None = None,
) -> dict[str, dict]:
    """Per ScapSparseMatMul node: the fraction of its input elements dropped on ``data``."""
    src = ModelSource(model)
    try:
        nodes = scap_nodes(src.proto)
        if not nodes:
            raise ScapError(f"{model} has no {OP_TYPE} nodes")
        et = {n.input[0]: _elem_type(src.proto, n.input[1]) for n in nodes}
        cap = build_capture_model(src.proto, et)
        opts = _options(cap, threads, use_library)
        sess = src.session(cap, opts)
        names = list(et)
        out_names = [f"{CAPTURE_PREFIX}{k}" for k in range(len(names))]
        dropped = defaultdict(int)
        total = defaultdict(int)
        inputs = {i.name for i in sess.get_inputs()}
        task = (progress or NullProgress()).task("measure sparsity", data.max_tokens if data.is_text else None)
        for feeds, n_tok in data.batches():
            outs = dict(zip(names, sess.run(out_names, {k: v for k, v in feeds.items() if k in inputs})))
            for n in nodes:
                x = outs[n.input[0]].astype(np.float32, copy=False)
                d = np.abs(x - np.float32(_attr(n, "offset")))
                dropped[n.name] += int(np.count_nonzero(d <= np.float32(_attr(n, "threshold"))))
                total[n.name] += x.size
            task.advance(n_tok)
        task.close()
        # A fused node's targets drop the same elements: each gets the node's sparsity.
        return {
            name: {
                "role": role_of(name) or "other", "layer": layer_of(name),
                "threshold": _attr(n, "threshold"), "offset": _attr(n, "offset"),
                "sparsity": dropped[n.name] / max(total[n.name], 1),
            }
            for n in nodes for name in members_of(n)
        }
    finally:
        src.close()


def summarize_sparsity(per_node: dict[str, dict], targets: dict[str, float] | None = None) -> dict[str, dict]:
    """Per role: mean measured sparsity, worst single-target deviation from ``targets`` (role -> s)."""
    by_role = defaultdict(list)
    for v in per_node.values():
        by_role[v["role"]].append(v["sparsity"])
    out = {}
    for role, vals in by_role.items():
        d = {"targets": len(vals), "mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
        if targets and role in targets:
            d["target"] = targets[role]
            d["mean_error"] = d["mean"] - targets[role]
            d["worst_error"] = float(max(vals, key=lambda x: abs(x - targets[role])) - targets[role])
        out[role] = d
    return out


def _logits_name(names: list[str]) -> str:
    if "logits" in names:
        return "logits"
    raise ScapError("perplexity needs a model with a 'logits' output (a causal LM export)")


def perplexity(model: str | Path, data: DataSource, *, threads: int | None = None, use_library: bool | None = None,
               progress: Progress | None = None) -> dict:
    """Token-level perplexity of a causal LM on ``data`` (each window scored on its own)."""
    r = _runner(model, None, threads, use_library)
    try:
        r.outputs = [_logits_name(r.outputs)]
        nll = 0.0
        count = 0
        task = (progress or NullProgress()).task(f"perplexity {Path(model).name}", data.max_tokens if data.is_text else None)
        for feeds, n_tok in data.batches():
            ids = next(v for k, v in feeds.items() if "input_ids" in k)
            logits = r.run(feeds)[0][:, :-1].astype(np.float32)
            tgt = ids[:, 1:]
            mx = logits.max(-1, keepdims=True)
            lse = np.log(np.exp(logits - mx).sum(-1)) + mx[..., 0]
            picked = np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
            nll += float((lse - picked).sum())
            count += tgt.size
            task.advance(n_tok)
        task.close()
        return {"perplexity": float(np.exp(nll / count)), "nll": nll / count, "tokens": count}
    finally:
        r.source.close()


def _first_output(names: list[str]) -> str:
    for cand in ("last_hidden_state", "token_embeddings", "sentence_embedding"):
        if cand in names:
            return cand
    return names[0]


def embedding_agreement(dense: str | Path, sparse: str | Path, data: DataSource, *, threads: int | None = None,
                        use_library: bool | None = None) -> dict:
    """Mean / min cosine between mean-pooled hidden states of two encoders over ``data``."""
    a = _runner(dense, None, threads, use_library)
    b = _runner(sparse, None, threads, use_library)
    try:
        a.outputs = b.outputs = [_first_output(a.outputs)]
        cos = []
        for feeds, _ in data.batches():
            ea, eb = a.run(feeds)[0], b.run(feeds)[0]
            if ea.ndim == 3:
                ea, eb = ea.mean(1), eb.mean(1)
            num = (ea * eb).sum(-1)
            den = np.linalg.norm(ea, axis=-1) * np.linalg.norm(eb, axis=-1)
            cos.extend((num / np.maximum(den, 1e-30)).tolist())
        return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "rows": len(cos)}
    finally:
        a.source.close()
        b.source.close()
