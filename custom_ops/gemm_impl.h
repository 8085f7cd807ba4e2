// The sparse GEMM kernels, written once over a small vector policy ("Isa") and compiled once per
// instruction set: gemm_avx512.cc, gemm_avx2.cc, gemm_portable.cc.
//
// Each including translation unit defines SCAP_KERNEL_NS first, so that every function here gets
// a namespace of its own: code compiled with -mavx512f must never be picked by the linker for a
// caller on a CPU without it. For the same reason nothing here calls std:: templates.
//
// An Isa provides: Vec, kWidth, Set, Load, Store, LoadB(float*), LoadB(uint16_t*), Fma (a*b+c), Mul,
// Add, StoreHalf.
#pragma once

#include <cstdint>
#include <cstring>

#include "sparse_gemm.h"

#ifndef SCAP_KERNEL_NS
#error "define SCAP_KERNEL_NS before including gemm_impl.h"
#endif

namespace scap {
namespace SCAP_KERNEL_NS {

// Float accumulators per thread, rows x column tile: 32 KiB stays in L1/L2.
constexpr int64_t kAccFloats = 8192;

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return HalfToFloat(x); }

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// acc[0:w] += d0*b0 + d1*b1 + d2*b2 + d3*b3
template <class Isa, typename TW>
inline void Axpy4(float* acc, int64_t w, const TW* b0, const TW* b1, const TW* b2, const TW* b3,
                  float d0, float d1, float d2, float d3) {
  const auto v0 = Isa::Set(d0), v1 = Isa::Set(d1), v2 = Isa::Set(d2), v3 = Isa::Set(d3);
  int64_t j = 0;
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    auto a = Isa::Fma(Isa::LoadB(b0 + j), v0, Isa::Load(acc + j));
    auto c = Isa::Fma(Isa::LoadB(b1 + j), v1, Isa::Mul(Isa::LoadB(b2 + j), v2));  // two chains, then join
    c = Isa::Fma(Isa::LoadB(b3 + j), v3, c);
    Isa::Store(acc + j, Isa::Add(a, c));
  }
  for (; j < w; ++j) {
    acc[j] += d0 * ToFloat(b0[j]) + d1 * ToFloat(b1[j]) + d2 * ToFloat(b2[j]) + d3 * ToFloat(b3[j]);
  }
}

// acc[0:w] += sum over r < 8 of d[r] * rows[r]: one load and one store of acc per eight rows of B.
template <class Isa, typename TW>
inline void Axpy8(float* acc, int64_t w, const TW* const* rows, const float* d) {
  const auto v0 = Isa::Set(d[0]), v1 = Isa::Set(d[1]), v2 = Isa::Set(d[2]), v3 = Isa::Set(d[3]);
  const auto v4 = Isa::Set(d[4]), v5 = Isa::Set(d[5]), v6 = Isa::Set(d[6]), v7 = Isa::Set(d[7]);
  const TW *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5], *r6 = rows[6],
           *r7 = rows[7];
  int64_t j = 0;
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    auto a = Isa::Fma(Isa::LoadB(r0 + j), v0, Isa::Load(acc + j));
    auto b = Isa::Mul(Isa::LoadB(r1 + j), v1);
    a = Isa::Fma(Isa::LoadB(r2 + j), v2, a);
    b = Isa::Fma(Isa::LoadB(r3 + j), v3, b);
    a = Isa::Fma(Isa::LoadB(r4 + j), v4, a);
    b = Isa::Fma(Isa::LoadB(r5 + j), v5, b);
    a = Isa::Fma(Isa::LoadB(r6 + j), v6, a);
    b = Isa::Fma(Isa::LoadB(r7 + j), v7, b);
    Isa::Store(acc + j, Isa::Add(a, b));
  }
  for (; j < w; ++j) {
    float sum = 0.0f;
    for (int r = 0; r < 8; ++r) sum += d[r] * ToFloat(rows[r][j]);
    acc[j] += sum;
  }
}

// acc[0:w] += d * b
template <class Isa, typename TW>
inline void Axpy1(float* acc, int64_t w, const TW* b, float d) {
  const auto v = Isa::Set(d);
  int64_t j = 0;
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    Isa::Store(acc + j, Isa::Fma(Isa::LoadB(b + j), v, Isa::Load(acc + j)));
  }
  for (; j < w; ++j) acc[j] += d * ToFloat(b[j]);
}

// One row of A (decoding): acc[0:w] += sum over kept[i0:i1] of d[k] * B[k, c0:c0+w], streaming the
// kept rows of B eight at a time. (Measured on a 2-core Xeon: software prefetching of the next rows
// and groups of 1 or 4 rows were no faster; the loop runs at the machine's streaming read rate.)
template <class Isa, typename TW>
void AccumulateOneRow(const SparseActivations& act, const TW* b, int64_t n, int64_t c0, int64_t w, int64_t i0,
                      int64_t i1, float* acc) {
  const float* d = act.values;
  const int32_t* kept = act.kept;
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const TW* rows[8];
    float dk[8];
    for (int r = 0; r < 8; ++r) {
      rows[r] = b + static_cast<int64_t>(kept[i + r]) * n + c0;
      dk[r] = d[kept[i + r]];
    }
    Axpy8<Isa>(acc, w, rows, dk);
  }
  for (; i + 4 <= i1; i += 4) {
    const int64_t k0 = kept[i], k1 = kept[i + 1], k2 = kept[i + 2], k3 = kept[i + 3];
    Axpy4<Isa>(acc, w, b + k0 * n + c0, b + k1 * n + c0, b + k2 * n + c0, b + k3 * n + c0, d[k0], d[k1], d[k2],
               d[k3]);
  }
  for (; i < i1; ++i) Axpy1<Isa>(acc, w, b + static_cast<int64_t>(kept[i]) * n + c0, d[kept[i]]);
}

