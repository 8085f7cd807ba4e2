// The CUDA kernel of ScapSparseMatMul for CUDAExecutionProvider: the shared base (op_base.h) reads
// and checks the node and the shapes; the kernels (kernels.cu, through launch.h) run on the stream
// onnxruntime gives, with scratch from onnxruntime's allocator. No host synchronisation, no
// host-device copies: the call can be captured in a CUDA graph. So threshold_scale's values are
// checked once, when the kernel is made, where the input is a constant initializer (the rewriter
// writes it so); a threshold_scale fed at run time is checked for its type and shape only (a
// negative entry then keeps its channel, a NaN one too).
#pragma once

#include "op_base.h"

namespace scap {

template <typename T>
struct ScapSparseMatMulCudaKernel : KernelShell<ScapSparseMatMulCudaKernel<T>> {
  ScapSparseMatMulCudaKernel(const OrtApi& api, const OrtKernelInfo* info);

 private:
  friend KernelShell<ScapSparseMatMulCudaKernel<T>>;
  using KernelShell<ScapSparseMatMulCudaKernel<T>>::api_;
  using KernelShell<ScapSparseMatMulCudaKernel<T>>::attributes_;

  void Compute(OrtKernelContext* context);
};

template <typename T>
struct ScapSparseMatMulCudaOp : OpSchema<ScapSparseMatMulCudaOp<T>, ScapSparseMatMulCudaKernel<T>, T> {
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};

// The oldest C API the CUDA kernel calls (KernelContext_GetScratchBuffer: onnxruntime 1.18).
constexpr uint32_t kOldestOrtApiCuda = 18;

}  // namespace scap
