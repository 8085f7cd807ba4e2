// CUDA kernels of ScapSparseMatMul (the contract: custom_ops/op_base.h), float16 and
// float32, accumulated in float32. Index arithmetic lives in plan.h, where the host tests reach it.
//
// One row of A (decoding), GemvKernel: a block per (column tile, split of K). Each block applies the
// drop rule to its split of A a window at a time, compacts the kept indices and values into shared
// memory, then its warps stream the kept rows of B over the tile, 16 bytes a lane. The warps' sums
// are added in warp order, the splits' partial sums in split order by the last block of the tile
// to finish: the result does not depend on scheduling.
//
// Several rows, GemmKernel: a block per (column tile, row tile, split of K) compacts, a window at a
// time, the kept rows of B of its row tile (the union of its rows' kept elements) and multiplies in
// steps of bk kept rows (tensor cores for float16, CUDA cores for float32), the splits added as
// above.
//
// Nothing here allocates or synchronises with the host: the scratch comes from the caller, and so do
// the tile counters a stream keeps between calls (counters.cc), which spare each call a memset.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "launch.h"
#include "plan.h"

namespace scap {
namespace cuda {
namespace {

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ void Unpack(const uint4& raw, float (&out)[4]) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

// Type punning through unions, which nvcc, gcc and clang define (a cast pointer would not be).
union HalfVector {
  uint4 raw;
  __half2 pairs[4];
  __half e[8];
};
union FloatVector {
  uint4 raw;
  float e[4];
};
template <typename T>
using Vector = typename std::conditional<std::is_same<T, float>::value, FloatVector, HalfVector>::type;

__device__ __forceinline__ void Unpack(const uint4& raw, float (&out)[8]) {
  HalfVector v;
  v.raw = raw;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(v.pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The `count` elements of T at p (16 bytes' worth or fewer), zero-filled: one 16-byte load when
// the row is aligned and the vector whole. B is read once per call: streamed past the caches.
template <typename T>
__device__ __forceinline__ uint4 LoadVector(const T* p, int count, bool vector_ok) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector_ok && count == kVec) return __ldcs(reinterpret_cast<const uint4*>(p));
  Vector<T> v;
  v.raw = make_uint4(0, 0, 0, 0);
  for (int i = 0; i < count; ++i) v.e[i] = p[i];
  return v.raw;
}

// One compaction round: thread t holds element `element` of the window and whether it is kept.
// The kept ones are appended in ascending order at idx[kept...] (and their values at val, if
// given). Returns the new count, the same on every thread. Every thread of the block must call it.
__device__ __forceinline__ int AppendRound(bool keep, int element, float value, int kept, int* idx, float* val,
                                           uint32_t* masks) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t mask = __ballot_sync(0xffffffffu, keep);
  if (lane == 0) masks[warp] = mask;
  __syncthreads();
  if (keep) {
    const int position = kept + CompactPosition(masks, warp, lane);
    idx[position] = element;
    if (val != nullptr) val[position] = value;
  }
  const int total = kept + RoundKept(masks);
  __syncthreads();  // the next round rewrites masks
  return total;
}

// The block's sums over its split for output rows [m0, m1) x columns [n0, n1), at tile[r * ld + c].
// K not split: Y = sums (+ bias). Split: the block writes its partial sums; the last block of the
// output tile to finish (counted in *counter, zeroed before the launch) adds every split's partial
// sums in split order (+ bias) into Y, and zeroes the counter again.
template <typename T>
__device__ void FinishTile(const float* tile, int ld, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t n,
                           int64_t split, int64_t splits, int64_t m, const T* bias, T* y, float* partials,
                           int* counter) {
  __shared__ int last;
  const int cols = static_cast<int>(n1 - n0);
  const int count = static_cast<int>(m1 - m0) * cols;
  if (splits > 1) {
    float* mine = partials + split * m * n;
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int r = e / cols, c = e % cols;
      mine[(m0 + r) * n + n0 + c] = tile[r * ld + c];
    }
    __threadfence();  // the partial sums reach L2 before the count says so
    __syncthreads();
    if (threadIdx.x == 0) {
      last = atomicAdd(counter, 1) == splits - 1;
      if (last) *counter = 0;  // zero again for the next call (stream order puts it after this one)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
  }
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int r = e / cols, c = e % cols;
    const int64_t at = (m0 + r) * n + n0 + c;
    float v = 0.0f;
    if (splits > 1) {
      for (int64_t s = 0; s < splits; ++s) v += __ldcg(partials + s * m * n + at);  // L2: other SMs wrote them
    } else {
      v = tile[r * ld + c];
    }
    if (bias != nullptr) v += ToFloat(bias[n0 + c]);
    y[at] = FromFloat<T>(v);
  }
}

// ---- One row of A ----

template <typename T>
__global__ void __launch_bounds__(kThreads) GemvKernel(const T* __restrict__ a, const T* __restrict__ b,
                                                       const T* __restrict__ bias, T* __restrict__ y, int64_t k,
                                                       int64_t n, DropRule rule, GemvPlan plan,
                                                       bool vector_ok, int* counters, float* partials) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kWidth = 32 * kVec;
  constexpr int kUnroll = 4;  // 16-byte loads in flight per lane
  __shared__ int kept_idx[kWindow];
  __shared__ float kept_val[kWindow];
  __shared__ uint32_t masks[kWarps];
  __shared__ float warp_sums[kWarps][kWidth];
  __shared__ float sums[kWidth];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Range cols = TileRange(n, kWidth, blockIdx.x);
  const int64_t col = cols.begin + lane * kVec;
  const int count = VecCount(col, kVec, n);
  const bool whole = vector_ok && count == kVec;
  const Range split = SplitRange(k, plan.splits, blockIdx.y);
  float acc[kVec] = {};

