"""Tiny random-weight decoders of other families, exported by optimum-onnx (built once, cached).

GPT-2 (Conv1D: Gemm with B [K, N]) and OPT (fc1/fc2: Gemm with transB) exercise the Gemm targets on
the graphs the real exporter writes. Nothing is downloaded: transformers builds each model from a
config; the folder holds model.onnx, calib.npz and eval.npz (random token windows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scap_onnx.prepare import cache_dir, cached_build, export_onnx, postprocess_onnx, transformers_offline

VOCAB = 256
#: family -> transformers config class name and its arguments (2 layers, hidden 64).
CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB)),
    "opt": ("OPTConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=176,
                              word_embed_proj_dim=64, vocab_size=VOCAB)),
    # GeGLU (gelu-tanh gate) and Qwen2 (SwiGLU, q/k/v biases): decoders of other families for calibration.
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, vocab_size=VOCAB,
                                  hidden_activation="gelu_pytorch_tanh")),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=VOCAB)),
}
REQUIRED = ("model.onnx", "calib.npz", "eval.npz")


def tiny_family(family: str, seed: int = 0) -> Path:
    """Folder with the exported model and its feeds."""
    name = f"test-{family}-l2-h64-v{VOCAB}-s{seed}"

    def build(tmp: Path) -> tuple[Path, dict]:
        with transformers_offline():
            out = _build(family, seed, tmp)
        return out, {"model": f"random {family}", "seed": seed}

    return cached_build(cache_dir() / "models" / name, REQUIRED, build)


def _build(family: str, seed: int, tmp: Path) -> Path:
    import onnx
    import torch
    import transformers

    from scap_onnx.calibration.data import feeds_from_ids, model_inputs

    torch.manual_seed(seed)
    config_class, kwargs = CONFIGS[family]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
    # Random biases: transformers initialises them to zero, and equal zero biases get deduplicated.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    out = tmp / "onnx"
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    export_onnx(tmp / "hf", out, task="text-generation-with-past", label=f"random {family}")
    postprocess_onnx(out / "model.onnx", rename_matmul_weights=False)
    inputs = model_inputs(onnx.load(str(out / "model.onnx"), load_external_data=False))
    for fname, rng_seed, windows in (("calib.npz", seed + 1, 16), ("eval.npz", seed + 2, 8)):
        ids = np.random.default_rng(rng_seed).integers(3, VOCAB, size=(windows, 64), dtype=np.int64)
        np.savez(out / fname, **feeds_from_ids(inputs, ids))
    return out
