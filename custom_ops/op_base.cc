// The parts of ScapSparseMatMul that do not depend on a kernel (see op_base.h).
#include "op_base.h"

#include <cmath>
#include <exception>
#include <new>
#include <stdexcept>

namespace scap {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// True, with `release`d status, when an OrtApi call succeeded.
bool Succeeded(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

// The attribute `name` holds some value that is not a single number (a string or a list).
bool HasNonNumberAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  size_t size = 0;
  return Succeeded(api, api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) ||
         Succeeded(api, api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) ||
         Succeeded(api, api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size));
}

// A numeric attribute stored as FLOAT or INT (onnx.helper stores a Python int as INT). False when
// the node has no such attribute; throws when it has one of another type.
bool ReadNumber(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* value) {
  if (Succeeded(api, api.KernelInfoGetAttribute_float(info, name, value))) return true;
  int64_t integer = 0;
  if (Succeeded(api, api.KernelInfoGetAttribute_int64(info, name, &integer))) {
    *value = static_cast<float>(integer);
    return true;
  }
  if (HasNonNumberAttribute(api, info, name))
    throw std::invalid_argument(std::string("attribute '") + name + "' must be a FLOAT or INT, not a string or list");
  return false;
}

}  // namespace

bool ReadInt(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* value) {
  if (Succeeded(api, api.KernelInfoGetAttribute_int64(info, name, value))) return true;
  float number = 0.0f;
  if (Succeeded(api, api.KernelInfoGetAttribute_float(info, name, &number)) || HasNonNumberAttribute(api, info, name))
    throw std::invalid_argument(std::string("attribute '") + name + "' must be an INT");
  return false;
}

NodeAttributes ReadNodeAttributes(const OrtApi& api, const OrtKernelInfo* info, const char* op_type) {
  NodeAttributes attributes;
  attributes.op_type = op_type;
  attributes.node_name = Ort::ConstKernelInfo(info).GetNodeName();
  try {
    if (!ReadNumber(api, info, "threshold", &attributes.threshold))
      throw std::invalid_argument("missing required attribute 'threshold' (FLOAT >= 0)");
    if (!ReadNumber(api, info, "offset", &attributes.offset)) attributes.offset = 0.0f;
    if (std::isnan(attributes.threshold) || attributes.threshold < 0.0f)
      throw std::invalid_argument("attribute 'threshold' must be >= 0, got " + std::to_string(attributes.threshold));
    if (std::isnan(attributes.offset)) throw std::invalid_argument("attribute 'offset' must not be NaN");
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(op_type) + " node '" + attributes.node_name + "': " + e.what());
  }
  return attributes;
}

MatMulShape CheckShapes(const std::vector<int64_t>& a, const std::vector<int64_t>& b,
                        const std::vector<int64_t>* bias) {
  if (b.size() != 2) throw std::invalid_argument("B must be 2-D [K, N], got shape " + ShapeString(b));
  if (a.empty()) throw std::invalid_argument("A must have rank >= 1, got a scalar");
  MatMulShape shape;
  shape.depth = b[0];
  shape.n = b[1];
  if (a.back() != shape.depth)
    throw std::invalid_argument("A's last dimension must equal B's first: A " + ShapeString(a) + ", B " +
                                ShapeString(b));
  if (shape.depth > kMaxDepth)
    throw std::invalid_argument("K = " + std::to_string(shape.depth) + " is too large: K must be below 2^31");
  if (bias != nullptr && (bias->size() != 1 || (*bias)[0] != shape.n))
    throw std::invalid_argument("bias must have shape [" + std::to_string(shape.n) + "], got " + ShapeString(*bias));
  shape.rows = 1;
  for (size_t i = 0; i + 1 < a.size(); ++i) shape.rows *= a[i];
  shape.y.assign(a.begin(), a.end() - 1);
  shape.y.push_back(shape.n);
  return shape;
}

namespace {

std::string TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return "float16";
    default:
      return "element type " + std::to_string(static_cast<int>(type));
  }
}

}  // namespace

void CheckElementTypes(ONNXTensorElementDataType expected, ONNXTensorElementDataType a, ONNXTensorElementDataType b,
                       ONNXTensorElementDataType bias) {
  if (a != expected || b != expected || (bias != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED && bias != expected))
    throw std::invalid_argument("A, B and bias must have one type, float32 or float16: got A " + TypeName(a) +
                                ", B " + TypeName(b) +
                                (bias != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED ? ", bias " + TypeName(bias) : ""));
}

