// The tile counters each stream keeps between calls (launch.h: StreamCounters). One buffer per
// (device, stream) serves every node: calls on a stream run one after another and each leaves the
// counters zero.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "launch.h"

namespace scap {
namespace cuda {

int* StreamCounters(void* stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, void*>, int*> counters;  // never freed: streams may outlive any owner
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, stream);
  const auto found = counters.find(key);
  if (found != counters.end()) return found->second;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return nullptr;
  }
  const size_t bytes = static_cast<size_t>(kStreamCounters) * sizeof(int);
  int* data = nullptr;
  if (cudaMalloc(&data, bytes) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (cudaMemsetAsync(data, 0, bytes, s) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(data);
    return nullptr;
  }
  counters.emplace(key, data);
  return data;
}

}  // namespace cuda
}  // namespace scap
