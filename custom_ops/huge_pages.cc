#include "huge_pages.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1; older C headers lack the name
#endif
#endif

namespace scap {

void BackWithHugePages(const void* data, size_t bytes) {
#if defined(__linux__)
  const char* setting = std::getenv("SCAP_ONNX_HUGE_PAGES");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return;
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  void* interior = reinterpret_cast<void*>(begin);
  // Hints: the contents stay as they are whether or not the kernel complies.
  madvise(interior, end - begin, MADV_HUGEPAGE);
  madvise(interior, end - begin, MADV_COLLAPSE);
#else
  (void)data;
  (void)bytes;
#endif
}

void BackConstantInputWithHugePages(const OrtApi& api, const OrtKernelInfo* info, size_t index) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return;
  }
  if (is_constant == 0 || value == nullptr) return;
  const Ort::ConstValue tensor(value);
  const Ort::TensorTypeAndShapeInfo type = tensor.GetTensorTypeAndShapeInfo();
  size_t element_bytes = 0;
  switch (type.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: element_bytes = 4; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: element_bytes = 2; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: element_bytes = 1; break;
    default: return;
  }
  BackWithHugePages(tensor.GetTensorRawData(), type.GetElementCount() * element_bytes);
}

}  // namespace scap
