"""The evaluation data: a DataSource over the held-out text or feeds, and its batches."""

from __future__ import annotations

from pathlib import Path


from ..calibration.data import open_data
from ..errors import ScapError
from .options import ValidateOptions
from .pairing import ModelPair


def open_eval_data(pair: ModelPair, data: str | Path, opts: ValidateOptions):
    """A DataSource over the evaluation data (ScapError on a missing file / tokenizer)."""
    return open_data(data, pair.sparse_proto, pair.dense_path, tokenizer=opts.tokenizer, seq_len=opts.seq_len,
                     max_tokens=opts.max_tokens, batch_size=opts.batch_size, skip_tokens=opts.skip_tokens,
                     sampling=opts.sampling, phase=opts.phase)


def batches(ds):
    """DataSource batches; ScapError naming the data when it holds no batch at all."""
    n = 0
    try:
        for feeds, n_tok in ds.batches():
            if n_tok == 0:
                continue
            n += 1
            yield feeds, n_tok
    except ScapError as e:
        if n == 0:
            raise ScapError(f"no evaluation data: {e}".replace("calibration window", "evaluation window")) from None
        raise
    if n == 0:
        raise ScapError(f"no evaluation data: {ds.path} holds no batch of feeds")
