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

Latency: both models in one process, in sessions with the same options: by default on one
onnxruntime intra-op pool that spins, as a single session runs with onnxruntime's defaults, in a
child process of its own (see :mod:`scap_onnx.timing_process`); with ``--thread-pool separate``
in this process, a pool per session. A warm-up, then
``repeats`` rounds that run dense and sparse alternately (order swapped every round); medians,
p10/p90 and the median of the per-round ratios. Decoders with past key/values: the decode step
(one new token over a KV cache of ``kv_len`` tokens, the cache each model computed itself from
the first ``kv_len`` tokens of the data; the new token cycles through the next real tokens) in
tokens/s, and the prefill of those ``kv_len`` tokens. Other models: one batch of the data.

The report (JSON; keys in :mod:`scap_onnx.report`) names the CPU model and ISA, thread count,
onnxruntime version and execution provider.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import helper

from . import __version__
from .errors import ScapError
from .op import OP_TYPE
from .progress import NullProgress, Progress

REPORT_FORMAT = "scap-onnx-validate"
REPORT_VERSION = 1
_VALIDATE_PREFIX = "scap_validate::"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: Decode steps cycle through this many real next tokens.
_DECODE_TOKENS = 8


# ----------------------------------------------------------------------------- options
THREAD_POOLS = ("shared", "separate")


@dataclass
class ValidateOptions:
    """What validate measures and how (the CLI options, one to one)."""

    tokenizer: str | Path | None = None
    seq_len: int = 256  # tokens per evaluation window
    max_tokens: int | None = 4096  # evaluation tokens (windows x seq_len)
    skip_tokens: int = 0  # skip this many tokens of the data first (contiguous sampling)
    sampling: str = "spread"  # text windows: "spread" across the whole file, or "contiguous" from its start
    phase: float = 0.0  # spread sampling: shift of the window places; 0.5 is disjoint from calibration's 0.0
    batch_size: int = 1
    threads: int | None = None  # intra-op threads (default: physical cores)
    provider: str = "cpu"
    accuracy: bool = True
    latency: bool = True
    kv_len: int = 256  # decode: tokens already in the KV cache
    warmup: int = 3
    repeats: int = 20
    prefill_repeats: int = 5
    prefill: bool = True
    # Latency: "shared" runs dense and sparse on one onnxruntime intra-op pool (spinning, as a single
    # session runs by default); "separate" gives each session its own pool, spinning or not.
    thread_pool: str = "shared"
    spinning: bool = False  # separate pools only: their workers spin (off: they would steal each other's cores)
    targets: dict[str, float] | None = None  # role -> target sparsity, for the report only

    def check(self) -> None:
        if self.seq_len < 2:
            raise ScapError("--seq-len must be at least 2")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ScapError("--tokens must be at least 1")
        if self.batch_size < 1:
            raise ScapError("--batch-size must be at least 1")
        if self.kv_len < 1:
            raise ScapError("--kv-len must be at least 1")
        if self.repeats < 1 or self.warmup < 0 or self.prefill_repeats < 1:
            raise ScapError("--repeats must be at least 1 and --warmup at least 0")
        if self.threads is not None and self.threads < 1:
            raise ScapError("--threads must be at least 1")
        if self.skip_tokens < 0:
            raise ScapError("--skip-tokens must be at least 0")
        if not (0.0 <= self.phase < 1.0):
            raise ScapError("--phase must be in [0, 1)")
        if self.thread_pool not in THREAD_POOLS:
            raise ScapError(f"--thread-pool must be one of {', '.join(THREAD_POOLS)}, got {self.thread_pool!r}")
        if self.spinning and self.thread_pool == "shared":
            raise ScapError("--spinning applies to --thread-pool separate only (the shared pool always spins)")
        if not (self.accuracy or self.latency):
            raise ScapError("nothing to do: both accuracy and latency are switched off")


def provider_name(provider: str) -> str:
    """'cpu' / 'cuda' or a full onnxruntime provider name; ScapError when onnxruntime lacks it."""
    import onnxruntime as ort

    name = _PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        raise ScapError(f"execution provider {provider!r} is not available in this onnxruntime "
                        f"(available: {', '.join(available)})")
    return name


def default_threads() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to tell
        n = None
    return int(n or os.cpu_count() or 1)


# ----------------------------------------------------------------------------- environment
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and val.strip():
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    return model, flags


