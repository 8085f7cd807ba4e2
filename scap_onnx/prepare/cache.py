"""The preparation cache: its folder, ``.complete`` markers, a portable file lock and
:func:`cached_build`, the one place that builds an artifact safely.

:func:`cached_build` takes an artifact's final folder, the files it must hold and a build
function.  It returns at once when the folder is complete (its marker has the current
:data:`PREP_FORMAT` and every required file is there and non-empty).  Otherwise it takes the
artifact's inter-process lock, checks again (another process may have built it meanwhile),
runs the build in a fresh temporary sibling folder, checks the result, writes the marker last
and renames the folder into place, so an interrupted run never leaves something that looks
complete.

The lock is ``fcntl.flock`` on POSIX and ``msvcrt.locking`` on Windows, both imported inside
the functions that use them.  This module uses the standard library only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

__all__ = [
    "MARKER", "PREP_FORMAT", "cache_dir", "cached_build", "file_lock", "folder_size", "is_complete",
    "lock_path", "log", "package_dir", "read_marker", "versions",
]

# Bump to invalidate caches built by an older, incompatible version of this package.
PREP_FORMAT = 1
MARKER = ".complete"

#: ``build(tmp)`` gets a fresh, empty temporary folder and returns ``(folder, info)``: the folder
#: holding the finished artifact (``tmp`` itself or a folder inside it) and the marker's info.
Build = Callable[[Path], tuple[Path, dict[str, Any]]]


def cache_dir() -> Path:
    """Root of the preparation cache: ``$SCAP_ONNX_CACHE`` or ``~/.cache/scap-onnx``."""
    env = os.environ.get("SCAP_ONNX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "scap-onnx"


_T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since this module was imported."""
    print(f"[scap-onnx prepare {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def versions(*dists: str) -> dict[str, str]:
    """Installed versions of the distributions ``dists`` (``"not installed"`` when missing)."""
    out: dict[str, str] = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {module!r} is not installed; install the 'prepare' extra "
            f"(see pyproject.toml / tools/install.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def folder_size(folder: Path) -> int:
    """Bytes in the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------- markers


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` if it has one of the current format, else None."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != PREP_FORMAT:
        return None
    return data


def is_complete(folder: Path, required: Sequence[str]) -> bool:
    """Whether ``folder`` has a current marker and every ``required`` file, non-empty."""
    if read_marker(folder) is None:
        return False
    return all((folder / r).is_file() and (folder / r).stat().st_size > 0 for r in required)


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    data = {"format": PREP_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


# ------------------------------------------------------------------------------------ lock


def _try_lock(fh: IO[bytes]) -> bool:
    if os.name == "nt":
        import msvcrt

        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_lock(fh: IO[bytes]) -> None:
    if os.name == "nt":
        while not _try_lock(fh):  # msvcrt's blocking mode gives up after 10 s
            time.sleep(0.5)
        return
    import fcntl

    fcntl.flock(fh, fcntl.LOCK_EX)


def _unlock(fh: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    import fcntl

    fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(name: str) -> Path:
    """The lock file of the artifact ``name`` (in the cache root)."""
    return cache_dir() / f".{name}.lock"


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Exclusive inter-process lock on the file ``path`` (created if missing).

    Yields True once the lock is held; while another process (or another open of the same
    file) holds it, waits, or with ``wait=False`` yields False at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:  # never truncated: on Windows the lock is on byte 0
        held = _try_lock(fh)
        if not held and wait:
            log(f"waiting for another process holding {path.name} ...")
            _wait_lock(fh)
            held = True
        try:
            yield held
        finally:
            if held:
                _unlock(fh)


# ------------------------------------------------------------------------- build and install


def _remove_stale(final: Path) -> None:
    """Remove build leftovers of a killed run (call with the artifact's lock held)."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _tidy(final: Path) -> None:
    """Remove leftovers of a killed build if no other process is building ``final`` now."""
    if not any(final.parent.glob(f".{final.name}.tmp-*")) and not any(
        final.parent.glob(f".{final.name}.old-*")
    ):
        return
    try:
        with file_lock(lock_path(final.name), wait=False) as held:
            if held:
                _remove_stale(final)
    except OSError:  # not writable
        pass


@contextlib.contextmanager
def _build_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``final``, removed afterwards whatever happens."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should be readable
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(src: Path, final: Path) -> None:
    """Put the finished folder ``src`` at ``final`` by renames (replacing an old one): readers see
    the old folder or the new one, never a half-written one."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cached_build(
    final: Path,
    required: Sequence[str],
    build: Build,
    *,
    force: bool = False,
    accept: Callable[[dict[str, Any]], bool] | None = None,
    label: str | None = None,
) -> Path:
    """The folder ``final``, built by ``build`` unless it is complete already.

    Complete means: a marker of the current format, every file in ``required`` present and
    non-empty, and ``accept(marker)`` true when ``accept`` is given (e.g. a version check).
    ``build(tmp)`` runs under the artifact's lock (:func:`lock_path` of ``final.name``) in a
    fresh temporary sibling of ``final`` and returns ``(folder, info)``: ``folder`` (``tmp`` or
    inside it) must then hold the required files; it gets the marker (``info`` plus ``format``,
    ``created`` and ``build_seconds``) and is renamed to ``final``.  ``force`` rebuilds even a
    complete folder.  With ``label``, a line with the result's size is logged after a build.
    """
    final = Path(final)

    def complete() -> bool:
        if not is_complete(final, required):
            return False
        return accept is None or accept(read_marker(final) or {})

    if not force and complete():
        _tidy(final)
        return final
    with file_lock(lock_path(final.name)):
        if not force and complete():
            return final
        t0 = time.monotonic()
        with _build_dir(final) as tmp:
            out, info = build(tmp)
            missing = [r for r in required if not (out / r).is_file() or (out / r).stat().st_size == 0]
            if missing:
                raise RuntimeError(f"building {final.name} left no (or empty) {', '.join(missing)}")
            info = dict(info)
            info.setdefault("build_seconds", round(time.monotonic() - t0, 1))
            _write_marker(out, info)
            replace_folder(out, final)
        if label:
            log(f"{label} ready: {final} ({folder_size(final) / 1e6:.0f} MB, "
                f"{time.monotonic() - t0:.0f}s)")
    return final
