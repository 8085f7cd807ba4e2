// Constant weights backed by 2 MiB pages where the OS can do it in place. Decoding reads B's kept rows
// scattered over tens of MiB per node; with 4 KiB pages many of those reads also miss the TLB. Linux
// only (elsewhere nothing happens), and only in place: memory that onnxruntime allocated for an
// initializer gets its 2 MiB-aligned interior advised (MADV_HUGEPAGE) and collapsed (MADV_COLLAPSE);
// a file mapping of external data, or a kernel without transparent huge pages, refuses and stays as
// it was (HugePageInput then copies it). SCAP_ONNX_HUGE_PAGES=0 turns it off.
#pragma once

#include <cstddef>

#include "op_base.h"  // onnxruntime's C++ API, set up as every file of the library includes it

namespace scap {

// What became of a request to back memory with 2 MiB pages in place.
enum class HugePages { kDone, kRefused, kNotTried };

// [data, data + bytes): the 2 MiB pages wholly inside it. kRefused where the kernel would not collapse
// them (a file mapping, for one); kNotTried where there are none, on other systems, or when turned off.
HugePages BackWithHugePages(const void* data, size_t bytes);

// Input `index` of the node, where it is a constant initializer of float32, float16 or uint8, in place.
HugePages BackConstantInputWithHugePages(const OrtApi& api, const OrtKernelInfo* info, size_t index);

// A constant input that the kernels read from 2 MiB pages: in place where that works; where the
// kernel refuses (onnxruntime maps external data from the model's file) a private copy in 2 MiB
// pages, as MatMulNBits keeps a prepacked copy of its weights (the file's pages stay in the page
// cache, where the system can reclaim them). data() is that copy, or nullptr: read the input.
class HugePageInput {
 public:
  HugePageInput(const OrtApi& api, const OrtKernelInfo* info, size_t index);
  ~HugePageInput();
  HugePageInput(const HugePageInput&) = delete;
  HugePageInput& operator=(const HugePageInput&) = delete;
  const void* data() const { return copy_; }

 private:
  void* copy_ = nullptr;
};

}  // namespace scap
