#include "huge_pages.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>

#include <cerrno>
#include <fstream>
#include <string>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1; older C headers lack the name
#endif
#endif

namespace scap {
namespace {

constexpr uintptr_t kHuge = uintptr_t{1} << 21;

// Bytes of one element of a constant input the kernels read (0: not one of them).
size_t ElementBytes(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return 1;
    default: return 0;
  }
}

// Input `index` when it is a constant initializer of a type above: its bytes.
bool ConstantInput(const OrtApi& api, const OrtKernelInfo* info, size_t index, const void** data, size_t* bytes) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return false;
  }
  if (is_constant == 0 || value == nullptr) return false;
  const Ort::ConstValue tensor(value);
  const Ort::TensorTypeAndShapeInfo type = tensor.GetTensorTypeAndShapeInfo();
  const size_t element = ElementBytes(type.GetElementType());
  if (element == 0) return false;
  *data = tensor.GetTensorRawData();
  *bytes = type.GetElementCount() * element;
  return true;
}

#if defined(__linux__)
bool TurnedOff() {
  const char* setting = std::getenv("SCAP_ONNX_HUGE_PAGES");
  return setting != nullptr && std::strcmp(setting, "0") == 0;
}

// Whether transparent huge pages are on at all ("never" in sysfs turns off what a copy would get).
bool SystemHasHugePages() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  return std::getline(f, line) && line.find("[never]") == std::string::npos;
}
#endif

}  // namespace

HugePages BackWithHugePages(const void* data, size_t bytes) {
#if defined(__linux__)
  if (TurnedOff()) return HugePages::kNotTried;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end <= begin) return HugePages::kNotTried;
  void* interior = reinterpret_cast<void*>(begin);
  // Hints: the contents stay as they are whether or not the kernel complies.
  madvise(interior, end - begin, MADV_HUGEPAGE);
  if (madvise(interior, end - begin, MADV_COLLAPSE) == 0) return HugePages::kDone;
  return errno == EINVAL ? HugePages::kRefused : HugePages::kNotTried;
#else
  (void)data;
  (void)bytes;
  return HugePages::kNotTried;
#endif
}

HugePages BackConstantInputWithHugePages(const OrtApi& api, const OrtKernelInfo* info, size_t index) {
  const void* data = nullptr;
  size_t bytes = 0;
  return ConstantInput(api, info, index, &data, &bytes) ? BackWithHugePages(data, bytes) : HugePages::kNotTried;
}

HugePageInput::HugePageInput(const OrtApi& api, const OrtKernelInfo* info, size_t index) {
#if defined(__linux__)
  const void* data = nullptr;
  size_t bytes = 0;
  if (!ConstantInput(api, info, index, &data, &bytes) || BackWithHugePages(data, bytes) != HugePages::kRefused ||
      !SystemHasHugePages()) {
    return;
  }
  const size_t rounded = (bytes + kHuge - 1) & ~(kHuge - 1);
  void* copy = std::aligned_alloc(kHuge, rounded);
  if (copy == nullptr) return;  // no memory for a copy: the kernels read the input
  madvise(copy, rounded, MADV_HUGEPAGE);  // before the first touch, so that the copy faults in 2 MiB pages
  std::memcpy(copy, data, bytes);
  copy_ = copy;
#else
  (void)api;
  (void)info;
  (void)index;
#endif
}

HugePageInput::~HugePageInput() { std::free(copy_); }

}  // namespace scap
