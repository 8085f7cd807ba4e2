"""Target MatMuls: which MatMuls SCAP can sparsify, their roles, layers and shared inputs.

A target is a MatMul whose B is a constant 2-D float initializer (float32 or float16), or a Gemm
that computes the same (alpha 1, A not transposed; B [K, N] or, with transB, [N, K]; its C, a
constant of N elements, is the bias), as optimum exports GPT-2's Conv1D and OPT's fc1/fc2. Its role
(q, k, v, o, qkv, gate, up, gate_up, down, lm_head, router, other) and layer index come from the names
that exporters (optimum / torch.onnx, transformers module paths) give nodes and weights, e.g.
``/model/layers.3/mlp/down_proj/MatMul`` or ``model.layers.3.mlp.down_proj.weight``. A MatMul
followed by an Add of a constant 1-D bias of length N carries that bias (fused at rewrite time).

Quantized weights (MatMulNBits, int8 QDQ) are targets too: scap_onnx.graph.quantized says which.

Works on an ``onnx.ModelProto`` (weights not needed: load with ``load_external_data=False``) and
on an ``onnx_ir.Model`` through the small :class:`GraphView` adapter.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from ..errors import ScapError
from .quantized import ELEM_OF, FLOAT_TYPES, MATMUL_NBITS, matmul_nbits_fields, qdq_fields, unsupported_weights
from .view import GraphView, Node

#: Roles in a stable order (also the order `inspect` prints them).
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "lm_head", "router", "other")
#: Roles left out unless --targets asks for them: the output head, and MoE routers (a dropped
#: input could change the experts chosen, for a saving of K x experts weights).
DEFAULT_EXCLUDED_ROLES = frozenset({"lm_head", "router"})


@dataclass(frozen=True)
class Target:
    """One target MatMul."""

    name: str  # node name (or its output name when the node has none): the target's id
    input: str  # A: the activation input, the tensor SCAP sparsifies
    weight: str  # B: the constant initializer (through Identity nodes): [K, N], or [N, K] if trans_b
    output: str  # MatMul / Gemm output
    role: str
    layer: int | None
    k: int
    n: int
    dtype: str  # "float32" | "float16"
    bias: str | None = None  # constant [N] initializer added right after the MatMul, or Gemm's C
    bias_add: str | None = None  # name of that Add node (None for Gemm's C)
    bias_output: str | None = None  # output of that Add node
    op: str = "MatMul"  # "MatMul" | "Gemm" | "MatMulNBits"
    trans_b: bool = False  # the weight is stored [N, K] (Gemm with transB = 1, a QDQ weight transposed)
    weight_format: str = ""  # "float32" | "float16" | "int4 block 32" | "int8 block 128 asym" | "int8 per-channel QDQ"
    # Quantized weights only (MatMulNBits, or a MatMul's QDQ weight): B above holds the codes (in
    # onnxruntime's layout), with these; for QDQ, block_size is the one the rewrite repacks in
    bits: int | None = None
    block_size: int | None = None
    scales: str | None = None
    zero_points: str | None = None
    accuracy_level: int = 0  # a MatMulNBits' (4: A quantised to int8), which the rewritten node keeps; QDQ: 0

    @property
    def quantized(self) -> bool:
        """Rewritten to ScapSparseMatMulNBits: a MatMulNBits or a MatMul with a QDQ weight."""
        return self.bits is not None

    @property
    def qdq(self) -> bool:
        """A MatMul whose B is a DequantizeLinear of a constant int8 / uint8 weight."""
        return self.bits is not None and self.op != MATMUL_NBITS

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight's values (the codes of a quantized weight; scales not counted)."""
        if self.op == MATMUL_NBITS:
            return self.n * -(-self.k // self.block_size) * self.block_size * self.bits // 8
        if self.qdq:
            return self.k * self.n
        return self.k * self.n * (2 if self.dtype == "float16" else 4)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Site:
    """An activation tensor sparsified once for all the targets that read it (q/k/v, gate/up)."""

    input: str
    targets: tuple[Target, ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.role for t in self.targets))

    @property
    def layer(self) -> int | None:
        return self.targets[0].layer

    @property
    def k(self) -> int:
        return self.targets[0].k

    @property
    def dtype(self) -> str:
        return self.targets[0].dtype


# ----------------------------------------------------------------------------- roles and layers
_ATTN = re.compile(r"attn|attention")
_FIXED = {
    # fused projections
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "qkv": "qkv", "wqkv": "qkv",
    "w_pack": "qkv", "in_proj": "qkv", "gate_up_proj": "gate_up",
    # attention
    "q_proj": "q", "query": "q", "q_lin": "q", "wq": "q",
    "k_proj": "k", "key": "k", "k_lin": "k", "wk": "k",
    "v_proj": "v", "value": "v", "v_lin": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "out_lin": "o",
    # feed-forward
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate",
    "up_proj": "up", "w3": "up", "wi_1": "up", "wi": "up", "c_fc": "up", "fc1": "up", "fc_in": "up",
    "dense_h_to_4h": "up", "lin1": "up",
    "down_proj": "down", "w2": "down", "fc2": "down", "fc_out": "down", "dense_4h_to_h": "down", "lin2": "down",
    # heads
    "lm_head": "lm_head", "embed_out": "lm_head",
}
_SKIP = re.compile(r"^(matmul(_\d+)?|gemm(_\d+)?|weight|bias|kernel|linear|base_layer|onnx|\d+)$")