namespace {

const float* ChannelInput(Ort::KernelContext& context, size_t index, const char* name, int64_t depth) {
  if (index >= context.GetInputCount()) return nullptr;
  const Ort::ConstValue value = context.GetInput(index);
  if (value == nullptr) return nullptr;
  const Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw std::invalid_argument(std::string(name) + " must be float32, got " + TypeName(info.GetElementType()));
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] != depth)
    throw std::invalid_argument(std::string(name) + " must have shape [K] = [" + std::to_string(depth) + "], got " +
                                ShapeString(shape));
  return value.GetTensorData<float>();
}

}  // namespace

ChannelInputs ReadChannelInputs(Ort::KernelContext& context, size_t scale_index, size_t offset_index, int64_t depth) {
  ChannelInputs inputs;
  inputs.threshold_scale = ChannelInput(context, scale_index, "threshold_scale", depth);
  inputs.channel_offset = ChannelInput(context, offset_index, "channel_offset", depth);
  return inputs;
}

void CheckThresholdScale(const float* threshold_scale, int64_t depth) {
  bool bad = false;
  for (int64_t k = 0; k < depth; ++k) bad |= !(threshold_scale[k] >= 0.0f);  // NaN too; a loop that vectorises
  if (!bad) return;
  for (int64_t k = 0; k < depth; ++k) {
    if (!(threshold_scale[k] >= 0.0f))
      throw std::invalid_argument("threshold_scale must be >= 0 and not NaN, got " +
                                  std::to_string(threshold_scale[k]) + " at channel " + std::to_string(k));
  }
}

OrtStatusPtr StatusFromCurrentException(const OrtApi& api, const std::string& node_name,
                                        const char* op_type) noexcept {
  const std::string prefix = node_name.empty() ? "" : std::string(op_type) + " node '" + node_name + "': ";
  try {
    throw;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), (prefix + e.what()).c_str());
  } catch (const std::invalid_argument& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, (prefix + e.what()).c_str());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, (prefix + "out of memory").c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (prefix + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, (prefix + "unknown error").c_str());
  }
}

namespace {

// An input's element type and dimensions (-1 unknown, names of symbolic ones) at inference time.
struct InferredInput {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  std::vector<const char*> names;
};

// False when ONNX Runtime cannot tell (the C API reports an unknown rank as rank 0).
bool ReadInput(const OrtApi& api, OrtShapeInferContext* context, size_t index, InferredInput* input) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  size_t rank = 0;
  if (!Succeeded(api, api.ShapeInferContext_GetInputTypeShape(context, index, &info)) ||
      !Succeeded(api, api.GetTensorElementType(info, &input->type)) ||
      !Succeeded(api, api.GetDimensionsCount(info, &rank)) || rank == 0)
    return false;
  input->dims.resize(rank);
  input->names.resize(rank);
  return Succeeded(api, api.GetDimensions(info, input->dims.data(), rank)) &&
         Succeeded(api, api.GetSymbolicDimensions(info, input->names.data(), rank));
}

// A dimension ONNX Runtime can write: a value, or a symbolic name.
bool Known(const InferredInput& input, size_t i) {
  return input.dims[i] >= 0 || (input.names[i] != nullptr && input.names[i][0] != '\0');
}

}  // namespace

OrtStatusPtr InferOutputShape(const OrtApi& api, OrtShapeInferContext* context, size_t n_input) noexcept {
  try {
    InferredInput a, b;
    if (!ReadInput(api, context, 0, &a) || !ReadInput(api, context, n_input, &b) || b.dims.size() != 2) return nullptr;
    // Y = A's dimensions with the last replaced by B's last; an unnamed unknown one leaves Y unknown
    // (the C API has no way to write it).
    InferredInput y = a;
    y.dims.back() = b.dims[1];
    y.names.back() = b.names[1];
    for (size_t i = 0; i < y.dims.size(); ++i) {
      if (!Known(y, i)) return nullptr;
      if (y.names[i] == nullptr) y.names[i] = "";
      if (y.names[i][0] != '\0') y.dims[i] = -1;
    }
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (!Succeeded(api, api.CreateTensorTypeAndShapeInfo(&info))) return nullptr;
    const bool ok = Succeeded(api, api.SetTensorElementType(info, a.type)) &&
                    Succeeded(api, api.SetDimensions(info, y.dims.data(), y.dims.size())) &&
                    Succeeded(api, api.SetSymbolicDimensions(info, y.names.data(), y.names.size())) &&
                    Succeeded(api, api.ShapeInferContext_SetOutputTypeShape(context, 0, info));
    api.ReleaseTensorTypeAndShapeInfo(info);
    (void)ok;  // a failed inference leaves Y unknown; the kernel still checks at run time
    return nullptr;
  } catch (...) {
    return nullptr;  // std::bad_alloc: no inference, never an exception into onnxruntime
  }
}

}  // namespace scap
