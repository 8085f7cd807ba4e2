// Host entry to the CUDA kernels of ScapSparseMatMul (kernels.cu), for the onnxruntime kernel and
// for tools/gpu_check.sh's program. No CUDA headers here: host code built by the C++ compiler
// includes it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace scap {
namespace cuda {

enum class DType { kFloat32, kFloat16 };

// Y [m, n] = drop(A [m, k] - offset - channel_offset) @ B [k, n] (+ bias [n]), row-major, T = dtype;
// threshold_scale and channel_offset: [k] float32 on the device, or null (op_base.h).
struct Problem {
  DType dtype;
  int64_t m, k, n;
  float threshold, offset;
  const float* threshold_scale = nullptr;
  const float* channel_offset = nullptr;
};

// Copies `bytes` from device memory to the host, synchronously (kernel creation only, never in a
// call); returns a cudaError_t as int (0: success).
int CopyToHost(void* host, const void* device, size_t bytes);

// Bytes of device scratch a call needs (0 when none); sm_count: the device's multiprocessors.
size_t ScratchBytes(const Problem& problem, int sm_count);

// Tile counters a stream keeps between calls: the last block of a split tile zeroes its counter
// again, so a call that finds them zero leaves them zero and the next call on the stream needs no
// memset. kStreamCounters ints of device memory.
constexpr int64_t kStreamCounters = 4096;

// Enqueues the call on `stream` (a cudaStream_t) and returns a cudaError_t as int (0: success).
// No host synchronisation and no allocation: `scratch` holds ScratchBytes() bytes of device memory
// (256-byte aligned) that the call may use until the stream reaches its end. a, b, y on the device;
// bias may be null. `counters`: the stream's kept counters (StreamCounters), or null, and the call
// then zeroes counters in its scratch.
int Enqueue(const Problem& problem, const void* a, const void* b, const void* bias, void* y, void* scratch,
            int* counters, int sm_count, void* stream);

// The kept counters of `stream` on the current device, allocated and zeroed on the stream at the
// first call for it; null when the stream is being captured into a CUDA graph and has none yet (no
// allocation is allowed then), or when the allocation fails. Live as long as the process.
int* StreamCounters(void* stream);

// The device's multiprocessor count (cached per device), or a cudaError_t as a negative number.
int SmCount(int device);

// The error's name and text, for messages.
const char* ErrorString(int error);

}  // namespace cuda
}  // namespace scap