def _components(name: str) -> list[str]:
    return [c for c in re.split(r"[/.:]+", name.lower()) if c]


def role_of(name: str) -> str | None:
    """Role that a node/value/weight name implies, or None when it implies none."""
    comps = _components(name)
    for i in range(len(comps) - 1, -1, -1):
        c = comps[i]
        if _SKIP.match(c) or c.endswith("_output_0") or c.startswith("matmul_"):
            continue
        ctx = comps[:i]
        in_attn = any(_ATTN.search(x) for x in ctx)
        if c in _FIXED:
            return _FIXED[c]
        if c in ("gate", "router", "shared_expert_gate"):
            return "router"  # MoE routers: Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate
        if c in ("q", "k", "v", "o") and in_attn:
            return c
        if c in ("wo", "c_proj"):
            return "o" if in_attn else "down"
        if c == "dense":
            if in_attn:
                return "o"  # BERT attention.output.dense, Falcon/NeoX/Phi attention dense
            if "intermediate" in ctx:
                return "up"  # BERT intermediate.dense
            if ctx and ctx[-1] == "output":
                return "down"  # BERT output.dense
            return None
        # First meaningful component decides; anything else (pooler, classifier, router gate...) is not a role.
        return None
    return None


def layer_of(name: str) -> int | None:
    """Layer index: the first integer component of a name (``layers.3``, ``layer.3``, ``h.3``, ``blocks.3``)."""
    for c in _components(name):
        if c.isdigit():
            return int(c)
    return None


def _classify(names: Sequence[str]) -> tuple[str, int | None]:
    role = None
    layer = None
    for nm in names:
        if not nm or nm.startswith("onnx::"):
            continue
        r = role_of(nm)
        if role is None and r is not None:
            role = r
            layer = layer_of(nm)
        if layer is None:
            layer = layer_of(nm)
        if role is not None:
            break
    return role or "other", layer


# ----------------------------------------------------------------------------- finding targets
def _gemm_as_matmul(view: GraphView, n: Node) -> tuple[str, str, bool, str | None] | None:
    """(A, B, transB, C) of a Gemm that is A @ B (+ C) with a constant C of N elements; else None."""
    if n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or len(n.inputs) not in (2, 3):
        return None
    c = n.inputs[2] if len(n.inputs) == 3 and n.inputs[2] else None
    if c is not None:
        const = view.constant(c)
        if const is None or n.attr("beta", 1.0) != 1.0:
            return None
        c = const
    return n.inputs[0], n.inputs[1], bool(n.attr("transB", 0)), c


def _following_bias(view: GraphView, consumers: dict[str, list[Node]], out: str, n_cols: int, dtype: int):
    """(bias, Add node, Add output) when the only reader of ``out`` adds a constant [N] bias."""
    users = consumers.get(out, [])
    if len(users) != 1 or out in view.graph_outputs:
        return None, None, None
    u = users[0]
    if u.op_type != "Add" or u.domain not in ("", "ai.onnx") or len(u.inputs) != 2:
        return None, None, None
    other = u.inputs[1] if u.inputs[0] == out else u.inputs[0]
    const = view.constant(other) if other != out else None
    if const is None:
        return None, None, None
    bdims, btype = view.initializers[const]
    if tuple(bdims) != (n_cols,) or btype != dtype:
        return None, None, None
    return const, u.name or u.outputs[0], u.outputs[0]


