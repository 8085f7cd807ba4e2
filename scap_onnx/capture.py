"""Capture: run a copy of the model that exposes target inputs as outputs, with onnxruntime.

:class:`ModelSource` loads a model once without its weights in Python memory: a model with
external data is read as a graph only and onnxruntime reads the weights from the original
folder; a model with inline weights has them moved once to a temporary external-data file.
Each capture graph (original graph + Identity outputs for the requested tensors, optionally with
upstream targets sparsified in standard ONNX ops, dead nodes pruned) is then a small proto.

The sparsification inserted for upstream-aware calibration is the op contract in standard ops:
x' = Where(|x - m| <= tau, m, x), which with the unchanged MatMul gives
drop(x - m) @ W + m * colsum(W), what ScapSparseMatMul with the folded bias computes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import ScapError
from .token_scale import default_opset, norm_nodes

CAPTURE_PREFIX = "scap_capture::"
_SPARSIFY_PREFIX = "scap_sparsify::"
_INLINE_LIMIT = 1024  # bytes: tensors larger than this are moved out of the proto


def load_proto(path: str | Path) -> onnx.ModelProto:
    """The model proto without external data. Raises ScapError when the file is not an ONNX model."""
    p = Path(path)
    if not p.is_file():
        from .fileio import missing_model_message

        raise ScapError(missing_model_message(p))
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        raise ScapError(f"{p} is not an ONNX model (cannot parse it as ModelProto)") from None
    if not model.graph.node:
        raise ScapError(f"{p} is not an ONNX model (no graph nodes)")
    return model


def _has_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _tensor_head(t: onnx.TensorProto, base_dir: Path, nbytes: int = 64, start: int = 0) -> bytes:
    """``nbytes`` bytes of a tensor's data from byte ``start`` (inline or external), without
    reading the rest."""
    if _has_external(t):
        info = {e.key: e.value for e in t.external_data}
        loc = base_dir / info.get("location", "")
        length = int(info.get("length", start + nbytes))
        try:
            with open(loc, "rb") as f:
                f.seek(int(info.get("offset", 0)) + start)
                return f.read(max(0, min(nbytes, length - start)))
        except OSError:
            return b""
    if t.raw_data:
        return t.raw_data[start:start + nbytes]
    for field in ("float_data", "int32_data", "int64_data", "double_data"):
        vals = getattr(t, field)
        if len(vals):
            return np.asarray(vals[start // 4: (start + nbytes) // 4]).tobytes()
    return b""


def fingerprint(model: onnx.ModelProto, base_dir: str | Path) -> str:
    """Identity of a model: sha256 of its graph structure, initializer names/shapes/types and the
    first bytes of every 2-D initializer (so models that share an architecture still differ)."""
    base_dir = Path(base_dir)
    h = hashlib.sha256()
    g = model.graph

    def put(*items):
        for it in items:
            h.update(str(it).encode())
            h.update(b"\0")

    for i in g.input:
        put("in", i.name, i.type.tensor_type.elem_type)
    for o in g.output:
        put("out", o.name)
    for n in g.node:
        put("node", n.domain, n.op_type, n.name, *n.input, "->", *n.output)
    for t in g.initializer:
        put("init", t.name, t.data_type, *t.dims)
        if len(t.dims) == 2:
            h.update(_tensor_head(t, base_dir))
    return h.hexdigest()


def _inline_small_external(proto: onnx.ModelProto, base_dir: Path, limit: int = 4096) -> None:
    """Read small external tensors (shape constants, axes ...) into the proto: onnxruntime's shape
    inference needs their values, and they cost nothing to hold."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in proto.graph.initializer:
        if _has_external(t):
            info = {e.key: e.value for e in t.external_data}
            length = int(info["length"]) if "length" in info else None
            if length is None:
                n = int(np.prod(t.dims)) if len(t.dims) else 1
                length = n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            if length <= limit:
                load_external_data_for_tensor(t, str(base_dir))
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT


