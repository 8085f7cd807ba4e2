// What every ScapSparseMatMul kernel shares, whichever execution provider runs it (the CPU kernel
// here, a CUDA kernel beside it): the op's name and schema for ONNX Runtime, the node's attributes
// read and checked, the checks of the inputs' shapes, Y's shape (at run time and for ONNX Runtime's
// shape inference), and exceptions turned into an OrtStatus that names the node. Free of kernels.
//
//   inputs     A: T [..., K] (rank >= 1, K < 2^31); B: T [K, N]; bias (optional): T [N];
//              threshold_scale (optional): float32 [K], entries >= 0 (+inf allowed);
//              channel_offset (optional): float32 [K]
//   output     Y: T [..., N]
//   attributes threshold: float >= 0 (required); offset: float (default 0); INT values are taken
//   T          float32 or float16, accumulated in float32
//   semantics  D[.., k] = A[.., k] - offset - channel_offset[k] (absent: 0); D[.., k] is dropped iff
//              |D[.., k]| <= threshold * threshold_scale[k] (absent: 1; where that is 0 * inf, the
//              scale: 0 keeps, +inf drops); Y = D_kept @ B (+ bias)
#pragma once

#if defined(_WIN32) && !defined(_MSC_VER) && !defined(_Return_type_success_)
// MinGW-w64: onnxruntime's C header uses this SAL annotation on Windows but defines it for MSVC only.
#define _Return_type_success_(expr)
#endif
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <string>
#include <vector>

