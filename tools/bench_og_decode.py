#!/usr/bin/env python3
"""Decode tokens/s through onnxruntime-genai's og.Generator, two genai folders interleaved.

The timing of ``scap-onnx validate DENSE SPARSE`` (scap_onnx.evaluation.genai_decode: both models
loaded once in a fresh process, greedy, rounds alternating with the order swapped every round,
medians), without validate's pairing and accuracy, so that any two folders can be compared: a
sparse folder against its dense original, or two builds of the op library (copy the folder, put the
other build's libscap_onnx_ops.so in the copy).

Write both folders in the same minutes (``cp -r`` the dense one): onnxruntime maps page-aligned
external data from the file and the NBits op copies what it reads, but a folder written long ago
decodes measurably slower than a fresh copy of itself (docs/results.md: 1-3% dense, 5-10% sparse
before the op copied its weights).

    python tools/bench_og_decode.py DENSE_FOLDER SPARSE_FOLDER
    python tools/bench_og_decode.py DENSE_FOLDER SPARSE_FOLDER --repeats 40 --prompt-tokens 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scap_onnx.evaluation.genai_decode import GenaiDecodeJob, measure_genai_decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path, help="the reference folder (dense)")
    p.add_argument("second", type=Path, help="the folder timed against it (sparse)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="where to write the result")
    args = p.parse_args()
    prompt = [100 + i for i in range(args.prompt_tokens)]  # any ids below the vocabulary's size
    result = measure_genai_decode(GenaiDecodeJob(dense=args.first, sparse=args.second, prompt=prompt,
                                                 new_tokens=args.new_tokens, warmup=2, repeats=args.repeats,
                                                 threads=args.threads))
    print(f"{args.first.name}: {result['dense_tokens_per_s']:.1f} tokens/s   {args.second.name}: "
          f"{result['sparse_tokens_per_s']:.1f} tokens/s   speedup {result['speedup']:.3f}x "
          f"(paired {result['paired_speedup']:.3f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
