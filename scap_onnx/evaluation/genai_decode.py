"""Decode speed through onnxruntime-genai's ``og.Generator``, dense folder against sparse folder.

What an int4 user runs: ``og.Model(folder)`` (the sparse folder's genai_config.json registers the op
library it carries), greedy search, one token per ``generate_next_token``. Both models load once, in a
fresh process (onnxruntime-genai and this process's onnxruntime sessions then never share state); each
round feeds the same prompt to a new generator of each model (not timed), then times ``new_tokens``
decode steps; rounds alternate dense and sparse, the order swapped every round. Medians of tokens/s
and of the per-round ratios, as scap_onnx.evaluation.latency reports them.

onnxruntime-genai is imported inside the functions: it is an optional dependency (the ``genai``
extra).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ScapError
from .fresh_process import run_in_fresh_process


@dataclass
class GenaiDecodeJob:
    """Picklable: runs in a fresh process (:func:`time_genai_decode`)."""

    dense: Path  # genai folders
    sparse: Path
    prompt: list[int]
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 7
    threads: int | None = None


def _load_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise ScapError(f"decode through og.Generator needs onnxruntime-genai (the 'genai' extra): {e}") from None
    return og


def load_genai_model(folder: str | Path, threads: int | None = None):
    """``og.Model`` of a folder, its decoder on ``threads`` intra-op threads when given."""
    og = _load_genai()
    try:
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        return og.Model(config)
    except Exception as e:  # onnxruntime-genai raises RuntimeError / OrtException for bad folders
        raise ScapError(f"onnxruntime-genai cannot load {folder}: {' '.join(str(e).split())}") from None


def _timed_decode(og, model, prompt: np.ndarray, new_tokens: int) -> tuple[float, int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)  # the prefill: not timed
    steps = 0
    t0 = time.perf_counter()
    while steps < new_tokens - 1 and not gen.is_done():
        gen.generate_next_token()
        steps += 1
    return time.perf_counter() - t0, steps


def time_genai_decode(job: GenaiDecodeJob) -> dict:
    """Decode tokens/s of both folders, interleaved (call it in a fresh process: :func:`measure_genai_decode`)."""
    og = _load_genai()
    models = {"dense": load_genai_model(job.dense, job.threads), "sparse": load_genai_model(job.sparse, job.threads)}
    prompt = np.asarray(job.prompt, dtype=np.int32)
    rates: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(job.warmup + job.repeats):
        for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
            seconds, steps = _timed_decode(og, models[name], prompt, job.new_tokens)
            if steps == 0:
                raise ScapError("og.Generator ended before the first decode step")
            if r >= job.warmup:
                rates[name].append(steps / seconds)
    d, s = np.asarray(rates["dense"]), np.asarray(rates["sparse"])
    return {
        "prompt_tokens": len(job.prompt), "new_tokens": job.new_tokens, "warmup": job.warmup,
        "repeats": job.repeats, "threads": job.threads,
        "dense_tokens_per_s": float(np.median(d)), "sparse_tokens_per_s": float(np.median(s)),
        "speedup": float(np.median(s) / np.median(d)), "paired_speedup": float(np.median(s / d)),
        "dense_tokens_per_s_all": d.tolist(), "sparse_tokens_per_s_all": s.tolist(),
    }


def measure_genai_decode(job: GenaiDecodeJob) -> dict:
    """:func:`time_genai_decode` in a fresh process."""
    return run_in_fresh_process(f"{__name__}:time_genai_decode", job, "og.Generator decode timing")
