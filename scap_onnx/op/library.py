"""Find the compiled custom-op library and register it with onnxruntime."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path

import onnxruntime as ort

_LIBRARY_NAMES = {"linux": "libscap_onnx_ops.so", "darwin": "libscap_onnx_ops.dylib", "win32": "scap_onnx_ops.dll"}
LIBRARY_ENV = "SCAP_ONNX_LIBRARY"


def _library_name() -> str:
    return _LIBRARY_NAMES.get(sys.platform, _LIBRARY_NAMES["linux"])


def _installed_library() -> Path | None:
    """The library of the installed scap-onnx distribution, which may lie elsewhere than this module
    (e.g. when the package is imported from a source checkout after `pip install .`)."""
    try:
        located = importlib.metadata.distribution("scap-onnx").locate_file(f"scap_onnx/{_library_name()}")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(located))


def get_library_path() -> str:
    """Path of the ScapSparseMatMul op library: $SCAP_ONNX_LIBRARY, else the one beside this module,
    else the one of the installed distribution.

    Raises FileNotFoundError with a hint when the library was not built.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        candidates = [Path(override)]
    else:
        candidates = [Path(__file__).parent / _library_name()]
        installed = _installed_library()
        if installed is not None:
            candidates.append(installed)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"ScapSparseMatMul library not found at {candidates[0]}; install the package with `pip install .` "
        f"(which builds it) or point {LIBRARY_ENV} at a built {_library_name()}"
    )


CUDA_LIBRARY_ENV = "SCAP_ONNX_CUDA_LIBRARY"
_CUDA_LIBRARY_NAMES = {"linux": "libscap_onnx_ops_cuda.so", "win32": "scap_onnx_ops_cuda.dll"}


def get_cuda_library_path() -> str:
    """Path of the library with the CPU and the CUDA kernels (register it instead of the CPU one
    with onnxruntime-gpu): $SCAP_ONNX_CUDA_LIBRARY, else the one beside the CPU library.

    Raises FileNotFoundError when it was not built (no nvcc at build time).
    """
    override = os.environ.get(CUDA_LIBRARY_ENV)
    name = _CUDA_LIBRARY_NAMES.get(sys.platform, _CUDA_LIBRARY_NAMES["linux"])
    path = Path(override) if override else Path(get_library_path()).with_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"the CUDA op library {path} was not built (pip install . builds it where nvcc "
                                f"is found), or point {CUDA_LIBRARY_ENV} at it")
    return str(path)


def register_library(options: ort.SessionOptions) -> ort.SessionOptions:
    """Register the op library with ``options`` (FileNotFoundError when it was not built)."""
    options.register_custom_ops_library(get_library_path())
    return options


def session_options(
    options: ort.SessionOptions | None = None, *, intra_op_threads: int | None = None
) -> ort.SessionOptions:
    """onnxruntime.SessionOptions with the op library registered (a new object unless one is given)."""
    options = options or ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return register_library(options)


def kernel_isa() -> str | None:
    """The kernel family the library runs in this process ("amx", "avx512", "avx2", "neon" or
    "portable"), as the library itself chose it (SCAP_ONNX_ISA caps it); None without a library."""
    try:
        lib = ctypes.CDLL(get_library_path())
    except (FileNotFoundError, OSError):
        return None
    try:
        fn = lib.ScapOnnxKernelIsa
    except AttributeError:  # a library older than the function
        return None
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn().decode()