// One row of A, split over K: partial[0:n] = the contribution of kept[i0:i1]. Each task streams
// whole rows of B, the access pattern that reaches the memory's read bandwidth.
template <class Isa, typename TW>
void RowsPartial(const SparseActivations& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* partial) {
  std::memset(partial, 0, static_cast<size_t>(n) * sizeof(float));
  AccumulateOneRow<Isa>(act, b, n, 0, n, i0, i1, partial);
}

// Several rows of A: each kept row of B is read once from memory and reused from cache for
// every row of A that keeps it.
template <class Isa, typename TW>
void AccumulateRows(const SparseActivations& act, const TW* b, int64_t n, int64_t c0, int64_t w,
                    int64_t tile, float* acc) {
  for (int64_t i = 0; i < act.kept_count; ++i) {
    const int64_t k = act.kept[i];
    const TW* row = b + k * n + c0;
    for (int64_t m = 0; m < act.rows; ++m) {
      const float d = act.values[m * act.depth + k];
      if (d != 0.0f) Axpy1<Isa>(acc + m * tile, w, row, d);
    }
  }
}

template <class Isa>
inline void StoreRow(const float* acc, const float* bias, float* y, int64_t w) {
  int64_t j = 0;
  if (bias != nullptr) {
    for (; j + Isa::kWidth <= w; j += Isa::kWidth) Isa::Store(y + j, Isa::Add(Isa::Load(acc + j), Isa::Load(bias + j)));
    for (; j < w; ++j) y[j] = acc[j] + bias[j];
  } else {
    std::memcpy(y, acc, static_cast<size_t>(w) * sizeof(float));
  }
}

template <class Isa>
inline void StoreRow(const float* acc, const float* bias, uint16_t* y, int64_t w) {
  int64_t j = 0;
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    auto v = Isa::Load(acc + j);
    if (bias != nullptr) v = Isa::Add(v, Isa::Load(bias + j));
    Isa::StoreHalf(y + j, v);
  }
  for (; j < w; ++j) y[j] = FloatToHalf(acc[j] + (bias != nullptr ? bias[j] : 0.0f));
}

template <class Isa, typename TW>
void GemmBlock(const SparseActivations& act, const TW* b, int64_t n, const float* bias, TW* y, int64_t n0,
               int64_t n1) {
  alignas(64) float acc[kAccFloats];
  const int64_t rows = act.rows < 1 ? 1 : act.rows;
  int64_t tile = kAccFloats / rows;
  tile = tile < 16 ? 16 : tile / 16 * 16;
  for (int64_t c0 = n0; c0 < n1; c0 += tile) {
    const int64_t w = Min(tile, n1 - c0);
    for (int64_t m = 0; m < act.rows; ++m) std::memset(acc + m * tile, 0, static_cast<size_t>(w) * sizeof(float));
    if (act.rows == 1) {
      AccumulateOneRow<Isa>(act, b, n, c0, w, 0, act.kept_count, acc);
    } else {
      AccumulateRows<Isa>(act, b, n, c0, w, tile, acc);
    }
    for (int64_t m = 0; m < act.rows; ++m) {
      StoreRow<Isa>(acc + m * tile, bias != nullptr ? bias + c0 : nullptr, y + m * n + c0, w);
    }
  }
}

// y[0:n] = sum of the partials (+ bias), stored as TW.
template <class Isa, typename TW>
void ReducePartials(const float* partials, int64_t parts, int64_t n, const float* bias, TW* y) {
  constexpr int64_t kChunk = 1024;
  alignas(64) float sum[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t w = Min(kChunk, n - c0);
    std::memcpy(sum, partials + c0, static_cast<size_t>(w) * sizeof(float));
    for (int64_t p = 1; p < parts; ++p) {
      const float* part = partials + p * n + c0;
      int64_t j = 0;
      for (; j + Isa::kWidth <= w; j += Isa::kWidth) Isa::Store(sum + j, Isa::Add(Isa::Load(sum + j), Isa::Load(part + j)));
      for (; j < w; ++j) sum[j] += part[j];
    }
    StoreRow<Isa>(sum, bias != nullptr ? bias + c0 : nullptr, y + c0, w);
  }
}

template <class Isa, typename TW>
constexpr KernelSet<TW> MakeKernelSet() {
  return KernelSet<TW>{&GemmBlock<Isa, TW>, &RowsPartial<Isa, TW>, &ReducePartials<Isa, TW>};
}

}  // namespace SCAP_KERNEL_NS
}  // namespace scap
