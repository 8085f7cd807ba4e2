"""Find the compiled custom-op library and register it with onnxruntime."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnxruntime as ort

_LIBRARY_NAMES = {"linux": "libscap_onnx_ops.so", "darwin": "libscap_onnx_ops.dylib", "win32": "scap_onnx_ops.dll"}
LIBRARY_ENV = "SCAP_ONNX_LIBRARY"


def _library_name() -> str:
    return _LIBRARY_NAMES.get(sys.platform, _LIBRARY_NAMES["linux"])


def get_library_path() -> str:
    """Path of the ScapSparseMatMul op library: $SCAP_ONNX_LIBRARY, else the one installed in the package.

    Raises FileNotFoundError with a hint when the library was not built.
    """
    override = os.environ.get(LIBRARY_ENV)
    candidates = [Path(override)] if override else [Path(__file__).parent / _library_name()]
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"ScapSparseMatMul library not found at {candidates[0]}; install the package with `pip install .` "
        f"(which builds it) or point {LIBRARY_ENV} at a built {_library_name()}"
    )


def session_options(
    options: ort.SessionOptions | None = None, *, intra_op_threads: int | None = None
) -> ort.SessionOptions:
    """onnxruntime.SessionOptions with the op library registered (a new object unless one is given)."""
    options = options or ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.register_custom_ops_library(get_library_path())
    return options
