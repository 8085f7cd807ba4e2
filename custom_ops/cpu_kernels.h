// The CPU ops' view of the kernels: how they hold an element type T (float, or the bits of a
// float16) and the kernel set the dispatch chose for it (sparse_gemm.h, dispatch.cc).
#pragma once

#include <cstdint>

#include "onnxruntime_cxx_api.h"
#include "sparse_gemm.h"

namespace scap {

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using Bits = float;
};
template <>
struct Traits<Ort::Float16_t> {
  using Bits = uint16_t;
};

template <typename Bits>
const KernelSet<Bits>& Kernels();
template <>
inline const KernelSet<float>& Kernels<float>() { return SelectKernels().f32; }
template <>
inline const KernelSet<uint16_t>& Kernels<uint16_t>() { return SelectKernels().f16; }

}  // namespace scap
