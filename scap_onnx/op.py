"""The ScapSparseMatMul operator contract, in one place on the Python side.

See shared/DESIGN.md ("Operator contract") and custom_ops/scap_sparse_matmul.h for the C++ twin.
"""

from __future__ import annotations

import onnx
from onnx import helper

DOMAIN = "com.scap"
OP_TYPE = "ScapSparseMatMul"
OPSET_VERSION = 1


def opset_import() -> onnx.OperatorSetIdProto:
    """The opset import a model needs before it may hold ScapSparseMatMul nodes."""
    return helper.make_opsetid(DOMAIN, OPSET_VERSION)


def make_node(
    a: str,
    b: str,
    output: str,
    *,
    threshold: float,
    offset: float = 0.0,
    bias: str | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """A ScapSparseMatMul node: Y = drop(A - offset) @ B (+ bias)."""
    inputs = [a, b] + ([bias] if bias else [])
    return helper.make_node(
        OP_TYPE,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        threshold=float(threshold),
        offset=float(offset),
    )
