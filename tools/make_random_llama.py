#!/usr/bin/env python
"""Build a Llama-shaped decoder with random weights and export it to ONNX with past key/values.

    python tools/make_random_llama.py [--layers 4] [--hidden 2048] [--intermediate 5632]
        [--heads 32] [--kv-heads 4] [--vocab 4096] [--seed 0] [--force]

The default shape is TinyLlama-1.1B's (hidden 2048, intermediate 5632, 32 heads, 4 KV heads) with
4 layers: decoding then streams about 190M float32 weights per token, and the FC layers
dominate as they do in 1B-70B models. The vocabulary is small (4096) on purpose: with only a few
layers a 32000-token lm_head would be a quarter of the bytes read per token, while in TinyLlama it
is 6% and in Llama-2-7B 2%; at 4096 it is 4.5%. Weights are transformers' random initialisation
(normal, std 0.02; ``--seed``): the model means nothing, but its FC inputs have realistic shapes
and it decodes at the speed of a real model of that shape.

Nothing is downloaded: transformers builds the model from a LlamaConfig, optimum-onnx exports it
(task text-generation-with-past, float32), and the result is cached outside the repository in
``$SCAP_ONNX_CACHE/models/random-llama-...`` (default ``~/.cache/scap-onnx``). The folder holds

    model.onnx        the export (inputs input_ids, attention_mask, position_ids,
                      past_key_values.N.key|value; outputs logits, present.N.key|value)
    config.json       the transformers config
    hf/               the torch checkpoint (safetensors), for independent checks against torch
    calib.npz         feeds of random token windows for calibration (16 x 128 tokens, seed+1)
    eval.npz          other random windows for validation (8 x 128 tokens, seed+2)
    .complete         what was built and how, written last

Prints the folder on stdout. Repeated runs return at once unless --force.

``--genai-int4`` also builds the model with onnxruntime-genai's model builder (int4, CPU, block 32,
accuracy level 4: what scap_onnx.prepare builds SmolLM2 with) from ``hf/`` plus a word-level
tokenizer over the vocabulary (``w3`` ... for ids 3 ...; the builder needs one), into the sibling
folder ``...-genai-int4/`` (genai_config.json, model.onnx, tokenizer files), and prints that folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scap_onnx.prepare import (  # noqa: E402  (shares the cache, lock and export helpers)
    build_genai_int4,
    cache_dir,
    cached_build,
    check_close,
    export_onnx,
    log,
    ort_session,
    postprocess_onnx,
    transformers_offline,
    versions,
)

REQUIRED = ("model.onnx", "config.json", "calib.npz", "eval.npz", "hf/config.json")


def folder_name(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seed: int) -> str:
    return f"random-llama-h{hidden}-i{intermediate}-l{layers}-a{heads}-kv{kv_heads}-v{vocab}-s{seed}"


def make_random_llama(
    layers: int = 4,
    hidden: int = 2048,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 4096,
    seed: int = 0,
    *,
    calib_windows: int = 16,
    eval_windows: int = 8,
    window: int = 128,
    force: bool = False,
    root: Path | None = None,
) -> Path:
    """Folder with the exported random Llama (built once, cached). See the module docstring."""
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv-heads")
    name = folder_name(layers, hidden, intermediate, heads, kv_heads, vocab, seed)
    final = (root or cache_dir() / "models") / name

    def build(tmp: Path) -> tuple[Path, dict]:
        with transformers_offline():
            info = _build(tmp, layers, hidden, intermediate, heads, kv_heads, vocab, seed,
                          calib_windows, eval_windows, window)
        return tmp / "onnx", info

    return cached_build(final, REQUIRED, build, force=force, label="random Llama")


def make_random_llama_genai_int4(force: bool = False, **shape) -> Path:
    """The genai int4 folder of the random Llama of ``shape`` (see the module docstring)."""
    from scap_onnx.prepare.genai import GENAI_FILES

    src = make_random_llama(**shape)
    vocab = json.loads((src / "hf" / "config.json").read_text())["vocab_size"]

    def build(tmp: Path) -> tuple[Path, dict]:
        hf = tmp / "hf"
        shutil.copytree(src / "hf", hf)
        with transformers_offline():
            _write_word_tokenizer(hf, vocab)
        out = tmp / "genai"
        info = build_genai_int4(hf, out, tmp / "work")
        info["source"] = src.name
        return out, info

    return cached_build(src.parent / f"{src.name}-genai-int4", GENAI_FILES, build, force=force,
                        label="random Llama int4 (onnxruntime-genai)")


def _write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` ids (<unk>, <s>, </s>, then w3, w4, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _build(tmp: Path, layers, hidden, intermediate, heads, kv_heads, vocab, seed,
           calib_windows, eval_windows, window) -> dict:
    import numpy as np
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scap_onnx.calibration.data import feeds_from_ids, model_inputs

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    log(f"building a random LlamaForCausalLM: {layers} layers, hidden {hidden}, intermediate "
        f"{intermediate}, {heads}/{kv_heads} heads, vocab {vocab}, seed {seed} ...")
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    out = tmp / "onnx"
    hf = out / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    export_onnx(hf, out, task="text-generation-with-past", label="random Llama")
    info = postprocess_onnx(out / "model.onnx", rename_matmul_weights=True)
    if not (out / "config.json").is_file():
        (out / "config.json").write_text(config.to_json_string(), encoding="utf-8")

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = model_inputs(proto)
    del proto
    rng_c, rng_e = np.random.default_rng(seed + 1), np.random.default_rng(seed + 2)
    for fname, rng, n in (("calib.npz", rng_c, calib_windows), ("eval.npz", rng_e, eval_windows)):
        ids = rng.integers(3, vocab, size=(n, window), dtype=np.int64)
        np.savez(out / fname, **feeds_from_ids(inputs, ids))

    # ONNX Runtime against torch on one short window.
    ids = rng_e.integers(3, vocab, size=(1, 16), dtype=np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    got = ort_session(out / "model.onnx").run(["logits"], feeds_from_ids(inputs, ids))[0]
    check = check_close("logits", got, ref, rtol=1e-3)
    params = sum(p.numel() for p in model.parameters())
    info.update({
        "model": "random LlamaForCausalLM",
        "config": {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads,
                   "kv_heads": kv_heads, "vocab": vocab, "seed": seed},
        "parameters": int(params),
        "task": "text-generation-with-past",
        "dtype": "float32",
        "feeds": {"calib.npz": [calib_windows, window], "eval.npz": [eval_windows, window]},
        "check": check,
        "versions": versions("torch", "transformers", "optimum-onnx", "optimum", "onnx", "onnxruntime"),
    })
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--genai-int4", action="store_true",
                    help="also build the onnxruntime-genai int4 folder and print it")
    a = ap.parse_args(argv)
    shape = dict(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                 kv_heads=a.kv_heads, vocab=a.vocab, seed=a.seed)
    try:
        if a.genai_int4:
            path = make_random_llama_genai_int4(force=a.force, **shape)
        else:
            path = make_random_llama(**shape, force=a.force)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path)
    info = json.loads((path / ".complete").read_text())
    if info.get("parameters"):
        print(f"parameters: {info.get('parameters')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
