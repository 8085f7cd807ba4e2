// ScapSparseMatMul: the operator contract (shared/DESIGN.md) and its CPU kernel for ONNX Runtime.
//
//   inputs     A: T [..., K] (rank >= 1); B: T [K, N]; bias (optional): T [N]
//   output     Y: T [..., N]
//   attributes threshold: float >= 0 (required); offset: float (default 0)
//   T          float32 or float16, accumulated in float32
//   semantics  D = A - offset; D[i] is dropped iff |D[i]| <= threshold; Y = D_kept @ B (+ bias)
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

namespace scap {

constexpr const char* kDomain = "com.scap";
constexpr const char* kOpType = "ScapSparseMatMul";

template <typename T>
struct ScapSparseMatMulKernel {
  ScapSparseMatMulKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept;

 private:
  void Compute(OrtKernelContext* context);

  const OrtApi& api_;
  std::string node_name_;
  float threshold_ = 0.0f;
  float offset_ = 0.0f;
};

template <typename T>
struct ScapSparseMatMulOp : Ort::CustomOpBase<ScapSparseMatMulOp<T>, ScapSparseMatMulKernel<T>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept;
  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return GetInputType(0); }
};

}  // namespace scap
