"""Runs validate's latency timing in a process of its own (``main(IN, OUT)`` in a new Python).

onnxruntime makes its process-wide (shared) thread pool once, and then refuses sessions that want a
pool of their own; timing dense and sparse on that shared pool therefore needs a fresh process, so
that the caller's later sessions are not affected. A plain subprocess rather than multiprocessing:
spawning would re-import the caller's main script, which breaks scripts without a ``__main__`` guard.

IN holds the pickled arguments of ``validate._time_plan``; OUT receives ``{"result": dict}`` or
``{"error": one-line message}``.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import ScapError


_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from scap_onnx.timing_process import main; main(sys.argv[2], sys.argv[3])")


def run_in_fresh_process(args: tuple) -> dict:
    """validate._time_plan(*args) in a new Python process; its ScapError is raised here."""
    with tempfile.TemporaryDirectory(prefix="scap-timing-") as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps(args))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the caller's dependencies
        # This very scap_onnx first, ahead of any other copy in the current folder.
        root = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.run([sys.executable, "-c", _CHILD, root, str(src), str(dst)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            out = pickle.loads(dst.read_bytes())
        except Exception:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ScapError(f"the latency process failed (exit code {proc.returncode}): {last}") from None
    if "error" in out:
        raise ScapError(out["error"])
    return out["result"]


def main(src: str, dst: str) -> None:
    from .validate import _time_plan

    args = pickle.loads(Path(src).read_bytes())
    try:
        out = {"result": _time_plan(*args)}
    except ScapError as e:
        out = {"error": str(e)}
    Path(dst).write_bytes(pickle.dumps(out))