def kernel_isa(flags: set[str]) -> str:
    """The kernel family the op library picks on this CPU (mirrors custom_ops/dispatch.cc)."""
    cap = os.environ.get("SCAP_ONNX_ISA")
    has_avx2 = {"avx2", "fma"} <= flags
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    has_amx = has_avx512 and {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
    if cap in (None, "amx") and has_amx:
        return "avx512+amx"
    if (cap in (None, "amx", "avx512")) and has_avx512:
        return "avx512"
    if (cap in (None, "amx", "avx512", "avx2")) and has_avx2:
        return "avx2"
    return "portable"


def environment(threads: int, provider: str, spinning: bool) -> dict:
    """Where the numbers come from: CPU model and ISA, threads, onnxruntime, provider, load."""
    import onnxruntime as ort

    model, flags = _cpu_model_and_flags()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem = psutil.virtual_memory().total
    except Exception:
        physical, mem = None, None
    try:
        from .library import get_library_path

        lib = get_library_path()
    except FileNotFoundError:
        lib = None
    return {
        "cpu_model": model,
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "kernel_isa": kernel_isa(flags),
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "memory_bytes": mem,
        "threads": threads,
        "spinning": spinning,
        "provider": provider,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "scap_onnx": __version__,
        "library": lib,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------- the two models
@dataclass
class ModelPair:
    """The dense and the sparse model, checked to belong together (weight-free protos)."""

    dense_path: Path
    sparse_path: Path
    inputs: list  # data.InputInfo of the dense model
    outputs: list[str]
    kind: str  # "causal-lm" | "encoder" | "generic"
    past: dict[str, str]  # past input name -> present output name (decoders with KV cache)
    scap: list[dict]  # per ScapSparseMatMul node: name, input, weight, k, n, threshold, offset, role, layer
    fc_bytes: int  # all FC weight bytes of the dense model (MatMuls with constant 2-D B)
    sparse_proto: onnx.ModelProto = field(repr=False, default=None)


def _load(path: Path, what: str) -> onnx.ModelProto:
    from .capture import load_proto

    try:
        return load_proto(path)
    except ScapError as e:
        raise ScapError(f"{what}: {e}") from None


def _io_signature(model: onnx.ModelProto) -> tuple[dict, dict]:
    from .data import model_inputs

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
    some; inputs/outputs differ; a sparse node has no MatMul of that name and weight in DENSE.
    """
    from .capture import _tensor_head
    from .data import model_inputs
    from .fuse import members_of
    from .measure import scap_nodes
    from .targets import GraphView, find_all_targets
    from .token_scale import NORM_TAG

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
    view = GraphView.from_proto(dp)
    fc = find_all_targets(view)
    by_name = {t.name: t for t in fc}
    d_inits = {t.name: t for t in dp.graph.initializer}
    s_inits = {t.name: t for t in sp.graph.initializer}
    producers = {n.output[0]: n for n in sp.graph.node if n.op_type in ("Identity", "Transpose") and n.input}
    norm_nodes = {n.output[0]: n for n in sp.graph.node if NORM_TAG in n.name and n.input}
    scap = []
    for n in snodes:
        members = members_of(n)
        if len(members) > 1:
            scap += _fused_members(n, _unscaled_input(norm_nodes, n.input[0]), members, by_name, d_inits, s_inits,
                                   dense, sparse)
            continue
        t = by_name.get(n.name)
        w = _weight_source(producers, n.input[1], t)
        if t is None or t.weight != w:
            raise ScapError(f"models do not match: sparse node {n.name!r} has no MatMul or Gemm of that name "
                            f"with weight {w!r} in {dense.name}")
        a, b = d_inits.get(w), s_inits.get(w)
        if a is not None and b is not None:
            if tuple(a.dims) != tuple(b.dims) or a.data_type != b.data_type or \
                    _tensor_head(a, dense.parent) != _tensor_head(b, sparse.parent):
                raise ScapError(f"models do not match: weight {w!r} differs between {dense.name} and {sparse.name}")
        scap.append(_scap_entry(n, t, n.name))
    inputs = model_inputs(dp)
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


def _scap_entry(node: onnx.NodeProto, t, name: str) -> dict:
    """What validate needs of one target computed by a ScapSparseMatMul node."""
    from .measure import _attr
    from .targets import layer_of, role_of

    return {
        "name": name, "input": node.input[0], "weight": t.weight, "k": t.k, "n": t.n,
        "itemsize": 2 if t.dtype == "float16" else 4,
        "threshold": _attr(node, "threshold"), "offset": _attr(node, "offset"),
        "role": t.role if t.role != "other" else (role_of(name) or "other"),
        "layer": t.layer if t.layer is not None else layer_of(name),
    }


def _unscaled_input(norm_nodes: dict[str, onnx.NodeProto], name: str) -> str:
    """The activation a ScapSparseMatMul input comes from: itself, or the x of a token-scaled x / n
    (the rewriter's nodes, named with token_scale.NORM_TAG)."""
    for _ in range(4):
        node = norm_nodes.get(name)
        if node is None:
            break
        name = node.input[0]
    return name


def _fused_members(node: onnx.NodeProto, activation: str, members: list[str], by_name: dict, d_inits: dict,
                   s_inits: dict, dense: Path, sparse: Path) -> list[dict]:
    """The targets of a fused node (scap_onnx.fuse): each a dense target reading ``activation``, the
    node's input (or what it token-scales), whose weight is the node's B from its column offset on
    (checked on the first row's bytes)."""
    from .capture import _tensor_head

    ts = [by_name.get(m) for m in members]
    if any(t is None or t.input != activation or t.trans_b for t in ts):
        bad = next(m for m, t in zip(members, ts) if t is None or t.input != activation or t.trans_b)
        raise ScapError(f"models do not match: fused sparse node {node.name!r} lists {bad!r}, which is no "
                        f"MatMul reading {activation!r} in {dense.name}")
    w = s_inits.get(node.input[1])
    width = sum(t.n for t in ts)
    if w is None or tuple(w.dims) != (ts[0].k, width) or any(t.k != ts[0].k for t in ts):
        shape = list(w.dims) if w is not None else "not an initializer"
        raise ScapError(f"models do not match: fused sparse node {node.name!r} in {sparse.name} has weight "
                        f"{shape}, not its targets' {ts[0].k} x {width}")
    column = 0
    for m, t in zip(members, ts):
        a = d_inits.get(t.weight)
        if a is not None:
            size = onnx.helper.tensor_dtype_to_np_dtype(a.data_type).itemsize
            nbytes = min(64, t.n * size)
            if a.data_type != w.data_type or _tensor_head(a, dense.parent, nbytes) != \
                    _tensor_head(w, sparse.parent, nbytes, column * size):
                raise ScapError(f"models do not match: weight {t.weight!r} of {m!r} differs between {dense.name} "
                                f"and the fused node {node.name!r} of {sparse.name}")
        column += t.n
    return [_scap_entry(node, t, m) for m, t in zip(members, ts)]


def _weight_source(producers: dict[str, onnx.NodeProto], name: str, target) -> str:
    """The dense weight a sparse node's B reads: through Identity nodes (``producers``: output ->
    Identity or Transpose node), and through the Transpose the rewriter puts on a transB weight."""
    for _ in range(8):
        p = producers.get(name)
        if target is None or name == target.weight or p is None:
            break
        if p.op_type == "Transpose" and not target.trans_b:
            break
        name = p.input[0]
    return name


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1}


def fc_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every MatMul / Gemm weight that is a constant 2-D tensor, also through Identity,
    Transpose or Cast nodes (a tied lm_head reads the embedding through a Transpose): what a
    decode step streams from memory for its fully-connected layers."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            inits[n.output[0]] = n.attribute[0].t
    source = {}
    for n in model.graph.node:
        if n.op_type in ("Identity", "Transpose", "Cast") and n.input:
            source[n.output[0]] = n.input[0]

    def resolve(name: str):
        seen = 0
        while name not in inits and name in source and seen < 8:
            name, seen = source[name], seen + 1
        return inits.get(name)

    total = 0
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        t = resolve(n.input[1])
        if t is None or len(t.dims) != 2 or resolve(n.input[0]) is not None:
            continue
        total += int(t.dims[0]) * int(t.dims[1]) * _ITEMSIZE.get(t.data_type, 4)
    return total


# ----------------------------------------------------------------------------- sessions
def session_options(threads: int, spinning: bool, library: bool, shared_pool: bool = False):
    """Options for a timed or compared session; ``shared_pool``: run on the process-wide pool,
    whose size and spinning onnxruntime fixed when it made it."""
    import onnxruntime as ort

    from .capture import default_options

    opts = default_options(None if shared_pool else threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if shared_pool:
        opts.use_per_session_threads = False
    else:
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if library:
        from .library import session_options as with_library

        try:
            opts = with_library(opts)
        except FileNotFoundError as e:
            raise ScapError(str(e)) from None
    return opts


def _providers(provider: str) -> list:
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def _session_from_path(path: Path, opts, provider: str):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), opts, providers=_providers(provider))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScapError(f"onnxruntime cannot load {path.name}: {msg}") from None


def _with_extra_outputs(proto: onnx.ModelProto, names: list[str], elem: dict[str, int]) -> onnx.ModelProto:
    """A copy of a weight-free proto that also outputs the tensors ``names`` (through Identity)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for k, nm in enumerate(names):
        out = f"{_VALIDATE_PREFIX}{k}"
        m.graph.node.append(helper.make_node("Identity", [nm], [out], name=f"{_VALIDATE_PREFIX}Identity{k}"))
        m.graph.output.append(helper.make_tensor_value_info(out, elem.get(nm, onnx.TensorProto.FLOAT), None))
    return m


# ----------------------------------------------------------------------------- data
def open_eval_data(pair: ModelPair, data: str | Path, opts: ValidateOptions):
    """A DataSource over the evaluation data (ScapError on a missing file / tokenizer)."""
    from .data import open_data

    return open_data(data, pair.sparse_proto, pair.dense_path, tokenizer=opts.tokenizer, seq_len=opts.seq_len,
                     max_tokens=opts.max_tokens, batch_size=opts.batch_size, skip_tokens=opts.skip_tokens,
                     sampling=opts.sampling, phase=opts.phase)


def _ids_of(feeds: dict) -> np.ndarray | None:
    for k, v in feeds.items():
        if "input_ids" in k:
            return v
    return None


def _batches(ds):
    """DataSource batches; ScapError naming the data when it holds no batch at all."""
    n = 0
    try:
        for feeds, n_tok in ds.batches():
            if n_tok == 0:
                continue
            n += 1
            yield feeds, n_tok
    except ScapError as e:
        if n == 0:
            raise ScapError(f"no evaluation data: {e}".replace("calibration window", "evaluation window")) from None
        raise
    if n == 0:
        raise ScapError(f"no evaluation data: {ds.path} holds no batch of feeds")


# ----------------------------------------------------------------------------- accuracy
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class _Accumulator:
    """Streaming accuracy metrics over batches."""

    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.sq_diff: dict[str, float] = {o: 0.0 for o in pair.outputs}
        self.sq_ref: dict[str, float] = {o: 0.0 for o in pair.outputs}
        self.max_abs: dict[str, float] = {o: 0.0 for o in pair.outputs}
        self.nll_d = self.nll_s = 0.0
        self.n_nll = 0
        self.agree = 0
        self.n_pos = 0
        self.kl: list[np.ndarray] = []
        self.cos: list[float] = []
        self.tokens = 0
        self.batches = 0

    def add(self, feeds: dict, dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray], n_tok: int) -> None:
        self.tokens += n_tok
        self.batches += 1
        for o in self.pair.outputs:
            a, b = dense[o], sparse[o]
            if a.dtype.kind != "f" or a.size == 0:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            self.sq_diff[o] += float(np.square(a64 - b64).sum())
            self.sq_ref[o] += float(np.square(a64).sum())
            self.max_abs[o] = max(self.max_abs[o], float(np.abs(a64 - b64).max()))
        ids = _ids_of(feeds)
        mask = next((v for k, v in feeds.items() if "attention_mask" in k), None)
        if self.pair.kind == "causal-lm" and ids is not None and "logits" in dense:
            self._lm(ids, mask, dense["logits"], sparse["logits"])
        elif self.pair.kind == "encoder":
            self._encoder(mask, dense, sparse)

    def _lm(self, ids, mask, ld, ls) -> None:
        b, s = ids.shape
        valid = np.ones((b, s), bool) if mask is None or mask.shape != (b, s) else mask.astype(bool)
        lpd, lps = _log_softmax(ld), _log_softmax(ls)
        # perplexity: position t predicts token t+1 (both real tokens)
        pv = valid[:, :-1] & valid[:, 1:]
        tgt = ids[:, 1:, None].astype(np.int64)
        pd_ = -np.take_along_axis(lpd[:, :-1], tgt, -1)[..., 0]
        ps_ = -np.take_along_axis(lps[:, :-1], tgt, -1)[..., 0]
        self.nll_d += float(pd_[pv].astype(np.float64).sum())
        self.nll_s += float(ps_[pv].astype(np.float64).sum())
        self.n_nll += int(pv.sum())
        # next-token distributions at every real position
        self.agree += int((ld.argmax(-1) == ls.argmax(-1))[valid].sum())
        self.n_pos += int(valid.sum())
        kl = (np.exp(lpd) * (lpd - lps)).sum(-1)
        self.kl.append(np.maximum(kl[valid], 0.0).astype(np.float64))

    def _encoder(self, mask, dense, sparse) -> None:
        name = next((o for o in ("sentence_embedding", "pooler_output", "last_hidden_state", "token_embeddings")
                     if o in dense), None)
        if name is None:
            name = next((o for o in self.pair.outputs if dense[o].dtype.kind == "f" and dense[o].ndim in (2, 3)), None)
        if name is None:
            return
        ea, eb = dense[name].astype(np.float64), sparse[name].astype(np.float64)
        if ea.ndim == 3:
            if mask is not None and mask.shape == ea.shape[:2]:
                w = mask.astype(np.float64)[..., None]
                ea = (ea * w).sum(1) / np.maximum(w.sum(1), 1.0)
                eb = (eb * w).sum(1) / np.maximum(w.sum(1), 1.0)
            else:
                ea, eb = ea.mean(1), eb.mean(1)
        num = (ea * eb).sum(-1)
        den = np.linalg.norm(ea, axis=-1) * np.linalg.norm(eb, axis=-1)
        self.cos.extend((num / np.maximum(den, 1e-300)).tolist())
        self.embedding_output = name

    def result(self) -> dict:
        out: dict = {"tokens": self.tokens, "batches": self.batches}
        out["outputs"] = {
            o: {"rel_error": (float(np.sqrt(self.sq_diff[o] / self.sq_ref[o])) if self.sq_ref[o] > 0 else 0.0),
                "max_abs_error": self.max_abs[o]}
            for o in self.pair.outputs if self.sq_ref[o] > 0 or self.sq_diff[o] > 0
        }
        if self.n_nll:
            pd, ps = float(np.exp(self.nll_d / self.n_nll)), float(np.exp(self.nll_s / self.n_nll))
            out["perplexity"] = {
                "dense": pd, "sparse": ps, "change": ps - pd, "change_pct": 100.0 * (ps / pd - 1.0),
                "nll_dense": self.nll_d / self.n_nll, "nll_sparse": self.nll_s / self.n_nll,
                "tokens": self.n_nll,
            }
        if self.n_pos:
            kl = np.concatenate(self.kl) if self.kl else np.zeros(1)
            out["top1_agreement"] = self.agree / self.n_pos
            out["kl"] = {"mean": float(kl.mean()), "p50": float(np.percentile(kl, 50)),
                         "p99": float(np.percentile(kl, 99)), "max": float(kl.max()), "positions": int(kl.size)}
        if self.cos:
            c = np.asarray(self.cos)
            out["embedding"] = {"output": getattr(self, "embedding_output", None), "pooling": "mean",
                                "cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "rows": int(c.size)}
        return out


def _dense_key(pair: ModelPair, ds) -> str:
    st = pair.dense_path.stat()
    return json.dumps([str(pair.dense_path.resolve()), st.st_size, st.st_mtime_ns, ds.describe(), ds.max_tokens])


def measure_accuracy(pair: ModelPair, ds, opts: ValidateOptions, progress: Progress | None = None,
                     dense_cache: DenseCache | None = None, token_sink: Callable | None = None) -> tuple[dict, dict]:
    """(accuracy, sparsity) over the data: both models on each batch, the sparse one with its
    ScapSparseMatMul inputs as extra outputs. ``token_sink(ids)`` sees every batch's input_ids."""
    from .capture import ModelSource, make_session
    from .measure import library_available, lower_scap_ops

    progress = progress or NullProgress()
    threads = opts.threads or default_threads()
    provider = provider_name(opts.provider)
    cap_names = list(dict.fromkeys(n["input"] for n in pair.scap))
    elem = {}
    for n in pair.scap:
        elem[n["input"]] = onnx.TensorProto.FLOAT16 if n["itemsize"] == 2 else onnx.TensorProto.FLOAT
    use_lib = library_available()
    key = _dense_key(pair, ds)
    dense_sess = None
    acc = _Accumulator(pair)
    dropped = {n["name"]: 0 for n in pair.scap}
    total = {n["name"]: 0 for n in pair.scap}
    src = ModelSource(pair.sparse_path)
    try:
        model = _with_extra_outputs(src.proto, cap_names, elem)
        if not use_lib:
            lower_scap_ops(model)
        sparse_sess = make_session(model, src.data_dir, session_options(threads, opts.spinning, use_lib),
                                   _providers(provider))
        del model
        cap_out = [f"{_VALIDATE_PREFIX}{k}" for k in range(len(cap_names))]
        s_inputs = {i.name for i in sparse_sess.get_inputs()}
        task = progress.task("validate accuracy", ds.max_tokens if ds.is_text else None)
        for i, (feeds, n_tok) in enumerate(_batches(ds)):
            if token_sink is not None:
                ids = _ids_of(feeds)
                if ids is not None:
                    token_sink(ids)
            feeds_in = {k: v for k, v in feeds.items() if k in s_inputs}
            dense = dense_cache.get(key, i) if dense_cache is not None else None
            if dense is None:
                if dense_sess is None:
                    dense_sess = _session_from_path(pair.dense_path, session_options(threads, opts.spinning, False),
                                                    provider)
                dense = dict(zip(pair.outputs, dense_sess.run(pair.outputs, feeds_in)))
                if dense_cache is not None:
                    dense_cache.put(key, i, dense)
            res = sparse_sess.run(pair.outputs + cap_out, feeds_in)
            sparse = dict(zip(pair.outputs, res[: len(pair.outputs)]))
            caps = dict(zip(cap_names, res[len(pair.outputs):]))
            for n in pair.scap:
                x = caps[n["input"]]
                d = np.abs(x.astype(np.float32, copy=False) - np.float32(n["offset"]))
                dropped[n["name"]] += int(np.count_nonzero(d <= np.float32(n["threshold"])))
                total[n["name"]] += int(x.size)
            acc.add(feeds, dense, sparse, n_tok)
            del res, sparse, caps, dense
            task.advance(n_tok)
        task.close()
    finally:
        src.close()
    accuracy = acc.result()
    accuracy["op"] = "library" if use_lib else "lowered to standard ONNX ops"
    sparsity = summarize_sparsity(pair, {k: dropped[k] / max(total[k], 1) for k in dropped}, opts.targets)
    return accuracy, sparsity


def summarize_sparsity(pair: ModelPair, measured: dict[str, float], targets: dict[str, float] | None) -> dict:
    """Per node, per role and weighted by FC weight bytes."""
    nodes = {}
    by_role: dict[str, list[float]] = {}
    role_bytes: dict[str, list[int]] = {}
    skipped = 0.0
    sparse_bytes = 0
    for n in pair.scap:
        s = measured[n["name"]]
        nb = n["k"] * n["n"] * n["itemsize"]
        nodes[n["name"]] = {"role": n["role"], "layer": n["layer"], "k": n["k"], "n": n["n"],
                            "threshold": n["threshold"], "offset": n["offset"], "sparsity": s}
        by_role.setdefault(n["role"], []).append(s)
        role_bytes.setdefault(n["role"], []).append(nb)
        skipped += s * nb
        sparse_bytes += nb
    roles = {}
    for r, vals in by_role.items():
        d = {"targets": len(vals), "mean": float(np.mean(vals)), "min": float(np.min(vals)),
             "max": float(np.max(vals)),
             "weighted": float(np.average(vals, weights=role_bytes[r]))}
        if targets and r in targets:
            d["target"] = float(targets[r])
            d["mean_error"] = d["mean"] - d["target"]
            d["worst_error"] = float(max(vals, key=lambda v: abs(v - targets[r])) - targets[r])
        roles[r] = d
    total = max(pair.fc_bytes, sparse_bytes, 1)
    return {
        "nodes": nodes,
        "roles": roles,
        "weighted": skipped / total,
        "weighted_sparse_targets": skipped / max(sparse_bytes, 1),
        "fc_bytes": int(total),
        "fc_bytes_sparse_targets": int(sparse_bytes),
        "ideal_fc_speedup": total / max(total - skipped, 1e-9),
    }


# ----------------------------------------------------------------------------- latency
def _stats_ms(times: list[float]) -> dict:
    t = np.asarray(times) * 1e3
    return {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()), "min": float(t.min()), "n": int(t.size)}