class ModelSource:
    """A model held as a weight-free proto plus a folder onnxruntime reads its weights from."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        proto = load_proto(self.path)
        self.fingerprint = fingerprint(proto, self.path.parent)
        self._tmp: tempfile.TemporaryDirectory | None = None
        inline = sum(len(t.raw_data) for t in proto.graph.initializer if not _has_external(t))
        if inline > 64 * 1024 * 1024 or any(_has_external(t) for t in proto.graph.initializer):
            if inline > 64 * 1024 * 1024:
                # Move the inline weights to a temporary external-data file once; the proto keeps the graph.
                self._tmp = tempfile.TemporaryDirectory(prefix="scap-onnx-")
                tmp_model = Path(self._tmp.name) / "model.onnx"
                onnx.save_model(
                    proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=_INLINE_LIMIT,
                )
                del proto
                # Tensors already external keep pointing into the original folder: link them in.
                proto = onnx.load(str(tmp_model), load_external_data=False)
                self._link_original_external(proto)
                self.data_dir = Path(self._tmp.name)
            else:
                self.data_dir = self.path.parent
        else:
            self.data_dir = self.path.parent
        _inline_small_external(proto, self.data_dir)
        self.proto = proto

    def _link_original_external(self, proto: onnx.ModelProto) -> None:
        for t in proto.graph.initializer:
            if _has_external(t):
                loc = {e.key: e.value for e in t.external_data}.get("location", "")
                dst = Path(self._tmp.name) / loc
                src = self.path.parent / loc
                if loc != "weights.bin" and not dst.exists() and src.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.symlink(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)

    def weight(self, name: str) -> np.ndarray:
        """One initializer as numpy (read from its external file when it has one)."""
        for t in self.proto.graph.initializer:
            if t.name == name:
                if _has_external(t):
                    return numpy_helper.to_array(t, base_dir=str(self.data_dir))
                return numpy_helper.to_array(t)
        for n in self.proto.graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                return numpy_helper.to_array(n.attribute[0].t)
        # an Identity alias of a constant
        for n in self.proto.graph.node:
            if n.op_type == "Identity" and n.output[0] == name:
                return self.weight(n.input[0])
        raise KeyError(name)

    def session(self, model: onnx.ModelProto, options: ort.SessionOptions | None = None,
                providers: list[str] | None = None) -> ort.InferenceSession:
        """An onnxruntime session over ``model`` (a weight-free variant of this source's graph)."""
        return make_session(model, self.data_dir, options, providers)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options: quiet logs, optional intra-op thread count."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: onnx.ModelProto, data_dir: str | Path, options: ort.SessionOptions | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """Session from an in-memory proto whose external data lies in ``data_dir``."""
    options = options or default_options()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScapError(f"onnxruntime cannot load the model: {msg}") from None


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def _prune(nodes: list[onnx.NodeProto], wanted: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``wanted``, in their original order."""
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    need = set()
    stack = [w for w in wanted if w in producer]
    seen_names = set(stack)
    while stack:
        i = producer[stack.pop()]
        if i in need:
            continue
        need.add(i)
        for nm in list(nodes[i].input) + sorted(_subgraph_inputs(nodes[i])):
            if nm in producer and nm not in seen_names:
                seen_names.add(nm)
                stack.append(nm)
    return [n for i, n in enumerate(nodes) if i in need]


def sparsify_nodes(x: str, consumers_out: str, threshold: float, offset: float, dtype: int, tag: str,
                   token_scaled: bool = False, opset: int = 13):
    """Standard ONNX nodes and initializers computing x' = Where(|x - offset| <= threshold, offset, x),
    or with ``token_scaled`` Where(|x / n - offset| <= threshold, offset * n, x), n = ||x|| per token
    (scap_onnx.token_scale): what the rewritten model computes, in terms of the MatMul's input."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    m = numpy_helper.from_array(np.asarray(offset, dtype=np_dtype), f"{_SPARSIFY_PREFIX}{tag}/offset")
    t = numpy_helper.from_array(np.asarray(threshold, dtype=np_dtype), f"{_SPARSIFY_PREFIX}{tag}/threshold")
    p = f"{_SPARSIFY_PREFIX}{tag}/"
    nodes, inits, z, fill = [], [m, t], x, m.name
    if token_scaled:
        nodes, norm_inits, z, n = norm_nodes(x, dtype, opset, p + "norm/")
        inits += norm_inits
        nodes.append(helper.make_node("Mul", [n, m.name], [p + "fill"], name=p + "MulFill"))
        fill = p + "fill"
    nodes += [
        helper.make_node("Sub", [z, m.name], [p + "d"], name=p + "Sub"),
        helper.make_node("Abs", [p + "d"], [p + "a"], name=p + "Abs"),
        helper.make_node("LessOrEqual", [p + "a", t.name], [p + "drop"], name=p + "LessOrEqual"),
        helper.make_node("Where", [p + "drop", fill, x], [consumers_out], name=p + "Where"),
    ]
    return nodes, inits


def build_capture_model(
    base: onnx.ModelProto,
    capture: Mapping[str, int],
    sparsify: Iterable[tuple] | None = None,
    token_scaled: Iterable[str] = (),
) -> onnx.ModelProto:
    """A weight-free copy of ``base`` whose outputs are the tensors in ``capture`` (name -> elem type);
    those in ``token_scaled`` divided by their norm per token (scap_onnx.token_scale).

    ``sparsify``: (input name, threshold, offset, elem type, consumer node names[, token-scaled])
    entries: those consumers read the sparsified tensor instead (upstream-aware calibration).
    """
    opset = default_opset(base)
    token_scaled = set(token_scaled)
    model = onnx.ModelProto()
    model.ir_version = base.ir_version
    model.opset_import.extend(base.opset_import)
    model.producer_name = "scap-onnx capture"
    g = model.graph
    g.name = base.graph.name
    g.input.extend(base.graph.input)
    g.initializer.extend(base.graph.initializer)  # weight-free: external references only
    g.sparse_initializer.extend(base.graph.sparse_initializer)
    nodes = [onnx.NodeProto() for _ in range(0)]
    extra_inits = []
    rewired: dict[str, dict[str, str]] = {}  # consumer node name -> {old input: new input}
    pre_nodes: dict[str, list[onnx.NodeProto]] = {}  # insert before first consumer
    for k, (name, thr, off, dtype, consumers, *scaled) in enumerate(sparsify or []):
        new = f"{_SPARSIFY_PREFIX}{k}/out"
        ns, inits = sparsify_nodes(name, new, thr, off, dtype, str(k), bool(scaled and scaled[0]), opset)
        extra_inits += inits
        for c in consumers:
            rewired.setdefault(c, {})[name] = new
        if consumers:
            pre_nodes.setdefault(consumers[0], []).extend(ns)
    for n in base.graph.node:
        key = n.name or n.output[0]
        if key in pre_nodes:
            nodes.extend(pre_nodes.pop(key))
        if key in rewired:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            for i, nm in enumerate(m.input):
                if nm in rewired[key]:
                    m.input[i] = rewired[key][nm]
            nodes.append(m)
        else:
            nodes.append(n)
    outputs = []
    for k, (name, dtype) in enumerate(capture.items()):
        out = f"{CAPTURE_PREFIX}{k}"
        if name in token_scaled:
            ns, inits, name, _ = norm_nodes(name, dtype, opset, f"{CAPTURE_PREFIX}norm{k}/")
            nodes.extend(ns)
            extra_inits += inits
        nodes.append(helper.make_node("Identity", [name], [out], name=f"{CAPTURE_PREFIX}Identity{k}"))
        outputs.append(helper.make_tensor_value_info(out, dtype, None))
    g.node.extend(_prune(nodes, [o.name for o in outputs]))
    g.initializer.extend(extra_inits)
    g.output.extend(outputs)
    # Keep only the graph inputs the pruned graph reads (onnxruntime then needs no others).
    used = {i for n in g.node for i in n.input} | {i for n in g.node for i in _subgraph_inputs(n)}
    keep = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(keep)
    kept_inits = [t for t in g.initializer if t.name in used]
    if len(kept_inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    return model


class Capture:
    """An onnxruntime session over a capture model; ``run(feeds)`` returns {tensor name: array}."""

    def __init__(self, source: ModelSource, capture: Mapping[str, int], sparsify=None,
                 options: ort.SessionOptions | None = None, providers: list[str] | None = None,
                 token_scaled: Iterable[str] = ()):
        self.names = list(capture)
        model = build_capture_model(source.proto, capture, sparsify, token_scaled)
        self.session = source.session(model, options or default_options(), providers)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [f"{CAPTURE_PREFIX}{k}" for k in range(len(self.names))]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = run_session(self.session, self.output_names, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.names, outs))


def run_session(session: ort.InferenceSession, outputs, feeds):
    """session.run, with onnxruntime's failures on bad feeds turned into a one-line ScapError."""
    try:
        return session.run(outputs, feeds)
    except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScapError(f"onnxruntime failed on the data: {msg}") from None
