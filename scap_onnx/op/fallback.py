"""Portable fallback: ScapSparseMatMul as an onnxruntime-extensions Python op.

Where the compiled op library is unavailable (no compiler, an unsupported platform), a rewritten
model still runs in onnxruntime, slowly, on the numpy reference (``scap_onnx.reference``)::

    from scap_onnx.fallback import fallback_session
    session = fallback_session("model.sparse.onnx")
    outputs = session.run(None, feeds)

How it works. onnxruntime-extensions runs Python functions registered with ``onnx_op`` as custom
ops, but only in its own domain (``ai.onnx.contrib``), with a fixed number of inputs per op type,
and for float32 but not float16 tensors (0.15.2 aborts the process on a float16 PyOp). So
:func:`to_fallback_model` returns a copy of the model in which every ``com.scap`` ScapSparseMatMul
node becomes

- ``ai.onnx.contrib::ScapSparseMatMul`` (A, B) or ``ai.onnx.contrib::ScapSparseMatMulBias``
  (A, B, bias), or, for a node with a per-channel input, ``ai.onnx.contrib::ScapSparseMatMulChannels``
  (A, B, bias, threshold_scale, channel_offset, an absent one replaced by an empty float32 tensor,
  which means the same), all float32, with the attributes threshold, offset and node (the original
  node's name, for error messages);
- preceded by ``Cast`` to float32 of its inputs and followed by a cast back (``Cast`` to float16,
  or ``CastLike`` the original A where the type of A is not declared in the model), unless A is
  known to be float32. The reference computes in float32 from float16 inputs either way.

A Python exception inside a PyOp also aborts the process, so attributes are checked when the
model is converted (ValueError naming the node), and the op function never raises: on bad shapes
it logs the error, returns NaNs, and :class:`FallbackSession` (what :func:`fallback_session`
returns) turns that into a RuntimeError naming the node when ``run`` returns. Sessions made
elsewhere with :func:`fallback_session_options` only log it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnx import TensorProto, helper

from ..graph.view import declared_elem_types
from .contract import DOMAIN, OP_TYPE, check_attributes, check_channel_vectors, trim_inputs
from .reference import scap_sparse_matmul

FALLBACK_DOMAIN = "ai.onnx.contrib"  # onnxruntime_extensions.default_opset_domain()
FALLBACK_OP_TYPE = OP_TYPE  # inputs A, B
FALLBACK_OP_TYPE_BIAS = OP_TYPE + "Bias"  # inputs A, B, bias
FALLBACK_OP_TYPE_CHANNELS = OP_TYPE + "Channels"  # inputs A, B, bias, threshold_scale, channel_offset

_log = logging.getLogger(__name__)
_registered = False
_register_lock = threading.Lock()
_errors = threading.local()  # errors of the PyOps run on this thread since FallbackSession.run began


def _compute(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None, threshold: float, offset: float, node: str,
             threshold_scale: np.ndarray | None = None, channel_offset: np.ndarray | None = None):
    """The PyOp body: the numpy reference, in float32. Never raises (that would abort onnxruntime)."""
    try:
        if bias is not None and b.ndim == 2 and bias.shape != (b.shape[1],):
            raise ValueError(f"bias must have shape [{b.shape[1]}], got {list(bias.shape)}")
        with np.errstate(all="ignore"):  # NaN / Inf in A are data, not warnings (which may be errors)
            return scap_sparse_matmul(a, b, bias, threshold_scale, channel_offset, threshold=threshold,
                                      offset=offset).astype(np.float32)
    except BaseException as e:  # noqa: BLE001 - see the module docstring
        message = f"{OP_TYPE} node '{node}': {e}"
        _log.error("%s", message)
        pending = getattr(_errors, "messages", None)
        if pending is not None:
            pending.append(message)
        n = b.shape[-1] if b.ndim >= 1 else 1
        return np.full((*a.shape[:-1], n), np.nan, dtype=np.float32)


def _register_ops() -> None:
    """Declare the two PyOps to onnxruntime-extensions (once per process)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from onnxruntime_extensions import PyOp, default_opset_domain, onnx_op

        assert default_opset_domain() == FALLBACK_DOMAIN, default_opset_domain()
        attrs = {"threshold": PyOp.dt_float, "offset": PyOp.dt_float, "node": PyOp.dt_string}
        f32 = PyOp.dt_float

        @onnx_op(op_type=FALLBACK_OP_TYPE, inputs=[f32, f32], outputs=[f32], attrs=attrs)
        def _scap_sparse_matmul(a, b, threshold=0.0, offset=0.0, node=""):
            return _compute(a, b, None, threshold, offset, node)

        @onnx_op(op_type=FALLBACK_OP_TYPE_BIAS, inputs=[f32, f32, f32], outputs=[f32], attrs=attrs)
        def _scap_sparse_matmul_bias(a, b, bias, threshold=0.0, offset=0.0, node=""):
            return _compute(a, b, bias, threshold, offset, node)

        def present(v):  # an empty tensor stands for an absent input (module docstring)
            return v if v.size else None

        @onnx_op(op_type=FALLBACK_OP_TYPE_CHANNELS, inputs=[f32] * 5, outputs=[f32], attrs=attrs)
        def _scap_sparse_matmul_channels(a, b, bias, threshold_scale, channel_offset, threshold=0.0, offset=0.0,
                                         node=""):
            return _compute(a, b, present(bias), threshold, offset, node, present(threshold_scale),
                            present(channel_offset))

        _registered = True


