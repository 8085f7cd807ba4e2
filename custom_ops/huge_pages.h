// Constant weights backed by 2 MiB pages where the OS can do it in place. Decoding reads B's kept rows
// scattered over tens of MiB per node; with 4 KiB pages many of those reads also miss the TLB. Linux
// only (elsewhere nothing happens), and only in place: memory that onnxruntime allocated for an
// initializer gets its 2 MiB-aligned interior advised (MADV_HUGEPAGE) and collapsed (MADV_COLLAPSE);
// a file mapping of external data, or a kernel without transparent huge pages, refuses and stays as
// it was. SCAP_ONNX_HUGE_PAGES=0 turns it off.
#pragma once

#include <cstddef>

#include "op_base.h"  // onnxruntime's C++ API, set up as every file of the library includes it

namespace scap {

// [data, data + bytes): the 2 MiB pages wholly inside it.
void BackWithHugePages(const void* data, size_t bytes);

// Input `index` of the node, where it is a constant initializer of float32, float16 or uint8.
void BackConstantInputWithHugePages(const OrtApi& api, const OrtKernelInfo* info, size_t index);

}  // namespace scap
