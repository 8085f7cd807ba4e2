// The CPU kernel of ScapSparseMatMul (the contract, attributes and shape checks: op_base.h).
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "op_base.h"
#include "sparse_gemm.h"

namespace scap {

// Which arithmetic several rows of A get, read from SCAP_ONNX_GEMM when a kernel is made (so that a
// benchmark can compare sessions made under different values in one process): sparse, packed,
// packed_rows or dense force one (sparse: the row-skipping kernels over B as it lies; packed: over B
// packed once, register tiles over the rows' union of kept rows; packed_rows: over B packed once,
// each row of A over its own kept rows; dense: onnxruntime's Gemm), panels the row-skipping kernels
// that copy B into panels for few rows too (tests of their tasks); otherwise the kernel chooses per
// call.
enum class GemmPolicy { kChoose, kSparse, kPanels, kDense, kPacked, kPackedRows };

template <typename T>
struct ScapSparseMatMulKernel : KernelShell<ScapSparseMatMulKernel<T>> {
  ScapSparseMatMulKernel(const OrtApi& api, const OrtKernelInfo* info);
  ~ScapSparseMatMulKernel();
  ScapSparseMatMulKernel(const ScapSparseMatMulKernel&) = delete;
  ScapSparseMatMulKernel& operator=(const ScapSparseMatMulKernel&) = delete;

 private:
  friend KernelShell<ScapSparseMatMulKernel<T>>;
  using KernelShell<ScapSparseMatMulKernel<T>>::api_;
  using KernelShell<ScapSparseMatMulKernel<T>>::attributes_;

  void Compute(OrtKernelContext* context);
  // Y = D @ B (+ bias) by onnxruntime's own Gemm on the sparsified rows of A; false (Y unspecified)
  // when the runtime has no Gemm here or Y came out with Inf or NaN, which a dropped activation's
  // zero times an Inf or NaN in B may have made.
  bool DenseGemm(OrtKernelContext* context, const float* d, int64_t rows, int64_t depth, int64_t n,
                 const OrtValue* b, const OrtValue* bias, float* y);

  // B packed for the several-rows kernels (PackedB), made on the first call that wants it; nullptr
  // where B is not a constant initializer (its contents could change between calls).
  const PackedB* Packed(OrtKernelContext* context);

  // onnxruntime's CPU Gemm (float32), without and with the bias input; nullptr where it cannot be
  // created (float16 kernels, or a runtime without OrtApi::CreateOp).
  OrtOp* gemm_ = nullptr;
  OrtOp* gemm_bias_ = nullptr;
  OrtMemoryInfo* cpu_memory_ = nullptr;
  GemmPolicy policy_ = GemmPolicy::kChoose;

  // B when it is a constant initializer (float32 only), and its packed copy: a second copy of the
  // weights in memory, made only where several rows of A are multiplied.
  const OrtValue* b_constant_ = nullptr;
  std::once_flag pack_once_;
  std::vector<float> packed_;
  std::vector<uint8_t> packed_finite_;
  PackedB packed_b_{};
  bool packed_ready_ = false;
};

template <typename T>
struct ScapSparseMatMulOp : OpSchema<ScapSparseMatMulOp<T>, ScapSparseMatMulKernel<T>, T> {
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

}  // namespace scap