  for (int64_t w0 = split.begin; w0 < split.end; w0 += kWindow) {
    const int len = static_cast<int>(Min64(kWindow, split.end - w0));
    int kept = 0;
    for (int r = 0; r < len; r += kThreads) {
      const int i = r + threadIdx.x;
      float d = 0.0f;
      bool keep = false;
      if (i < len) {
        d = Diff(ToFloat(a[w0 + i]), rule, w0 + i);
        keep = KeptAt(d, rule, w0 + i);
      }
      kept = AppendRound(keep, i, d, kept, kept_idx, kept_val, masks);
    }
    const T* rows = b + w0 * n + col;
    if (whole) {
      int j = warp;
      for (; j + (kUnroll - 1) * kWarps < kept; j += kUnroll * kWarps) {
        uint4 raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          raw[u] = __ldcs(reinterpret_cast<const uint4*>(rows + static_cast<int64_t>(kept_idx[j + u * kWarps]) * n));
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float d = kept_val[j + u * kWarps];
          float f[kVec];
          Unpack(raw[u], f);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] = fmaf(d, f[e], acc[e]);
        }
      }
      for (; j < kept; j += kWarps) {
        const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(rows + static_cast<int64_t>(kept_idx[j]) * n));
        const float d = kept_val[j];
        float f[kVec];
        Unpack(raw, f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = fmaf(d, f[e], acc[e]);
      }
    } else if (count > 0) {  // the tail of N, or rows not 16-byte aligned
      for (int j = warp; j < kept; j += kWarps) {
        const uint4 raw = LoadVector(rows + static_cast<int64_t>(kept_idx[j]) * n, count, false);
        const float d = kept_val[j];
        float f[kVec];
        Unpack(raw, f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = fmaf(d, f[e], acc[e]);
      }
    }
    __syncthreads();  // the next window rewrites the kept lists
  }

#pragma unroll
  for (int e = 0; e < kVec; ++e) warp_sums[warp][lane * kVec + e] = acc[e];
  __syncthreads();
  if (threadIdx.x < kWidth) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w][threadIdx.x];
    sums[threadIdx.x] = s;
  }
  __syncthreads();
  FinishTile<T>(sums, kWidth, 0, 1, cols.begin, cols.end, n, blockIdx.y, plan.splits, 1, bias, y, partials,
                counters + blockIdx.x);
}

