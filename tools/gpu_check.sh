#!/usr/bin/env bash
# The GPU check of the CUDA kernels, in one go on a machine with an NVIDIA GPU, its driver, nvcc
# and cmake (no network, no onnxruntime): builds custom_ops/cuda (cmake, against cuBLAS when the
# toolkit has it, else against the program's own dense kernels, which the output says), then runs
# scap_gpu_check: correctness against a float64 CPU reference, the copy bandwidth, and timings
# against the baseline. Prints one table per part, then the JSON it writes.
#
# Usage: bash tools/gpu_check.sh [JSON]     (default: gpu_check.json in the current folder)
# Environment: SCAP_GPU_BUILD (build folder, default build/gpu_check), JOBS (default: all cores),
#              CUDA_ARCHS (default: this GPU's, else the library's list).
# Exit status: 1 if a correctness case failed; timings below target are reported, not fatal.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
json=$(realpath -m "${1:-gpu_check.json}")
build=$(realpath -m "${SCAP_GPU_BUILD:-$repo/build/gpu_check}")
jobs=${JOBS:-$(nproc)}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Only this GPU's architecture: a faster build (nvidia-smi reports e.g. "9.0").
archs=${CUDA_ARCHS:-}
if [ -z "$archs" ] && command -v nvidia-smi >/dev/null; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)
  [[ "$cap" =~ ^[0-9]+$ ]] && archs="$cap"
fi
cmake_args=(-S "$repo/custom_ops/cuda" -B "$build" -DCMAKE_BUILD_TYPE=Release)
[ -n "$archs" ] && cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$archs")
start=$(date +%s)
cmake "${cmake_args[@]}" | grep -E "scap_gpu_check|CUDA" || true
cmake --build "$build" -j "$jobs" --target scap_gpu_check
echo "gpu_check: built in $(( $(date +%s) - start )) s (architectures: ${archs:-default list})"
status=0
"$build/scap_gpu_check" --json "$json" || status=$?
[ -f "$json" ] && { echo "--- $json"; cat "$json"; }
exit "$status"