def _check_constant_vectors(graph: onnx.GraphProto, inputs: list[str], label: str) -> None:
    """Per-channel inputs that are initializers are checked now (ValueError naming the node); others
    when the op runs."""
    constants = {t.name: t for t in graph.initializer}
    b = constants.get(inputs[1])
    vectors = [onnx.numpy_helper.to_array(constants[n]) if n in constants else None
               for n in (inputs + ["", "", ""])[3:5]]
    if b is None or len(b.dims) != 2 or all(v is None for v in vectors):
        return
    try:
        check_channel_vectors(b.dims[0], *vectors)
    except ValueError as e:
        raise ValueError(f"{OP_TYPE} node '{label}': {e}") from None


def _convert_graph(graph: onnx.GraphProto, default_opset: int) -> int:
    """Replace the ScapSparseMatMul nodes of graph (and its subgraphs) in place; return how many."""
    types = declared_elem_types(graph)
    names = {o for node in graph.node for o in node.output} | set(types)
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{base}__scap_fallback{counter[0]}"
            if name not in names:
                names.add(name)
                return name

    converted = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for attr in node.attribute:  # If / Loop / Scan bodies
            subgraphs = [attr.g] if attr.type == attr.GRAPH else attr.graphs if attr.type == attr.GRAPHS else []
            for sub in subgraphs:
                converted += _convert_graph(sub, default_opset)
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "threshold" not in attrs:
            raise ValueError(f"{OP_TYPE} node '{label}': missing required attribute 'threshold'")
        threshold, offset = float(attrs["threshold"]), float(attrs.get("offset", 0.0))
        try:
            check_attributes(threshold, offset)
        except ValueError as e:
            raise ValueError(f"{OP_TYPE} node '{label}': {e}") from None
        inputs = trim_inputs(node.input)  # without omitted optional inputs at the end
        channels = len(inputs) > 3
        if len(inputs) not in (2, 3, 4, 5) or not all(inputs[:2]) or (not channels and not all(inputs)):
            raise ValueError(f"{OP_TYPE} node '{label}': expected inputs (A, B[, bias][, threshold_scale]"
                             f"[, channel_offset]), got {list(node.input)}")
        if channels:
            _check_constant_vectors(graph, inputs, label)
            inputs += [""] * (5 - len(inputs))
            if "" in inputs:  # an absent optional input: an empty float32 tensor
                empty = fresh("scap_fallback_absent")
                new_nodes.append(helper.make_node("Constant", [], [empty], value=helper.make_tensor(
                    empty, TensorProto.FLOAT, [0], [])))
                inputs = [name or empty for name in inputs]
        a_type = types.get(inputs[0])
        if a_type not in (None, TensorProto.FLOAT, TensorProto.FLOAT16):
            raise ValueError(f"{OP_TYPE} node '{label}': A must be float32 or float16")
        y = node.output[0]
        op_inputs, op_output = inputs, y
        if a_type != TensorProto.FLOAT:
            # Cast to float32 (a no-op for float32 inputs of undeclared type), run, cast back.
            op_inputs = []
            for name in inputs:
                cast = fresh(name)
                new_nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT))
                op_inputs.append(cast)
            op_output = fresh(y)
        new_nodes.append(
            helper.make_node(
                (FALLBACK_OP_TYPE_CHANNELS if channels else
                 FALLBACK_OP_TYPE_BIAS if len(inputs) == 3 else FALLBACK_OP_TYPE),
                op_inputs,
                [op_output],
                name=node.name,
                domain=FALLBACK_DOMAIN,
                threshold=threshold,
                offset=offset,
                node=label,
            )
        )
        if a_type == TensorProto.FLOAT16:
            new_nodes.append(helper.make_node("Cast", [op_output], [y], to=TensorProto.FLOAT16))
        elif a_type is None:
            if default_opset < 15:
                raise ValueError(
                    f"{OP_TYPE} node '{label}': the type of input '{inputs[0]}' is not declared and CastLike needs "
                    f"opset >= 15 (the model has {default_opset}); add value_info for it"
                )
            new_nodes.append(helper.make_node("CastLike", [op_output, inputs[0]], [y]))
        if a_type is not None:
            types[y] = a_type
        converted += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return converted


