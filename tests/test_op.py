"""The compiled ScapSparseMatMul op in real onnxruntime sessions, against the numpy reference.

The reference (scap_onnx.op.reference.scap_sparse_matmul) is the oracle: no expected output is written
down here. The shapes cover every path of the CPU kernel:

- one row of A (decode): kept rows of B split over tasks, threaded from rows*kept*N >= 65536;
- several rows: column blocks over threads, passes of rows, register tiles of a few rows, panels
  of kept rows of B (K = 300 keeps more than 256 at low thresholds); earlier versions sent float32
  A of 16 rows or more to onnxruntime's MatMul on the sparsified A: the heights cover that too;
- several rows of float32 A over a constant B (an initializer): B packed once into strips, by
  register tiles over the rows' union of kept rows or by each pair of rows' own kept rows (forced with
  SCAP_ONNX_GEMM=packed|packed_rows in capped subprocesses, chosen by default where measured faster);
- K and N off the vector widths, K = 1, N = 1, no rows at all; 1 to 4 threads;
- on CPUs with AMX-BF16, tall float32 A runs on the tile unit (bfloat16 parts of float32 values),
  and falls back to the AVX-512 kernels for Inf or NaN: the default runs cover it, the capped
  subprocesses the paths without it.

Each ISA cap (SCAP_ONNX_ISA, read once per process) is checked in a subprocess that imports this
file and calls run_battery(). Error metric: max |y - ref| / max |ref| over the finite outputs,
with NaN and Inf required in the same places.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import scap_onnx
from conftest import skip_unless_cpu_runs
from scap_onnx.op.contract import DOMAIN, OP_TYPE, make_node, opset_import
from scap_onnx.op.reference import scap_sparse_matmul

TOL = {np.float32: 1e-5, np.float16: 3e-3}
DTYPES = [np.float32, np.float16]
PROVIDERS = ["CPUExecutionProvider"]
# IR 9: read by every onnxruntime the library supports (1.17 reads up to 9; the models need no more).
IR_VERSION = 9

# (shape of A, N). K = A.shape[-1].
CASES = [
    ((7,), 17),  # rank 1, decode
    ((1,), 33),  # rank 1, K = 1
    ((1, 300), 1000),  # decode, threaded, 8 row tasks
    ((1, 40), 3000),  # decode, threaded, few kept rows (1-2 tasks)
    ((1, 1, 33), 7),  # rank 3, decode
    ((3, 17), 33),  # several rows, fewer than a register tile
    ((2, 5, 1), 17),  # K = 1, 10 rows
    ((2, 3, 33), 7),  # rank 3, 6 rows
    ((4, 300), 1000),  # several rows, threaded over column blocks, > 256 kept rows at threshold 0
    ((15, 300), 1000),  # 15 rows (the last below 16, where earlier versions switched path), threaded
    ((16, 17), 33),  # 16 rows (earlier versions: onnxruntime's MatMul for float32 from here)
    ((2, 3, 4, 7), 17),  # rank 4, 24 rows
    ((33, 300), 1000),  # 33 rows (32 + 1: a pass or tile boundary), threaded
    ((70, 1), 33),  # K = 1, 70 rows
    ((3, 100, 17), 33),  # 300 rows: more than one pass (of 256 rows)
    ((5, 40), 3000),  # several rows, threaded over many column blocks
    ((65, 1100), 40),  # the drop rule split over tasks of rows (rows * K >= 2 * 2^15), odd rows
    ((3, 1, 1, 300), 1),  # rank 4, N = 1
    ((0, 17), 7),  # no rows
    ((2, 0, 33), 17),  # no rows, rank 3
]
CASE_IDS = ["x".join(map(str, (*shape, n))) for shape, n in CASES]
# (threshold, offset)
ATTRS = [(0.0, 0.0), (0.5, 0.25), (1.0, -1.25), (math.inf, 0.5)]
ATTR_IDS = [f"t{t}_o{o}" for t, o in ATTRS]
SPECIALS = ["finite", "nan", "inf"]


# ----------------------------------------------------------------------------- helpers
def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _model(dtype, *, threshold=0.5, offset=0.0, with_bias=False, name="scap", attrs=None, b=None):
    """One ScapSparseMatMul node named `name` over graph inputs a, b (or initializer b), bias.

    attrs, when given, replaces the node's attributes (to build invalid nodes).
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info("a", elem, None)]
    initializers = []
    if b is None:
        inputs.append(helper.make_tensor_value_info("b", elem, None))
    else:
        initializers.append(numpy_helper.from_array(b, "b"))
    if with_bias:
        inputs.append(helper.make_tensor_value_info("bias", elem, None))
    node = make_node("a", "b", "y", threshold=threshold, offset=offset, bias="bias" if with_bias else None, name=name)
    if attrs is not None:
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    graph = helper.make_graph([node], "scap_op_test", inputs, [helper.make_tensor_value_info("y", elem, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = IR_VERSION
    return model


def _session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = scap_onnx.session_options(intra_op_threads=threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=PROVIDERS)


@functools.lru_cache(maxsize=None)
def _cached_session(dtype, with_bias, threshold, offset, threads):
    return _session(_model(dtype, threshold=threshold, offset=offset, with_bias=with_bias), threads)


@functools.lru_cache(maxsize=None)
def _weights(k, n, dtype):
    rng = np.random.default_rng(_seed("weights", k, n, np.dtype(dtype).name))
    b = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    b.flags.writeable = bias.flags.writeable = False
    return b, bias


def _activations(shape, dtype, threshold, offset, special, seed):
    """A ~ N(offset, 1) with exact zeros, exact offsets (d = 0) and ties |d| == threshold mixed in,
    and NaN or +-Inf in a few places when asked."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) + offset).astype(dtype)
    flat = a.reshape(-1)
    if flat.size:
        pick = rng.random(flat.size)
        flat[pick < 0.08] = 0
        flat[(pick >= 0.08) & (pick < 0.14)] = offset
        if math.isfinite(threshold):
            flat[(pick >= 0.14) & (pick < 0.18)] = offset + threshold
            flat[(pick >= 0.18) & (pick < 0.22)] = offset - threshold
        if special != "finite":
            where = rng.choice(flat.size, size=max(1, flat.size // 97), replace=False)
            flat[where] = np.nan if special == "nan" else np.where(rng.random(where.size) < 0.5, np.inf, -np.inf)
    return a


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| over the finite entries of ref (scale 1 where ref is all zero)."""
    finite = np.isfinite(ref)
    r = ref[finite].astype(np.float64)
    diff = np.abs(y[finite].astype(np.float64) - r)
    scale = float(np.abs(r).max(initial=0.0)) or 1.0
    return float(diff.max(initial=0.0)) / scale


def check_close(y: np.ndarray, ref: np.ndarray, tol: float, context: str = "") -> None:
    assert y.dtype == ref.dtype, f"{context}: dtype {y.dtype} != {ref.dtype}"
    assert y.shape == ref.shape, f"{context}: shape {y.shape} != {ref.shape}"
    assert np.array_equal(np.isnan(y), np.isnan(ref)), f"{context}: NaN in different places"
    inf = np.isinf(ref)
    assert np.array_equal(np.isinf(y), inf) and np.array_equal(y[inf], ref[inf]), f"{context}: Inf differs"
    err = relative_error(y, ref)
    assert err <= tol, f"{context}: relative error {err:.3g} > {tol:g}"


def _reference(a, b, bias, threshold, offset):
    with np.errstate(invalid="ignore", over="ignore"):
        return scap_sparse_matmul(a, b, bias, threshold=threshold, offset=offset)


def check_case(dtype, with_bias, threshold, offset, threads, shape, n, special) -> None:
    """Run one case through the compiled op and compare it with the reference (AssertionError)."""
    b, bias = _weights(shape[-1], n, dtype)
    a = _activations(shape, dtype, threshold, offset, special,
                     _seed(np.dtype(dtype).name, with_bias, threshold, offset, threads, shape, n, special))
    feeds = {"a": a, "b": b, **({"bias": bias} if with_bias else {})}
    (y,) = _cached_session(dtype, with_bias, threshold, offset, threads).run(None, feeds)
    ref = _reference(a, b, bias if with_bias else None, threshold, offset)
    context = (f"{np.dtype(dtype).name} A{shape} N={n} threshold={threshold} offset={offset} bias={with_bias} "
               f"threads={threads} {special}")
    check_close(y, ref, TOL[dtype], context)


@functools.lru_cache(maxsize=None)
def _constant_session(dtype, with_bias, threshold, offset, threads, k, n):
    """B as a constant initializer: the kernels may then pack it once (several rows of float32 A)."""
    b, _ = _weights(k, n, dtype)
    return _session(_model(dtype, threshold=threshold, offset=offset, with_bias=with_bias, b=np.array(b)), threads)


def check_case_constant(dtype, with_bias, threshold, offset, threads, shape, n, special) -> None:
    """check_case with B a constant initializer."""
    b, bias = _weights(shape[-1], n, dtype)
    a = _activations(shape, dtype, threshold, offset, special,
                     _seed("constant", np.dtype(dtype).name, with_bias, threshold, offset, threads, shape, n, special))
    feeds = {"a": a, **({"bias": bias} if with_bias else {})}
    (y,) = _constant_session(dtype, with_bias, threshold, offset, threads, shape[-1], n).run(None, feeds)
    ref = _reference(a, b, bias if with_bias else None, threshold, offset)
    context = (f"constant B: {np.dtype(dtype).name} A{shape} N={n} threshold={threshold} offset={offset} "
               f"bias={with_bias} threads={threads} {special}")
    check_close(y, ref, TOL[dtype], context)


def check_float16_exact(rows: int, threads: int) -> None:
    """float16 conversions, exactly: B holds all 65536 float16 bit patterns and A is 1, so Y = B bit for
    bit (NaN as NaN); then A in [1, 2) with offset -2**-11 makes every D = A + 2**-11 a tie between two
    float16 values, which must round to even as the reference's cast does. N is odd, so every ISA's
    vector body and scalar tail both store halves."""
    b = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(1, -1)[:, :65535]
    a = np.ones((rows, 1), np.float16)
    (y,) = _cached_session(np.float16, False, 0.0, 0.0, threads).run(None, {"a": a, "b": b})
    assert y.shape == (rows, b.shape[1])
    for row in y:
        assert np.array_equal(row, b[0], equal_nan=True), f"rows={rows}: float16 values not reproduced exactly"

    offset = -(2.0**-11)
    ties = (1 + np.arange(rows * 17).reshape(rows, 17) % 1024 / 1024).astype(np.float16)
    ones = np.ones((17, 33), np.float16)
    for k in (1, 17):  # one kept row, or several summed (all exact in float32)
        a = ties[:, :k]
        (y,) = _cached_session(np.float16, False, 0.0, offset, threads).run(None, {"a": a, "b": ones[:k]})
        ref = _reference(a, ones[:k], None, 0.0, offset)
        assert np.array_equal(y, ref), f"rows={rows} K={k}: float16 ties not rounded to even"


def run_battery() -> int:
    """A smaller sweep over every path, for the ISA-capped subprocesses: 0 if all pass, else 1."""
    failures = []
    for rows in (1, 3, 40):
        try:
            check_float16_exact(rows, 2)
        except AssertionError as e:
            failures.append(str(e))
    for dtype in DTYPES:
        for with_bias in (False, True):
            for threshold, offset in ATTRS[1:3]:
                for threads in (3,):
                    for shape, n in CASES:
                        for special in ("finite", "nan"):
                            for check in (check_case, check_case_constant):
                                try:
                                    check(dtype, with_bias, threshold, offset, threads, shape, n, special)
                                except AssertionError as e:
                                    failures.append(str(e))
    for line in failures[:20]:
        print(line)
    print(f"isa={os.environ.get('SCAP_ONNX_ISA')}: {len(failures)} failures")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape, n", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("threads", [1, 2, 3, 4], ids=lambda t: f"{t}thr")
@pytest.mark.parametrize("threshold, offset", ATTRS, ids=ATTR_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_matches_reference(dtype, with_bias, threshold, offset, threads, shape, n):
    # Finite data, then NaN or Inf (alternating with the thread count, so each combination of the
    # other parameters meets both).
    for special in ("finite", SPECIALS[1 + threads % 2]):
        check_case(dtype, with_bias, threshold, offset, threads, shape, n, special)


HEIGHTS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]


@pytest.mark.parametrize("k, n", [(17, 33), (300, 70)], ids=["17x33", "300x70"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_every_height(dtype, k, n):
    """Rows of A around every block size a kernel may use (vector widths, register tiles, passes)."""
    for rows in HEIGHTS:
        for special in ("finite", "nan"):
            check_case(dtype, True, 0.5, 0.25, 2, (rows, k), n, special)


@pytest.mark.parametrize("rows", [1, 40, 128])
def test_float32_accuracy_against_float64(rows):
    """float32 weights keep float32 accuracy on every path, the tile unit's included. Measured here:
    1.3-1.9e-6 for every kernel (float32 accumulation over K = 4096); AMX with three bfloat16 products
    instead of six would add about 4e-6."""
    k, n = 4096, 96
    rng = np.random.default_rng(_seed("float64", rows))
    a = rng.standard_normal((rows, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    (y,) = _cached_session(np.float32, False, 0.5, 0.25, 2).run(None, {"a": a, "b": b})
    d = a.astype(np.float64) - 0.25
    d[np.abs(d) <= 0.5] = 0
    exact = d @ b.astype(np.float64)
    assert relative_error(y, exact) <= 3e-6


@pytest.mark.parametrize("rows", [1, 40])
def test_values_that_round_to_inf_in_bfloat16(rows):
    """float32 values above bfloat16's largest (3.39e38) cannot be split into bfloat16 parts: the AMX
    path must hand them to the float32 kernels, which give the reference's Inf."""
    rng = np.random.default_rng(_seed("bf16-overflow", rows))
    a = rng.standard_normal((rows, 64)).astype(np.float32)
    b = (rng.standard_normal((64, 50)) * 1e-3).astype(np.float32)
    a[0, 5] = 3.4e38
    b[7, 9] = 3.395e38
    (y,) = _cached_session(np.float32, False, 0.5, 0.0, 2).run(None, {"a": a, "b": b})
    ref = _reference(a, b, None, 0.5, 0.0)
    assert np.isinf(ref).any()
    check_close(y, ref, TOL[np.float32], f"rows={rows}")


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize(
    "case", ["product_near_float32_max", "products_below_float32_min", "subnormal_activations",
             "tiny_activations_huge_weights"])
def test_extreme_magnitudes(case, rows):
    """Finite values at the ends of float32's range give the reference's result: bfloat16 parts
    would overflow (x0 rounds up) or flush to zero there, so the AMX path must hand them over.
    N = 2048 makes 40 rows enough work for the threaded (AMX) path."""
    rng = np.random.default_rng(_seed("extreme", case, rows))
    if case == "product_near_float32_max":  # a * b = 3.4028e38 exactly; a0 * b0 = 2^128 = Inf
        x = np.float32((2**24 - 1) * 2.0**40)
        a, b = np.full((rows, 1), x, np.float32), np.full((1, 2048), x, np.float32)
    elif case == "products_below_float32_min":  # every product about 1e-40
        a = (rng.standard_normal((rows, 64)) * 1e-20).astype(np.float32)
        b = (rng.standard_normal((64, 2048)) * 1e-20).astype(np.float32)
    elif case == "subnormal_activations":  # kept subnormal activations against large weights: Y about 1e-9
        a = np.zeros((rows, 2), np.float32)
        a[:, 0] = 1e-39
        b = np.full((2, 2048), 1e30, np.float32)
    else:  # normal activations whose lower bfloat16 parts would be subnormal: Y about 2^-20
        a = np.zeros((rows, 2), np.float32)
        a[:, 0] = np.float32(1.337 * 2.0**-120)
        b = np.full((2, 2048), 2.0**100, np.float32)
    (y,) = _cached_session(np.float32, False, 0.0, 0.0, 2).run(None, {"a": a, "b": b})
    check_close(y, _reference(a, b, None, 0.0, 0.0), TOL[np.float32], f"{case} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_non_finite_weights_in_one_column_range(dtype):
    """Inf in one column range of a wide B: that range takes the float32 kernels, the others the
    AMX kernels (where present), and every range matches the reference."""
    k, n, rows = 96, 3000, 40
    b = np.array(_weights(k, n, dtype)[0])
    b[10, 2500] = np.inf
    a = _activations((rows, k), dtype, 0.5, 0.0, "finite", _seed("range-inf"))
    a[:, 10] = 0.25  # dropped ...
    a[::3, 10] = 2.0  # ... except in every third row, whose Y[:, 2500] is Inf
    (y,) = _cached_session(dtype, False, 0.5, 0.0, 2).run(None, {"a": a, "b": b})
    ref = _reference(a, b, None, 0.5, 0.0)
    assert np.isinf(ref[::3, 2500]).all() and np.isfinite(ref[1::3]).all()
    check_close(y, ref, TOL[dtype], "Inf in one column range")


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_float16_conversions_exact(rows):
    check_float16_exact(rows, 2)


@pytest.mark.parametrize("shape, n", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_threshold_zero_offset_zero_is_matmul(shape, n, with_bias):
    """Dropping only exact zeros changes nothing: Y = A @ B (+ bias), numpy's float32 matmul."""
    b, bias = _weights(shape[-1], n, np.float32)
    rng = np.random.default_rng(_seed("dense", shape, n))
    a = rng.standard_normal(shape).astype(np.float32)
    a[rng.random(shape) < 0.3] = 0
    feeds = {"a": a, "b": b, **({"bias": bias} if with_bias else {})}
    (y,) = _cached_session(np.float32, with_bias, 0.0, 0.0, 2).run(None, feeds)
    expected = a @ b + (bias if with_bias else 0)
    check_close(y, expected.astype(np.float32), 1e-5, f"A{shape} N={n}")


@pytest.mark.parametrize("shape, n", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("threads", [1, 3], ids=lambda t: f"{t}thr")
@pytest.mark.parametrize("threshold, offset", ATTRS, ids=ATTR_IDS)
@pytest.mark.parametrize("special", SPECIALS)
def test_constant_weights_match_reference(special, threshold, offset, threads, shape, n):
    """B as a constant initializer, float32: several rows may run over B packed once (tiles_packed),
    by register tiles over the rows' union of kept rows or by each pair of rows' own kept rows."""
    check_case_constant(np.float32, True, threshold, offset, threads, shape, n, special)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_initializer_weights_and_changing_shapes(dtype):
    """B as a constant initializer (the rewriter's layout); one session runs heights of every path in
    turn, so per-thread scratch buffers grow and shrink between calls."""
    b, bias = _weights(300, 1000, dtype)
    session = _session(_model(dtype, threshold=0.5, offset=0.25, b=np.array(b)), threads=2)
    for rows in (1, 40, 1, 5, 0, 17, 1, 2, 33, 1):
        a = _activations((rows, 300), dtype, 0.5, 0.25, "finite", _seed("init", rows))
        (y,) = session.run(None, {"a": a})
        check_close(y, _reference(a, b, None, 0.5, 0.25), TOL[dtype], f"rows={rows}")


def test_concurrent_runs_of_one_session():
    """Runs from several Python threads at once (onnxruntime releases the GIL) stay independent."""
    session = _cached_session(np.float32, True, 0.5, 0.25, 2)
    b, bias = _weights(300, 1000, np.float32)
    errors: list[str] = []

    def worker(index: int) -> None:
        for i in range(6):
            rows = (1, 3, 20)[(index + i) % 3]
            a = _activations((rows, 300), np.float32, 0.5, 0.25, "finite", _seed("threads", index, i))
            try:
                (y,) = session.run(None, {"a": a, "b": b, "bias": bias})
                check_close(y, _reference(a, b, bias, 0.5, 0.25), TOL[np.float32], f"thread {index} run {i}")
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(f"{type(e).__name__}: {e}")

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors


@pytest.mark.parametrize(
    "dtype, rows, partly",
    [
        pytest.param(dtype, rows, partly,
                     id=f"{np.dtype(dtype).name}-{rows}rows-{'dropped_by_some' if partly else 'dropped_by_all'}")
        for dtype in DTYPES
        for rows in (1, 3, 16, 40)
        for partly in (False, True)
    ],
)
@pytest.mark.parametrize("constant", [False, True], ids=["input_b", "constant_b"])
def test_non_finite_weights_in_dropped_rows_are_skipped(dtype, rows, partly, constant):
    """A dropped activation skips its row of B (the contract: Y = D_kept @ B), so Inf / NaN in a row of
    B that every row of A drops must not reach Y as 0 * Inf = NaN (the reference's semantics). A dense
    MatMul on the sparsified A (an earlier float32 path for >= 16 rows) fails this; so would B packed
    once (constant B) without its record of non-finite rows."""
    k, n = 33, 17
    b = np.array(_weights(k, n, dtype)[0])
    b[4, 3] = np.inf
    b[9, :] = np.nan
    a = _activations((rows, k), dtype, 0.5, 0.0, "finite", _seed("nonfinite", rows))
    a[:, [4, 9]] = 0.25  # |0.25| <= 0.5: dropped in every row
    if partly:
        a[0, 4] = 2.0  # row 0 keeps k = 4 (its Y[0, 3] is Inf); the other rows still drop it
    if constant:
        (y,) = _session(_model(dtype, threshold=0.5, b=b)).run(None, {"a": a})
    else:
        (y,) = _cached_session(dtype, False, 0.5, 0.0, 1).run(None, {"a": a, "b": b})
    ref = _reference(a, b, None, 0.5, 0.0)
    assert np.isfinite(ref).sum() == ref.size - partly
    check_close(y, ref, TOL[dtype], f"rows={rows}")


# ----------------------------------------------------------------------------- ISA caps
def _run_capped(isa: str, body: str, gemm: str | None = None) -> subprocess.CompletedProcess:
    """Runs `body` in a subprocess that has imported this file as test_op, with SCAP_ONNX_ISA=isa
    (the library reads the cap once per process), and SCAP_ONNX_GEMM=gemm when given (sparse,
    panels or dense: the arithmetic of several rows, forced)."""
    package_root = str(Path(scap_onnx.__file__).resolve().parents[1])
    script = f"import sys\nsys.path[:0] = [{package_root!r}, {str(Path(__file__).parent)!r}]\nimport test_op\n" + body
    env = {**os.environ, "SCAP_ONNX_ISA": isa}
    if gemm is not None:
        env["SCAP_ONNX_GEMM"] = gemm
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def kernel_isa() -> str:
    """The kernels the library chose for this process, as its ScapOnnxKernelIsa() reports them."""
    return scap_onnx.kernel_isa()


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512", "amx"])
def test_isa_cap(isa):
    """Every kernel variant the CPU runs, one capped subprocess each; the library reports that the
    cap really chose those kernels."""
    skip_unless_cpu_runs(isa)
    proc = _run_capped(isa, "print('kernel isa:', test_op.kernel_isa())\n"
                            "from scap_onnx.evaluation.environment import environment\n"
                            "print('report isa:', environment(1, 'CPUExecutionProvider', False)['kernel_isa'])\n"
                            "sys.exit(test_op.run_battery())\n")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert f"kernel isa: {isa}\n" in proc.stdout, proc.stdout[-4000:]
    # validate's report names the kernel the library says it chose, not a guess from the CPU's flags
    assert f"report isa: {isa}\n" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("gemm", ["sparse", "panels", "dense", "packed", "packed_rows"])
def test_several_rows_both_ways(gemm):
    """Several rows run the row-skipping kernels over B as it lies, over B packed once (constant B;
    register tiles over the union of kept rows, or each pair of rows' own kept rows), or onnxruntime's Gemm
    on the sparsified A (chosen per call from the shape and the kept share): each forced in turn
    passes the battery and the non-finite weights in dropped rows (the Gemm's 0 * Inf = NaN sends the
    call back to the row-skipping kernels)."""
    body = ("failed = test_op.run_battery()\n"
            "for dtype in test_op.DTYPES:\n"
            "    for rows in (3, 16, 40):\n"
            "        for partly in (False, True):\n"
            "            for constant in (False, True):\n"
            "                test_op.test_non_finite_weights_in_dropped_rows_are_skipped(dtype, rows, partly, constant)\n"
            "sys.exit(failed)\n")
    proc = _run_capped(os.environ.get("SCAP_ONNX_ISA", "amx"), body, gemm=gemm)  # "amx": no cap
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_packed_weights_run_their_own_kernel():
    """With constant B, 8 rows of float32 A multiply over B packed once when forced (and by default
    on AVX-512, where every row of B is kept): the sums then come in another order than the
    row-skipping kernels' split over K (8 tasks of partial sums), so the last bits differ, while both
    match the reference."""
    if kernel_isa() not in {"avx512", "amx"}:
        pytest.skip(f"the {kernel_isa()} kernels do not choose packed B for 8 rows")
    body = (
        "import hashlib, numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.standard_normal((8, 512)).astype(np.float32)\n"
        "b = rng.standard_normal((512, 256)).astype(np.float32)\n"
        "s = test_op._session(test_op._model(np.float32, threshold=0.0, b=b), threads=2)\n"
        "(y,) = s.run(None, {'a': a})\n"
        "test_op.check_close(y, test_op._reference(a, b, None, 0.0, 0.0), 1e-5)\n"
        "print(hashlib.sha256(y.tobytes()).hexdigest())\n"
    )
    digests = {}
    for gemm in ("sparse", "packed", None):
        proc = _run_capped(os.environ.get("SCAP_ONNX_ISA", "amx"), body, gemm=gemm)
        assert proc.returncode == 0, proc.stderr[-4000:]
        digests[gemm] = proc.stdout.strip().splitlines()[-1]
    assert digests["sparse"] != digests["packed"], "the packed kernel did not run (same sums as the split over K)"
    assert digests[None] == digests["packed"], "8 rows keeping all of K did not choose packed B"


def test_tiles_and_pair_lists_are_timed_then_one_is_kept():
    """64 rows of float32 A that drop half of K each, over constant B: the process times the register
    tiles against the pair lists on its first calls of that kind over that shape of B (two each,
    alternating) and then keeps the faster. Both ways match the reference, they sum in different
    orders (so both ran), and every later call gives the bits of one of them. (The choice is one per
    shape of B for the whole process: no other test uses 509 x 263.)"""
    if kernel_isa() not in {"avx512", "avx2"}:
        pytest.skip(f"the {kernel_isa()} kernels do not multiply several rows over packed B")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((64, 509)).astype(np.float32)
    b = rng.standard_normal((509, 263)).astype(np.float32)
    threshold = 0.6745  # the median of |N(0, 1)|: half of each row drops
    session = _session(_model(np.float32, threshold=threshold, b=b), threads=2)
    ref = _reference(a, b, None, threshold, 0.0)
    outputs = [session.run(None, {"a": a})[0] for _ in range(7)]
    for y in outputs:
        check_close(y, ref, TOL[np.float32], "tiles or pair lists")
    # Calls 1-4: tiles, pairs, tiles, pairs (timed); from call 5 the faster of the two.
    tiles, pairs = outputs[0].tobytes(), outputs[1].tobytes()
    assert tiles != pairs, "the trial calls gave the same bits: only one way ran"
    assert [y.tobytes() for y in outputs[:4]] == [tiles, pairs, tiles, pairs]
    assert outputs[4].tobytes() in {tiles, pairs}
    assert all(y.tobytes() == outputs[4].tobytes() for y in outputs[5:])


def test_kernel_isa_is_reported():
    """ScapOnnxKernelIsa names one of the library's kernel families (uncapped: the best the CPU runs)."""
    assert kernel_isa() in {"amx", "avx512", "avx2", "neon", "portable"}


def test_amx_kernel_runs_where_the_cpu_has_it():
    """On a CPU with AMX-BF16 the default build multiplies tall A on the tile unit: its float32
    sums then differ in the last bits from the AVX-512 kernels' (another order of additions)."""
    skip_unless_cpu_runs("amx", unknown_ok=False)
    body = (
        "import hashlib, numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.standard_normal((64, 512)).astype(np.float32)\n"
        "b = rng.standard_normal((512, 256)).astype(np.float32)\n"
        "(y,) = test_op._cached_session(np.float32, False, 0.5, 0.0, 2).run(None, {'a': a, 'b': b})\n"
        "print(hashlib.sha256(y.tobytes()).hexdigest())\n"
    )
    digests = {}
    for isa in ("amx", "avx512"):
        proc = _run_capped(isa, body)
        assert proc.returncode == 0, proc.stderr[-4000:]
        digests[isa] = proc.stdout.strip().splitlines()[-1]
    assert digests["amx"] != digests["avx512"], "the AMX kernel did not run (same result as AVX-512)"


# ----------------------------------------------------------------------------- errors
def _expect_ort_error(model: onnx.ModelProto, feeds: dict, node_name: str) -> str:
    """Creating the session or running it raises an onnxruntime error that names the node."""
    with pytest.raises(Exception) as info:  # onnxruntime's Fail / InvalidArgument / RuntimeException ...
        _session(model).run(None, feeds)
    assert type(info.value).__module__.startswith("onnxruntime"), repr(info.value)
    message = str(info.value)
    assert node_name in message, message
    return message


@pytest.mark.parametrize(
    "attrs, words",
    [
        ({"threshold": -0.5, "offset": 0.0}, "threshold"),
        ({"threshold": -math.inf}, "threshold"),
        ({"threshold": math.nan, "offset": 0.0}, "threshold"),
        ({"offset": 0.0}, "threshold"),
        ({"threshold": 0.5, "offset": math.nan}, "offset"),
    ],
    ids=["negative", "minus_inf", "nan", "missing", "nan_offset"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_bad_attributes(dtype, attrs, words):
    name = f"bad_attrs_{np.dtype(dtype).name}"
    a, b = np.ones((2, 3), dtype), np.ones((3, 4), dtype)
    message = _expect_ort_error(_model(dtype, attrs=attrs, name=name), {"a": a, "b": b}, name)
    assert words in message


@pytest.mark.parametrize(
    "a_shape, b_shape, bias_shape",
    [
        ((2, 3), (3, 4, 1), None),  # B 3-D
        ((2, 3), (3,), None),  # B 1-D
        ((2, 3), (4, 4), None),  # K mismatch
        ((1, 3), (2, 4), None),  # K mismatch, one row
        ((20, 3), (2, 4), None),  # K mismatch, 20 rows
        ((2, 3), (3, 4), (5,)),  # bias too long
        ((2, 3), (3, 4), (1, 4)),  # bias 2-D
        ((), (3, 4), None),  # A scalar
    ],
    ids=["b3d", "b1d", "k_mismatch", "k_mismatch_1row", "k_mismatch_tall", "bias_len", "bias_2d", "a_scalar"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_bad_shapes(dtype, a_shape, b_shape, bias_shape):
    name = f"bad_shape_{np.dtype(dtype).name}"
    model = _model(dtype, with_bias=bias_shape is not None, name=name)
    feeds = {"a": np.ones(a_shape, dtype), "b": np.ones(b_shape, dtype)}
    if bias_shape is not None:
        feeds["bias"] = np.ones(bias_shape, dtype)
    _expect_ort_error(model, feeds, name)


def test_unsupported_types():
    """Only float32 and float16, the same for A, B and bias."""
    cases = {"int_inputs": (TensorProto.INT32, TensorProto.INT32), "mixed": (TensorProto.FLOAT16, TensorProto.FLOAT)}
    for name, types in cases.items():
        node = helper.make_node(OP_TYPE, ["a", "b"], ["y"], domain=DOMAIN, name=name, threshold=0.5)
        graph = helper.make_graph(
            [node], "g",
            [helper.make_tensor_value_info("a", types[0], None), helper.make_tensor_value_info("b", types[1], None)],
            [helper.make_tensor_value_info("y", types[0], None)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
        model.ir_version = IR_VERSION
        np_types = [helper.tensor_dtype_to_np_dtype(t) for t in types]
        rng = np.random.default_rng(_seed("types", name))
        a = rng.standard_normal((2, 3)).astype(np_types[0])
        b = rng.standard_normal((3, 4)).astype(np_types[1])
        if name == "mixed" and _ort_version() < (1, 18):
            # onnxruntime 1.17 casts the float16 input and runs the float32 kernel: the result must be right.
            (y,) = _session(model).run(None, {"a": a, "b": b})
            ref = _reference(a.astype(np.float32), b, None, 0.5, 0.0).astype(np.float16)
            check_close(y, ref, TOL[np.float16], "mixed types on onnxruntime 1.17")
        else:
            _expect_ort_error(model, {"a": a, "b": b}, name)


def _ort_version() -> tuple[int, int]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2])


def test_session_still_works_after_errors():
    """An error in one run leaves the session usable (the kernel threw no further than its status)."""
    session = _session(_model(np.float32, threshold=0.5, name="reuse"))
    with pytest.raises(Exception, match="reuse"):
        session.run(None, {"a": np.ones((2, 3), np.float32), "b": np.ones((4, 4), np.float32)})
    b, _ = _weights(33, 17, np.float32)
    a = _activations((3, 33), np.float32, 0.5, 0.0, "finite", 1)
    (y,) = session.run(None, {"a": a, "b": b})
    check_close(y, _reference(a, b, None, 0.5, 0.0), 1e-5)


@pytest.mark.parametrize(
    "attrs, threshold, offset",
    [
        ({"threshold": 0.5, "offset": 2}, 0.5, 2.0),  # INT offset (onnx.helper stores a Python int as INT)
        ({"threshold": 1, "offset": 0.25}, 1.0, 0.25),  # INT threshold
        ({"threshold": 1, "offset": -2}, 1.0, -2.0),
        ({"threshold": 0}, 0.0, 0.0),
    ],
    ids=["int_offset", "int_threshold", "both_int", "int_threshold_only"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_int_attributes_are_numbers(dtype, attrs, threshold, offset):
    """INT attributes mean their value (an INT offset of 2 was once read as 0)."""
    name = f"int_attrs_{np.dtype(dtype).name}"
    b, bias = _weights(33, 17, dtype)
    session = _session(_model(dtype, attrs=attrs, name=name, with_bias=True))
    for rows in (1, 5, 40):
        a = _activations((rows, 33), dtype, threshold, offset, "finite", _seed("int-attrs", rows))
        (y,) = session.run(None, {"a": a, "b": b, "bias": bias})
        check_close(y, _reference(a, b, bias, threshold, offset), TOL[dtype], f"{attrs} rows={rows}")


@pytest.mark.parametrize(
    "attrs, words",
    [
        ({"threshold": 0.5, "offset": "2"}, ["'offset'", "FLOAT or INT"]),
        ({"threshold": "0.5"}, ["'threshold'", "FLOAT or INT"]),
        ({"threshold": [0.5, 0.5]}, ["'threshold'", "FLOAT or INT"]),
        ({"threshold": 0.5, "offset": [1, 2]}, ["'offset'", "FLOAT or INT"]),
        ({"threshold": -1}, ["'threshold'", ">= 0"]),
    ],
    ids=["string_offset", "string_threshold", "list_threshold", "list_offset", "negative_int_threshold"],
)
def test_attributes_of_other_types_are_rejected(attrs, words):
    """Attributes that are not single numbers are errors naming the node and the attribute, never
    silently the default."""
    name = "typed_attrs"
    message = _expect_ort_error(_model(np.float32, attrs=attrs, name=name),
                                {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 4), np.float32)}, name)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_depth_of_2_pow_31_is_rejected(dtype):
    """Kept indices are 32-bit: K = 2^31 is an error naming the node (here on empty tensors, which need
    no memory; earlier versions returned an empty Y without a word)."""
    name = f"huge_k_{np.dtype(dtype).name}"
    k = 2**31
    message = _expect_ort_error(_model(dtype, name=name),
                                {"a": np.ones((0, k), dtype), "b": np.ones((k, 0), dtype)}, name)
    assert "2^31" in message
    # K = 2^31 - 1 is allowed.
    (y,) = _session(_model(dtype)).run(None, {"a": np.ones((0, k - 1), dtype), "b": np.ones((k - 1, 0), dtype)})
    assert y.shape == (0, 0)


def _model_with_shapes(dtype, a_shape, n, with_bias=False):
    """One node over A with the declared shape a_shape (None: unknown rank) and an initializer B [K, N]."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    k = 16 if a_shape is None else a_shape[-1]
    b = np.ones((k, n), dtype)
    inputs = [helper.make_tensor_value_info("a", elem, a_shape)]
    initializers = [numpy_helper.from_array(b, "b")]
    if with_bias:
        initializers.append(numpy_helper.from_array(np.ones(n, dtype), "bias"))
    node = make_node("a", "b", "y", threshold=0.5, offset=0.0, bias="bias" if with_bias else None, name="shapes")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", elem, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize(
    "a_shape, n, expected",
    [
        (["batch", "seq", 16], 7, ["batch", "seq", 7]),
        ([3, 16], 5, [3, 5]),
        ([16], 9, [9]),
        (["tokens", 16], 4, ["tokens", 4]),
    ],
    ids=["symbolic_rank3", "fixed", "rank1", "symbolic_rank2"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_output_shape_is_inferred(dtype, a_shape, n, expected):
    """onnxruntime knows Y's shape [..., N] from A's and B's before running (the op declares it)."""
    session = _session(_model_with_shapes(dtype, a_shape, n, with_bias=True))
    (output,) = session.get_outputs()
    assert output.shape == expected
    assert output.type == f"tensor({'float' if dtype == np.float32 else 'float16'})"


def test_output_shape_of_unknown_rank_stays_unknown():
    """A of unknown rank gives no inferred shape (not a wrong one), and the node still runs."""
    session = _session(_model_with_shapes(np.float32, None, 7))
    assert session.get_outputs()[0].shape in (None, [])
    a = np.ones((2, 3, 16), np.float32)
    (y,) = session.run(None, {"a": a})
    assert y.shape == (2, 3, 7)


def test_out_of_memory_in_pool_tasks_is_an_error():
    """An allocation that fails inside a task of onnxruntime's thread pool becomes an error naming the
    node, never a crash (the exception once crossed onnxruntime's C interface). A subprocess caps its
    address space just above what the call needs outside the tasks; the tasks' panels do not fit."""
    body = """
import resource, numpy as np, onnxruntime as ort
import scap_onnx
def vm_bytes():
    for line in open('/proc/self/status'):
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
options = scap_onnx.session_options(intra_op_threads=2)
options.enable_cpu_mem_arena = False
model = test_op._model(np.float32, threshold=0.0, name='oom_node')
session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
rng = np.random.default_rng(0)
for n in (64, 4096):  # warm up: the pool thread's allocator and buffers exist
    session.run(None, {'a': rng.standard_normal((2, 64)).astype(np.float32),
                       'b': rng.standard_normal((64, n)).astype(np.float32)})
n = 2**18
a = rng.standard_normal((2, 64)).astype(np.float32)
b = rng.standard_normal((64, n)).astype(np.float32)
# Outside the tasks: 4 partial sums (2 rows padded to a register tile) and Y; each task's panel:
# 8 rows of n floats, which the 4 * n floats of margin cannot hold.
tile_rows = 8 if test_op.kernel_isa() in ('avx512', 'amx') else 4
limit = vm_bytes() + (4 * tile_rows + 2 + 4) * n * 4
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
try:
    session.run(None, {'a': a, 'b': b})
    print('ran without error')
except Exception as e:
    print('error:', type(e).__module__, str(e).replace(chr(10), ' '))
"""
    # the row-skipping kernels' tasks with their panels (onnxruntime's Gemm would take such a call,
    # and the kernel for few rows that multiplies B in place allocates nothing in its tasks)
    proc = _run_capped(os.environ.get("SCAP_ONNX_ISA", "amx"), body, gemm="panels")  # "amx": no cap
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "error: onnxruntime" in proc.stdout and "oom_node" in proc.stdout and "out of memory" in proc.stdout, \
        proc.stdout
