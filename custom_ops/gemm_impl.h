// The sparse GEMM kernels, written once over a small vector policy ("Isa") and compiled once per
// instruction set: gemm_avx512.cc, gemm_avx2.cc, gemm_portable.cc.
//
// Each including translation unit defines SCAP_KERNEL_NS first, so that every function here gets
// a namespace of its own: code compiled with -mavx512f must never be picked by the linker for a
// caller on a CPU without it. For the same reason nothing here calls std:: templates.
//
// An Isa provides: Vec, kWidth, Set, Load, LoadShared (a load kept in a register), KeptPairParts
// (KeptPairColumns over kWidth columns, whole vectors stored), Store, LoadB(float*), LoadB(uint16_t*), Fma (a*b+c), Mul,
// Add, Sub, StoreHalf, Drop (the drop rule on a vector: the kept lanes as bits, the dropped ones
// zeroed), ChannelThreshold (threshold * scale per lane, the scale where that is NaN: 0 * inf),
// and the register block of the several-rows kernel: kTileRows rows of A by
// kTileVecs vectors of columns, and kRegisters (how many vector registers it has).
//
// (Long because every kernel of every ISA is here, once: the file is the kernels.)
#pragma once

#include <cstdint>
#include <cstring>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

#include "kernel_common.h"
#include "sparse_gemm.h"

#ifndef SCAP_KERNEL_NS
#error "define SCAP_KERNEL_NS before including gemm_impl.h"
#endif

namespace scap {
namespace SCAP_KERNEL_NS {

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return HalfToFloat(x); }

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }


// The cache lines of the next panel of B (kept rows [i0, i0 + count), columns [n0, n0 + w)),
// prefetched a share at a time while the current panel is multiplied, so that the next copy reads
// L2 instead of memory: a panel's copy otherwise stalls on memory between two multiplies (M = 32,
// K = N = 4096 on a Zen 4 EPYC: 8.9 ms a call against 6.3 ms for onnxruntime's MatMul).
template <typename TW>
struct PanelPrefetch {
  const TW* b = nullptr;
  const int32_t* kept = nullptr;
  int64_t n = 0, n0 = 0;
  int64_t line_elements = 64 / sizeof(TW);
  int64_t lines_per_row = 0;
  int64_t lines = 0;  // of the whole panel
  int64_t next = 0;   // the next line to prefetch

  PanelPrefetch() = default;
  PanelPrefetch(const TW* b_, const int32_t* kept_, int64_t n_, int64_t i0, int64_t count, int64_t n0_, int64_t w)
      : b(b_), kept(kept_ + i0), n(n_), n0(n0_) {
    lines_per_row = (w + line_elements - 1) / line_elements;
    lines = count > 0 ? lines_per_row * count : 0;
  }
  // Prefetches the next `share` lines.
  void Step(int64_t share) {
    const int64_t end = Min(lines, next + share);
    for (; next < end; ++next) {
      const int64_t row = next / lines_per_row, line = next - row * lines_per_row;
      PrefetchL2(b + static_cast<int64_t>(kept[row]) * n + n0 + line * line_elements);
    }
  }
};

// Index of the lowest set bit of a non-zero word.
inline int LowestBit(uint32_t bits) {
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long index;
  _BitScanForward(&index, bits);
  return static_cast<int>(index);
#else
  return __builtin_ctz(bits);
#endif
}

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

