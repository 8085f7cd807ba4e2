"""Model files: read graphs without their weights, identify models, write models atomically.

- protos (calibration, evaluation): :func:`load_proto` reads the graph alone;
  :class:`ModelSource` holds a weight-free proto plus the folder onnxruntime reads the weights from
  (inline weights of a large model are moved once to a temporary external-data file), and reads
  single weights through the one constant resolver (scap_onnx.graph.view); :func:`fingerprint`
  identifies a model by structure and the first bytes of its 2-D weights.
- onnx_ir (the rewriter): :func:`load_model` leaves external data memory-mapped; :func:`save_model`
  is the one save path (atomic, with external data when the input had it or the model is too large
  for one protobuf).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from ..errors import ScapError
from .fileio import check_output_file, missing_model_message, same_file
from .view import GraphView

INLINE_LIMIT = 1024  # bytes: tensors larger than this are moved out of the proto
#: Models whose initializers exceed this are saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def load_proto(path: str | Path) -> onnx.ModelProto:
    """The model proto without external data. Raises ScapError when the file is not an ONNX model."""
    p = Path(path)
    if not p.is_file():
        raise ScapError(missing_model_message(p))
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        raise ScapError(f"{p} is not an ONNX model (cannot parse it as ModelProto)") from None
    if not model.graph.node:
        raise ScapError(f"{p} is not an ONNX model (no graph nodes)")
    return model


def has_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def tensor_head(t: onnx.TensorProto, base_dir: Path, nbytes: int = 64, start: int = 0) -> bytes:
    """``nbytes`` bytes of a tensor's data from byte ``start`` (inline or external), without
    reading the rest."""
    if has_external(t):
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
    # Typed fields (float_data, int32_data holding float16 bits ...): the bytes raw_data would hold.
    return numpy_helper.to_array(t).tobytes()[start:start + nbytes]


def fingerprint(model: onnx.ModelProto, base_dir: str | Path) -> str:
    """Identity of a model: sha256 of its graph structure, initializer names/shapes/types and the
    first bytes of every 2-D initializer and every 3-D uint8 one (MatMulNBits' B), so that models
    that share an architecture still differ."""
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
        if len(t.dims) == 2 or (len(t.dims) == 3 and t.data_type == onnx.TensorProto.UINT8):
            h.update(tensor_head(t, base_dir))
    return h.hexdigest()


def _inline_small_external(proto: onnx.ModelProto, base_dir: Path, limit: int = 4096) -> None:
    """Read small external tensors (shape constants, axes ...) into the proto: onnxruntime's shape
    inference needs their values, and they cost nothing to hold."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in proto.graph.initializer:
        if has_external(t):
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
        inline = sum(len(t.raw_data) for t in proto.graph.initializer if not has_external(t))
        if inline > 64 * 1024 * 1024 or any(has_external(t) for t in proto.graph.initializer):
            if inline > 64 * 1024 * 1024:
                # Move the inline weights to a temporary external-data file once; the proto keeps the graph.
                self._tmp = tempfile.TemporaryDirectory(prefix="scap-onnx-")
                tmp_model = Path(self._tmp.name) / "model.onnx"
                onnx.save_model(
                    proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=INLINE_LIMIT,
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
        self.view = GraphView.from_proto(proto)

    def _link_original_external(self, proto: onnx.ModelProto) -> None:
        for t in proto.graph.initializer:
            if has_external(t):
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
        """The constant a value is (an initializer, read from its external file when it has one, or
        a Constant node), through Identity nodes; KeyError when it is not one."""
        const = self.view.constant(name)
        if const is None:
            raise KeyError(name)
        for t in self.proto.graph.initializer:
            if t.name == const:
                return numpy_helper.to_array(t, base_dir=str(self.data_dir)) if has_external(t) \
                    else numpy_helper.to_array(t)
        node = next(n for n in self.proto.graph.node if n.op_type == "Constant" and n.output[0] == const)
        return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))

    def weight_is_finite(self, name: str) -> bool:
        """Whether the constant ``name`` holds only finite values (read once, then dropped)."""
        return bool(np.isfinite(self.weight(name)).all())

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_model(path: str | Path) -> ir.Model:
    """onnx_ir model, external data left on disk (memory-mapped). ScapError if not ONNX."""
    p = Path(path)
    if not p.is_file():
        raise ScapError(missing_model_message(p))
    try:
        return ir.load(str(p))
    except Exception:
        raise ScapError(f"{p} is not an ONNX model (cannot parse it as ModelProto)") from None


def wants_external_data(model: ir.Model) -> bool:
    """Whether ``model`` should be saved with external data: it had some, or it is too large for one
    protobuf. Ask before fusing (scap_onnx.passes.fuse): fused weights are computed tensors, not external."""
    return _uses_external_data(model) or _initializer_bytes(model) > EXTERNAL_DATA_BYTES


def _uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += int(np.prod(t.shape.numpy(), dtype=np.int64)) * t.dtype.itemsize
    return total


def external_data_name(output: Path) -> str:
    return output.name + ".data"


def save_model(model: ir.Model, output: str | Path, *, external: bool | None = None,
               inputs_to_keep: list[Path] | None = None) -> Path | None:
    """Save atomically: the model (and its data file) appear complete or not at all.

    ``external``: None decides by the size of the model (or whether it used external data).
    Returns the external data file written, if any.
    """
    output = Path(output)
    check_output_file(output)
    if external is None:
        external = wants_external_data(model)
    for p in inputs_to_keep or []:
        if same_file(p, output) or (external and same_file(p, output.parent / external_data_name(output))):
            raise ScapError(f"output {output} would overwrite the input {p}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp_model = tmp / output.name
        if external:
            data_name = external_data_name(output)
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp / data_name, output.parent / data_name)
            os.replace(tmp_model, output)
            return output.parent / data_name
        ir.save(model, tmp_model)
        os.replace(tmp_model, output)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def external_files(model: ir.Model) -> list[Path]:
    """Files the model's external tensors live in (a rewrite must not overwrite them)."""
    return sorted({Path(v.const_value.path) for v in model.graph.initializers.values()
                   if isinstance(v.const_value, ir.ExternalTensor)})


def check_model(path: str | Path, input_ops: set[str] | None = None) -> None:
    """onnx.checker on a saved model (by path, so external data and > 2 GB models work).

    ``input_ops``: op types of the input model. onnxruntime registers some of its contrib ops in the
    ONNX domain (SimplifiedLayerNormalization, which onnxruntime-genai's builder writes), where the
    checker knows no schema for them: a model that had them already is not refused for them.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).splitlines()[0]
        unknown = first.split("No Op registered for ", 1)
        if len(unknown) == 2 and unknown[1].split(" ", 1)[0] in (input_ops or set()):
            return
        raise ScapError(f"rewritten model fails onnx.checker: {first}") from None
