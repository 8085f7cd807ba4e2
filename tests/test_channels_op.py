"""The compiled ops' per-channel inputs (threshold_scale, channel_offset) in real onnxruntime
sessions, against the numpy reference: ScapSparseMatMul (float32 / float16; M = 0, 1, 7, 64; 1-4
threads; scale entries 0 and +inf; NaN in A; with and without bias; vectors as initializers and as
graph inputs), under each ISA cap the CPU allows (a subprocess per cap, as tests/test_op.py does),
ScapSparseMatMulNBits (inputs 5 and 6), the errors for bad vectors, and models without the vectors
(3 inputs) computing bit for bit what they computed before. The Python side: tests/test_channels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import scap_onnx
from conftest import skip_unless_cpu_runs
from scap_onnx.op.contract import opset_import
from scap_onnx.op.nbits import make_nbits_node, pack_rows
from scap_onnx.op.reference import scap_sparse_matmul, scap_sparse_matmul_nbits

sys.path.insert(0, str(Path(__file__).parent))
from test_channels import channel_data, vector_feeds, vector_model  # noqa: E402
from test_op import check_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
TOL = {np.float32: 1e-5, np.float16: 3e-3}
SHAPES = [(0,), (1,), (7,), (2, 32)]  # M = 0, 1, 7, 64
# (K, N): decoding threaded over kept rows at K = 300, N = 1000; odd sizes off the vector widths.
SIZES = [(37, 11), (300, 1000)]
# (threshold, offset, with bias, vectors, as graph inputs)
VARIANTS = [(0.6, 0.1, True, "both", False), (0.0, 0.0, False, "scale", False), (1.5, -0.3, False, "both", True),
            (np.inf, 0.2, True, "offset", False), (0.4, 0.0, False, "scale", True)]


def session(model, threads=1):
    options = scap_onnx.session_options(intra_op_threads=threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def activations(shape, k, dtype, seed, offset, coff):
    """A ~ N(offset + channel_offset, 1), with D = 0 exactly in one channel and NaN in a few places."""
    rng = np.random.default_rng(seed)
    centre = np.float32(offset) + (coff if coff is not None else np.float32(0))
    a = (rng.standard_normal((*shape, k)).astype(np.float32) + centre).astype(dtype)
    if a.size:
        a[..., 3] = centre if np.ndim(centre) == 0 else centre[3]
        a.reshape(-1)[rng.choice(a.size, max(1, a.size // 50), replace=False)] = np.nan
    return a


def run_battery(sizes=SIZES, threads_list=(1, 2, 3, 4)) -> int:
    """Every variant, shape, size and type through the float op against the reference; the number of
    failures (printed)."""
    failures = 0
    for dtype in (np.float32, np.float16):
        for ki, (k, n) in enumerate(sizes):
            for vi, (threshold, offset, with_bias, vectors, as_inputs) in enumerate(VARIANTS):
                _, b, bias, scale, coff = channel_data((1,), k, n, dtype, 100 + 10 * ki + vi)
                bias = bias if with_bias else None
                scale, coff = (scale if vectors != "offset" else None), (coff if vectors != "scale" else None)
                model = vector_model(b, bias, scale, coff, threshold=threshold, offset=offset, dtype=dtype,
                                     as_inputs=as_inputs)
                threads = threads_list[(ki + vi) % len(threads_list)]
                sess = session(model, threads)
                for si, shape in enumerate(SHAPES):
                    a = activations(shape, k, dtype, 1000 + 100 * ki + 10 * vi + si, offset, coff)
                    (y,) = sess.run(None, vector_feeds(a, scale, coff, as_inputs))
                    want = scap_sparse_matmul(a, b, bias, scale, coff, threshold=threshold, offset=offset)
                    try:
                        check_close(y, want, TOL[dtype], f"{np.dtype(dtype).name} K={k} N={n} A{a.shape} "
                                    f"variant {vi} threads {threads}")
                    except AssertionError as e:
                        failures += 1
                        print(e)
    print(f"isa={os.environ.get('SCAP_ONNX_ISA')}: {failures} failures")
    return failures


def test_float_op_matches_the_reference():
    assert run_battery() == 0


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_float_op_under_isa_caps(isa):
    skip_unless_cpu_runs(isa)
    env = {**os.environ, "SCAP_ONNX_ISA": isa,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    body = "import sys, test_channels_op as t; sys.exit(1 if t.run_battery(t.SIZES[:1] + [(300, 200)]) else 0)"
    proc = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"isa={isa}: 0 failures" in proc.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_neutral_vectors_change_nothing(dtype):
    """Scales of 1 and offsets of 0 give bit for bit what the node without them gives; and a model
    written before the vectors existed (3 inputs) runs as it did."""
    k, n = 300, 1000
    a, b, bias, _, _ = channel_data((5,), k, n, dtype, 7)
    ones, zeros = np.ones(k, np.float32), np.zeros(k, np.float32)
    plain = session(vector_model(b, bias, None, None, threshold=0.5, offset=0.1, dtype=dtype), 2)
    assert len(plain.get_inputs()) == 1
    neutral = session(vector_model(b, bias, ones, zeros, threshold=0.5, offset=0.1, dtype=dtype), 2)
    for rows in (1, 5):
        (y_plain,) = plain.run(None, {"A": a[:rows]})
        (y_neutral,) = neutral.run(None, {"A": a[:rows]})
        np.testing.assert_array_equal(y_plain, y_neutral)
        check_close(y_plain, scap_sparse_matmul(a[:rows], b, bias, threshold=0.5, offset=0.1), TOL[dtype])


@pytest.mark.parametrize("scale, coff, as_inputs, message", [
    (np.ones(36, np.float32), None, False, r"threshold_scale must have shape \[K\] = \[37\], got \[36\]"),
    (None, np.zeros((1, 37), np.float32), False, r"channel_offset must have shape \[K\] = \[37\], got \[1, 37\]"),
    (np.r_[np.ones(36), -0.5].astype(np.float32), None, True, "threshold_scale must be >= 0 and not NaN, got -0.5"),
    (np.r_[np.nan, np.ones(36)].astype(np.float32), None, True, "threshold_scale must be >= 0 and not NaN, got nan"),
])
def test_bad_vectors_are_errors_naming_the_node(scale, coff, as_inputs, message):
    a, b, bias, _, _ = channel_data((2,), 37, 11, np.float32, 8)
    model = vector_model(b, bias, scale, coff, threshold=0.5, offset=0.0, dtype=np.float32, as_inputs=as_inputs)
    with pytest.raises(Exception, match=f"ScapSparseMatMul node 'scap': {message}"):
        session(model).run(None, vector_feeds(a, scale, coff, as_inputs))


def test_float16_vectors_must_be_float32():
    a, b, _, scale, _ = channel_data((2,), 37, 11, np.float16, 9)
    model = vector_model(b, None, scale, None, threshold=0.5, offset=0.0, dtype=np.float16)
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(scale.astype(np.float16), "scale"))
    with pytest.raises(Exception, match="(?i)type"):
        session(model).run(None, {"A": a})


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_op_matches_the_reference(bits, dtype):
    k, n, block = 3 * 32 + 5, 600, 32
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    scales = rng.uniform(0.001, 0.02, (-(-k // block), n)).astype(np.float32)
    zp = rng.integers(0, 1 << bits, scales.shape).astype(np.uint8)
    _, _, bias, scale, coff = channel_data((1,), k, n, dtype, 10 + bits)
    for threads, (with_bias, vectors) in zip((1, 3, 4), ((False, "both"), (True, "scale"), (False, "offset"))):
        ts, co = (scale if vectors != "offset" else None), (coff if vectors != "scale" else None)
        names = {"b": pack_rows(q, bits), "s": scales, "zp": zp, "bias": bias, "ts": ts, "co": co}
        node = make_nbits_node("a", "b", "s", "y", k=k, n=n, bits=bits, block_size=block, threshold=0.7, offset=0.05,
                               zero_points="zp", bias="bias" if with_bias else None,
                               threshold_scale="ts" if ts is not None else None,
                               channel_offset="co" if co is not None else None, name="nbits")
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inits = [numpy_helper.from_array(v, name) for name, v in names.items() if v is not None and name in node.input]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", elem, None)],
                                  [helper.make_tensor_value_info("y", elem, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
        model.ir_version = 9
        sess = session(model, threads)
        for shape in SHAPES:
            a = channel_data(shape, k, n, dtype, 20 + len(shape) + shape[0])[0]
            (y,) = sess.run(None, {"a": a})
            want = scap_sparse_matmul_nbits(a, pack_rows(q, bits), scales, zp, bias if with_bias else None, ts, co,
                                            k=k, n=n, bits=bits, block_size=block, threshold=0.7, offset=0.05)
            check_close(y, want, TOL[dtype], f"bits={bits} {vectors} A{a.shape}")


def test_nbits_bad_scale_is_an_error_naming_the_node():
    k, n = 32, 8
    node = make_nbits_node("a", "b", "s", "y", k=k, n=n, bits=8, block_size=32, threshold=0.5, threshold_scale="ts",
                           name="nbits")
    inits = [numpy_helper.from_array(np.zeros((k, n), np.uint8), "b"),
             numpy_helper.from_array(np.ones((1, n), np.float32), "s"),
             numpy_helper.from_array(np.full(k, -1.0, np.float32), "ts")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 9
    with pytest.raises(Exception, match="ScapSparseMatMulNBits node 'nbits': threshold_scale must be >= 0"):
        session(model).run(None, {"a": np.ones((1, k), np.float32)})
