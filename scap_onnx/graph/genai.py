"""onnxruntime-genai model folders: ``genai_config.json`` + the decoder model + tokenizer files, as
onnxruntime-genai's model builder writes them (``python -m onnxruntime_genai.models.builder``).

- :func:`open_genai_folder` reads a folder's config and checks that every file it names is there
  (ScapError, one line, otherwise); :func:`resolve_model` turns a MODEL argument that is such a folder
  into its decoder model file.
- :func:`genai_config_beside` finds the config of a model file inside a folder, and
  :func:`past_dims` fills the symbolic dims of the past key/value inputs (the builder names the head
  size ``kv_cache_dim``) from it, so that feeds follow the model's own inputs.
- :func:`write_genai_folder` writes a rewritten folder atomically: everything of the input folder but
  its model, the new model, the op library copied in, and ``session_options.custom_ops_library`` set to
  the copy's file name. onnxruntime-genai resolves a relative library path against the model folder
  first (and refuses absolute paths outside the model folder, the current folder and its execution
  providers' folders), so a bare file name keeps the folder working wherever it is moved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ScapError
from ..prepare.cache import replace_folder

CONFIG_NAME = "genai_config.json"

__all__ = [
    "CONFIG_NAME", "GenaiFolder", "genai_config_beside", "is_genai_folder", "open_genai_folder", "past_dims",
    "resolve_model", "write_genai_folder",
]


@dataclass(frozen=True)
class GenaiFolder:
    """A checked onnxruntime-genai folder."""

    folder: Path
    config: dict

    @property
    def model_path(self) -> Path:
        return self.folder / self.config["model"]["decoder"]["filename"]

    @property
    def custom_ops_library(self) -> str | None:
        return self.config["model"]["decoder"].get("session_options", {}).get("custom_ops_library")


def is_genai_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def _named_files(node: Any) -> list[str]:
    """Every ``filename`` value in the config (the decoder's, and those of embedding, vision, ...)."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "filename" and isinstance(v, str):
                out.append(v)
            else:
                out.extend(_named_files(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_named_files(v))
    return out


def open_genai_folder(path: str | Path) -> GenaiFolder:
    """The folder's config, checked: readable JSON with ``model.decoder.filename``, and every file the
    config names present. ScapError (one line) otherwise."""
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScapError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ScapError(f"{cfg_path} is not valid JSON ({e})") from None
    decoder = config.get("model", {}).get("decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename"), str):
        raise ScapError(f"{cfg_path} names no decoder model (model.decoder.filename)")
    missing = [f for f in _named_files(config) if not (folder / f).is_file()]
    library = decoder.get("session_options", {}).get("custom_ops_library")
    if isinstance(library, str) and not Path(library).is_absolute() and not (folder / library).is_file():
        missing.append(library)
    if missing:
        raise ScapError(f"{cfg_path} names files missing from {folder}: {', '.join(missing)}")
    return GenaiFolder(folder, config)


def resolve_model(path: str | Path) -> Path:
    """A MODEL argument: a model file as it is, or the decoder model of a genai folder (checked)."""
    p = Path(path)
    if is_genai_folder(p):
        return open_genai_folder(p).model_path
    return p


def genai_config_beside(model_path: str | Path) -> dict | None:
    """The genai config of the folder holding ``model_path`` when that folder is a genai folder whose
    decoder is this file; else None."""
    p = Path(model_path)
    cfg_path = p.parent / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if decoder.get("filename") == p.name else None


def _past_pattern_matches(pattern: str, name: str) -> bool:
    head, _, tail = pattern.partition("%d")
    middle = name[len(head): len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
    return middle.isdigit()


def past_dims(config: dict | None, name: str, dims: tuple) -> tuple:
    """``dims`` of the input ``name`` with the symbolic head count and head size of a past key/value
    input ([batch, kv_heads, past_len, head_size]) taken from the genai config."""
    if not config or len(dims) != 4:
        return dims
    decoder = config["model"]["decoder"]
    inputs = decoder.get("inputs", {})
    patterns = [inputs.get("past_key_names"), inputs.get("past_value_names")]
    if not any(isinstance(p, str) and _past_pattern_matches(p, name) for p in patterns):
        return dims
    heads = decoder.get("num_key_value_heads")
    head_size = decoder.get("head_size")
    out = list(dims)
    if not isinstance(out[1], int) and isinstance(heads, int):
        out[1] = heads
    if not isinstance(out[3], int) and isinstance(head_size, int):
        out[3] = head_size
    return tuple(out)


def write_genai_folder(src: GenaiFolder, output: str | Path, write_model: Callable[[Path], None],
                       library: str | Path, skip: list[Path]) -> Path:
    """Write the rewritten folder ``output`` atomically (a temporary sibling renamed into place).

    ``write_model(path)`` writes the new decoder model at ``path`` (its external data beside it);
    ``skip``: the input's model file and its external data files, not copied. Every other file of the
    input folder is copied but hidden ones; ``library`` is copied in and named in the config. An existing ``output``
    is replaced only when it is a genai folder itself.
    """
    output = Path(output)
    if output.exists():
        if output.resolve() == src.folder.resolve():
            raise ScapError(f"output {output} would overwrite the input folder")
        if not is_genai_folder(output):
            raise ScapError(f"output {output} exists and is not an onnxruntime-genai folder: give a new folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    skip_names = {p.resolve() for p in skip}
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        for item in src.folder.iterdir():
            if item.resolve() in skip_names or item.name == CONFIG_NAME or item.name.startswith("."):
                continue  # hidden files: markers and leftovers of other tools, not the model's
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        write_model(tmp / src.model_path.name)
        lib = Path(library)
        shutil.copy2(lib, tmp / lib.name)
        config = json.loads(json.dumps(src.config))
        config["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = lib.name
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        replace_folder(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
