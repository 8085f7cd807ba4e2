"""Calibration data: model feeds from text (through the model's tokenizer) or from an .npz.

Text is cut into token windows by scap_onnx.calibration.text. Feeds for the other inputs an exported model has are derived from the
window: attention_mask (ones), position_ids / cache_position (0..S-1), token_type_ids (zeros) and
empty past_key_values (past length 0) for decoders exported with past (optimum's
text-generation-with-past). An .npz holds feeds by input name, split along axis 0 into batches.
Several text files are mixed (MixedSource): the windows are split evenly between them.

Nothing here holds more than one batch of feeds at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import onnx
from onnx import helper

from ..errors import ScapError
from ..graph.genai import genai_config_beside, past_dims
from .text import CHUNK_CHARS, TEXT_SUFFIXES, find_tokenizer, load_tokenizer, spread_windows, token_windows



@dataclass(frozen=True)
class InputInfo:
    """A graph input: name, numpy dtype, dims (int, or str for symbolic, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple

    @property
    def rank(self) -> int:
        return len(self.dims)


def model_inputs(model: onnx.ModelProto, genai_config: dict | None = None) -> list[InputInfo]:
    """Graph inputs that are not initializers, with dtypes and dims (the symbolic head count and
    head size of past key/values filled from ``genai_config``, an onnxruntime-genai folder's config)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims = tuple(
            (d.dim_value if d.HasField("dim_value") else (d.dim_param or None)) for d in tt.shape.dim
        ) if tt.HasField("shape") else ()
        out.append(InputInfo(i.name, dtype, past_dims(genai_config, i.name, dims)))
    return out


# ----------------------------------------------------------------------------- tokenizer
def _is_batch_dim(d, batch_name) -> bool:
    return isinstance(d, str) and (d == batch_name or "batch" in d.lower())


def feeds_from_ids(inputs: list[InputInfo], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a batch of token windows ``ids`` [B, S] (past length 0)."""
    b, s = ids.shape
    by_name = {i.name: i for i in inputs}
    ids_input = by_name.get("input_ids") or next((i for i in inputs if "input_ids" in i.name), None)
    if ids_input is None:
        raise ScapError(
            "the model has no input_ids input, so text cannot feed it; give --data as an .npz of feeds "
            f"(inputs: {', '.join(by_name)})"
        )
    batch_name = ids_input.dims[0] if ids_input.dims else None
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        n = inp.name
        if inp is ids_input:
            feeds[n] = ids.astype(inp.dtype)
        elif "attention_mask" in n:
            feeds[n] = np.ones((b, s), dtype=inp.dtype)
        elif "position_ids" in n:
            feeds[n] = np.broadcast_to(np.arange(s, dtype=inp.dtype), (b, s)).copy()
        elif "cache_position" in n:
            feeds[n] = np.arange(s, dtype=inp.dtype)
        elif "token_type_ids" in n:
            feeds[n] = np.zeros((b, s), dtype=inp.dtype)
        elif n.startswith("past") or ".past" in n or "past_key" in n:
            shape = []
            for d in inp.dims:
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif _is_batch_dim(d, batch_name):
                    shape.append(b)
                else:
                    shape.append(0)  # past sequence length
            feeds[n] = np.zeros(shape, dtype=inp.dtype)
        elif n == "use_cache_branch":
            feeds[n] = np.zeros((1,), dtype=inp.dtype)
        else:
            raise ScapError(
                f"cannot derive model input {n!r} from text; give --data as an .npz of feeds for every input"
            )
    return feeds


@runtime_checkable
class DataReader(Protocol):
    """The one protocol of calibration and evaluation data (onnxruntime's CalibrationDataReader, as
    a re-iterable stream): :class:`DataSource` (one file) and :class:`MixedSource` (several texts)."""

    max_tokens: int | None

    @property
    def path(self) -> Path: ...

    @property
    def is_text(self) -> bool: ...

    def batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feeds by input name, tokens in the batch), one batch at a time, from the start each call."""
        ...

    def describe(self) -> dict: ...


@dataclass
class DataSource:
    """Where calibration feeds come from; ``batches()`` yields (feeds, n_tokens) one batch at a time."""

    path: Path
    inputs: list[InputInfo]
    tokenizer_path: Path | None = None
    seq_len: int = 256
    max_tokens: int | None = 16384
    batch_size: int = 1
    skip_tokens: int = 0
    sampling: str = "spread"  # "spread": windows across the whole file; "contiguous": from its start
    phase: float = 0.0  # spread sampling: shift of the window places (0.5: held out from phase 0)

    @property
    def is_text(self) -> bool:
        return self.path.suffix.lower() != ".npz"

    @property
    def max_windows(self) -> int | None:
        if self.max_tokens is None:
            return None
        return max(1, self.max_tokens // self.seq_len)

    def batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        if self.is_text:
            yield from self._text_batches()
        else:
            yield from self._npz_batches()

    def _text_batches(self):
        yield from batch_windows(self.inputs, self.windows(load_tokenizer(self.tokenizer_path)), self.batch_size)

    def windows(self, tok) -> Iterator[np.ndarray]:
        """The text's token windows (at most ``max_windows``), one [seq_len] array each."""
        n = 0
        limit = self.max_windows
        skip = self.skip_tokens // self.seq_len
        if self.sampling == "spread" and limit is not None and not skip and self._large_enough(tok, limit):
            windows = spread_windows(self.path, tok, self.seq_len, limit, phase=self.phase)
        else:
            windows = token_windows(self.path, tok, self.seq_len, skip=skip)
        for w in windows:
            yield w
            n += 1
            if limit is not None and n >= limit:
                break
        if n == 0:
            raise ScapError(f"{self.path} holds fewer than {self.seq_len} tokens: no calibration window")

    def _large_enough(self, tok, windows: int) -> bool:
        """Whether the file holds clearly more text than ``windows`` need (else read it from the start:
        spread windows would overlap)."""
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(CHUNK_CHARS).decode("utf-8", errors="ignore")
        n_tok = len(tok.encode(head, add_special_tokens=False).ids) if head else 0
        if n_tok == 0:
            return False
        bytes_per_token = len(head.encode("utf-8")) / n_tok
        return size > 2 * windows * self.seq_len * bytes_per_token

    def _npz_batches(self):
        try:
            z = np.load(self.path, allow_pickle=False)
        except Exception as e:
            raise ScapError(f"cannot read {self.path} as .npz: {type(e).__name__}") from None
        with z:
            names = set(z.files)
            missing = [i.name for i in self.inputs if i.name not in names]
            if missing:
                raise ScapError(f"{self.path} lacks feeds for model inputs: {', '.join(missing)}")
            arrays = {i.name: z[i.name] for i in self.inputs}
        rows = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if len(rows) != 1 or any(a.ndim == 0 for a in arrays.values()):
            yield {k: v.astype(i.dtype, copy=False) for (k, v), i in zip(arrays.items(), self.inputs)}, _tokens(arrays)
            return
        total = rows.pop()
        step = self.batch_size
        done = 0
        for start in range(0, total, step):
            feeds = {i.name: np.ascontiguousarray(arrays[i.name][start : start + step]).astype(i.dtype, copy=False) for i in self.inputs}
            n_tok = _tokens(feeds)
            yield feeds, n_tok
            done += n_tok
            if self.max_tokens is not None and done >= self.max_tokens:
                break

    def describe(self) -> dict:
        d = {"path": str(self.path), "kind": "text" if self.is_text else "npz", "batch_size": self.batch_size}
        if self.is_text:
            d.update(seq_len=self.seq_len, tokenizer=str(self.tokenizer_path), skip_tokens=self.skip_tokens,
                     sampling=self.sampling, phase=self.phase)
        return d


