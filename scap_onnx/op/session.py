"""The one factory of onnxruntime sessions: calibration, measurement, validation and timing all
open their sessions here.

A model with ScapSparseMatMul nodes runs with the compiled library when it is available (or when
asked for); otherwise its nodes are lowered to standard ops (scap_onnx.op.lowering), so that
measurements never depend on a build. onnxruntime's failures become one-line ScapErrors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort

from ..errors import ScapError
from .contract import scap_nodes
from .library import get_library_path, register_library
from .lowering import lower_model

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def library_available() -> bool:
    try:
        get_library_path()
        return True
    except FileNotFoundError:
        return False


def default_threads() -> int:
    """Physical cores (onnxruntime's own default for the intra-op pool)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to tell
        n = None
    return int(n or os.cpu_count() or 1)


def provider_name(provider: str) -> str:
    """'cpu' / 'cuda' or a full onnxruntime provider name; ScapError when onnxruntime lacks it."""
    name = _PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        raise ScapError(f"execution provider {provider!r} is not available in this onnxruntime "
                        f"(available: {', '.join(available)})")
    return name


def providers_for(provider: str | list | None) -> list:
    """The provider list of a session: the provider, with the CPU as the fallback for other ones
    (a list is taken as it is)."""
    if isinstance(provider, list):
        return provider
    if provider is None or provider == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    return [provider, "CPUExecutionProvider"]


def base_options(threads: int | None = None, *, spinning: bool | None = None,
                 shared_pool: bool = False) -> ort.SessionOptions:
    """Quiet options for :func:`open_session` (which registers the library where the model needs it).
    ``threads``: intra-op threads; ``spinning``: whether the pool's threads spin (None: onnxruntime's
    default); ``shared_pool``: run on the process-wide pool, whose size and spinning onnxruntime
    fixed when it made it."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if shared_pool:
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
    if spinning is not None and not shared_pool:
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def _register(options: ort.SessionOptions) -> None:
    try:
        register_library(options)
    except FileNotFoundError as e:
        raise ScapError(str(e)) from None


def open_session(model: onnx.ModelProto | str | Path, *, data_dir: str | Path | None = None,
                 options: ort.SessionOptions | None = None, provider: str | list | None = None,
                 use_library: bool | None = None,
                 weight_is_finite: Callable[[str], bool] | None = None) -> ort.InferenceSession:
    """A session over a model file or an in-memory weight-free proto whose external data lies in
    ``data_dir``. ``options`` (from :func:`base_options`) are consumed: the library and the data
    folder are set on them. A model with ScapSparseMatMul nodes gets the library registered, or,
    with ``use_library=False`` (or no library built, when None), a proto is lowered in place
    (``weight_is_finite`` as in scap_onnx.op.lowering.lower_model); a file is then read as a proto.
    ``provider``: a provider name, or a list as onnxruntime takes it."""
    options = options or base_options()
    if use_library is None:
        use_library = library_available()
    what = "the model"
    if not isinstance(model, onnx.ModelProto):
        what = Path(model).name
        if not use_library:  # read the graph: its ScapSparseMatMul nodes, if any, are lowered below
            model, data_dir = onnx.load(str(model), load_external_data=False), Path(model).parent
    if isinstance(model, onnx.ModelProto):
        if scap_nodes(model):
            if use_library:
                _register(options)
            else:
                lower_model(model, weight_is_finite)
        if data_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
        source = model.SerializeToString()
    else:
        _register(options)  # registered for a dense model too: harmless, and a file is not read twice
        source = str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers_for(provider))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ScapError(f"onnxruntime cannot load {what}: {_first_line(e)}") from None


def run_session(session: ort.InferenceSession, outputs, feeds):
    """session.run on the feeds the session takes, with onnxruntime's failures on bad feeds turned
    into a one-line ScapError."""
    names = {i.name for i in session.get_inputs()}
    try:
        return session.run(outputs, {k: v for k, v in feeds.items() if k in names})
    except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        raise ScapError(f"onnxruntime failed on the data: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
