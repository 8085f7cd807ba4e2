// CPU emulation of the small part of CUDA that custom_ops/cuda/kernels.cu uses, so that
// tests/cuda_emu_test.cc runs the real kernels on machines without a GPU: each block's threads
// are user-space contexts (ucontext) switched at __syncthreads and __ballot_sync, which wait for
// every thread of the block (the kernels call both only in block-uniform code; a divergent barrier
// aborts). Shared memory is static storage (blocks run one after another). Device memory is host
// memory. Not emulated: the memory model (fences are no-ops), timing, anything not used.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

struct Thread {
  ucontext_t context;
  dim3 index;
  bool done = false, waiting = false, predicate = false;
  uint32_t ballot = 0;
};

struct Block {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  int current = 0;
  dim3 block, grid, block_dim;
  std::function<void()> body;
};

inline Block& State() {
  static Block state;
  return state;
}

inline const dim3& ThreadIdx() { return State().threads[static_cast<size_t>(State().current)].index; }
inline const dim3& BlockIdx() { return State().block; }
inline const dim3& GridDim() { return State().grid; }
inline const dim3& BlockDim() { return State().block_dim; }

// Waits until every thread of the block has arrived.
inline void Barrier() {
  Block& s = State();
  Thread& t = s.threads[static_cast<size_t>(s.current)];
  t.waiting = true;
  swapcontext(&t.context, &s.scheduler);
}

inline void Entry() {
  Block& s = State();
  s.body();
  s.threads[static_cast<size_t>(s.current)].done = true;
}

// Runs one block of `threads` threads to completion.
inline void RunBlock(unsigned threads) {
  Block& s = State();
  constexpr size_t kStack = 256 * 1024;
  s.threads.assign(threads, Thread{});
  if (s.stacks.size() < threads) s.stacks.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    Thread& t = s.threads[i];
    t.index = dim3(i, 0, 0);
    s.stacks[i].resize(kStack);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].data();
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, &Entry, 0);
  }
  for (;;) {
    for (unsigned i = 0; i < threads; ++i) {
      if (s.threads[i].done || s.threads[i].waiting) continue;
      s.current = static_cast<int>(i);
      swapcontext(&s.scheduler, &s.threads[i].context);
    }
    unsigned done = 0, waiting = 0;
    for (const Thread& t : s.threads) {
      done += t.done;
      waiting += t.waiting;
    }
    if (done == threads) return;
    if (done != 0 || waiting != threads) {
      std::fprintf(stderr, "emu: divergent barrier in block (%u, %u, %u): %u threads done, %u waiting\n", s.block.x,
                   s.block.y, s.block.z, done, waiting);
      std::abort();
    }
    // Everyone arrived: the warps' ballots, then release.
    for (unsigned w = 0; w * 32 < threads; ++w) {
      uint32_t mask = 0;
      for (unsigned l = 0; l < 32 && w * 32 + l < threads; ++l) mask |= uint32_t{s.threads[w * 32 + l].predicate} << l;
      for (unsigned l = 0; l < 32 && w * 32 + l < threads; ++l) s.threads[w * 32 + l].ballot = mask;
    }
    for (Thread& t : s.threads) t.waiting = false;
  }
}

template <typename... Params, typename... Args>
void Launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  Block& s = State();
  s.grid = grid;
  s.block_dim = block;
  s.body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block = dim3(x, y, z);
        RunBlock(block.x);
      }
}

}  // namespace emu

#define threadIdx (::emu::ThreadIdx())
#define blockIdx (::emu::BlockIdx())
#define gridDim (::emu::GridDim())
#define blockDim (::emu::BlockDim())

inline void __syncthreads() { emu::Barrier(); }
inline uint32_t __ballot_sync(uint32_t, bool predicate) {
  emu::Block& s = emu::State();
  s.threads[static_cast<size_t>(s.current)].predicate = predicate;
  emu::Barrier();
  return s.threads[static_cast<size_t>(s.current)].ballot;
}
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
template <class Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 4;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 4;
  return cudaSuccess;
}
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