// ---- Several rows of A ----

// Where a block's step reads its operands: rows [m0, m0 + bm) of A and columns [n0, n0 + bn) of B,
// at kept rows list[s0, s0 + bk) of the window starting at w0 (list: window-relative indices).
template <typename T>
struct StepSource {
  const T* a;
  const T* b;
  int64_t m, k, n, m0, n0, w0;
  const int* list;
  int kept, s0;
  DropRule rule;
  bool vector_ok;

  // Element (r, c) of the step's A tile: the sparsified activation, 0 outside A or the list.
  __device__ __forceinline__ float A(int r, int c) const {
    if (m0 + r >= m || s0 + c >= kept) return 0.0f;
    const int64_t channel = w0 + list[s0 + c];
    const float d = Diff(ToFloat(a[(m0 + r) * k + channel]), rule, channel);
    return KeptAt(d, rule, channel) ? d : 0.0f;
  }
  // The 16 bytes of the step's B tile at row r, column c (zero outside B or the list).
  __device__ __forceinline__ uint4 B(int r, int c) const {
    if (s0 + r >= kept) return make_uint4(0, 0, 0, 0);
    const int64_t col = n0 + c;
    const int count = VecCount(col, 16 / sizeof(T), n);
    if (count == 0) return make_uint4(0, 0, 0, 0);
    return LoadVector(b + (w0 + list[s0 + r]) * n + col, count, vector_ok);
  }
};

// float16 tiles on tensor cores (WMMA 16x16x16, float32 accumulators): 8 warps as 2 x 4, each
// 32 x 32 of the 64 x 128 block tile.
struct HalfTile {
  using T = __half;
  static constexpr int kBm = static_cast<int>(kGemmHalfBm), kBn = static_cast<int>(kGemmHalfBn),
                       kBk = static_cast<int>(kGemmHalfBk);
  static constexpr int kLda = kBk + 8, kLdb = kBn + 8, kLdc = kBn + 4;  // padded against bank conflicts
  static constexpr int kAPairs = kBm * kBk / 2 / kThreads;               // pairs of A per thread
  static constexpr int kBVectors = kBk * kBn / 8 / kThreads;             // 16-byte vectors of B per thread
  union __align__(128) Shared {
    struct {
      __half a[kBm * kLda];
      __half b[kBk * kLdb];
    } op;
    float c[kBm * kLdc];
  };
  struct Stage {
    __half2 a[kAPairs];
    uint4 b[kBVectors];
  };
  struct Acc {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[2][2];
  };

  __device__ static void Zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
  }
  __device__ static void Load(Stage& st, const StepSource<__half>& src) {
#pragma unroll
    for (int i = 0; i < kAPairs; ++i) {
      const int p = threadIdx.x + i * kThreads;
      const int r = p / (kBk / 2), c = p % (kBk / 2) * 2;
      st.a[i] = __floats2half2_rn(src.A(r, c), src.A(r, c + 1));
    }
#pragma unroll
    for (int i = 0; i < kBVectors; ++i) {
      const int v = threadIdx.x + i * kThreads;
      st.b[i] = src.B(v / (kBn / 8), v % (kBn / 8) * 8);
    }
  }
  __device__ static void Store(const Stage& st, Shared& sh) {
#pragma unroll
    for (int i = 0; i < kAPairs; ++i) {
      const int p = threadIdx.x + i * kThreads;
      const int r = p / (kBk / 2), c = p % (kBk / 2) * 2;
      *reinterpret_cast<__half2*>(&sh.op.a[r * kLda + c]) = st.a[i];
    }
#pragma unroll
    for (int i = 0; i < kBVectors; ++i) {
      const int v = threadIdx.x + i * kThreads;
      *reinterpret_cast<uint4*>(&sh.op.b[(v / (kBn / 8)) * kLdb + v % (kBn / 8) * 8]) = st.b[i];
    }
  }
  __device__ static void Compute(const Shared& sh, Acc& acc) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int kk = 0; kk < kBk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sh.op.a + (wm * 32 + i * 16) * kLda + kk, kLda);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sh.op.b + kk * kLdb + wn * 32 + j * 16, kLdb);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
    }
  }
  __device__ static void StoreAcc(const Acc& acc, Shared& sh) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sh.c + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc.f[i][j], kLdc,
                                wmma::mem_row_major);
  }
};

