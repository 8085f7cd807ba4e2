"""The dense model and its rewritten sparse twin, checked to belong together.

Each ScapSparseMatMul node records in its metadata (scap_onnx.op.contract) the targets it
replaces and the activation they read; the pairing follows that, never node names: every listed
target must be a MatMul or Gemm of DENSE reading that activation, and the node's weight must be the
target's (the constant resolver of scap_onnx.graph.view follows Identity nodes and the rewriter's
Transpose; the first bytes are compared, so a model of the same shape with other weights is refused).
A ScapSparseMatMulNBits reads repacked weights: its attributes must be the quantized target's
(MatMulNBits, or MatMul of a QDQ weight; N the targets' sum where several are fused) and its scales
the targets', as scap_onnx.op.nbits repacks them (compared on the first block's, in the type the
sparse model stores them in: float16 or float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration.data import model_inputs
from ..graph.genai import genai_config_beside
from ..errors import ScapError
from ..graph.model_io import has_external, load_proto, tensor_head
from ..graph.quantized import FLOAT_TYPES
from ..graph.targets import Target, find_all_targets, layer_of, role_of
from ..graph.view import GraphView
from ..op.contract import (OP_TYPE, TARGETS_KEY, channel_vectors, is_float_node, node_attribute, scap_nodes,
                           source_input_of, targets_of)
from ..op.nbits import matmul_nbits_scales, qdq_scales
from .sparsity import fc_weight_bytes


@dataclass
class ModelPair:
    """The dense and the sparse model, checked to belong together (weight-free protos)."""

    dense_path: Path
    sparse_path: Path
    inputs: list  # data.InputInfo of the dense model
    outputs: list[str]
    kind: str  # "causal-lm" | "encoder" | "generic"
    past: dict[str, str]  # past input name -> present output name (decoders with KV cache)
    scap: list[dict]  # per target: name, input, weight, k, n, itemsize (of A), bytes (of the weight), threshold,
    #                   offset, role, layer
    fc_bytes: int  # all FC weight bytes of the dense model (MatMuls with constant 2-D B, MatMulNBits codes)
    sparse_proto: onnx.ModelProto = field(repr=False, default=None)


def _load(path: Path, what: str) -> onnx.ModelProto:
    try:
        return load_proto(path)
    except ScapError as e:
        raise ScapError(f"{what}: {e}") from None


def _io_signature(model: onnx.ModelProto) -> tuple[dict, dict]:
    ins = {i.name: (str(i.dtype), len(i.dims)) for i in model_inputs(model)}
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    return ins, outs


def _past_map(input_names: list[str], output_names: list[str]) -> dict[str, str]:
    """past_key_values.N.key -> present.N.key (optimum's naming; also past.* / present_*)."""
    outs = set(output_names)
    mapping = {}
    for n in input_names:
        if not ("past" in n and ("key" in n or "value" in n)):
            continue
        for cand in (n.replace("past_key_values", "present"), n.replace("past", "present")):
            if cand in outs:
                mapping[n] = cand
                break
    return mapping


def open_pair(dense: str | Path, sparse: str | Path) -> ModelPair:
    """Load both graphs (weights stay on disk where they can) and check that they belong together.

    ScapError when: a file is not an ONNX model; SPARSE has no ScapSparseMatMul; DENSE already has
    some; inputs/outputs differ; a sparse node does not record its targets, or they are not MatMuls
    of DENSE reading the recorded activation with the node's weight.
    """
    dense, sparse = Path(dense), Path(sparse)
    dp = _load(dense, "DENSE")
    sp = _load(sparse, "SPARSE")
    snodes = scap_nodes(sp)
    if not snodes:
        raise ScapError(f"{sparse} has no {OP_TYPE} nodes: nothing to validate "
                        "(make the sparse model with `scap-onnx rewrite` first)")
    if scap_nodes(dp):
        raise ScapError(f"{dense} already has {len(scap_nodes(dp))} {OP_TYPE} nodes: give the original "
                        "dense model first and the rewritten one second")
    d_in, d_out = _io_signature(dp)
    s_in, s_out = _io_signature(sp)
    if d_in != s_in:
        diff = sorted(set(d_in.items()) ^ set(s_in.items()))
        raise ScapError(f"models do not match: their inputs differ (e.g. {diff[0][0]!r}); "
                        f"{sparse.name} was not rewritten from {dense.name}")
    if list(d_out) != list(s_out):
        diff = sorted(set(d_out) ^ set(s_out)) or list(d_out)
        raise ScapError(f"models do not match: their outputs differ (e.g. {diff[0]!r}); "
                        f"{sparse.name} was not rewritten from {dense.name}")
    pairing = _Pairing(dp, sp, dense, sparse)
    scap = [entry for n in snodes for entry in pairing.targets(n)]
    inputs = model_inputs(dp, genai_config_beside(dense))
    names = [i.name for i in inputs]
    outputs = list(d_out)
    has_ids = any("input_ids" in n for n in names)
    if "logits" in outputs and has_ids:
        kind = "causal-lm"
    elif has_ids:
        kind = "encoder"
    else:
        kind = "generic"
    fc_bytes = fc_weight_bytes(dp)
    past = _past_map(names, outputs) if kind == "causal-lm" else {}
    del dp
    return ModelPair(dense, sparse, inputs, outputs, kind, past, scap, fc_bytes, sp)


class _Pairing:
    """Matches sparse nodes to dense targets by the sparse nodes' metadata."""

    def __init__(self, dp: onnx.ModelProto, sp: onnx.ModelProto, dense: Path, sparse: Path):
        self.by_name = {t.name: t for t in find_all_targets(GraphView.from_proto(dp))}
        self.s_view = GraphView.from_proto(sp)
        self.d_inits = {t.name: t for t in dp.graph.initializer}
        self.s_inits = {t.name: t for t in sp.graph.initializer}
        self.dense, self.sparse = dense, sparse

    def _mismatch(self, what: str) -> ScapError:
        return ScapError(f"models do not match: {what}")

    def targets(self, node: onnx.NodeProto) -> list[dict]:
        """The entries of the targets a sparse node computes, checked against DENSE."""
        members = targets_of(node)
        if not members:
            raise ScapError(f"sparse node {node.name!r} does not record the targets it replaces (node metadata "
                            f"{TARGETS_KEY}): rewrite {self.sparse.name} with this version of scap-onnx")
        activation = source_input_of(node)
        ts = [self.by_name.get(m) for m in members]
        for m, t in zip(members, ts):
            if t is None or t.input != activation:
                raise self._mismatch(f"sparse node {node.name!r} replaces {m!r}, which is no MatMul or Gemm "
                                     f"reading {activation!r} in {self.dense.name}")
        if ts[0].quantized == is_float_node(node):
            raise self._mismatch(f"sparse node {node.name!r} ({node.op_type}) cannot compute {members[0]!r}, a "
                                 f"{ts[0].op} of {ts[0].weight_format} weights in {self.dense.name}")
        if ts[0].quantized:
            self._check_nbits_weight(node, ts)
        elif len(ts) == 1:
            self._check_weight(node, ts[0])
        else:
            self._check_fused_weight(node, members, ts)
        try:
            vectors = channel_vectors(node, self._sparse_constant)
        except ValueError as e:
            raise self._mismatch(str(e)) from None
        return [{**_entry(node, t, m), **vectors} for m, t in zip(members, ts)]

    def _sparse_constant(self, name: str) -> np.ndarray:
        """An initializer of the sparse model (KeyError when there is none of that name)."""
        t = self.s_inits[name]
        if has_external(t):
            return numpy_helper.to_array(t, base_dir=str(self.sparse.parent))
        return numpy_helper.to_array(t)

    def _check_weight(self, node: onnx.NodeProto, t: Target) -> None:
        origin = self.s_view.resolve(node.input[1])
        # through Identity nodes, and the Transpose the rewriter puts on a Gemm's transB weight; a Cast
        # would make it another weight
        ok = (origin is not None and origin.name == t.weight and "Cast" not in origin.through
              and ("Transpose" not in origin.through or t.trans_b))
        if not ok:
            raise self._mismatch(f"sparse node {node.name!r} does not read the weight {t.weight!r} of {t.name!r} "
                                 f"in {self.dense.name}")
        a, b = self.d_inits.get(t.weight), self.s_inits.get(t.weight)
        if a is not None and b is not None:
            if tuple(a.dims) != tuple(b.dims) or a.data_type != b.data_type or \
                    tensor_head(a, self.dense.parent) != tensor_head(b, self.sparse.parent):
                raise self._mismatch(f"weight {t.weight!r} differs between {self.dense.name} and {self.sparse.name}")

    def _check_nbits_weight(self, node: onnx.NodeProto, ts: list[Target]) -> None:
        """K, bits and block_size as the targets', N their sum (one target, or several fused side by
        side), and the first block's scales of every column those of the targets (repacked by
        scap_onnx.op.nbits, which writes them float32 or, rounded where they were not, float16)."""
        shape = {"K": ts[0].k, "N": sum(t.n for t in ts), "bits": ts[0].bits, "block_size": ts[0].block_size}
        got = {k: int(node_attribute(node, k, -1)) for k in shape}
        if got != shape or any((t.k, t.bits, t.block_size) != (ts[0].k, ts[0].bits, ts[0].block_size) for t in ts):
            raise self._mismatch(f"sparse node {node.name!r} has {got}, its targets {[t.name for t in ts]} in "
                                 f"{self.dense.name} {shape}")
        b = self.s_inits.get(node.input[2]) if len(node.input) > 2 else None
        written = FLOAT_TYPES.get(b.data_type) if b is not None else None
        column = 0
        for t in ts:
            a = self.d_inits.get(t.scales)
            if a is not None and b is not None:
                dense = numpy_helper.to_array(a, base_dir=str(self.dense.parent)) if has_external(a) \
                    else numpy_helper.to_array(a)
                first = (qdq_scales if t.qdq else matmul_nbits_scales)(dense, k=t.k, n=t.n, block_size=t.block_size)[0]
                expected = b"" if written is None else first.astype(written).tobytes()[:64]
                start = column * (np.dtype(written).itemsize if written is not None else 0)
                if not expected or tensor_head(b, self.sparse.parent, len(expected), start) != expected:
                    raise self._mismatch(f"weight {t.weight!r} (its scales) differs between {self.dense.name} and "
                                         f"{self.sparse.name}")
            column += t.n

    def _check_fused_weight(self, node: onnx.NodeProto, members: list[str], ts: list[Target]) -> None:
        """A fused node's B is its targets' weights side by side (checked on the first row's bytes)."""
        w = self.s_inits.get(node.input[1])
        width = sum(t.n for t in ts)
        if w is None or tuple(w.dims) != (ts[0].k, width) or any(t.k != ts[0].k or t.trans_b for t in ts):
            shape = list(w.dims) if w is not None else "not an initializer"
            raise self._mismatch(f"fused sparse node {node.name!r} in {self.sparse.name} has weight {shape}, not "
                                 f"its targets' {ts[0].k} x {width}")
        column = 0
        for m, t in zip(members, ts):
            a = self.d_inits.get(t.weight)
            if a is not None:
                size = onnx.helper.tensor_dtype_to_np_dtype(a.data_type).itemsize
                nbytes = min(64, t.n * size)
                if a.data_type != w.data_type or tensor_head(a, self.dense.parent, nbytes) != \
                        tensor_head(w, self.sparse.parent, nbytes, column * size):
                    raise self._mismatch(f"weight {t.weight!r} of {m!r} differs between {self.dense.name} and the "
                                         f"fused node {node.name!r} of {self.sparse.name}")
            column += t.n


def _entry(node: onnx.NodeProto, t: Target, name: str) -> dict:
    """What validate needs of one target computed by a ScapSparseMatMul node."""
    return {
        "name": name, "input": node.input[0], "weight": t.weight, "k": t.k, "n": t.n,
        "itemsize": 2 if t.dtype == "float16" else 4, "bytes": t.weight_bytes,
        "threshold": node_attribute(node, "threshold"), "offset": node_attribute(node, "offset"),
        "role": t.role if t.role != "other" else (role_of(name) or "other"),
        "layer": t.layer if t.layer is not None else layer_of(name),
    }
