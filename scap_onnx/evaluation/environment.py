"""Where the numbers come from: CPU model and ISA flags, the kernel the op library chose, threads,
onnxruntime, provider, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import __version__
from ..op.library import get_library_path, kernel_isa

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and val.strip():
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    return model, flags


def environment(threads: int, provider: str, spinning: bool) -> dict:
    """Where the numbers come from: CPU model and ISA, threads, onnxruntime, provider, load."""
    model, flags = cpu_model_and_flags()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem = psutil.virtual_memory().total
    except Exception:
        physical, mem = None, None
    try:
        lib = get_library_path()
    except FileNotFoundError:
        lib = None
    return {
        "cpu_model": model,
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "kernel_isa": kernel_isa(),  # what the library chose (None without it)
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "memory_bytes": mem,
        "threads": threads,
        "spinning": spinning,
        "provider": provider,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "scap_onnx": __version__,
        "library": lib,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


