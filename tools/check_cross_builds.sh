#!/usr/bin/env bash
# Cross builds of the op library, checked in CI (a few minutes):
#   - ARM64: the kernels (NEON) cross-compiled with Debian's aarch64 compiler and scap_kernel_test
#     run under qemu-user against its float64 reference; the whole library compiled and linked;
#   - x86-64 without F16C (qemu-x86_64 -cpu max,-f16c): the dispatch must pick the portable kernels;
#   - Windows: the library (scap_onnx_ops.dll) and scap_kernel_test.exe built with MinGW-w64.
# Installs what it needs with apt-get (Debian 12/13, as root). Fails on any failure.
# Usage: bash tools/check_cross_builds.sh [BUILD_ROOT]     (default: build/cross)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-build/cross}
jobs=${SCAP_BUILD_JOBS:-2}

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null && command -v qemu-x86_64 >/dev/null || need+=(qemu-user)
command -v x86_64-w64-mingw32-g++-posix >/dev/null || need+=(g++-mingw-w64-x86-64-posix)
command -v cmake >/dev/null || need+=(cmake)
if [ ${#need[@]} -gt 0 ]; then
  echo "check_cross_builds: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
ort=$(bash tools/get_ort_headers.sh)

build() {  # build DIR TOOLCHAIN|"" CMAKE_ARGS...
  local dir=$1 toolchain=$2
  shift 2
  local args=(-S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_ROOT="$ort" "$@")
  [ -n "$toolchain" ] && args+=(-DCMAKE_TOOLCHAIN_FILE="$PWD/tools/toolchains/$toolchain.cmake")
  cmake --no-warn-unused-cli "${args[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs" >/dev/null
}

echo "== ARM64: kernels under qemu-aarch64, library compiled and linked"
build "$root/aarch64" aarch64-linux-gnu -DSCAP_BUILD_KERNEL_TEST=ON
qemu-aarch64 -L /usr/aarch64-linux-gnu "$root/aarch64/scap_kernel_test" --expect neon
SCAP_ONNX_ISA=portable qemu-aarch64 -L /usr/aarch64-linux-gnu "$root/aarch64/scap_kernel_test" --expect portable
aarch64-linux-gnu-objdump -T "$root/aarch64/libscap_onnx_ops.so" | grep -q ' RegisterCustomOps$'

echo "== x86-64: every kernel set natively, and a CPU without F16C under qemu-x86_64"
build "$root/x86_64" "" -DSCAP_BUILD_KERNEL_TEST=ON -DSCAP_BUILD_LIBRARY=OFF
"$root/x86_64/scap_kernel_test"
SCAP_ONNX_ISA=portable "$root/x86_64/scap_kernel_test" --expect portable
if grep -qw avx2 /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
  SCAP_ONNX_ISA=avx2 "$root/x86_64/scap_kernel_test" --expect avx2
fi
# AVX2 and FMA but no F16C: the AVX2 kernels would die there with an illegal instruction.
qemu-x86_64 -cpu max,-f16c "$root/x86_64/scap_kernel_test" --expect portable

echo "== Windows: MinGW-w64 build of scap_onnx_ops.dll"
build "$root/mingw" x86_64-w64-mingw32 -DSCAP_BUILD_KERNEL_TEST=ON
dll="$root/mingw/scap_onnx_ops.dll"
exports=$(x86_64-w64-mingw32-objdump -p "$dll")
grep -q ' RegisterCustomOps$' <<<"$exports" && grep -q ' ScapOnnxKernelIsa$' <<<"$exports" ||
  { echo "check_cross_builds: $dll does not export RegisterCustomOps and ScapOnnxKernelIsa" >&2; exit 1; }
echo "$dll: $(grep 'DLL Name' <<<"$exports" | awk '{print $3}' | tr '\n' ' ')"
echo "check_cross_builds: all passed"
