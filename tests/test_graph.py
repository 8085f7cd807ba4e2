"""scap_onnx.graph: the constant resolver, the bytes weight-identity checks read, and validate's
pairing of dense and sparse models by the rewriter's node metadata (not node names)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scap_onnx.api import rewrite
from scap_onnx.calibration.calibrator import calibrate
from scap_onnx.errors import ScapError
from scap_onnx.evaluation.pairing import open_pair
from scap_onnx.graph.model_io import tensor_head
from scap_onnx.graph.view import GraphView
from scap_onnx.op.contract import INPUT_KEY, TARGETS_KEY, scap_nodes


def _typed(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A tensor stored in its typed field (float_data; float16 bits in int32_data), not raw_data."""
    t = helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                           array.flatten().astype(np.float32).tolist())
    assert not t.raw_data and (t.float_data if array.dtype == np.float32 else t.int32_data)
    assert np.array_equal(numpy_helper.to_array(t), array)
    return t


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tensor_head_reads_typed_fields_at_their_width(tmp_path, dtype):
    """The bytes of a tensor stored in float_data / int32_data are those raw_data would hold (the
    earlier reader widened float_data to float64 and int32_data to 4 bytes per float16)."""
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(dtype)
    typed = _typed(a, "w")
    raw = numpy_helper.from_array(a, "w")
    assert tensor_head(typed, tmp_path) == tensor_head(raw, tmp_path) == a.tobytes()[:64]
    width = np.dtype(dtype).itemsize
    assert tensor_head(typed, tmp_path, 8, 3 * width) == a.tobytes()[3 * width: 3 * width + 8]


def _decoder_with_typed_weights(tmp_path, tiny) -> tuple:
    """The tiny decoder with every 2-D weight moved to its typed field (as some exporters write)."""
    m = onnx.load(str(tiny["decoder"]))
    for i, t in enumerate(m.graph.initializer):
        if len(t.dims) == 2:
            m.graph.initializer[i].CopyFrom(_typed(numpy_helper.to_array(t), t.name))
    folder = tmp_path / "typed"
    folder.mkdir()
    for f in tiny["decoder"].parent.iterdir():
        if f.suffix != ".onnx":
            (folder / f.name).write_bytes(f.read_bytes())
    onnx.save(m, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def decoder_stats(tiny):
    return calibrate(tiny["decoder"], tiny["calib"], sparsity="0.5", max_tokens=512, seq_len=64, passes=1)


def test_pairing_accepts_weights_stored_in_typed_fields(tiny, decoder_stats, tmp_path):
    """The rewritten model (raw_data) and its dense original (typed fields) hold the same weights:
    validate pairs them (the earlier byte reader refused them as different weights)."""
    dense = _decoder_with_typed_weights(tmp_path, tiny)
    rewrite(dense, tmp_path / "sparse.onnx", data=tiny["calib"], sparsity="0.5", max_tokens=256, seq_len=64,
            passes=1, fuse=False)
    pair = open_pair(dense, tmp_path / "sparse.onnx")
    assert len(pair.scap) == 14


def test_pairing_follows_metadata_not_names(tiny, decoder_stats, tmp_path):
    sparse = tmp_path / "sparse.onnx"
    rewrite(tiny["decoder"], sparse, stats=decoder_stats)
    m = onnx.load(str(sparse))
    nodes = scap_nodes(m)
    # names are free: renamed nodes pair as before
    for i, n in enumerate(nodes):
        n.name = f"renamed_{i}"
    onnx.save(m, str(tmp_path / "renamed.onnx"))
    pair = open_pair(tiny["decoder"], tmp_path / "renamed.onnx")
    assert sorted(e["name"] for e in pair.scap) == sorted(t for n in nodes
                                                          for t in json.loads(_meta(n)[TARGETS_KEY]))
    # metadata that names another layer's target is refused, whatever the node is called
    single = next(n for n in nodes if len(json.loads(_meta(n)[TARGETS_KEY])) == 1)
    other = next(t for n in nodes for t in json.loads(_meta(n)[TARGETS_KEY])
                 if t not in json.loads(_meta(single)[TARGETS_KEY]) and _meta(n)[INPUT_KEY] != _meta(single)[INPUT_KEY])
    _set_meta(single, TARGETS_KEY, json.dumps([other]))
    onnx.save(m, str(tmp_path / "lying.onnx"))
    with pytest.raises(ScapError, match="models do not match: sparse node .* replaces"):
        open_pair(tiny["decoder"], tmp_path / "lying.onnx")
    # no metadata at all: a model not written by this rewriter
    for n in nodes:
        del n.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    with pytest.raises(ScapError, match="does not record the targets it replaces"):
        open_pair(tiny["decoder"], tmp_path / "bare.onnx")


def _meta(node) -> dict:
    return {e.key: e.value for e in node.metadata_props}


def _set_meta(node, key, value) -> None:
    for e in node.metadata_props:
        if e.key == key:
            e.value = value


def test_resolver_follows_pass_through_nodes():
    w = numpy_helper.from_array(np.zeros((3, 4), np.float32), "W")
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(np.zeros((4, 2), np.float16)))
    nodes = [const,
             helper.make_node("Identity", ["W"], ["W1"]),
             helper.make_node("Transpose", ["W1"], ["Wt"], perm=[1, 0]),
             helper.make_node("Cast", ["Wt"], ["Wc"], to=TensorProto.FLOAT16),
             helper.make_node("Identity", ["C"], ["C1"]),
             helper.make_node("Relu", ["X"], ["R"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("R", TensorProto.FLOAT, [3])], [w])
    view = GraphView.from_proto(helper.make_model(g))
    assert view.resolve("Wc").name == "W" and view.resolve("Wc").through == ("Cast", "Transpose", "Identity")
    assert view.constant("W1") == "W" and view.constant("Wt") is None  # a transposed W is not W itself
    assert view.constant("C1") == "C" and view.elem_type("C1") == TensorProto.FLOAT16
    assert view.elem_type("Wt") == TensorProto.FLOAT and view.elem_type("Wc") is None
    assert view.resolve("R") is None and view.resolve("X") is None
