"""Latency, dense against sparse, interleaved in one process.

By default both run on one onnxruntime intra-op pool that spins, as a single session runs with
onnxruntime's defaults, in a child process of its own (scap_onnx.evaluation.fresh_process); with
``--thread-pool separate`` in this process, a pool per session. A warm-up, then ``repeats`` rounds
that run dense and sparse alternately (order swapped every round); medians, p10/p90 and the median
of the per-round ratios. Decoders with past key/values: the decode step (one new token over a KV
cache of ``kv_len`` tokens, the cache each model computed itself from the first ``kv_len`` tokens of
the data; the new token cycles through the next real tokens) in tokens/s, and the prefill of those
``kv_len`` tokens. Other models: one batch of the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnxruntime as ort

from ..calibration.data import feeds_from_ids
from ..errors import ScapError
from ..op.session import base_options, default_threads, open_session, provider_name
from ..progress import NullProgress, Progress
from ..calibration.lm_loss import ids_of
from .eval_data import batches
from .fresh_process import run_in_fresh_process
from .options import ValidateOptions
from .pairing import ModelPair

#: Decode steps cycle through this many real next tokens.
DECODE_TOKENS = 8


def _stats_ms(times: list[float]) -> dict:
    t = np.asarray(times) * 1e3
    return {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()), "min": float(t.min()), "n": int(t.size)}


def interleaved(runs: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up, then ``repeats`` rounds running every callable once, order reversed every other round."""
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _compare(times: dict[str, list[float]], tokens: int | None, warmup: int) -> dict:
    d, s = times["dense"], times["sparse"]
    out = {"dense_ms": _stats_ms(d), "sparse_ms": _stats_ms(s), "warmup": warmup, "repeats": len(d)}
    out["speedup"] = float(np.median(d) / np.median(s))
    out["paired_speedup"] = float(np.median(np.asarray(d) / np.asarray(s)))
    if tokens:
        out["tokens"] = tokens
        out["dense_tokens_per_s"] = tokens / float(np.median(d))
        out["sparse_tokens_per_s"] = tokens / float(np.median(s))
    return out


