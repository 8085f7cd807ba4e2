"""The CUDA library where no GPU is: what can be checked on a machine with nvcc and no GPU.

- The index arithmetic of the CUDA kernels (custom_ops/cuda/plan.h, __host__ __device__) runs on
  the host: tests/cuda_index_test.cc, compiled here with the host compiler, walks the kernels'
  decompositions over odd shapes against a float64 product.
- The kernels themselves run on the CPU under a small CUDA emulator (tests/cuda_emu: block threads
  as user contexts switched at barriers, WMMA fragments as plain matrices): tests/cuda_emu_test.cc
  checks Enqueue against a float64 reference over the paths a GPU run takes.
- libscap_onnx_ops_cuda (built by `pip install .` when nvcc is found) carries machine code for
  sm_80, sm_86, sm_89 and sm_90 and PTX for later GPUs: read from the .nv_fatbin section of the ELF
  file (no cuobjdump needed).
- The same library registers in a CPU-only onnxruntime and runs the CPU kernel (it holds both
  providers' kernels in one domain); the CPU library links no CUDA.
The kernels themselves run on a GPU only: tools/gpu_check.sh.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import scap_onnx
from scap_onnx.op.contract import make_node, opset_import
from scap_onnx.op.reference import scap_sparse_matmul

REPO = Path(__file__).resolve().parents[1]
FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_ELF = 1, 2
SASS_ARCHS = {80, 86, 89, 90}
PTX_ARCHS = {90}


def elf_sections(path: Path) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, kind, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, kind, offset, size))
    names_offset = headers[shstrndx][2]
    sections = {}
    for name, kind, offset, size in headers:
        label = data[names_offset + name : data.index(b"\0", names_offset + name)].decode()
        sections[label] = b"" if kind == 8 else data[offset : offset + size]  # SHT_NOBITS holds nothing
    return sections


def fatbin_entries(blob: bytes) -> list[tuple[int, int]]:
    """(kind, sm) of every entry of the fat binaries in a .nv_fatbin section: kind 1 PTX, 2 ELF."""
    entries, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            break
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _v, entry_header, padded_size = struct.unpack_from("<HHII", blob, entry)
            sm = struct.unpack_from("<I", blob, entry + 28)[0]
            entries.append((kind, sm))
            entry += entry_header + padded_size
        pos = (end + 7) // 8 * 8  # fat binaries follow one another 8-byte aligned
    return entries


def nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))


def cuda_library() -> Path:
    """The CUDA library, as scap_onnx finds it ($SCAP_ONNX_CUDA_LIBRARY, else beside the CPU library)."""
    try:
        return Path(scap_onnx.get_cuda_library_path())
    except FileNotFoundError as e:
        if nvcc_present():
            pytest.fail(f"nvcc is here but {e}: the package build must build it")
        pytest.skip(f"no nvcc: {e}")


def build_and_run(tmp_path, source: str, flags: list[str]) -> None:
    """Compile tests/<source> with the host compiler and require it to report no failures."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    program = tmp_path / Path(source).stem
    build = subprocess.run(
        [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *flags,
         f"-I{REPO / 'custom_ops' / 'cuda'}", str(REPO / "tests" / source), "-o", str(program)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "ok: 0 failures" in run.stdout


def test_index_arithmetic_on_host(tmp_path):
    build_and_run(tmp_path, "cuda_index_test.cc", [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator switches threads with ucontext")
def test_kernels_under_cpu_emulation(tmp_path):
    # #pragma unroll is nvcc's; the shared-memory stores through vector types are nvcc's idiom.
    build_and_run(tmp_path, "cuda_emu_test.cc",
                  [f"-I{REPO / 'tests' / 'cuda_emu'}", "-Wno-unknown-pragmas", "-Wno-strict-aliasing"])


def test_fatbin_parser_reads_a_fresh_object(tmp_path):
    """The parser against nvcc itself: an object built for sm_86 alone holds sm_86 machine code only."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    subprocess.run([nvcc, "-c", "-gencode", "arch=compute_86,code=sm_86", str(source), "-o", str(tmp_path / "k.o")],
                   check=True, capture_output=True, timeout=300)
    assert fatbin_entries(elf_sections(tmp_path / "k.o")[".nv_fatbin"]) == [(FATBIN_ELF, 86)]


def test_cuda_library_carries_device_code_for_each_architecture():
    sections = elf_sections(cuda_library())
    assert ".nv_fatbin" in sections, "no device code in the CUDA library"
    entries = fatbin_entries(sections[".nv_fatbin"])
    sass = {sm for kind, sm in entries if kind == FATBIN_ELF}
    ptx = {sm for kind, sm in entries if kind == FATBIN_PTX}
    assert SASS_ARCHS <= sass, f"machine code for {sorted(sass)}, wanted {sorted(SASS_ARCHS)}"
    assert PTX_ARCHS <= ptx, f"PTX for {sorted(ptx)}, wanted {sorted(PTX_ARCHS)}"


def test_cpu_library_links_no_cuda():
    sections = elf_sections(Path(scap_onnx.get_library_path()).with_name("libscap_onnx_ops.so"))
    assert ".nv_fatbin" not in sections
    assert b"libcudart" not in sections.get(".dynstr", b"")


def test_cuda_library_runs_the_cpu_kernel_without_a_gpu():
    """Registered in a CPU-only onnxruntime, the CUDA library runs the CPU kernel of the same domain."""
    path = cuda_library()
    rng = np.random.default_rng(15)
    k, n = 37, 19
    b = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [make_node("A", "B", "Y", bias="bias", threshold=0.5, offset=0.1)],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
        [helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.ravel()),
         helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(path))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for m in (1, 5):
        a = rng.standard_normal((m, k)).astype(np.float32)
        (y,) = session.run(None, {"A": a})
        expected = scap_sparse_matmul(a, b, bias, threshold=0.5, offset=0.1)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