def find_all_targets(view: GraphView) -> list[Target]:
    """Every MatMul (or equivalent Gemm) with a constant 2-D float B, and every MatMulNBits that
    ScapSparseMatMulNBits can replace, in graph order, lm_head included."""
    consumers: dict[str, list[Node]] = {}
    for n in view.nodes:
        for i in n.inputs:
            if i:
                consumers.setdefault(i, []).append(n)
    targets = []
    for n in view.nodes:
        out = n.outputs[0] if n.outputs else ""
        if n.op_type == MATMUL_NBITS and n.domain == "com.microsoft":
            fields, _ = matmul_nbits_fields(view, n)
            if fields is not None:
                role, layer = _classify([n.name, out, fields["weight"]])
                targets.append(Target(name=n.name or out, output=out, role=role, layer=layer, **fields))
            continue
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "MatMul" and len(n.inputs) == 2:
            (a, b_in), trans_b, c = n.inputs, False, None
        elif n.op_type == "Gemm" and (gemm := _gemm_as_matmul(view, n)) is not None:
            a, b_in, trans_b, c = gemm
        else:
            continue
        b = view.constant(b_in)
        if b is None and n.op_type == "MatMul" and view.constant(a) is None:
            fields, _ = qdq_fields(view, b_in)
            if fields is not None:
                bias, bias_add, bias_output = _following_bias(view, consumers, out, fields["n"],
                                                              ELEM_OF[fields["dtype"]])
                role, layer = _classify([n.name, out, fields["weight"]])
                targets.append(Target(name=n.name or out, input=a, output=out, role=role, layer=layer, bias=bias,
                                      bias_add=bias_add, bias_output=bias_output, **fields))
            continue
        if b is None or view.constant(a) is not None:
            continue
        dims, dtype = view.initializers[b]
        if len(dims) != 2 or dtype not in FLOAT_TYPES:
            continue
        k, n_cols = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        if n.op_type == "Gemm":
            if c is not None:
                cdims, ctype = view.initializers[c]
                if int(np.prod(cdims)) != n_cols or cdims[-1:] != (n_cols,) or ctype != dtype:
                    continue  # a C that broadcasts over rows too is not a bias
            bias, bias_add, bias_output = c, None, None
        else:
            bias, bias_add, bias_output = _following_bias(view, consumers, out, n_cols, dtype)
        role, layer = _classify([n.name, out, b])
        targets.append(
            Target(
                name=n.name or out,
                input=a,
                weight=b,
                output=out,
                role=role,
                layer=layer,
                k=int(k),
                n=int(n_cols),
                dtype=FLOAT_TYPES[dtype],
                bias=bias,
                bias_add=bias_add,
                bias_output=bias_output,
                op=n.op_type,
                trans_b=trans_b,
                weight_format=FLOAT_TYPES[dtype],
            )
        )
    return targets


def select_targets(targets: Iterable[Target], patterns: str | Sequence[str] | None = None) -> list[Target]:
    """Targets chosen by ``--targets``: comma-separated glob patterns on the node name, the weight
    name or the role (``down``, ``*mlp*``, ``/model/layers.1?/*``); ``!PATTERN`` excludes.
    Without patterns: every target except lm_head and MoE routers."""
    targets = list(targets)
    if patterns is None or (isinstance(patterns, str) and not patterns.strip()):
        return [t for t in targets if t.role not in DEFAULT_EXCLUDED_ROLES]
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]

    def hit(t: Target, pats: list[str]) -> bool:
        return any(t.role == p or fnmatch.fnmatchcase(t.name, p) or fnmatch.fnmatchcase(t.weight, p) for p in pats)

    base = [t for t in targets if hit(t, include)] if include else [t for t in targets if t.role not in DEFAULT_EXCLUDED_ROLES]
    return [t for t in base if not hit(t, exclude)]


def group_sites(targets: Iterable[Target]) -> list[Site]:
    """Group targets by their input tensor, in graph order: one Site per shared input."""
    groups: "OrderedDict[str, list[Target]]" = OrderedDict()
    for t in targets:
        groups.setdefault(t.input, []).append(t)
    return [Site(inp, tuple(ts)) for inp, ts in groups.items()]


_QUANTIZED_OPS = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "DequantizeLinear", "GatherBlockQuantized")


def _why_no_targets(view: GraphView) -> str:
    """A hint for models whose MatMuls scap-onnx cannot see: quantized weights it cannot take (the
    first named), other quantized ops, or MatMuls in subgraphs."""
    unsupported = unsupported_weights(view)
    if unsupported:
        op, name, why = unsupported[0]
        return f"; {op} {name!r} {why}"
    ops = [n.op_type for n in view.nodes]
    quantized = sorted({op for op in ops if op in _QUANTIZED_OPS})
    if quantized:
        return f"; it is already quantized ({', '.join(quantized)}): export or load the float model instead"
    control = sorted({op for op in ops if op in ("If", "Loop", "Scan")})
    if control:
        return (f"; MatMuls inside {'/'.join(control)} subgraphs are not searched (a merged decoder?): "
                "use the decoder exported without merging (optimum's model.onnx)")
    return ""


def find_targets(model, patterns: str | Sequence[str] | None = None, *, require: bool = True) -> list[Target]:
    """Targets of a model (onnx.ModelProto, onnx_ir.Model or GraphView), filtered by ``patterns``.

    Raises ScapError when ``require`` and nothing matches.
    """
    if isinstance(model, GraphView):
        view = model
    elif isinstance(model, onnx.ModelProto):
        view = GraphView.from_proto(model)
    else:
        view = GraphView.from_ir(model)
    all_targets = find_all_targets(view)
    chosen = select_targets(all_targets, patterns)
    if require and not chosen:
        if not all_targets or patterns is None:
            besides = f" besides {', '.join(sorted({t.role for t in all_targets}))}" if all_targets else ""
            raise ScapError(f"the model has no target MatMuls{besides} (a MatMul or Gemm whose B is a constant "
                            "2-D float initializer or an int8 DequantizeLinear of one, or a 4- or 8-bit MatMulNBits)" + _why_no_targets(view))
        raise ScapError(f"--targets {patterns!r} matches none of the model's {len(all_targets)} target MatMuls")
    return chosen