def interleaved(runs: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up, then ``repeats`` rounds running every callable once, order reversed every other round."""
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _compare(times: dict[str, list[float]], tokens: int | None, warmup: int) -> dict:
    d, s = times["dense"], times["sparse"]
    out = {"dense_ms": _stats_ms(d), "sparse_ms": _stats_ms(s), "warmup": warmup, "repeats": len(d)}
    out["speedup"] = float(np.median(d) / np.median(s))
    out["paired_speedup"] = float(np.median(np.asarray(d) / np.asarray(s)))
    if tokens:
        out["tokens"] = tokens
        out["dense_tokens_per_s"] = tokens / float(np.median(d))
        out["sparse_tokens_per_s"] = tokens / float(np.median(s))
    return out


def _token_stream(ds, need: int, seen: list[np.ndarray] | None = None) -> tuple[np.ndarray, bool]:
    """At least ``need`` token ids from the data (windows concatenated; tiled when too few)."""
    chunks = list(seen or [])
    have = sum(c.size for c in chunks)
    if have < need:
        for feeds, _ in _batches(ds):
            ids = _ids_of(feeds)
            if ids is None:
                break
            chunks.append(ids.reshape(-1))
            have += ids.size
            if have >= need:
                break
    if not chunks:
        raise ScapError("decode latency needs input_ids in the data")
    flat = np.concatenate([c.reshape(-1) for c in chunks]).astype(np.int64)
    tiled = flat.size < need
    if tiled:
        flat = np.tile(flat, need // max(flat.size, 1) + 1)
    return flat[:need], tiled


def _decoder_feeds(pair: ModelPair, ids: np.ndarray, past_len: int, past: dict[str, np.ndarray] | None):
    """Feeds for ids [1, S] after ``past_len`` cached tokens (``past``: present outputs by name)."""
    from .data import feeds_from_ids

    s = ids.shape[1]
    feeds = feeds_from_ids(pair.inputs, ids)
    for inp in pair.inputs:
        n = inp.name
        if "attention_mask" in n:
            feeds[n] = np.ones((1, past_len + s), dtype=inp.dtype)
        elif "position_ids" in n:
            feeds[n] = np.arange(past_len, past_len + s, dtype=inp.dtype)[None]
        elif "cache_position" in n:
            feeds[n] = np.arange(past_len, past_len + s, dtype=inp.dtype)
        elif n in pair.past and past is not None:
            feeds[n] = past[pair.past[n]]
    return feeds


def _latency_plan(pair: ModelPair, ds, opts: ValidateOptions, tokens_seen: list[np.ndarray] | None) -> dict:
    """What to time, from the data: token ids for a decoder with a KV cache, else one batch of feeds."""
    if pair.kind == "causal-lm" and pair.past:
        ids, tiled = _token_stream(ds, opts.kv_len + _DECODE_TOKENS, tokens_seen)
        return {"ids": ids, "tiled": tiled}
    feeds, n_tok = next(_batches(ds))  # the first batch (_batches raises ScapError when there is none)
    return {"feeds": feeds, "tokens": n_tok}


def _time_plan(pair: ModelPair, plan: dict, opts: ValidateOptions, threads: int, provider: str, shared: bool,
               progress: Progress | None = None) -> dict:
    """Decode step and prefill (decoders with KV cache) or one batch (others), dense and sparse
    interleaved. ``shared``: both sessions on onnxruntime's process-wide pool (a fresh process only)."""
    import onnxruntime as ort

    progress = progress or NullProgress()
    if shared:
        ort.set_global_thread_pool_sizes(threads, 1)
    spinning = True if shared else opts.spinning  # onnxruntime's shared pool spins (its default)
    sessions = {
        "dense": _session_from_path(pair.dense_path, session_options(threads, spinning, False, shared), provider),
        "sparse": _session_from_path(pair.sparse_path, session_options(threads, spinning, True, shared), provider),
    }
    out: dict = {"threads": threads, "provider": provider, "thread_pool": "shared" if shared else "separate",
                 "spinning": spinning}
    if "ids" in plan:
        L = opts.kv_len
        ids = plan["ids"]
        prompt = ids[None, :L]
        prefill_feeds = _decoder_feeds(pair, prompt, 0, None)
        decode_feeds = {}
        for name, sess in sessions.items():
            t = progress.task(f"latency: prefill {name} ({L} tokens)", None)
            res = dict(zip(pair.outputs, sess.run(pair.outputs, prefill_feeds)))
            t.close()
            cache = {o: res[o] for o in pair.past.values()}
            decode_feeds[name] = [_decoder_feeds(pair, ids[None, L + j: L + j + 1], L, cache)
                                  for j in range(_DECODE_TOKENS)]
            del res
        counters = {"dense": 0, "sparse": 0}

        def step(name):
            def run():
                f = decode_feeds[name][counters[name] % _DECODE_TOKENS]
                counters[name] += 1
                return sessions[name].run(None, f)
            return run

        task = progress.task(f"latency: decode step, KV {L} ({opts.warmup}+{opts.repeats} rounds)", None)
        times = interleaved({"dense": step("dense"), "sparse": step("sparse")}, opts.warmup, opts.repeats)
        task.close()
        out["decode"] = _compare(times, 1, opts.warmup)
        out["decode"]["kv_len"] = L
        out["decode"]["tokens_tiled"] = plan["tiled"]
        del decode_feeds
        if opts.prefill:
            task = progress.task(f"latency: prefill {L} tokens (1+{opts.prefill_repeats} rounds)", None)
            times = interleaved({n: (lambda s=s: s.run(None, prefill_feeds)) for n, s in sessions.items()},
                                1, opts.prefill_repeats)
            task.close()
            out["prefill"] = _compare(times, L, 1)
    else:
        if pair.kind == "causal-lm":  # no KV cache: a decode step is a whole forward pass
            out["note"] = "the model has no past key/value inputs: no decode step; one batch timed instead"
        names = {i.name for i in sessions["dense"].get_inputs()}
        feeds = {k: v for k, v in plan["feeds"].items() if k in names}
        task = progress.task(f"latency: one batch ({opts.warmup}+{opts.repeats} rounds)", None)
        times = interleaved({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()},
                            opts.warmup, opts.repeats)
        task.close()
        out["batch"] = _compare(times, plan["tokens"], opts.warmup)
        out["batch"]["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    del sessions
    return out


def measure_latency(pair: ModelPair, ds, opts: ValidateOptions, tokens_seen: list[np.ndarray] | None = None,
                    progress: Progress | None = None) -> dict:
    """Decode step and prefill (decoders with KV cache) or one batch (others), interleaved.

    With the shared thread pool (the default) the timing runs in a fresh process: onnxruntime makes
    its process-wide pool once and then refuses sessions with pools of their own, which would break
    the caller's later sessions.
    """
    progress = progress or NullProgress()
    threads = opts.threads or default_threads()
    provider = provider_name(opts.provider)
    plan = _latency_plan(pair, ds, opts, tokens_seen)
    if opts.thread_pool != "shared":
        return _time_plan(pair, plan, opts, threads, provider, False, progress)
    from .timing_process import run_in_fresh_process

    task = progress.task("latency: dense and sparse on one thread pool (in a separate process)", None)
    try:
        return run_in_fresh_process((replace(pair, sparse_proto=None), plan, opts, threads, provider, True))
    finally:
        task.close()


# ----------------------------------------------------------------------------- the whole run
def validate(dense: str | Path, sparse: str | Path, data: str | Path, options: ValidateOptions | None = None,
             *, progress: Progress | None = None, dense_cache: DenseCache | None = None) -> dict:
    """Validate SPARSE against DENSE on DATA; returns the report dict (see scap_onnx.report)."""
    from .measure import scap_nodes

    opts = options or ValidateOptions()
    opts.check()
    progress = progress or NullProgress()
    started = time.perf_counter()
    pair = open_pair(dense, sparse)
    provider = provider_name(opts.provider)
    threads = opts.threads or default_threads()
    ds = open_eval_data(pair, data, opts)
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
    need = opts.kv_len + _DECODE_TOKENS

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


# ----------------------------------------------------------------------------- command line
def _cli(fn):
    """The CLI's error handling (exit 2 on bad input), looked up at call time (no import cycle)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cli import handle_errors

        return handle_errors(fn)(*args, **kwargs)

    return wrapper


def targets_from_spec(spec: str | None) -> dict[str, float] | None:
    """Role -> target sparsity from a SPEC (for the report's measured-vs-target columns)."""
    if not spec:
        return None
    from .spec import parse_spec
    from .targets import ROLES

    s = parse_spec(spec)
    return {r: s.sparsity(r) for r in ROLES if s.sparsity(r) is not None}


def default_report_path(sparse: Path) -> Path:
    return sparse.with_name(sparse.stem + ".report.json")


import typer  # noqa: E402  (typer is a dependency; the command below is registered in cli.py)


@_cli
def validate_command(
    dense: Path = typer.Argument(..., help="The original (dense) ONNX model."),
    sparse: Path = typer.Argument(..., help="The rewritten model with ScapSparseMatMul nodes."),
    data: Path = typer.Option(..., "--data", "-d", help="Held-out data: a text file (.txt, .jsonl) or an .npz of input feeds."),
    report: Optional[Path] = typer.Option(None, "--report", "-r", help="Report JSON (default: SPARSE.report.json beside SPARSE); .md and .png files are written beside it."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Folder with tokenizer.json (default: beside DENSE)."),
    tokens: int = typer.Option(4096, "--tokens", help="Evaluation tokens (windows of --seq-len)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per evaluation window."),
    sampling: str = typer.Option("spread", "--sampling", help="Text windows: 'spread' (evenly across the whole file) or 'contiguous' (from its start)."),
    phase: float = typer.Option(0.0, "--phase", help="Spread sampling: shift of the window places in [0, 1); 0.5 gives windows disjoint from a calibration at 0 (held out from the same file)."),
    skip_tokens: int = typer.Option(0, "--skip-tokens", help="Skip this many tokens first (implies contiguous windows)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per onnxruntime run."),
    kv_len: int = typer.Option(256, "--kv-len", help="Decode step: tokens already in the KV cache."),
    repeats: int = typer.Option(20, "--repeats", help="Timed rounds (dense and sparse once each per round)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds first."),
    prefill_repeats: int = typer.Option(5, "--prefill-repeats", help="Timed rounds of the prefill."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: physical cores)."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider: cpu, cuda or a full onnxruntime provider name."),
    thread_pool: str = typer.Option("shared", "--thread-pool", help="Latency: 'shared' (dense and sparse sessions on one onnxruntime thread pool that spins, like one session with onnxruntime's defaults) or 'separate' (a pool each)."),
    spinning: bool = typer.Option(False, "--spinning/--no-spinning", help="With --thread-pool separate: the pools' threads spin (off by default: two spinning pools steal each other's cores)."),
    accuracy: bool = typer.Option(True, "--accuracy/--no-accuracy", help="Measure accuracy and sparsity."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="SPEC the model was rewritten for (shown next to the measured sparsity)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Compare SPARSE with DENSE: accuracy (perplexity, agreement, KL or embedding cosine), measured sparsity, decode / prefill / batch latency (interleaved); JSON, markdown and PNG reports."""
    from .fileio import check_output_file
    from .progress import make_progress
    from .report import write_report

    opts = ValidateOptions(tokenizer=tokenizer, seq_len=seq_len, max_tokens=tokens, skip_tokens=skip_tokens,
                           sampling=sampling, phase=phase,
                           batch_size=batch_size, threads=threads, provider=provider, accuracy=accuracy,
                           latency=latency, kv_len=kv_len, warmup=warmup, repeats=repeats,
                           prefill_repeats=prefill_repeats, thread_pool=thread_pool, spinning=spinning, targets=targets_from_spec(sparsity))
    report_path = report or default_report_path(sparse)
    check_output_file(report_path)
    progress = make_progress(quiet)
    try:
        rep = validate(dense, sparse, data, opts, progress=progress)
    finally:
        stop = getattr(progress, "stop", None)
        if stop:
            stop()
    files = write_report(rep, report_path)
    typer.echo(files["markdown_text"])
    typer.echo(f"report: {files['json']} (+ {files['markdown'].name}"
               + "".join(f", {p.name}" for p in files["plots"]) + ")")