def to_fallback_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model whose ScapSparseMatMul nodes run as onnxruntime-extensions Python ops.

    Raises ValueError (naming the node) for attributes the op rejects.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    default_opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    if _convert_graph(out.graph, default_opset) == 0:
        return out
    uses_domain = any(n.domain == DOMAIN for n in out.graph.node) or any(f.domain == DOMAIN for f in out.functions)
    kept = [o for o in out.opset_import if o.domain != FALLBACK_DOMAIN and (uses_domain or o.domain != DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend([*kept, helper.make_opsetid(FALLBACK_DOMAIN, 1)])
    return out


def fallback_session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """onnxruntime.SessionOptions with onnxruntime-extensions (and so the fallback PyOps) registered."""
    from onnxruntime_extensions import get_library_path

    _register_ops()
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


class FallbackSession(ort.InferenceSession):
    """An InferenceSession whose ``run`` raises RuntimeError when a fallback op met invalid inputs."""

    def run(self, output_names, input_feed, run_options=None):  # noqa: D102 - as InferenceSession.run
        _errors.messages = []
        try:
            outputs = super().run(output_names, input_feed, run_options)
            if _errors.messages:
                raise RuntimeError("; ".join(_errors.messages))
            return outputs
        finally:
            _errors.messages = None


def fallback_session(
    model: onnx.ModelProto | str | os.PathLike,
    options: ort.SessionOptions | None = None,
    **kwargs: Any,
) -> FallbackSession:
    """A CPU onnxruntime session for a model with ScapSparseMatMul nodes, without the compiled library.

    model: a ModelProto or a path (external data beside it is loaded). The converted model is
    passed to onnxruntime serialized, so it must stay under protobuf's 2 GB limit. Further keyword
    arguments go to onnxruntime.InferenceSession.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    converted = to_fallback_model(model)
    kwargs.setdefault("providers", ["CPUExecutionProvider"])
    return FallbackSession(converted.SerializeToString(), fallback_session_options(options), **kwargs)


__all__ = [
    "FALLBACK_DOMAIN",
    "FallbackSession",
    "fallback_session",
    "fallback_session_options",
    "to_fallback_model",
]
