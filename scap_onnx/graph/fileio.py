"""Atomic file writes: write beside the destination, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ScapError


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in dest's folder; on success it replaces ``dest`` in one rename."""
    dest = Path(dest)
    check_output_file(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_file(dest: str | Path) -> None:
    """ScapError when an output path names a folder: checked up front, before long work."""
    if Path(dest).is_dir():
        raise ScapError(f"output {dest} is a folder: give a file name inside it")


def missing_model_message(path: str | Path) -> str:
    """Why a model path cannot be read as a file (a folder gets a hint to the model inside it)."""
    p = Path(path)
    if p.is_dir():
        inside = sorted(p.glob("*.onnx"))
        hint = f": give the model file, e.g. {inside[0]}" if inside else " with no .onnx file in it"
        return f"model {p} is a folder{hint}"
    return f"model {p} does not exist"


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (False when either does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