// Axpy8 that also prefetches the rows `next` (the rows of the next eight, at the same columns): for
// short rows the hardware's stream prefetchers lose each row's first lines to training, and kept rows
// a few KiB long (SmolLM2's down_proj, 1536x576) then read memory at 60-90% of the rate of long ones.
template <class Isa, typename TW>
inline void Axpy8Prefetch(float* acc, int64_t w, const TW* const* rows, const float* d, const TW* const* next) {
  const auto v0 = Isa::Set(d[0]), v1 = Isa::Set(d[1]), v2 = Isa::Set(d[2]), v3 = Isa::Set(d[3]);
  const auto v4 = Isa::Set(d[4]), v5 = Isa::Set(d[5]), v6 = Isa::Set(d[6]), v7 = Isa::Set(d[7]);
  const TW *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5], *r6 = rows[6],
           *r7 = rows[7];
  constexpr int64_t kLine = 64 / sizeof(TW);
  int64_t j = 0;
  int64_t p = 0;  // elements of the next rows prefetched
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    if (j >= p) {
      for (int r = 0; r < 8; ++r) PrefetchL2(next[r] + p);
      p += kLine;
    }
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
  for (; p < w; p += kLine) {
    for (int r = 0; r < 8; ++r) PrefetchL2(next[r] + p);
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

// The threshold of one channel: threshold * scale, or the scale where that is 0 * inf (DropRule).
inline float ChannelThreshold(float threshold, float scale) {
  const float product = threshold * scale;
  return product != product ? scale : product;
}

// Bits set in x.
inline int PopCount(uint32_t x) {
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  return static_cast<int>((((x + (x >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

// The drop rule on rows of A (see KernelSet::sparsify) with or without each per-channel vector, a
// loop compiled for each case so that a node without them pays nothing: vectors of d, and the kept
// columns of every row ORed into the bitmap. Returns the kept elements.
template <class Isa, typename TW, bool kScale, bool kOffset>
int64_t SparsifyRows(const TW* a, int64_t rows, int64_t depth, const DropRule& rule, float* d, uint32_t* seen) {
  static_assert(32 % Isa::kWidth == 0, "a vector's kept bits must fit in one word of the bitmap");
  const float threshold = rule.threshold, offset = rule.offset;
  const float* scale = rule.threshold_scale;
  const float* channel_offset = rule.channel_offset;
  const auto off = Isa::Set(offset), thr = Isa::Set(threshold);
  int64_t kept_elements = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const TW* a_row = a + r * depth;
    float* d_row = d + r * depth;
    int64_t j = 0;
    for (; j + Isa::kWidth <= depth; j += Isa::kWidth) {
      auto diff = Isa::Sub(Isa::LoadB(a_row + j), off);
      if (kOffset) diff = Isa::Sub(diff, Isa::Load(channel_offset + j));
      typename Isa::Vec kept_values;
      const uint32_t bits =
          Isa::Drop(diff, kScale ? Isa::ChannelThreshold(thr, Isa::Load(scale + j)) : thr, &kept_values);
      Isa::Store(d_row + j, kept_values);
      seen[j >> 5] |= bits << (j & 31);
      kept_elements += PopCount(bits);
    }
    for (; j < depth; ++j) {
      float diff = ToFloat(a_row[j]) - offset;
      if (kOffset) diff -= channel_offset[j];
      const float tau = kScale ? ChannelThreshold(threshold, scale[j]) : threshold;
      const bool keep = !(Abs(diff) <= tau);  // NaN compares false: kept
      d_row[j] = keep ? diff : 0.0f;
      seen[j >> 5] |= static_cast<uint32_t>(keep) << (j & 31);
      kept_elements += keep ? 1 : 0;
    }
  }
  return kept_elements;
}

template <class Isa, typename TW>
int64_t Sparsify(const TW* a, int64_t rows, int64_t depth, const DropRule& rule, float* d, uint32_t* seen,
                 int32_t* kept, int64_t* kept_elements) {
  const int64_t words = SeenWords(depth);
  std::memset(seen, 0, static_cast<size_t>(words) * sizeof(uint32_t));
  if (rule.threshold_scale == nullptr && rule.channel_offset == nullptr) {
    *kept_elements = SparsifyRows<Isa, TW, false, false>(a, rows, depth, rule, d, seen);
  } else if (rule.channel_offset == nullptr) {
    *kept_elements = SparsifyRows<Isa, TW, true, false>(a, rows, depth, rule, d, seen);
  } else if (rule.threshold_scale == nullptr) {
    *kept_elements = SparsifyRows<Isa, TW, false, true>(a, rows, depth, rule, d, seen);
  } else {
    *kept_elements = SparsifyRows<Isa, TW, true, true>(a, rows, depth, rule, d, seen);
  }
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) {
    for (uint32_t bits = seen[w]; bits != 0; bits &= bits - 1) {
      kept[count++] = static_cast<int32_t>(w * 32 + LowestBit(bits));
    }
  }
  return count;
}

// Where a pair's kept columns go, by part (RowPairLists): k[part] + count[part] onwards, with the
// first row's values at v0[part] (parts 0 and 1) and the second's at v1[part] (parts 0 and 2).
struct PairParts {
  int32_t* k[kPairListParts];
  float* v0[kPairListParts];
  float* v1[kPairListParts];
  int64_t count[kPairListParts];
};

// Appends, of kCount columns j, j + 1, ... of two rows of D, those both rows keep (non-zero; NaN is
// kept) to part 0, those only the first keeps to part 1 and only the second to part 2. Branch-free:
// it writes every column's slot of each part and advances past the kept ones only (an Isa's
// KeptPairParts where it has no compress instruction).
template <int64_t kCount>
inline void KeptPairColumns(const float* d0, const float* d1, int32_t j, PairParts& out) {
  for (int64_t i = 0; i < kCount; ++i) {
    const float a0 = d0[i], a1 = d1[i];
    const int32_t column = j + static_cast<int32_t>(i);
    const bool keep0 = a0 != 0.0f, keep1 = a1 != 0.0f;
    int64_t& both = out.count[0];
    int64_t& first = out.count[1];
    int64_t& second = out.count[2];
    out.k[0][both] = column;
    out.v0[0][both] = a0;
    out.v1[0][both] = a1;
    both += keep0 & keep1 ? 1 : 0;
    out.k[1][first] = column;
    out.v0[1][first] = a0;
    first += keep0 & !keep1 ? 1 : 0;
    out.k[2][second] = column;
    out.v1[2][second] = a1;
    second += !keep0 & keep1 ? 1 : 0;
  }
}

// Rows of B up to this long are prefetched a group ahead when decoding (Axpy8Prefetch).
constexpr int64_t kPrefetchRowBytes = 8192;

// One row of A (decoding): acc[0:n] += sum over kept[i0:i1] of d[k] * B[k, :], streaming the
// kept rows of B eight at a time. The eight come from eight lanes, equal slices of the range, so
// that each lane walks forward through nearby rows (SmolLM2's down_proj, 1536x576 at 55%: 9% faster
// than eight consecutive kept rows). (Measured on a 2-core Xeon: software prefetching of the next
// rows and groups of 1 or 4 rows were no faster; the loop runs at the machine's read rate.)
template <class Isa, typename TW>
void AccumulateOneRow(const SparseRow& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* acc) {
  const float* d = act.values;
  const int32_t* kept = act.kept;
  const int64_t lanes = (i1 - i0) / 8;
  const bool prefetch = n * static_cast<int64_t>(sizeof(TW)) <= kPrefetchRowBytes;
  for (int64_t t = 0; t < lanes; ++t) {
    const TW* rows[8];
    const TW* next[8];
    float dk[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t k = kept[i0 + r * lanes + t];
      rows[r] = b + k * n;
      next[r] = t + 1 < lanes ? b + static_cast<int64_t>(kept[i0 + r * lanes + t + 1]) * n : rows[r];
      dk[r] = d[k];
    }
    if (prefetch) {
      Axpy8Prefetch<Isa>(acc, n, rows, dk, next);
    } else {
      Axpy8<Isa>(acc, n, rows, dk);
    }
  }
  int64_t i = i0 + 8 * lanes;
  for (; i + 4 <= i1; i += 4) {
    const int64_t k0 = kept[i], k1 = kept[i + 1], k2 = kept[i + 2], k3 = kept[i + 3];
    Axpy4<Isa>(acc, n, b + k0 * n, b + k1 * n, b + k2 * n, b + k3 * n, d[k0], d[k1], d[k2], d[k3]);
  }
  for (; i < i1; ++i) Axpy1<Isa>(acc, n, b + static_cast<int64_t>(kept[i]) * n, d[kept[i]]);
}

// One row of A, split over K: partial[0:n] = the contribution of kept[i0:i1]. Each task streams
// whole rows of B, the access pattern that reaches the memory's read bandwidth.
template <class Isa, typename TW>
void RowPartial(const SparseRow& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* partial) {
  std::memset(partial, 0, static_cast<size_t>(n) * sizeof(float));
  AccumulateOneRow<Isa>(act, b, n, i0, i1, partial);
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

// Converts a row segment of B to float32 (a copy for float weights) and reports whether it holds
// Inf or NaN: those must not meet the zeros of dropped activations (0 * Inf would make NaN).
template <class Isa, typename TW>
inline bool CopyRow(const TW* src, int64_t w, float* dst) {
  const auto zero = Isa::Set(0.0f);
  // Stay 0 unless some x * 0 is NaN, i.e. x is Inf or NaN. Two of them, so that the copy does not
  // wait on one chain of FMA latencies.
  auto probe = zero, probe2 = zero;
  int64_t j = 0;
  for (; j + 2 * Isa::kWidth <= w; j += 2 * Isa::kWidth) {
    const auto v = Isa::LoadB(src + j), v2 = Isa::LoadB(src + j + Isa::kWidth);
    probe = Isa::Fma(v, zero, probe);
    probe2 = Isa::Fma(v2, zero, probe2);
    Isa::Store(dst + j, v);
    Isa::Store(dst + j + Isa::kWidth, v2);
  }
  for (; j + Isa::kWidth <= w; j += Isa::kWidth) {
    const auto v = Isa::LoadB(src + j);
    probe = Isa::Fma(v, zero, probe);
    Isa::Store(dst + j, v);
  }
  probe = Isa::Add(probe, probe2);
  bool finite = true;
  for (; j < w; ++j) {
    dst[j] = ToFloat(src[j]);
    finite = finite && dst[j] * 0.0f == 0.0f;
  }
  alignas(64) float lanes[Isa::kWidth];
  Isa::Store(lanes, probe);
  for (int64_t l = 0; l < Isa::kWidth; ++l) finite = finite && lanes[l] == 0.0f;
  return finite;
}

// acc[r][0:w] += d[r * d_stride] * row for the rows r of the tile that keep this element: the slow,
// exact path for a row of B holding Inf or NaN.
inline void NonFiniteRow(const float* row, int64_t w, const float* d, int64_t d_stride, int64_t tile_rows, float* acc,
                         int64_t acc_stride) {
  for (int64_t r = 0; r < tile_rows; ++r) {
    const float dr = d[r * d_stride];
    if (dr == 0.0f) continue;  // dropped (kept elements are never 0)
    for (int64_t j = 0; j < w; ++j) acc[r * acc_stride + j] += dr * row[j];
  }
}

// acc[r][c:c+V*W] += sum over panel rows i of d[r][i] * panel[i][c:c+V*W], for kTileRows rows of
// A (d_stride floats apart) and kTileVecs vectors of columns held in registers. acc rows are
// acc_stride floats apart, panel rows `stride`.
template <class Isa>
inline void PanelBlock(const float* panel, int64_t rows_in_panel, int64_t stride, const float* d, int64_t d_stride,
                       float* acc, int64_t acc_stride) {
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kVecs = Isa::kTileVecs;
  constexpr int64_t kW = Isa::kWidth;
  typename Isa::Vec sum[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) sum[r][v] = Isa::Load(acc + r * acc_stride + v * kW);
  const float* d_row[kRows];
  for (int64_t r = 0; r < kRows; ++r) d_row[r] = d + r * d_stride;
  for (int64_t i = 0; i < rows_in_panel; ++i) {
    typename Isa::Vec bv[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) bv[v] = Isa::Load(panel + i * stride + v * kW);
    for (int64_t r = 0; r < kRows; ++r) {
      const auto dv = Isa::Set(d_row[r][i]);
      for (int64_t v = 0; v < kVecs; ++v) sum[r][v] = Isa::Fma(bv[v], dv, sum[r][v]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) Isa::Store(acc + r * acc_stride + v * kW, sum[r][v]);
}

// acc += D[:, kept[i0 : i0 + count]] @ panel, where the panel holds those kept rows of B (count rows
// `width` floats wide, a multiple of the register block, panel_stride floats apart) and acc holds
// every row of A (acc_stride floats apart). finite[i] says whether panel row i is free of Inf and NaN.
template <class Isa, typename TW>
void MultiplyPanel(const SparseTiles& act, int64_t i0, const float* panel, int64_t count, int64_t width,
                   int64_t panel_stride, const bool* finite, float* acc, int64_t acc_stride,
                   PanelPrefetch<TW>& prefetch) {
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kBlock = Isa::kTileVecs * Isa::kWidth;
  const float* d = act.values + i0;
  const int64_t d_stride = act.row_stride;
  const int64_t tile_d_stride = kRows * d_stride;  // distance between tiles in act.values
  bool all_finite = true;
  for (int64_t i = 0; i < count; ++i) all_finite = all_finite && finite[i];
  if (all_finite) {
    // Column strip outside, tiles inside: the strip stays in L1 for every tile.
    const int64_t calls = (width + kBlock - 1) / kBlock * act.tiles;
    const int64_t share = calls > 0 ? (prefetch.lines + calls - 1) / calls : 0;
    for (int64_t c = 0; c < width; c += kBlock) {
      for (int64_t t = 0; t < act.tiles; ++t) {
        prefetch.Step(share);
        PanelBlock<Isa>(panel + c, count, panel_stride, d + t * tile_d_stride, d_stride,
                        acc + t * kRows * acc_stride + c, acc_stride);
      }
    }
    return;
  }
  // Runs of finite rows go through the register blocks; a row with Inf or NaN goes alone.
  prefetch.Step(prefetch.lines);
  for (int64_t t = 0; t < act.tiles; ++t) {
    const float* tile_d = d + t * tile_d_stride;
    float* tile_acc = acc + t * kRows * acc_stride;
    for (int64_t start = 0; start < count;) {
      int64_t end = start;
      while (end < count && finite[end]) ++end;
      for (int64_t c = 0; end > start && c < width; c += kBlock) {
        PanelBlock<Isa>(panel + start * panel_stride + c, end - start, panel_stride, tile_d + start, d_stride,
                        tile_acc + c, acc_stride);
      }
      if (end < count) {
        NonFiniteRow(panel + end * panel_stride, width, tile_d + end, d_stride, kRows, tile_acc, acc_stride);
      }
      start = end + 1;
    }
  }
}

// Copies kept rows [i0, i0 + count) of B's columns [n0, n0 + w) into a float32 panel, zero-padded
// to `width` floats, rows panel_stride floats apart, recording which rows hold Inf or NaN.
template <class Isa, typename TW>
void CopyPanel(const SparseTiles& act, const TW* b, int64_t n, int64_t i0, int64_t count, int64_t n0, int64_t w,
               int64_t width, int64_t panel_stride, float* panel, bool* finite) {
  for (int64_t i = 0; i < count; ++i) {
    float* dst = panel + i * panel_stride;
    finite[i] = CopyRow<Isa>(b + static_cast<int64_t>(act.kept[i0 + i]) * n + n0, w, dst);
    for (int64_t j = w; j < width; ++j) dst[j] = 0.0f;
  }
}

// Several rows of A over the column block [n0, n1) (the split for tall A, compute-bound): copy
// kPanelRows kept rows of B's block into a float32 panel, multiply every tile of A by it, repeat
// over K. Work space: the panel, then float32 accumulators for all rows.
template <class Isa, typename TW>
void TileColumns(const SparseTiles& act, const TW* b, int64_t n, const float* bias, TW* y, int64_t n0, int64_t n1,
                 float* work) {
  const int64_t w = n1 - n0;
  const int64_t stride = RoundUp(w, Isa::kTileVecs * Isa::kWidth);
  const int64_t panel_stride = PanelStride(stride);
  float* panel = work;
  float* acc = work + kPanelRows * panel_stride;
  std::memset(acc, 0, static_cast<size_t>(act.tiles * Isa::kTileRows * stride) * sizeof(float));
  bool finite[kPanelRows];
  for (int64_t i0 = 0; i0 < act.kept_count; i0 += kPanelRows) {
    const int64_t count = Min(kPanelRows, act.kept_count - i0);
    CopyPanel<Isa>(act, b, n, i0, count, n0, w, stride, panel_stride, panel, finite);
    const int64_t next = i0 + kPanelRows;
    PanelPrefetch<TW> prefetch(b, act.kept, n, next, Min(kPanelRows, act.kept_count - next), n0, w);
    MultiplyPanel<Isa>(act, i0, panel, count, stride, panel_stride, finite, acc, stride, prefetch);
  }
  for (int64_t r = 0; r < act.rows; ++r) {
    StoreRow<Isa>(acc + r * stride, bias != nullptr ? bias + n0 : nullptr, y + r * n + n0, w);
  }
}

// Several rows of A over kept rows [i0, i1) and all columns (the split for short A, bound by
// memory): whole rows of B stream into the panel, a few at a time. partial: every row of A,
// RoundUp(n, block) floats apart; work: PanelRowsForWidth(that width) rows of PanelStride(that width).
template <class Isa, typename TW>
void TilesPartial(const SparseTiles& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* work,
                  float* partial) {
  const int64_t stride = RoundUp(n, Isa::kTileVecs * Isa::kWidth);
  const int64_t acc_stride = PartialStride(n, Isa::kTileVecs * Isa::kWidth);
  const int64_t panel_rows = PanelRowsForWidth(stride);
  std::memset(partial, 0, static_cast<size_t>(act.tiles * Isa::kTileRows * acc_stride) * sizeof(float));
  bool finite[kPanelRows];
  for (int64_t start = i0; start < i1; start += panel_rows) {
    const int64_t count = Min(panel_rows, i1 - start);
    CopyPanel<Isa>(act, b, n, start, count, 0, n, stride, PanelStride(stride), work, finite);
    const int64_t next = start + panel_rows;
    PanelPrefetch<TW> prefetch(b, act.kept, n, next, Min(panel_rows, i1 - next), 0, n);
    MultiplyPanel<Isa>(act, start, work, count, stride, PanelStride(stride), finite, partial, acc_stride, prefetch);
  }
}

// PanelBlock over rows of B in place: rows[i] + c, i < count, instead of a copied panel.
// kRows rows of A (up to the tile's), the others of the tile being padding.
template <class Isa, typename TW, int64_t kRows>
inline void RowsBlock(const TW* const* rows, int64_t count, int64_t c, const float* d, int64_t d_stride, float* acc,
                      int64_t acc_stride) {
  constexpr int64_t kVecs = Isa::kTileVecs;
  constexpr int64_t kW = Isa::kWidth;
  typename Isa::Vec sum[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) sum[r][v] = Isa::Load(acc + r * acc_stride + v * kW);
  const float* d_row[kRows];
  for (int64_t r = 0; r < kRows; ++r) d_row[r] = d + r * d_stride;
  for (int64_t i = 0; i < count; ++i) {
    typename Isa::Vec bv[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) bv[v] = Isa::LoadB(rows[i] + c + v * kW);
    for (int64_t r = 0; r < kRows; ++r) {
      const auto dv = Isa::Set(d_row[r][i]);
      for (int64_t v = 0; v < kVecs; ++v) sum[r][v] = Isa::Fma(bv[v], dv, sum[r][v]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) Isa::Store(acc + r * acc_stride + v * kW, sum[r][v]);
}

// RowsBlock for the first `live` rows of a tile (a short last tile skips its padding rows' work).
template <class Isa, typename TW>
inline void RowsBlockLive(int64_t live, const TW* const* rows, int64_t count, int64_t c, const float* d,
                          int64_t d_stride, float* acc, int64_t acc_stride) {
  constexpr int64_t kRows = Isa::kTileRows;
  static_assert(kRows == 4 || kRows == 8, "tiles of 4 or 8 rows");
  switch (live < kRows ? live : kRows) {
    case 1: RowsBlock<Isa, TW, 1>(rows, count, c, d, d_stride, acc, acc_stride); return;
    case 2: RowsBlock<Isa, TW, 2>(rows, count, c, d, d_stride, acc, acc_stride); return;
    case 3: RowsBlock<Isa, TW, 3>(rows, count, c, d, d_stride, acc, acc_stride); return;
    case 4: RowsBlock<Isa, TW, 4>(rows, count, c, d, d_stride, acc, acc_stride); return;
    default: break;
  }
  if constexpr (kRows == 8) {
    switch (live) {
      case 5: RowsBlock<Isa, TW, 5>(rows, count, c, d, d_stride, acc, acc_stride); return;
      case 6: RowsBlock<Isa, TW, 6>(rows, count, c, d, d_stride, acc, acc_stride); return;
      case 7: RowsBlock<Isa, TW, 7>(rows, count, c, d, d_stride, acc, acc_stride); return;
      default: RowsBlock<Isa, TW, 8>(rows, count, c, d, d_stride, acc, acc_stride); return;
    }
  }
}

// TilesPartial without the panel: groups of kGroup kept rows of B are multiplied where they lie,
// walked side by side along N as decoding walks them (few tiles of A use each strip of them, from
// L1; the copy into a panel only paid off for many). An Inf or NaN in a kept row of B meets the
// zeros of the rows of A that drop it: partials may then hold NaN where the contract wants none,
// and the caller runs TilesPartial instead.
template <class Isa, typename TW>
void TilesPartialDirect(const SparseTiles& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* partial) {
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kBlock = Isa::kTileVecs * Isa::kWidth;
  constexpr int64_t kGroup = 8;  // groups of 16 measured no faster (M = 2 to 16, K = N = 4096 on a Zen 4 EPYC)
  const int64_t stride = PartialStride(n, kBlock);
  const int64_t full = n / kBlock * kBlock;
  std::memset(partial, 0, static_cast<size_t>(act.tiles * kRows * stride) * sizeof(float));
  const int64_t d_stride = act.row_stride;
  const int64_t tile_d_stride = kRows * d_stride;
  alignas(64) float tail[kGroup * kBlock];
  for (int64_t g = i0; g < i1; g += kGroup) {
    const int64_t count = Min(kGroup, i1 - g);
    const TW* rows[kGroup];
    for (int64_t i = 0; i < count; ++i) rows[i] = b + static_cast<int64_t>(act.kept[g + i]) * n;
    const float* d = act.values + g;
    for (int64_t c = 0; c < full; c += kBlock) {
      for (int64_t t = 0; t < act.tiles; ++t) {
        RowsBlockLive<Isa>(act.rows - t * kRows, rows, count, c, d + t * tile_d_stride, d_stride,
                           partial + t * kRows * stride + c, stride);
      }
    }
    if (full < n) {  // the last columns, zero-padded to a register block
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < kBlock; ++j) tail[i * kBlock + j] = full + j < n ? ToFloat(rows[i][full + j]) : 0.0f;
      }
      for (int64_t t = 0; t < act.tiles; ++t) {
        PanelBlock<Isa>(tail, count, kBlock, d + t * tile_d_stride, d_stride, partial + t * kRows * stride + full, stride);
      }
    }
  }
}

// Rows [k0, k1) of B into PackedB's strips of Isa's register block, recording which rows hold Inf or NaN.
template <class Isa, typename TW>
void PackRows(const TW* b, int64_t depth, int64_t n, int64_t k0, int64_t k1, float* packed, uint8_t* row_finite) {
  constexpr int64_t kBlock = Isa::kTileVecs * Isa::kWidth;
  for (int64_t k = k0; k < k1; ++k) {
    bool finite = true;
    for (int64_t c = 0; c < n; c += kBlock) {
      const int64_t w = Min(kBlock, n - c);
      float* dst = packed + ((c / kBlock) * depth + k) * kBlock;
      finite = CopyRow<Isa>(b + k * n + c, w, dst) && finite;
      for (int64_t j = w; j < kBlock; ++j) dst[j] = 0.0f;
    }
    row_finite[k] = finite ? 1 : 0;
  }
}

// For one pair of rows of A over kStrips strips of packed B (strips[s]: the strip's row 0), one block
// of its lists (RowPairLists) whose parts are [part[0], part[1]) both rows, [part[1], part[2]) the
// first only, [part[2], part[3]) the second only: acc0[0 : kStrips * kBlock] += value0[j] * B[k[j],
// strip columns] over the first two parts, acc1 += value1[j] * B[k[j], ...] over the first and the
// last (strip_step floats between two strips' accumulators). A row of B that both rows keep is
// loaded once for both: a walk of one row's own kept rows is bound by those loads (about half the
// FMA rate on Zen 4 when every entry is one row's), and the FMAs are those of kept elements only.
template <class Isa, int64_t kStrips>
inline void PairListBlock(const float* const* strips, const int32_t* k, const float* value0, const float* value1,
                          const int64_t* part, float* acc0, float* acc1, int64_t strip_step) {
  constexpr int64_t kVecs = Isa::kTileVecs;
  constexpr int64_t kW = Isa::kWidth;
  constexpr int64_t kBlock = kVecs * kW;
  typename Isa::Vec sum0[kStrips][kVecs], sum1[kStrips][kVecs];
  for (int64_t s = 0; s < kStrips; ++s)
    for (int64_t v = 0; v < kVecs; ++v) {
      sum0[s][v] = Isa::Load(acc0 + s * strip_step + v * kW);
      sum1[s][v] = Isa::Load(acc1 + s * strip_step + v * kW);
    }
  for (int64_t j = part[0]; j < part[1]; ++j) {
    const auto d0 = Isa::Set(value0[j]), d1 = Isa::Set(value1[j]);
    const int64_t o = static_cast<int64_t>(k[j]) * kBlock;
    for (int64_t s = 0; s < kStrips; ++s)
      for (int64_t v = 0; v < kVecs; ++v) {
        const auto bv = Isa::LoadShared(strips[s] + o + v * kW);
        sum0[s][v] = Isa::Fma(bv, d0, sum0[s][v]);
        sum1[s][v] = Isa::Fma(bv, d1, sum1[s][v]);
      }
  }
  for (int64_t j = part[1]; j < part[2]; ++j) {
    const auto d0 = Isa::Set(value0[j]);
    const int64_t o = static_cast<int64_t>(k[j]) * kBlock;
    for (int64_t s = 0; s < kStrips; ++s)
      for (int64_t v = 0; v < kVecs; ++v) sum0[s][v] = Isa::Fma(Isa::LoadShared(strips[s] + o + v * kW), d0, sum0[s][v]);
  }
  for (int64_t j = part[2]; j < part[3]; ++j) {
    const auto d1 = Isa::Set(value1[j]);
    const int64_t o = static_cast<int64_t>(k[j]) * kBlock;
    for (int64_t s = 0; s < kStrips; ++s)
      for (int64_t v = 0; v < kVecs; ++v) sum1[s][v] = Isa::Fma(Isa::LoadShared(strips[s] + o + v * kW), d1, sum1[s][v]);
  }
  for (int64_t s = 0; s < kStrips; ++s)
    for (int64_t v = 0; v < kVecs; ++v) {
      Isa::Store(acc0 + s * strip_step + v * kW, sum0[s][v]);
      Isa::Store(acc1 + s * strip_step + v * kW, sum1[s][v]);
    }
}

// Strips of packed B that a pair of rows walks together in PairListBlock: two rows' accumulators of
// every strip, one strip's loads and the two broadcasts must fit in the vector registers (AVX-512:
// 2 strips of 3 vectors, 12 accumulators of 32 registers; AVX2: 1 strip of 3; NEON: 1 of 4).
template <class Isa>
constexpr int64_t PairListStrips() {
  return 2 * 2 * Isa::kTileVecs + 2 + 2 <= Isa::kRegisters ? 2 : 1;
}

// TilesPacked with each pair of rows of A over the union of their own kept rows of B (lists): per
// block of kPairListBlock rows of B and group of strips, each pair adds the kept rows of the block
// that either of its rows keeps. acc holds every row of A (and the second row of an odd last pair),
// `stride` floats apart.
template <class Isa>
void PairListColumns(const RowPairLists& lists, const PackedB& b, int64_t w_strips, int64_t first_strip, float* acc,
                     int64_t stride) {
  constexpr int64_t kBlock = Isa::kTileVecs * Isa::kWidth;
  constexpr int64_t kStrips = PairListStrips<Isa>();
  const int64_t pairs = lists.pairs;
  const int64_t starts = PairListStarts(lists.blocks);
  const float* strips[kStrips];
  for (int64_t block = 0; block < lists.blocks; ++block) {
    for (int64_t s = 0; s < w_strips; s += kStrips) {
      const int64_t live = Min(kStrips, w_strips - s);
      for (int64_t i = 0; i < kStrips; ++i) {
        strips[i] = b.data + (first_strip + s + Min(i, live - 1)) * b.depth * kBlock;
      }
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t* part = lists.start + p * starts + kPairListParts * block;
        if (part[kPairListParts] == part[0]) continue;
        const int32_t* k = lists.k + p * lists.stride;
        const float* value0 = lists.value + 2 * p * lists.stride;
        const float* value1 = value0 + lists.stride;
        float* acc0 = acc + 2 * p * stride + s * kBlock;
        float* acc1 = acc0 + stride;
        if (live == kStrips) {
          PairListBlock<Isa, kStrips>(strips, k, value0, value1, part, acc0, acc1, kBlock);
        } else {
          for (int64_t i = 0; i < live; ++i) {
            PairListBlock<Isa, 1>(strips + i, k, value0, value1, part, acc0 + i * kBlock, acc1 + i * kBlock, kBlock);
          }
        }
      }
    }
  }
}

// RowPairLists of pairs [p0, p1) of D's rows, lists `stride` entries apart: per vector of kWidth
// columns, Isa::KeptPairParts appends the columns both rows keep to the list and those one row keeps
// to the block's buffers of the other two parts (storing whole vectors, so that stride is depth +
// kPairListSlack), which follow once the block is done.
template <class Isa>
void PairLists(const float* d, int64_t rows, int64_t depth, int64_t stride, int64_t p0, int64_t p1, int32_t* k,
               float* value, int64_t* count, int64_t* start) {
  constexpr int64_t kW = Isa::kWidth;
  static_assert(kPairListBlock % kW == 0 && kPairListSlack >= kW, "blocks of whole vectors");
  constexpr int64_t kBuffer = kPairListBlock + kPairListSlack;
  const int64_t blocks = (depth + kPairListBlock - 1) / kPairListBlock;
  alignas(64) static const float kZeros[kW] = {};
  alignas(64) int32_t first_k[kBuffer], second_k[kBuffer];
  alignas(64) float first_v[kBuffer], second_v[kBuffer];
  for (int64_t p = p0; p < p1; ++p) {
    const float* d0 = d + 2 * p * depth;
    const float* d1 = 2 * p + 1 < rows ? d0 + depth : nullptr;
    int32_t* pk = k + p * stride;
    float* v0 = value + 2 * p * stride;
    float* v1 = v0 + stride;
    int64_t* pstart = start + p * PairListStarts(blocks);
    int64_t c = 0;
    int64_t j = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      PairParts parts{{pk, first_k, second_k}, {v0, first_v, nullptr}, {v1, nullptr, second_v}, {c, 0, 0}};
      const int64_t j1 = Min(depth, (block + 1) * kPairListBlock);
      for (; j + kW <= j1; j += kW) Isa::KeptPairParts(d0 + j, d1 != nullptr ? d1 + j : kZeros, static_cast<int32_t>(j), parts);
      for (; j < j1; ++j) {  // the tail of K
        KeptPairColumns<1>(d0 + j, d1 != nullptr ? d1 + j : kZeros, static_cast<int32_t>(j), parts);
      }
      // The parts one row keeps, after the block's first; the other row's values there are 0.
      pstart[kPairListParts * block] = c;
      c = parts.count[0];
      const int64_t singles[2] = {parts.count[1], parts.count[2]};
      const int32_t* single_k[2] = {first_k, second_k};
      const float* single_v[2] = {first_v, second_v};
      float* kept_v[2] = {v0, v1};
      float* zero_v[2] = {v1, v0};
      for (int part = 0; part < 2; ++part) {
        pstart[kPairListParts * block + 1 + part] = c;
        const size_t n = static_cast<size_t>(singles[part]);
        std::memcpy(pk + c, single_k[part], n * sizeof(int32_t));
        std::memcpy(kept_v[part] + c, single_v[part], n * sizeof(float));
        std::memset(zero_v[part] + c, 0, n * sizeof(float));
        c += singles[part];
      }
    }
    pstart[kPairListParts * blocks] = c;
    count[p] = c;
  }
}

// Kept rows of B per block of TilesPacked: a strip's block (96 KiB on AVX-512) streams from L2 in
// order, so it need not fit L1 as a copied panel must, and longer blocks load and store the register
// tiles' accumulators less often. One Zen 4 thread at 0% (CPU time against onnxruntime's MatMul,
// against 128 rows in the same run): 512 rows 0.97-0.99x against 0.92-0.95x on 576x1536 / 1536x576
// at M = 128-256, 1.20-1.32x against 1.16-1.21x on 4096x4096; 256 and 1024 rows in between.
constexpr int64_t kPackedBlockRows = 512;

// Several rows of A over the columns [n0, n1) of packed B (the compute-bound path, and the
// memory-bound one for a few rows: B is read once, strip by strip). Without lists: for each block of
// kPackedBlockRows kept rows and each strip, every tile of A multiplies the strip's block (from L2)
// into float32 accumulators for all rows (work), stored to Y at the end; a row of B
// with Inf or NaN goes alone, skipped by the rows of A that drop it (0 * Inf must not make NaN).
// With lists: PairListColumns.
template <class Isa, typename TW>
void TilesPacked(const SparseTiles& act, const RowPairLists* lists, const PackedB& b, int64_t n, const float* bias, TW* y,
                 int64_t n0, int64_t n1, float* work) {
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kBlock = Isa::kTileVecs * Isa::kWidth;
  const int64_t w = n1 - n0;
  const int64_t stride = PanelStride(RoundUp(w, kBlock));
  float* acc = work;
  std::memset(acc, 0, static_cast<size_t>(act.tiles * kRows * stride) * sizeof(float));
  if (lists != nullptr) {
    PairListColumns<Isa>(*lists, b, RoundUp(w, kBlock) / kBlock, n0 / kBlock, acc, stride);
  } else {
    const int64_t d_stride = act.row_stride;
    const float* rows[kPackedBlockRows];
    for (int64_t i0 = 0; i0 < act.kept_count; i0 += kPackedBlockRows) {
      const int64_t count = Min(kPackedBlockRows, act.kept_count - i0);
      const int32_t* kept = act.kept + i0;
      bool all_finite = true;
      for (int64_t i = 0; i < count; ++i) all_finite = all_finite && b.row_finite[kept[i]] != 0;
      for (int64_t c = 0; c < w; c += kBlock) {
        const float* strip = b.data + ((n0 + c) / kBlock) * b.depth * kBlock;
        for (int64_t i = 0; i < count; ++i) rows[i] = strip + static_cast<int64_t>(kept[i]) * kBlock;
        for (int64_t t = 0; t < act.tiles; ++t) {
          const int64_t live = Min(kRows, act.rows - t * kRows);
          const float* d = act.values + t * kRows * d_stride + i0;
          float* tile_acc = acc + t * kRows * stride + c;
          if (all_finite) {
            RowsBlockLive<Isa>(live, rows, count, 0, d, d_stride, tile_acc, stride);
            continue;
          }
          for (int64_t start = 0; start < count;) {
            int64_t end = start;
            while (end < count && b.row_finite[kept[end]] != 0) ++end;
            if (end > start) RowsBlockLive<Isa>(live, rows + start, end - start, 0, d + start, d_stride, tile_acc, stride);
            if (end < count) NonFiniteRow(rows[end], kBlock, d + end, d_stride, live, tile_acc, stride);
            start = end + 1;
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < act.rows; ++r) {
    StoreRow<Isa>(acc + r * stride, bias != nullptr ? bias + n0 : nullptr, y + r * n + n0, w);
  }
}

// y[0:n] = sum of the partials, part_stride floats apart (+ bias), stored as TW.
template <class Isa, typename TW>
void ReducePartials(const float* partials, int64_t parts, int64_t part_stride, int64_t n, const float* bias, TW* y) {
  constexpr int64_t kChunk = 1024;
  alignas(64) float sum[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t w = Min(kChunk, n - c0);
    std::memcpy(sum, partials + c0, static_cast<size_t>(w) * sizeof(float));
    for (int64_t p = 1; p < parts; ++p) {
      const float* part = partials + p * part_stride + c0;
      int64_t j = 0;
      for (; j + Isa::kWidth <= w; j += Isa::kWidth) Isa::Store(sum + j, Isa::Add(Isa::Load(sum + j), Isa::Load(part + j)));
      for (; j < w; ++j) sum[j] += part[j];
    }
    StoreRow<Isa>(sum, bias != nullptr ? bias + c0 : nullptr, y + c0, w);
  }
}

template <class Isa, typename TW>
constexpr KernelSet<TW> MakeKernelSet() {
  return KernelSet<TW>{Isa::kTileRows, Isa::kTileVecs * Isa::kWidth, PairListStrips<Isa>() * Isa::kTileVecs * Isa::kWidth,
                       &Sparsify<Isa, TW>, &RowPartial<Isa, TW>, &ReducePartials<Isa, TW>,
                       &TileColumns<Isa, TW>, &TilesPartial<Isa, TW>, &TilesPartialDirect<Isa, TW>,
                       &PackRows<Isa, TW>, &TilesPacked<Isa, TW>, &PairLists<Isa>};
}

}  // namespace SCAP_KERNEL_NS
}  // namespace scap
