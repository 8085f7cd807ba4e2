// The CUDA kernel of ScapSparseMatMul for CUDAExecutionProvider: the shared base (op_base.h) reads
// and checks the node and the shapes; the kernels (kernels.cu, through launch.h) run on the stream
// onnxruntime gives, with scratch from onnxruntime's allocator. No host synchronisation, no
// host-device copies: the call can be captured in a CUDA graph.
#pragma once

#include "op_base.h"

namespace scap {

template <typename T>
struct ScapSparseMatMulCudaKernel {
  ScapSparseMatMulCudaKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);

  const OrtApi& api_;
  NodeAttributes attributes_;
};

template <typename T>
struct ScapSparseMatMulCudaOp : OpSchema<ScapSparseMatMulCudaOp<T>, ScapSparseMatMulCudaKernel<T>, T> {
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};

// The oldest C API the CUDA kernel calls (KernelContext_GetScratchBuffer: onnxruntime 1.18).
constexpr uint32_t kOldestOrtApiCuda = 18;

}  // namespace scap
