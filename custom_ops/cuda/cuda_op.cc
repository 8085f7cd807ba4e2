// ScapSparseMatMul on CUDAExecutionProvider (see cuda_op.h).
#include "cuda_op.h"

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "launch.h"

namespace scap {
namespace {

// Device scratch from onnxruntime's allocator for the output's device, handed back when the call
// returns: onnxruntime's CUDA allocator orders reuse on the compute stream, as for its own kernels.
class Scratch {
 public:
  Scratch(const OrtApi& api, OrtKernelContext* context, const OrtMemoryInfo* memory, size_t bytes) : api_(api) {
    if (bytes == 0) return;
    Ort::ThrowOnError(api.KernelContext_GetAllocator(context, memory, &allocator_));
    Ort::ThrowOnError(api.KernelContext_GetScratchBuffer(context, memory, bytes, &data_));
    if (data_ == nullptr) throw std::runtime_error("no device scratch of " + std::to_string(bytes) + " bytes");
  }
  ~Scratch() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    if (allocator_ != nullptr) api_.ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* data() const { return data_; }

 private:
  const OrtApi& api_;
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

// Checks threshold_scale's values (CheckThresholdScale) when it is a constant initializer.
void CheckConstantThresholdScale(const OrtApi& api, const OrtKernelInfo* info) {
  size_t inputs = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &inputs));
  if (inputs <= kThresholdScaleInput) return;
  int is_constant = 0;
  const OrtValue* value = nullptr;
  Ort::ThrowOnError(api.KernelInfoGetConstantInput_tensor(info, kThresholdScaleInput, &is_constant, &value));
  if (!is_constant || value == nullptr) return;
  const Ort::ConstValue scale(value);
  const Ort::TensorTypeAndShapeInfo shape = scale.GetTensorTypeAndShapeInfo();
  if (shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return;  // the call says what is wrong
  const size_t count = shape.GetElementCount();
  std::vector<float> host(count);
  if (scale.GetTensorMemoryInfo().GetDeviceType() == OrtMemoryInfoDeviceType_CPU) {
    const float* data = scale.GetTensorData<float>();
    host.assign(data, data + count);
  } else if (count > 0) {
    const int error = cuda::CopyToHost(host.data(), scale.GetTensorRawData(), count * sizeof(float));
    if (error != 0) throw std::runtime_error(std::string("CUDA copy of threshold_scale: ") + cuda::ErrorString(error));
  }
  CheckThresholdScale(host.data(), static_cast<int64_t>(count));
}

template <typename T>
constexpr cuda::DType kDType = std::is_same<T, float>::value ? cuda::DType::kFloat32 : cuda::DType::kFloat16;

}  // namespace

template <typename T>
ScapSparseMatMulCudaKernel<T>::ScapSparseMatMulCudaKernel(const OrtApi& api, const OrtKernelInfo* info)
    : KernelShell<ScapSparseMatMulCudaKernel<T>>(api, info) {
  try {
    CheckConstantThresholdScale(api, info);
  } catch (const std::exception& e) {  // CreateKernelV2 adds no node name: the message carries it
    throw std::invalid_argument(std::string(kOpType) + " node '" + attributes_.node_name + "': " + e.what());
  }
}

template <typename T>
void ScapSparseMatMulCudaKernel<T>::Compute(OrtKernelContext* raw_context) {
  Ort::KernelContext context(raw_context);
  const Ort::ConstValue a = context.GetInput(0);
  const Ort::ConstValue b = context.GetInput(1);
  const Ort::ConstValue bias = context.GetInputCount() > 2 ? context.GetInput(2) : Ort::ConstValue{nullptr};
  std::vector<int64_t> bias_shape;
  if (bias != nullptr) bias_shape = bias.GetTensorTypeAndShapeInfo().GetShape();
  const MatMulShape shape = CheckShapes(a.GetTensorTypeAndShapeInfo().GetShape(),
                                        b.GetTensorTypeAndShapeInfo().GetShape(),
                                        bias != nullptr ? &bias_shape : nullptr);
  const ChannelInputs channels = ReadChannelInputs(context, kThresholdScaleInput, kChannelOffsetInput, shape.depth);
  Ort::UnownedValue y = context.GetOutput(0, shape.y);
  if (shape.rows == 0 || shape.n == 0) return;

  const cuda::Problem problem{kDType<T>, shape.rows, shape.depth, shape.n, attributes_.threshold, attributes_.offset,
                              channels.threshold_scale, channels.channel_offset};
  const Ort::ConstMemoryInfo memory = y.GetTensorMemoryInfo();
  const int sm_count = cuda::SmCount(memory.GetDeviceId());
  if (sm_count <= 0) throw std::runtime_error(std::string("CUDA device query: ") + cuda::ErrorString(-sm_count));
  Scratch scratch(api_, raw_context, memory, cuda::ScratchBytes(problem, sm_count));
  void* stream = context.GetGPUComputeStream();
  const int error = cuda::Enqueue(problem, a.GetTensorRawData(), b.GetTensorRawData(),
                                  bias != nullptr ? bias.GetTensorRawData() : nullptr, y.GetTensorMutableRawData(),
                                  scratch.data(), cuda::StreamCounters(stream), sm_count, stream);
  if (error != 0) throw std::runtime_error(std::string("CUDA launch: ") + cuda::ErrorString(error));
}

template struct ScapSparseMatMulCudaKernel<float>;
template struct ScapSparseMatMulCudaKernel<Ort::Float16_t>;

}  // namespace scap