// float32 tiles on CUDA cores (tensor cores would round to TF32): each thread 4 x 4 of the 64 x 64
// block tile; A is kept transposed in shared memory so that a thread reads its 4 rows as one vector.
struct FloatTile {
  using T = float;
  static constexpr int kBm = static_cast<int>(kGemmFloatBm), kBn = static_cast<int>(kGemmFloatBn),
                       kBk = static_cast<int>(kGemmFloatBk);
  static constexpr int kLda = kBm + 4, kLdb = kBn + 4, kLdc = kBn + 4;
  static constexpr int kAElements = kBm * kBk / kThreads;
  static_assert(kBk * kBn / 4 == kThreads, "one 16-byte vector of B per thread");
  union __align__(128) Shared {
    struct {
      float a[kBk * kLda];  // [k][m]
      float b[kBk * kLdb];  // [k][n]
    } op;
    float c[kBm * kLdc];
  };
  struct Stage {
    float a[kAElements];
    uint4 b;
  };
  struct Acc {
    float v[4][4];
  };

  __device__ static void Zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = 0.0f;
  }
  __device__ static void Load(Stage& st, const StepSource<float>& src) {
#pragma unroll
    for (int i = 0; i < kAElements; ++i) {
      const int e = threadIdx.x + i * kThreads;
      st.a[i] = src.A(e / kBk, e % kBk);
    }
    st.b = src.B(threadIdx.x / (kBn / 4), threadIdx.x % (kBn / 4) * 4);
  }
  __device__ static void Store(const Stage& st, Shared& sh) {
#pragma unroll
    for (int i = 0; i < kAElements; ++i) {
      const int e = threadIdx.x + i * kThreads;
      sh.op.a[(e % kBk) * kLda + e / kBk] = st.a[i];
    }
    *reinterpret_cast<uint4*>(&sh.op.b[(threadIdx.x / (kBn / 4)) * kLdb + threadIdx.x % (kBn / 4) * 4]) = st.b;
  }
  __device__ static void Compute(const Shared& sh, Acc& acc) {
    const int tm = threadIdx.x / (kBn / 4), tn = threadIdx.x % (kBn / 4);
#pragma unroll
    for (int kk = 0; kk < kBk; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&sh.op.a[kk * kLda + tm * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&sh.op.b[kk * kLdb + tn * 4]);
      const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(ar[i], br[j], acc.v[i][j]);
    }
  }
  __device__ static void StoreAcc(const Acc& acc, Shared& sh) {
    const int tm = threadIdx.x / (kBn / 4), tn = threadIdx.x % (kBn / 4);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sh.c[(tm * 4 + i) * kLdc + tn * 4 + j] = acc.v[i][j];
  }
};

