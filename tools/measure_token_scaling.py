"""Would thresholds relative to each token's scale transfer across texts better than static ones?

SCAP's thresholds are static: element i of a token's activation x is dropped iff
|x_i - m| <= tau. Where x is the output of a normalisation (q/k/v and gate/up read an RMSNorm in
Llama), its scale is fixed per token; where it is not (o reads the attention output, down reads
act(gate) * up), its scale moves with the text, and so does the measured sparsity. This tool
captures every target's input on the dense model over each text, calibrates a centre (the median)
and a threshold for ``--sparsity`` on one text, and measures the sparsity on the others, two ways:

- static: the quantile of |x - m|, as SCAP (and scap-onnx) calibrate;
- token-scaled: the same on x / rms(x), rms over each token's K elements; in a rewritten model this
  would be ScapSparseMatMul(x / rms(x), B) * rms(x), with standard ops around the unchanged op.

Dense activations only (no upstream sparsity), median centres; a comparison of the two rules, not
the acceptance measurement (tools/measure_calibration.py is that).

    python tools/measure_token_scaling.py --model M.onnx --texts pydoc.txt fortunes.txt kjv.txt other.txt \
        --calib pydoc.txt fortunes.txt --tokens 4096 --sparsity 0.4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scap_onnx.calibration.capture import Capture  # noqa: E402
from scap_onnx.graph.model_io import ModelSource  # noqa: E402
from scap_onnx.calibration.data import open_data  # noqa: E402
from scap_onnx.graph.targets import find_targets, group_sites  # noqa: E402

_FLOAT = 1  # onnx.TensorProto.FLOAT


def token_scaled(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True) + 1e-30).astype(np.float32)


def capture_inputs(model: Path, text: Path, tokens: int, seq_len: int, threads: int | None):
    """Every target input over ``tokens`` tokens of ``text`` ({input name: [tokens, K] float32}),
    with the roles and layer of the targets that read each."""
    from scap_onnx.op.session import base_options

    with ModelSource(model) as src:
        sites = group_sites(find_targets(src.proto))
        cap = Capture(src, {s.input: _FLOAT for s in sites}, None, base_options(threads))
        ds = open_data(text, src.proto, model, seq_len=seq_len, max_tokens=tokens)
        rows: dict[str, list[np.ndarray]] = {s.input: [] for s in sites}
        for feeds, _ in ds.batches():
            for name, x in cap.run(feeds).items():
                rows[name].append(x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False))
        roles = {s.input: "/".join(sorted({t.role for t in s.targets})) for s in sites}
        layers = {s.input: s.targets[0].layer for s in sites}
    return {k: np.concatenate(v) for k, v in rows.items()}, roles, layers


def rule(x: np.ndarray, scaled: bool) -> np.ndarray:
    return token_scaled(x) if scaled else x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--texts", type=Path, nargs="+", required=True, help="texts to capture (and measure on)")
    ap.add_argument("--calib", type=Path, nargs="+", required=True, help="which of --texts to calibrate on, one at a time")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    caps = {}
    for t in args.texts:
        caps[t.stem], roles, layers = capture_inputs(args.model, t, args.tokens, args.seq_len, args.threads)
        print(f"captured {t.stem}: {len(roles)} inputs x {next(iter(caps[t.stem].values())).shape[0]} tokens", flush=True)
    s = args.sparsity
    for scaled in (False, True):
        print(f"\n{'token-scaled' if scaled else 'static (SCAP)'} thresholds for {s:g}: "
              "per role, mean and worst-target error in points (layer of the worst)")
        for cal in (c.stem for c in args.calib):
            centre = {}
            for name, x in caps[cal].items():
                v = rule(x, scaled)
                m = float(np.median(v))
                centre[name] = (m, float(np.quantile(np.abs(v - m), s)))
            for ev in caps:
                if ev == cal:
                    continue
                by_role: dict[str, list[tuple[float, int]]] = {}
                for name, x in caps[ev].items():
                    m, tau = centre[name]
                    err = 100 * (float(np.mean(np.abs(rule(x, scaled) - m) <= tau)) - s)
                    by_role.setdefault(roles[name], []).append((err, layers[name]))
                cells = []
                for r, v in sorted(by_role.items()):
                    worst = max(v, key=lambda p: abs(p[0]))
                    cells.append(f"{r} {np.mean([e for e, _ in v]):+.1f} / {worst[0]:+.1f} (L{worst[1]})")
                print(f"  {cal:>9} -> {ev:<9} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
