"""Text as token windows: the tokenizer beside the model, and windows of ``seq_len`` tokens.

Text (.txt, or .jsonl with a "text" field per line) is read as a stream, tokenised in chunks and
cut into windows of ``seq_len`` tokens, by default taken at evenly spaced places across the whole
file (``spread_windows``: a sample of all of the text, read without reading the rest), or from its
start (``token_windows``), the tokenizer's own special tokens (e.g. [CLS]/[SEP]) added around
each window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ScapError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
CHUNK_CHARS = 64 * 1024


def find_tokenizer(model_path: str | Path, tokenizer: str | Path | None = None) -> Path:
    """tokenizer.json: ``tokenizer`` (a file or a folder holding one) or the one beside the model."""
    if tokenizer is not None:
        p = Path(tokenizer)
        cand = p / "tokenizer.json" if p.is_dir() else p
        if not cand.is_file():
            raise ScapError(f"no tokenizer: {cand} does not exist")
        return cand
    cand = Path(model_path).resolve().parent / "tokenizer.json"
    if not cand.is_file():
        raise ScapError(
            f"no tokenizer: text data needs the model's tokenizer.json (not found beside {model_path}); "
            "pass --tokenizer DIR or give --data as an .npz of feeds"
        )
    return cand


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ScapError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _special_wrap(tok) -> tuple[list[int], list[int]]:
    """Ids the tokenizer's post-processor puts before and after a single sequence."""
    with_sp = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    n = len(without)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i : i + n] == without:
            return with_sp[:i], with_sp[i + n :]
    return [], []


def _jsonl_text(line: str, where: str) -> str | None:
    """The "text" of one .jsonl line, as a paragraph (None for a blank line); `where` names the line."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        raise ScapError(f"{where}: not a JSON object") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise ScapError(f'{where}: a .jsonl record needs a "text" string field')
    return rec["text"] + "\n\n"


def _text_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, cut at line ends (jsonl: one per record)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = _jsonl_text(line, f"{path}:{lineno}")
                if text is not None:
                    yield text
        return
    buf: list[str] = []
    size = 0
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
    except UnicodeDecodeError:
        raise ScapError(f"{path} is not UTF-8 text") from None
    if buf:
        yield "".join(buf)


def _lines_from(path: Path, offset: int) -> Iterator[str]:
    """Text from byte ``offset`` on, in lines: plain text from the next word boundary, jsonl from the
    next record (its "text")."""
    jsonl = path.suffix == ".jsonl"
    with path.open("rb") as f:
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                rest = f.readline()  # the partial line
                if not jsonl:
                    # plain text: start at the next word of this line (lines can be whole chapters)
                    text = rest.decode("utf-8", errors="ignore")
                    cut = len(text) - len(text.lstrip()) if text[:1].isspace() else next(
                        (i for i, ch in enumerate(text) if ch.isspace()), len(text))
                    if text[cut:].strip():
                        yield text[cut:].lstrip(" \t")
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ScapError(f"{path} is not UTF-8 text") from None
            if jsonl:
                text = _jsonl_text(line, f"{path} (before byte {f.tell()})")
                if text is not None:
                    yield text
            else:
                yield line


def spread_windows(path: Path, tokenizer, seq_len: int, n_windows: int, *, phase: float = 0.0,
                   per_anchor: int = 1) -> Iterator[np.ndarray]:
    """``n_windows`` windows taken at evenly spaced places across the whole file (``per_anchor``
    consecutive windows at each), so a calibration sample represents all of a text, not its start.
    ``phase`` in [0, 1) shifts the places by that fraction of the spacing: phase 0.5 gives windows
    disjoint from phase 0's (held-out data from the same file)."""
    pre, post = _special_wrap(tokenizer)
    content = seq_len - len(pre) - len(post)
    if content < 1:
        raise ScapError(f"--seq-len {seq_len} leaves no room for text next to the tokenizer's special tokens")
    size = path.stat().st_size
    anchors = max(1, -(-n_windows // per_anchor))
    produced = 0
    for i in range(anchors):
        offset = int((i + phase) * size / anchors)
        want = min(per_anchor, n_windows - produced)
        buf: list[int] = []
        for line in _lines_from(path, offset):
            buf.extend(tokenizer.encode(line, add_special_tokens=False).ids)
            if len(buf) >= want * content:
                break
        got = len(buf) // content
        for k in range(min(want, got)):
            yield np.asarray(pre + buf[k * content : (k + 1) * content] + post, dtype=np.int64)
            produced += 1


def token_windows(path: Path, tokenizer, seq_len: int, *, skip: int = 0) -> Iterator[np.ndarray]:
    """Consecutive windows of ``seq_len`` ids (special tokens included), after skipping ``skip`` windows."""
    pre, post = _special_wrap(tokenizer)
    content = seq_len - len(pre) - len(post)
    if content < 1:
        raise ScapError(f"--seq-len {seq_len} leaves no room for text next to the tokenizer's special tokens")
    buf: list[int] = []
    index = 0
    for chunk in _text_chunks(path):
        buf.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
        while len(buf) >= content:
            window, buf = buf[:content], buf[content:]
            if index >= skip:
                yield np.asarray(pre + window + post, dtype=np.int64)
            index += 1


# ----------------------------------------------------------------------------- feeds
