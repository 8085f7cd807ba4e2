"""scap-onnx: post-training activation sparsity (SCAP) for ONNX models."""

__version__ = "0.1.0"

from .op.contract import DOMAIN, OP_TYPE  # noqa: E402
from .op.library import get_cuda_library_path, get_library_path, kernel_isa, session_options  # noqa: E402
from .op.reference import ScapSparseMatMulOpRun, scap_sparse_matmul  # noqa: E402

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "ScapSparseMatMulOpRun",
    "get_cuda_library_path",
    "get_library_path",
    "kernel_isa",
    "scap_sparse_matmul",
    "session_options",
    "__version__",
]