namespace scap {

constexpr const char* kDomain = "com.scap";
constexpr const char* kOpType = "ScapSparseMatMul";
constexpr const char* kOpTypeNBits = "ScapSparseMatMulNBits";  // scap_sparse_matmul_nbits.h

// Kernels index A's kept elements with int32: K must stay below 2^31.
constexpr int64_t kMaxDepth = 2147483647;

// Positions of the optional per-channel inputs: ScapSparseMatMul's after bias; ScapSparseMatMulNBits'
// after its bias too (scap_sparse_matmul_nbits.h).
constexpr size_t kThresholdScaleInput = 3, kChannelOffsetInput = 4;
constexpr size_t kThresholdScaleInputNBits = 5, kChannelOffsetInputNBits = 6;

// The oldest ONNX Runtime C API the library calls (onnxruntime 1.17: KernelContext_ParallelFor and
// custom-op shape inference). register.cc negotiates down to it.
constexpr uint32_t kOldestOrtApi = 17;

// The ONNX element type of T (float or Ort::Float16_t).
template <typename T>
struct ElementType;
template <>
struct ElementType<float> {
  static constexpr ONNXTensorElementDataType kValue = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
template <>
struct ElementType<Ort::Float16_t> {
  static constexpr ONNXTensorElementDataType kValue = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
};

// A node's attributes, checked.
struct NodeAttributes {
  std::string node_name;
  const char* op_type = kOpType;  // the op, for messages
  float threshold = 0.0f;
  float offset = 0.0f;
};

// Reads threshold (required) and offset (default 0), as FLOAT or INT attributes; throws
// std::invalid_argument naming the node (an op_type node) when one is missing, of another type,
// NaN, or threshold < 0.
NodeAttributes ReadNodeAttributes(const OrtApi& api, const OrtKernelInfo* info, const char* op_type = kOpType);

// An INT attribute into `value`: false when the node has no attribute `name`; throws
// std::invalid_argument when it has one of another type (read as "missing", or as 0, it would hide
// what is wrong).
bool ReadInt(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* value);

// One call's sizes, from the inputs' shapes.
struct MatMulShape {
  int64_t rows = 0;   // product of A's leading dimensions
  int64_t depth = 0;  // K
  int64_t n = 0;      // N
  std::vector<int64_t> y;
};

// Checks A, B and bias (nullptr when absent) against the contract; throws std::invalid_argument
// saying what is wrong (the caller adds the node's name).
MatMulShape CheckShapes(const std::vector<int64_t>& a, const std::vector<int64_t>& b,
                        const std::vector<int64_t>* bias);

// A node's per-channel vectors as given to a kernel: float32 [K] each, nullptr where absent.
struct ChannelInputs {
  const float* threshold_scale = nullptr;
  const float* channel_offset = nullptr;
};

// Reads inputs scale_index and offset_index (absent or beyond the node's inputs: nullptr) and checks
// their types and shapes (float32 [depth]); throws std::invalid_argument saying what is wrong. The
// values are not read (on CUDA they lie on the device): see CheckThresholdScale.
ChannelInputs ReadChannelInputs(Ort::KernelContext& context, size_t scale_index, size_t offset_index, int64_t depth);

// Throws std::invalid_argument unless every threshold_scale entry (host memory) is >= 0 (+inf
// allowed) and not NaN.
void CheckThresholdScale(const float* threshold_scale, int64_t depth);

// Throws std::invalid_argument unless A, B and bias (UNDEFINED when absent) are all of type
// `expected`. A defence: onnxruntime picks kernels by type (1.17 casts a float16 A beside a float32
// B and runs the float32 kernel; later releases reject the node), so no kernel reads the wrong type.
void CheckElementTypes(ONNXTensorElementDataType expected, ONNXTensorElementDataType a, ONNXTensorElementDataType b,
                       ONNXTensorElementDataType bias);

// The exception being handled, as an OrtStatus whose message names the node (when node_name is
// not empty). Call from a catch block only.
OrtStatusPtr StatusFromCurrentException(const OrtApi& api, const std::string& node_name,
                                        const char* op_type = kOpType) noexcept;

// ONNX Runtime's shape inference for the node: Y gets A's element type and shape [..., N] when the
// ranks and dimensions are known (a dimension may be symbolic); otherwise Y is left unknown. N is
// the last dimension of the 2-D input n_input (B [K, N]; the NBits op's scales [k_blocks, N]).
OrtStatusPtr InferOutputShape(const OrtApi& api, OrtShapeInferContext* context, size_t n_input = 1) noexcept;

// What every kernel of the library shares: the node's attributes, read once when the kernel is
// made, and ComputeV2, which runs Derived::Compute(OrtKernelContext*) and turns any exception into
// an error naming the node (so nothing throws through onnxruntime's C interface). Derived
// declares `friend KernelShell<Derived>;` when its Compute is private.
template <typename Derived>
struct KernelShell {
  KernelShell(const OrtApi& api, const OrtKernelInfo* info, const char* op_type = kOpType)
      : api_(api), attributes_(ReadNodeAttributes(api, info, op_type)), op_type_(op_type) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      static_cast<Derived*>(this)->Compute(context);
      return nullptr;
    } catch (...) {
      return StatusFromCurrentException(api_, attributes_.node_name, op_type_);
    }
  }

 protected:
  const OrtApi& api_;
  NodeAttributes attributes_;
  const char* op_type_;
};

// The op's schema for ONNX Runtime, one per element type T. TOp (the derived op) adds
// GetExecutionProviderType; TKernel has TKernel(const OrtApi&, const OrtKernelInfo*) and
// OrtStatusPtr ComputeV2(OrtKernelContext*) noexcept.
template <typename TOp, typename TKernel, typename T>
struct OpSchema : Ort::CustomOpBase<TOp, TKernel, /*WithStatus=*/true> {
  OpSchema() {
    // ONNX Runtime keeps one schema per op name: this function serves every T, reading A's type.
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* context) -> OrtStatusPtr {
      return InferOutputShape(Ort::GetApi(), context);
    };
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    try {
      *kernel = new TKernel(api, info);
      return nullptr;
    } catch (...) {
      return StatusFromCurrentException(api, "");  // the kernel's messages name the node
    }
  }

  const char* GetName() const { return kOpType; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index >= kThresholdScaleInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ElementType<T>::kValue;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>::kValue; }
};

}  // namespace scap