template <class Tile>
__global__ void __launch_bounds__(kThreads)
    GemmKernel(const typename Tile::T* __restrict__ a, const typename Tile::T* __restrict__ b,
               const typename Tile::T* __restrict__ bias, typename Tile::T* __restrict__ y, int64_t m, int64_t k,
               int64_t n, DropRule rule, GemmPlan plan, bool vector_ok, int* counters,
               float* partials) {
  using T = typename Tile::T;
  __shared__ int kept_idx[kWindow];
  __shared__ uint32_t masks[kWarps];
  __shared__ typename Tile::Shared sh;

  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Tile::kBm, n0 = static_cast<int64_t>(blockIdx.x) * Tile::kBn;
  const int64_t m1 = Min64(m0 + Tile::kBm, m);
  const Range split = SplitRange(k, plan.splits, blockIdx.z);
  typename Tile::Acc acc;
  Tile::Zero(acc);
  typename Tile::Stage stage;

  for (int64_t w0 = split.begin; w0 < split.end; w0 += kWindow) {
    const int len = static_cast<int>(Min64(kWindow, split.end - w0));
    int kept = 0;
    for (int r = 0; r < len; r += kThreads) {
      const int i = r + threadIdx.x;
      // Element i is kept for the tile if one of its rows keeps it: most are found in a row or two.
      bool keep = false;
      if (i < len) {
        const T* column = a + w0 + i;
        for (int64_t row = m0; row < m1 && !keep; ++row) {
          keep = KeptAt(Diff(ToFloat(column[row * k]), rule, w0 + i), rule, w0 + i);
        }
      }
      kept = AppendRound(keep, i, 0.0f, kept, kept_idx, nullptr, masks);
    }
    StepSource<T> src{a, b, m, k, n, m0, n0, w0, kept_idx, kept, 0, rule, vector_ok};
    const int steps = static_cast<int>(CeilDiv(kept, Tile::kBk));
    if (steps > 0) Tile::Load(stage, src);
    for (int s = 0; s < steps; ++s) {
      __syncthreads();  // the previous step is done with the operand tiles
      Tile::Store(stage, sh);
      __syncthreads();
      if (s + 1 < steps) {  // the next step's loads fly while this one multiplies
        src.s0 = (s + 1) * Tile::kBk;
        Tile::Load(stage, src);
      }
      Tile::Compute(sh, acc);
    }
  }
  __syncthreads();  // the output tile reuses the operands' shared memory
  Tile::StoreAcc(acc, sh);
  __syncthreads();
  FinishTile<T>(sh.c, Tile::kLdc, m0, m1, n0, Min64(n0 + Tile::kBn, n), n, blockIdx.z,
                plan.splits, m, bias, y, partials, counters + static_cast<int64_t>(blockIdx.y) * plan.ntiles + blockIdx.x);
}

// ---- Host side ----

struct CallPlan {
  bool gemv;
  GemvPlan gemv_plan;
  GemmPlan gemm_plan;
  ScratchLayout layout;
};

// Resident blocks per SM of a kernel (the occupancy calculator), asked once per process.
template <class Kernel>
int Residency(Kernel kernel) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1) {
    cudaGetLastError();  // clear it: the plan then assumes one block
    blocks = 1;
  }
  return blocks;
}

template <typename T, class Tile>
CallPlan PlanTyped(const Problem& p, int sm_count) {
  static const int gemv_blocks = Residency(GemvKernel<T>);
  static const int gemm_blocks = Residency(GemmKernel<Tile>);
  CallPlan l{};
  l.gemv = p.m == 1;
  if (l.gemv) {
    l.gemv_plan = MakeGemvPlan(p.k, p.n, sizeof(T), sm_count, gemv_blocks);
    l.layout = MakeScratchLayout(1, p.n, l.gemv_plan.tiles, l.gemv_plan.splits);
  } else {
    l.gemm_plan = MakeGemmPlan(p.m, p.k, p.n, sizeof(T), sm_count, gemm_blocks);
    const GemmPlan& g = l.gemm_plan;
    l.layout = MakeScratchLayout(p.m, p.n, g.mtiles * g.ntiles, g.splits);
  }
  return l;
}

