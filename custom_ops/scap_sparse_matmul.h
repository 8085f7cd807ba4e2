// The CPU kernel of ScapSparseMatMul (the contract, attributes and shape checks: op_base.h).
#pragma once

#include <string>

#include "op_base.h"

namespace scap {

template <typename T>
struct ScapSparseMatMulKernel {
  ScapSparseMatMulKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);

  const OrtApi& api_;
  NodeAttributes attributes_;
};

template <typename T>
struct ScapSparseMatMulOp : OpSchema<ScapSparseMatMulOp<T>, ScapSparseMatMulKernel<T>, T> {
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

}  // namespace scap
