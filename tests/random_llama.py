"""Tiny random-weight Llama models from tools/make_random_llama.py (built once, cached), for tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_random_llama.py"
#: Small enough to export in seconds; the same code path as the 2048/5632 model.
TINY = dict(layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=256)


def tool():
    spec = importlib.util.spec_from_file_location("make_random_llama", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_llama(seed: int = 0) -> Path:
    """Folder with model.onnx, hf/, calib.npz, eval.npz (see tools/make_random_llama.py)."""
    return tool().make_random_llama(**TINY, seed=seed)