CallPlan Plan(const Problem& p, int sm_count) {
  return p.dtype == DType::kFloat16 ? PlanTyped<__half, HalfTile>(p, sm_count) : PlanTyped<float, FloatTile>(p, sm_count);
}

// kernel<<<grid, kThreads, 0, stream>>>(args); the CPU emulator of tests/cuda_emu runs the blocks
// one after another instead.
template <typename... Params, typename... Args>
void Launch(void (*kernel)(Params...), dim3 grid, cudaStream_t stream, Args... args) {
#if defined(SCAP_CUDA_EMULATION)
  (void)stream;
  emu::Launch(grid, dim3(kThreads), kernel, static_cast<Params>(args)...);
#else
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<Params>(args)...);
#endif
}

template <typename T, class Tile>
cudaError_t EnqueueTyped(const Problem& p, const T* a, const T* b, const T* bias, T* y, char* scratch,
                         int* stream_counters, int sm_count, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const CallPlan l = Plan(p, sm_count);
  const int64_t tiles = l.gemv ? l.gemv_plan.tiles : l.gemm_plan.mtiles * l.gemm_plan.ntiles;
  const bool kept_counters = stream_counters != nullptr && tiles <= kStreamCounters;
  int* counters = kept_counters ? stream_counters : reinterpret_cast<int*>(scratch + l.layout.counters);
  float* partials = reinterpret_cast<float*>(scratch + l.layout.partials);
  const bool vector_ok = p.n % (16 / sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  const int64_t splits = l.gemv ? l.gemv_plan.splits : l.gemm_plan.splits;
  const DropRule rule{p.threshold, p.offset, p.threshold_scale, p.channel_offset};
  if (splits > 1 && !kept_counters) {
    const cudaError_t e = cudaMemsetAsync(counters, 0, static_cast<size_t>(tiles) * sizeof(int), stream);
    if (e != cudaSuccess) return e;
  }
  if (l.gemv) {
    const GemvPlan& g = l.gemv_plan;
    Launch(GemvKernel<T>, dim3(static_cast<unsigned>(g.tiles), static_cast<unsigned>(g.splits)), stream, a, b, bias, y,
           p.k, p.n, rule, g, vector_ok, counters, partials);
  } else {
    const GemmPlan& g = l.gemm_plan;
    const dim3 grid(static_cast<unsigned>(g.ntiles), static_cast<unsigned>(g.mtiles), static_cast<unsigned>(g.splits));
    Launch(GemmKernel<Tile>, grid, stream, a, b, bias, y, p.m, p.k, p.n, rule, g, vector_ok, counters, partials);
  }
  return cudaGetLastError();
}

}  // namespace

size_t ScratchBytes(const Problem& problem, int sm_count) {
  if (problem.m == 0 || problem.n == 0) return 0;
  return Plan(problem, sm_count).layout.bytes;
}

int Enqueue(const Problem& p, const void* a, const void* b, const void* bias, void* y, void* scratch, int* counters,
            int sm_count, void* stream) {
  char* s = static_cast<char*>(scratch);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kFloat16) {
    return EnqueueTyped<__half, HalfTile>(p, static_cast<const __half*>(a), static_cast<const __half*>(b),
                                          static_cast<const __half*>(bias), static_cast<__half*>(y), s, counters, sm_count,
                                          st);
  }
  return EnqueueTyped<float, FloatTile>(p, static_cast<const float*>(a), static_cast<const float*>(b),
                                        static_cast<const float*>(bias), static_cast<float*>(y), s, counters, sm_count, st);
}

int CopyToHost(void* host, const void* device, size_t bytes) {
  return static_cast<int>(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost));
}

int SmCount(int device) {
  int count = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return e == cudaSuccess ? count : -static_cast<int>(e);
}

const char* ErrorString(int error) {
  thread_local std::string text;
  const cudaError_t e = static_cast<cudaError_t>(error);
  text = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  return text.c_str();
}

}  // namespace cuda
}  // namespace scap
