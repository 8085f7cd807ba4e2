"""Runs one function in a fresh Python process: ``run_in_fresh_process("module:function", arg)``.

onnxruntime makes its process-wide (shared) thread pool once, and then refuses sessions that want a
pool of their own; timing dense and sparse on that shared pool therefore needs a fresh process, so
that the caller's later sessions are not affected. A plain subprocess rather than multiprocessing:
spawning would re-import the caller's main script, which breaks scripts without a ``__main__`` guard.

The argument goes to the child pickled; the child sends back ``{"result": ...}`` or, for a
ScapError, ``{"error": one-line message}``, raised again here.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ScapError

_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from scap_onnx.evaluation.fresh_process import main; main(sys.argv[2], sys.argv[3], sys.argv[4])")


def run_in_fresh_process(function: str, arg, what: str = "child"):
    """``function(arg)`` (``function`` as "package.module:name") in a new Python process; ``what``
    names the work in the error when the process fails."""
    with tempfile.TemporaryDirectory(prefix="scap-onnx-process-") as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps(arg))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the caller's dependencies
        # This very scap_onnx first, ahead of any other copy in the current folder.
        root = str(Path(__file__).resolve().parents[2])
        proc = subprocess.run([sys.executable, "-c", _CHILD, root, function, str(src), str(dst)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            out = pickle.loads(dst.read_bytes())
        except Exception:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ScapError(f"the {what} process failed (exit code {proc.returncode}): {last}") from None
    if "error" in out:
        raise ScapError(out["error"])
    return out["result"]


def main(function: str, src: str, dst: str) -> None:
    module, _, name = function.partition(":")
    fn = getattr(importlib.import_module(module), name)
    arg = pickle.loads(Path(src).read_bytes())
    try:
        out = {"result": fn(arg)}
    except ScapError as e:
        out = {"error": str(e)}
    Path(dst).write_bytes(pickle.dumps(out))
