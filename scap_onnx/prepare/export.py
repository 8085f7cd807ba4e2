"""Export of transformers checkpoints to ONNX with optimum-onnx, ONNX post-processing (IR
version for onnxruntime, readable MatMul weight names) and checks of the export against torch.

The heavy libraries (torch, transformers, optimum, onnx, onnxruntime) are imported inside the
functions only.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from .cache import log

__all__ = [
    "check_close", "ensure_tokenizer_files", "export_onnx", "max_ir_version_ort", "ort_session",
    "postprocess_onnx", "transformers_offline",
]


@contextlib.contextmanager
def transformers_offline() -> Iterator[None]:
    """Keep transformers and the hub client offline (for the rest of the process: the
    environment variables are set, not restored) and transformers' logging at errors only
    (restored on exit)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


def export_onnx(src: Path, out: Path, task: str, label: str) -> None:
    """Export the transformers checkpoint in ``src`` to ``out/model.onnx`` (float32, CPU)."""
    from optimum.exporters.onnx import main_export

    log(f"exporting {label} with optimum-onnx (task {task}, float32) ...")
    t = time.monotonic()
    main_export(
        model_name_or_path=str(src),
        output=out,
        task=task,
        framework="pt",
        device="cpu",
        dtype="fp32",
        library_name="transformers",
        local_files_only=True,
        do_validation=False,  # the callers check the result against torch, once
    )
    if not (out / "model.onnx").is_file():
        raise RuntimeError(f"optimum export wrote no model.onnx in {out}: {os.listdir(out)}")
    log(f"export done in {time.monotonic() - t:.0f}s")


def ensure_tokenizer_files(out: Path, tokenizer) -> None:
    """Save ``tokenizer`` beside the exported model unless a ``tokenizer.json`` is there."""
    if not (out / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json beside the exported model in {out}")


# --------------------------------------------------------------------------- post-processing


def max_ir_version_ort() -> int:
    """Largest ONNX IR version the installed onnxruntime loads (probed on a tiny model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    for ir in range(onnx.IR_VERSION, 6, -1):
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - any load failure means "too new"
            continue
    return 7


def _external_files(model) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.add(ExternalDataInfo(init).location)
    return files


def postprocess_onnx(path: Path, rename_matmul_weights: bool) -> dict[str, Any]:
    """Fix the IR version for onnxruntime and give MatMul weight initializers readable names.

    The graph proto is loaded without its external data (weights stay where they are, the
    external-data references are rewritten unchanged), so nothing is read twice.  Returns
    marker info: exported and final IR version, renamed weights, external data files.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    info: dict[str, Any] = {"ir_version_exported": int(model.ir_version)}
    changed = False

    max_ir = max_ir_version_ort()
    if model.ir_version > max_ir:
        log(f"lowering IR version {model.ir_version} -> {max_ir} for onnxruntime")
        model.ir_version = max_ir
        changed = True
    info["ir_version"] = int(model.ir_version)

    renamed = 0
    if rename_matmul_weights:
        renamed = _rename_matmul_weights(model)
        changed = changed or renamed > 0
    info["renamed_matmul_weights"] = renamed

    if changed:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))  # external data references are kept as they are
        os.replace(tmp, path)
    info["external_data"] = sorted(_external_files(model))
    return info


def _rename_matmul_weights(model) -> int:
    """Name anonymous MatMul weight initializers (``onnx::MatMul_123``) after their node.

    The torchscript exporter turns a bias-free ``nn.Linear`` into a MatMul whose B is the
    transposed weight under an anonymous name.  ``/model/layers.3/mlp/down_proj/MatMul`` gets
    B renamed to ``model.layers.3.mlp.down_proj.weight_t`` (shape [K, N]).  Only anonymous
    initializers used by exactly one node are renamed; data (and external data) is untouched.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    taken = set(inits) | {v.name for v in g.input} | {o for n in g.node for o in n.output}
    renamed = 0
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or not n.name.endswith("/MatMul"):
            continue
        b = n.input[1]
        if b not in inits or uses.get(b) != 1 or not b.startswith("onnx::"):
            continue
        stem = n.name[: -len("/MatMul")].strip("/").replace("/", ".")
        new = f"{stem}.weight_t"
        if not stem or new in taken:
            continue
        inits[b].name = new
        n.input[1] = new
        taken.add(new)
        renamed += 1
    return renamed



# ---------------------------------------------------------------------------------- checks


def ort_session(path: Path):
    """A quiet CPU onnxruntime session for ``path``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_close(name: str, got, want, rtol: float = 1e-3) -> dict[str, Any]:
    """Compare onnxruntime's ``got`` with torch's ``want``; raise RuntimeError if they differ,
    else return marker info (max abs diff, scale, rtol, ok)."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise RuntimeError(f"{name}: shape {got.shape} != torch {want.shape}")
    if not np.isfinite(got).all():
        raise RuntimeError(f"{name}: onnxruntime output has non-finite values")
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    # rtol relative to each value, plus the same rtol times the tensor's scale as atol,
    # so values near zero do not fail on float32 rounding.
    ok = bool(np.allclose(got, want, rtol=rtol, atol=rtol * scale))
    res = {"max_abs_diff": diff, "max_abs_ref": scale, "rtol": rtol, "ok": ok}
    if not ok:
        raise RuntimeError(
            f"{name}: onnxruntime and torch differ (max abs diff {diff:.3g}, scale {scale:.3g}, "
            f"rtol {rtol})"
        )
    return res
