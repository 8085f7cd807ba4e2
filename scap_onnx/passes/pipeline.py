"""The rewrite pipeline, written once: load the model lazily, replace the planned targets, fuse the
nodes that share one pass, save atomically (external data as the input had it), check.

The passes run in one onnx_ir PassManager. Whether to write external data is decided on the loaded
model, before the passes: fused weights are computed tensors, not external ones, so asking
afterwards would inline a model that had its weights outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import onnx_ir as ir

from ..errors import ScapError
from ..graph.fileio import same_file
from ..graph.model_io import check_model, external_files, load_model, save_model, wants_external_data
from ..op.contract import is_scap_node
from ..op.nbits import DEFAULT_NBITS_SCALES
from .fuse import FusePass
from .sparsify import ScapRewritePass


@dataclass
class Rewritten:
    output: Path
    external_data: Path | None
    rewritten: list[str]  # target names, in plan order
    nodes: int  # ScapSparseMatMul nodes written: fewer than targets where some were fused


def rewrite_file(model: str | Path, output: str | Path, plan: Mapping[str, object], *, fuse: bool = True,
                 check: bool = True, nbits_scales: str = DEFAULT_NBITS_SCALES) -> Rewritten:
    """Rewrite the model file ``model`` by ``plan`` (target name -> threshold, offset, token scaling)
    into ``output``; the input model and its data files are never written. ``nbits_scales``: the
    type asked for ScapSparseMatMulNBits' scales (scap_onnx.op.nbits.block_scales_for_layout)."""
    model, output = Path(model), Path(output)
    if same_file(model, output):
        raise ScapError(f"output {output} would overwrite the input model")
    ir_model = load_model(model)
    input_ops = {n.op_type for n in ir_model.graph.all_nodes()}
    external, sources = wants_external_data(ir_model), external_files(ir_model)
    rewrite = ScapRewritePass(plan, nbits_scales)
    _run(ir.passes.PassManager([rewrite, FusePass()] if fuse else [rewrite]), ir_model)
    names = rewrite.rewritten
    nodes = sum(1 for n in ir_model.graph if is_scap_node(n))
    data = save_model(ir_model, output, external=external, inputs_to_keep=[model] + sources)
    del ir_model
    if check:
        check_model(output, input_ops)
    return Rewritten(output, data, names, nodes)


def _run(passes: ir.passes.PassManager, model: ir.Model) -> None:
    """Run the passes; a ScapError inside one comes out as itself (the PassManager wraps every
    exception of a step in a PassError)."""
    try:
        passes(model)
    except ir.passes.PassError as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ScapError):
            raise cause from None
        raise
