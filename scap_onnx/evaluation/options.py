"""What validate measures and how: the options of `scap-onnx validate`, one to one, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ScapError

THREAD_POOLS = ("shared", "separate")


@dataclass
class ValidateOptions:
    """What validate measures and how (the CLI options, one to one)."""

    tokenizer: str | Path | None = None
    seq_len: int = 256  # tokens per evaluation window
    max_tokens: int | None = 4096  # evaluation tokens (windows x seq_len)
    skip_tokens: int = 0  # skip this many tokens of the data first (contiguous sampling)
    sampling: str = "spread"  # text windows: "spread" across the whole file, or "contiguous" from its start
    phase: float = 0.0  # spread sampling: shift of the window places; 0.5 is disjoint from calibration's 0.0
    batch_size: int = 1
    threads: int | None = None  # intra-op threads (default: physical cores)
    provider: str = "cpu"
    accuracy: bool = True
    latency: bool = True
    kv_len: int = 256  # decode: tokens already in the KV cache
    warmup: int = 3
    repeats: int = 20
    prefill_repeats: int = 5
    prefill: bool = True
    # Latency: "shared" runs dense and sparse on one onnxruntime intra-op pool (spinning, as a single
    # session runs by default); "separate" gives each session its own pool, spinning or not.
    thread_pool: str = "shared"
    spinning: bool = False  # separate pools only: their workers spin (off: they would steal each other's cores)
    targets: dict[str, float] | None = None  # role -> target sparsity, for the report only

    def check(self) -> None:
        if self.seq_len < 2:
            raise ScapError("--seq-len must be at least 2")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ScapError("--tokens must be at least 1")
        if self.batch_size < 1:
            raise ScapError("--batch-size must be at least 1")
        if self.kv_len < 1:
            raise ScapError("--kv-len must be at least 1")
        if self.repeats < 1 or self.warmup < 0 or self.prefill_repeats < 1:
            raise ScapError("--repeats must be at least 1 and --warmup at least 0")
        if self.threads is not None and self.threads < 1:
            raise ScapError("--threads must be at least 1")
        if self.skip_tokens < 0:
            raise ScapError("--skip-tokens must be at least 0")
        if not (0.0 <= self.phase < 1.0):
            raise ScapError("--phase must be in [0, 1)")
        if self.thread_pool not in THREAD_POOLS:
            raise ScapError(f"--thread-pool must be one of {', '.join(THREAD_POOLS)}, got {self.thread_pool!r}")
        if self.spinning and self.thread_pool == "shared":
            raise ScapError("--spinning applies to --thread-pool separate only (the shared pool always spins)")
        if not (self.accuracy or self.latency):
            raise ScapError("nothing to do: both accuracy and latency are switched off")


