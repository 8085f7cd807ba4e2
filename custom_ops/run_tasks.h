// Tasks in onnxruntime's intra-op thread pool, shared by the CPU kernels.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>

#include "op_base.h"

namespace scap {

// Tasks run by onnxruntime's thread pool must not throw (an exception would cross its C interface
// or end a pool thread): the first failure is kept here and rethrown on the calling thread.
struct TaskBatch {
  void (*task)(void*, size_t);
  void* job;
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::exception_ptr error;
};

inline void RunCaught(void* data, size_t index) noexcept {
  auto& batch = *static_cast<TaskBatch*>(data);
  if (batch.failed.load(std::memory_order_relaxed)) return;
  try {
    batch.task(batch.job, index);
  } catch (...) {
    std::lock_guard<std::mutex> lock(batch.mutex);
    if (!batch.failed.exchange(true)) batch.error = std::current_exception();
  }
}

// Runs tasks [0, count) in onnxruntime's intra-op thread pool, or inline when there is one.
inline void RunTasks(Ort::KernelContext& context, void (*task)(void*, size_t), int64_t count, void* job) {
  if (count == 1) {
    task(job, 0);
    return;
  }
  TaskBatch batch;
  batch.task = task;
  batch.job = job;
  context.ParallelFor(&RunCaught, static_cast<size_t>(count), 0, &batch);
  if (batch.error) std::rethrow_exception(batch.error);
}

}  // namespace scap
