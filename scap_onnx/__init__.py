"""scap-onnx: post-training activation sparsity (SCAP) for ONNX models."""

from .library import get_library_path, session_options
from .op import DOMAIN, OP_TYPE
from .reference import ScapSparseMatMulOpRun, scap_sparse_matmul

__version__ = "0.1.0"

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "ScapSparseMatMulOpRun",
    "get_library_path",
    "scap_sparse_matmul",
    "session_options",
    "__version__",
]
