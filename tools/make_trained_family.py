#!/usr/bin/env python3
"""A small decoder of one transformers family, trained briefly on bytes of text, exported by optimum.

Random-weight models (tests/random_families.py) predict next to uniform distributions (perplexity
about their vocabulary of 256), so a perplexity change on them is noise of a few hundredths of a
percent and cannot rank calibration methods (docs/results.md). A few hundred training steps on
real text give the same families activations with structure (outlier channels, off-centre GELU
outputs) and a perplexity a sparsification can move. Nothing is downloaded: the model is built from
a config, trained with torch on the CPU and exported as the prepared models are.

    T=~/.cache/scap-onnx/texts
    python tools/make_trained_family.py gemma --train $T/pydoc.txt $T/fortunes.txt $T/kjv.txt \\
        --eval $T/fortunes.txt $T/kjv.txt -o /tmp/trained-gemma

writes OUT/model.onnx, OUT/calib.npz (windows of the first --train text) and OUT/eval_<name>.npz for
every --eval text. Training reads the first nine tenths of each --train text (equally often);
calibration and evaluation windows come from the last tenth of a text trained on (the whole text
otherwise). Train on every text you evaluate on, as a real LLM has seen such text: a model that saw
pydoc only reads fortunes at twice its pydoc perplexity, and that domain shift, not the
sparsification, then decides what a plan costs there. Tokens are bytes (vocabulary 256), so no
tokenizer is needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 256
#: family -> transformers config class and arguments: 4 layers, hidden 128.
CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=4, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256)),
    "gemma": ("GemmaConfig", dict(num_hidden_layers=4, hidden_size=128, intermediate_size=352,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=VOCAB,
                                  hidden_activation="gelu_pytorch_tanh", max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=4, hidden_size=128, intermediate_size=352,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=256)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=4, hidden_size=128, intermediate_size=352,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=256)),
}


def text_bytes(path: Path) -> np.ndarray:
    return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int64)


def windows(data: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` windows spread evenly over ``data``."""
    starts = np.linspace(0, len(data) - length - 1, count).astype(np.int64)
    return np.stack([data[s:s + length] for s in starts])


def train(family: str, texts: list[np.ndarray], steps: int, seq: int, batch: int, seed: int, log):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls, kwargs = CONFIGS[family]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        which = rng.integers(0, len(texts), size=batch)
        ids = torch.from_numpy(np.stack([texts[w][s:s + seq] for w in which
                                         for s in rng.integers(0, len(texts[w]) - seq - 1, size=1)]))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)")
    model.eval()
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("family", choices=sorted(CONFIGS))
    ap.add_argument("--train", type=Path, nargs="+", required=True,
                    help="Texts to train on; the first is also the calibration text.")
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="Texts to write evaluation feeds of.")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16, help="Windows of --seq-len per feeds file.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import onnx
    import torch

    from scap_onnx.calibration.data import feeds_from_ids, model_inputs
    from scap_onnx.prepare import export_onnx, postprocess_onnx, transformers_offline

    def log(msg):
        print(f"[{args.family}] {msg}", file=sys.stderr, flush=True)

    def held_out(path: Path) -> np.ndarray:  # the last tenth of a text trained on, else all of it
        data = text_bytes(path)
        trained = any(path.resolve() == t.resolve() for t in args.train)
        return data[int(len(data) * 0.9):] if trained else data

    texts = [text_bytes(p) for p in args.train]
    with transformers_offline():
        model = train(args.family, [t[:int(len(t) * 0.9)] for t in texts], args.steps, args.seq_len, args.batch,
                      args.seed, log)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "hf", safe_serialization=True)
            export_onnx(Path(tmp) / "hf", args.output, task="text-generation-with-past",
                        label=f"trained {args.family}")
    postprocess_onnx(args.output / "model.onnx", rename_matmul_weights=False)
    inputs = model_inputs(onnx.load(str(args.output / "model.onnx"), load_external_data=False))
    feeds = {"calib": windows(held_out(args.train[0]), args.windows, args.seq_len)}
    feeds.update({f"eval_{p.stem}": windows(held_out(p), args.windows, args.seq_len) for p in args.eval})
    for name, ids in feeds.items():
        np.savez(args.output / f"{name}.npz", **feeds_from_ids(inputs, ids))
    log(f"wrote {args.output}: model.onnx, " + ", ".join(f"{n}.npz" for n in feeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