def token_stream(ds, need: int, seen: list[np.ndarray] | None = None) -> tuple[np.ndarray, bool]:
    """At least ``need`` token ids from the data (windows concatenated; tiled when too few)."""
    chunks = list(seen or [])
    have = sum(c.size for c in chunks)
    if have < need:
        for feeds, _ in batches(ds):
            ids = ids_of(feeds)
            if ids is None:
                break
            chunks.append(ids.reshape(-1))
            have += ids.size
            if have >= need:
                break
    if not chunks:
        raise ScapError("decode latency needs input_ids in the data")
    flat = np.concatenate([c.reshape(-1) for c in chunks]).astype(np.int64)
    tiled = flat.size < need
    if tiled:
        flat = np.tile(flat, need // max(flat.size, 1) + 1)
    return flat[:need], tiled


def _decoder_feeds(pair: ModelPair, ids: np.ndarray, past_len: int, past: dict[str, np.ndarray] | None):
    """Feeds for ids [1, S] after ``past_len`` cached tokens (``past``: present outputs by name)."""
    s = ids.shape[1]
    feeds = feeds_from_ids(pair.inputs, ids)
    for inp in pair.inputs:
        n = inp.name
        if "attention_mask" in n:
            feeds[n] = np.ones((1, past_len + s), dtype=inp.dtype)
        elif "position_ids" in n:
            feeds[n] = np.arange(past_len, past_len + s, dtype=inp.dtype)[None]
        elif "cache_position" in n:
            feeds[n] = np.arange(past_len, past_len + s, dtype=inp.dtype)
        elif n in pair.past and past is not None:
            feeds[n] = past[pair.past[n]]
    return feeds


def _latency_plan(pair: ModelPair, ds, opts: ValidateOptions, tokens_seen: list[np.ndarray] | None) -> dict:
    """What to time, from the data: token ids for a decoder with a KV cache, else one batch of feeds."""
    if pair.kind == "causal-lm" and pair.past:
        ids, tiled = token_stream(ds, opts.kv_len + DECODE_TOKENS, tokens_seen)
        return {"ids": ids, "tiled": tiled}
    feeds, n_tok = next(batches(ds))  # the first batch (batches raises ScapError when there is none)
    return {"feeds": feeds, "tokens": n_tok}


@dataclass
class TimingJob:
    """Everything the timing needs, picklable: it may run in a fresh process (:func:`time_job`)."""

    pair: ModelPair  # without its sparse proto
    plan: dict
    opts: ValidateOptions
    threads: int
    provider: str
    shared: bool  # both sessions on onnxruntime's process-wide pool (a fresh process only)


def time_job(job: TimingJob, progress: Progress | None = None) -> dict:
    """Decode step and prefill (decoders with KV cache) or one batch (others), dense and sparse
    interleaved."""
    pair, plan, opts, threads, provider, shared = job.pair, job.plan, job.opts, job.threads, job.provider, job.shared
    progress = progress or NullProgress()
    if shared:
        ort.set_global_thread_pool_sizes(threads, 1)
    spinning = True if shared else opts.spinning  # onnxruntime's shared pool spins (its default)
    sessions = {
        name: open_session(path, options=base_options(threads, spinning=spinning, shared_pool=shared),
                           provider=provider, use_library=True if name == "sparse" else None)
        for name, path in (("dense", pair.dense_path), ("sparse", pair.sparse_path))
    }
    out: dict = {"threads": threads, "provider": provider, "thread_pool": "shared" if shared else "separate",
                 "spinning": spinning}
    if "ids" in plan:
        L = opts.kv_len
        ids = plan["ids"]
        prompt = ids[None, :L]
        prefill_feeds = _decoder_feeds(pair, prompt, 0, None)
        decode_feeds = {}
        for name, sess in sessions.items():
            t = progress.task(f"latency: prefill {name} ({L} tokens)", None)
            res = dict(zip(pair.outputs, sess.run(pair.outputs, prefill_feeds)))
            t.close()
            cache = {o: res[o] for o in pair.past.values()}
            decode_feeds[name] = [_decoder_feeds(pair, ids[None, L + j: L + j + 1], L, cache)
                                  for j in range(DECODE_TOKENS)]
            del res
        counters = {"dense": 0, "sparse": 0}

        def step(name):
            def run():
                f = decode_feeds[name][counters[name] % DECODE_TOKENS]
                counters[name] += 1
                return sessions[name].run(None, f)
            return run

        task = progress.task(f"latency: decode step, KV {L} ({opts.warmup}+{opts.repeats} rounds)", None)
        times = interleaved({"dense": step("dense"), "sparse": step("sparse")}, opts.warmup, opts.repeats)
        task.close()
        out["decode"] = _compare(times, 1, opts.warmup)
        out["decode"]["kv_len"] = L
        out["decode"]["tokens_tiled"] = plan["tiled"]
        del decode_feeds
        if opts.prefill:
            task = progress.task(f"latency: prefill {L} tokens (1+{opts.prefill_repeats} rounds)", None)
            times = interleaved({n: (lambda s=s: s.run(None, prefill_feeds)) for n, s in sessions.items()},
                                1, opts.prefill_repeats)
            task.close()
            out["prefill"] = _compare(times, L, 1)
    else:
        if pair.kind == "causal-lm":  # no KV cache: a decode step is a whole forward pass
            out["note"] = "the model has no past key/value inputs: no decode step; one batch timed instead"
        names = {i.name for i in sessions["dense"].get_inputs()}
        feeds = {k: v for k, v in plan["feeds"].items() if k in names}
        task = progress.task(f"latency: one batch ({opts.warmup}+{opts.repeats} rounds)", None)
        times = interleaved({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()},
                            opts.warmup, opts.repeats)
        task.close()
        out["batch"] = _compare(times, plan["tokens"], opts.warmup)
        out["batch"]["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    sessions.clear()  # release both models before returning
    return out


def measure_latency(pair: ModelPair, ds, opts: ValidateOptions, tokens_seen: list[np.ndarray] | None = None,
                    progress: Progress | None = None) -> dict:
    """Decode step and prefill (decoders with KV cache) or one batch (others), interleaved.

    With the shared thread pool (the default) the timing runs in a fresh process: onnxruntime makes
    its process-wide pool once and then refuses sessions with pools of their own, which would break
    the caller's later sessions.
    """
    progress = progress or NullProgress()
    threads = opts.threads or default_threads()
    provider = provider_name(opts.provider)
    plan = _latency_plan(pair, ds, opts, tokens_seen)
    job = TimingJob(replace(pair, sparse_proto=None), plan, opts, threads, provider, opts.thread_pool == "shared")
    if not job.shared:
        return time_job(job, progress)
    task = progress.task("latency: dense and sparse on one thread pool (in a separate process)", None)
    try:
        return run_in_fresh_process(f"{__name__}:time_job", job, "latency")
    finally:
        task.close()