def _tokens(feeds: dict[str, np.ndarray]) -> int:
    """Rows x sequence length of the first 2-D integer feed, else rows of the first feed."""
    for a in feeds.values():
        if a.ndim == 2 and a.dtype.kind in "iu":
            return int(a.shape[0] * a.shape[1])
    a = next(iter(feeds.values()))
    return int(a.shape[0]) if a.ndim else 1


def batch_windows(inputs: list[InputInfo], windows, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(feeds, n_tokens) for batches of ``batch_size`` windows."""
    pending: list[np.ndarray] = []
    for w in windows:
        pending.append(w)
        if len(pending) == batch_size:
            ids = np.stack(pending)
            pending = []
            yield feeds_from_ids(inputs, ids), int(ids.size)
    if pending:
        ids = np.stack(pending)
        yield feeds_from_ids(inputs, ids), int(ids.size)


@dataclass
class MixedSource:
    """Windows from several text files: the token budget split evenly between them, windows taken
    in turn from each (so every batch, and any prefix of the run, mixes the texts)."""

    parts: list[DataSource]
    max_tokens: int | None
    batch_size: int = 1

    is_text = True

    @property
    def path(self) -> Path:  # named in messages
        return self.parts[0].path

    def batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        tok = load_tokenizer(self.parts[0].tokenizer_path)
        streams = [part.windows(tok) for part in self.parts]

        def interleaved():
            live = list(streams)
            while live:
                for st in list(live):
                    w = next(st, None)
                    if w is None:
                        live.remove(st)
                    else:
                        yield w

        yield from batch_windows(self.parts[0].inputs, interleaved(), self.batch_size)

    def describe(self) -> dict:
        return {"kind": "text", "batch_size": self.batch_size, "mix": [p.describe() for p in self.parts]}


def open_data(
    data: str | Path | Sequence[str | Path],
    model: onnx.ModelProto,
    model_path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    seq_len: int = 256,
    max_tokens: int | None = 16384,
    batch_size: int = 1,
    skip_tokens: int = 0,
    sampling: str = "spread",
    phase: float = 0.0,
) -> DataSource:
    """Check the data argument and make a DataSource for ``model``. Raises ScapError on bad input.

    Several text files (a list) give a MixedSource: ``max_tokens`` split evenly between them."""
    if max_tokens is not None and max_tokens < 1:
        raise ScapError(f"--tokens must be at least 1, got {max_tokens}")
    if not isinstance(data, (str, Path)):
        paths = list(data)
        if not paths:
            raise ScapError("no data file given")
        if len(paths) > 1:
            return _open_mix(paths, model, model_path, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                             batch_size=batch_size, skip_tokens=skip_tokens, sampling=sampling, phase=phase)
        data = paths[0]
    path = Path(data)
    if not path.is_file():
        raise ScapError(f"data file {path} does not exist")
    if seq_len < 2:
        raise ScapError("--seq-len must be at least 2")
    if batch_size < 1:
        raise ScapError("--batch-size must be at least 1")
    if sampling not in ("spread", "contiguous"):
        raise ScapError(f"--sampling must be 'spread' or 'contiguous', not {sampling!r}")
    inputs = model_inputs(model, genai_config_beside(model_path))
    if path.suffix.lower() == ".npz":
        return DataSource(path, inputs, None, seq_len, max_tokens, batch_size, skip_tokens, sampling, phase)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise ScapError(f"data {path}: expected a text file (.txt, .jsonl) or an .npz of feeds")
    tok = find_tokenizer(model_path, tokenizer)
    return DataSource(path, inputs, tok, seq_len, max_tokens, batch_size, skip_tokens, sampling, phase)


def _open_mix(paths: list, model: onnx.ModelProto, model_path, *, max_tokens: int | None, seq_len: int,
              batch_size: int, **kw) -> MixedSource:
    if max_tokens is not None and max_tokens // seq_len < len(paths):
        raise ScapError(f"--tokens {max_tokens} gives fewer windows of {seq_len} tokens than the {len(paths)} data files")
    parts = []
    for i, p in enumerate(paths):
        if max_tokens is None:
            budget = None
        else:
            windows = max_tokens // seq_len
            budget = (windows // len(paths) + (i < windows % len(paths))) * seq_len
        ds = open_data(p, model, model_path, seq_len=seq_len, max_tokens=budget, batch_size=batch_size, **kw)
        if not ds.is_text:
            raise ScapError(f"data {p}: only text files can be mixed (an .npz must be the only --data)")
        parts.append(ds)
    return MixedSource(parts, max_tokens, batch_size)
