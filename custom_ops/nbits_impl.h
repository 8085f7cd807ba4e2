// The NBits kernels (nbits_kernels.h), written once over a small vector policy and compiled once
// per instruction set: nbits_avx512.cc, nbits_avx2.cc, nbits_portable.cc. As in gemm_impl.h, each
// including translation unit defines SCAP_KERNEL_NS first and nothing here calls std:: templates,
// so that code built with -mavx512f is never linked into a caller on a CPU without it.
//
// A policy provides: Vec (kWidth floats), IVec (kWidth int32), Zero, Set, Load, Store, Mul, Fma
// (a*b+c), Widen (kWidth bytes to int32 lanes), Low4 / High4 (a lane's low / high nibble of its
// byte), Nibbles (both as floats), SubI, Cvt (int32 to float), LoadHalf (kWidth float16 as floats),
// Prefetch, and kTileGroups: 32-column groups per register tile.
// kLanes: whether M = 1 reads 4-bit tiles in place (BlockTileLanes: LoadI, Broadcast, NibbleAt,
// NibbleScale, ToColumns).
//
// One row of A, per chunk of at most kChunkRows kept rows of one block of K: for each register
// tile of columns, the chunk's d * (q - zp) are summed in registers, multiplied by the block's
// scales once and added to y. The tile walks along the chunk's rows; their next lines are
// prefetched kPrefetchBytes ahead (into L1), and the next chunk's lines under the tile (with its
// block's scales and zero points) a whole chunk ahead (into L2).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_common.h"
#include "nbits_kernels.h"

#ifndef SCAP_KERNEL_NS
#error "define SCAP_KERNEL_NS before including nbits_impl.h"
#endif

namespace scap {
namespace SCAP_KERNEL_NS {
namespace nbits {

constexpr int64_t kGroup = 32;            // columns of a 4-bit group (16 bytes)
constexpr int64_t kMaxBlock = 256;        // the largest block_size
// How far ahead along the rows: 128 bytes measured fastest of 64 to 2048 (K = N = 4096, 2 threads,
// Zen 4 EPYC): the block's up to 32 rows are 2^n bytes apart and share few L1 sets.
constexpr int64_t kPrefetchBytes = 128;
constexpr int64_t kRowsPerPass = 128;     // several rows: rows of A per pass over a strip

// Full unrolling before the accumulator arrays are given registers (GCC otherwise keeps them on
// the stack, and every FMA waits on a store and a load).
#if defined(__GNUC__) && !defined(__clang__)
#define SCAP_UNROLL _Pragma("GCC unroll 32")
#elif defined(__clang__)
#define SCAP_UNROLL _Pragma("unroll")
#else
#define SCAP_UNROLL
#endif

// How a block's scales and zero points are stored (NBitsRow): kHalf, float16 scales; kPacked, 4-bit
// zero points packed like a row of B, so that a tile starting at column c (a multiple of 32) finds
// its zero points at byte c / 2 of the block's row. The kernels below read both in place.
template <bool kHalf>
struct ScaleType {
  using T = float;
};
template <>
struct ScaleType<true> {
  using T = uint16_t;
};

template <bool kHalf_, bool kPacked_>
struct Params {
  static constexpr bool kHalf = kHalf_;
  static constexpr bool kPacked = kPacked_;
  using Scale = typename ScaleType<kHalf_>::T;
  // c: a multiple of 32 (tiles, groups and column tasks start there)
  static constexpr int64_t ZeroPointOffset(int64_t c) { return kPacked ? c / 2 : c; }
};
using PlainParams = Params<false, false>;  // float32 scales, a byte per zero point

template <class Isa, class P>
inline typename Isa::Vec LoadScales(const typename P::Scale* s) {
  if constexpr (P::kHalf) {
    return Isa::LoadHalf(s);
  } else {
    return Isa::Load(s);
  }
}

// The zero points of kWidth columns `col` columns into a tile (col a multiple of kWidth) whose zero
// points start at zp.
template <class Isa, class P>
inline typename Isa::IVec LoadZeroPoints(const uint8_t* zp, int col) {
  if constexpr (P::kPacked) {
    const typename Isa::IVec x = Isa::Widen(zp + 16 * (col / 32) + col % 16);
    return col % 32 < 16 ? Isa::Low4(x) : Isa::High4(x);
  } else {
    return Isa::Widen(zp + col);
  }
}

// 1 / 16^t: the factor of d for nibble t of a 32-bit lane read in place (BlockTileLanes).
constexpr float NibbleScaleAt(int t) { return t == 0 ? 1.0f : NibbleScaleAt(t - 1) * 0.0625f; }

inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// y[0 : kGroups * 32) (=|+=) scale * sum over rows i < count of dv[i] * (q_i - zp), q_i the codes
// at rows[i] + byte_off; zp: the block's zero points of these columns. Exact form: q - zp in int32
// for every row.
template <class Isa, int kBits, int kGroups, class P>
inline void BlockTileExact(const uint8_t* const* rows, const float* dv, int64_t count, int64_t byte_off,
                           const typename P::Scale* scale, const uint8_t* zp, float* y, bool first) {
  using Vec = typename Isa::Vec;
  using IVec = typename Isa::IVec;
  constexpr int kW = Isa::kWidth;
  constexpr int kV = 32 / kW;  // vectors of a 32-column group
  constexpr int kH = 16 / kW;  // 4 bits: widenings of a group's 16 bytes
  Vec acc[kGroups * kV];
  IVec z[kGroups * kV];
  SCAP_UNROLL
  for (int v = 0; v < kGroups * kV; ++v) {
    acc[v] = Isa::Zero();
    z[v] = LoadZeroPoints<Isa, P>(zp, v * kW);
  }
  for (int64_t i = 0; i < count; ++i) {
    const Vec d = Isa::Set(dv[i]);
    const uint8_t* p = rows[i] + byte_off;
    SCAP_UNROLL
    for (int g = 0; g < kGroups; ++g) {
      if constexpr (kBits == 4) {
        SCAP_UNROLL
        for (int h = 0; h < kH; ++h) {
          const IVec x = Isa::Widen(p + 16 * g + h * kW);
          const int lo = g * kV + h, hi = g * kV + kH + h;
          acc[lo] = Isa::Fma(Isa::Cvt(Isa::SubI(Isa::Low4(x), z[lo])), d, acc[lo]);
          acc[hi] = Isa::Fma(Isa::Cvt(Isa::SubI(Isa::High4(x), z[hi])), d, acc[hi]);
        }
      } else {
        SCAP_UNROLL
        for (int v = 0; v < kV; ++v) {
          const IVec x = Isa::Widen(p + 32 * g + v * kW);
          acc[g * kV + v] = Isa::Fma(Isa::Cvt(Isa::SubI(x, z[g * kV + v])), d, acc[g * kV + v]);
        }
      }
    }
  }
  SCAP_UNROLL
  for (int v = 0; v < kGroups * kV; ++v) {
    const Vec s = LoadScales<Isa, P>(scale + v * kW);
    Isa::Store(y + v * kW, first ? Isa::Mul(acc[v], s) : Isa::Fma(acc[v], s, Isa::Load(y + v * kW)));
  }
}

// The same as sum(d * q) - zp * sum(d): the rows' loop multiplies codes alone (4 bits: Isa::Nibbles,
// a table lookup on AVX-512), and the zero points are applied once per block. Only for blocks whose
// sum of |d| * 256 is finite (RowRangeBits checks), where it differs from the exact form by float
// rounding alone.
template <class Isa, int kBits, int kGroups, class P>
inline void BlockTile(const uint8_t* const* rows, const float* dv, int64_t count, int64_t byte_off,
                      const typename P::Scale* scale, const uint8_t* zp, float* y, bool first, float dsum) {
  using Vec = typename Isa::Vec;
  constexpr int kW = Isa::kWidth;
  constexpr int kV = 32 / kW;
  constexpr int kH = 16 / kW;
  Vec acc[kGroups * kV];
  SCAP_UNROLL
  for (int v = 0; v < kGroups * kV; ++v) acc[v] = Isa::Zero();
  for (int64_t i = 0; i < count; ++i) {
    const Vec d = Isa::Set(dv[i]);
    const uint8_t* p = rows[i] + byte_off;
    SCAP_UNROLL
    for (int g = 0; g < kGroups; ++g) {
      if constexpr (kBits == 4) {
        SCAP_UNROLL
        for (int h = 0; h < kH; ++h) {
          Vec lo, hi;
          Isa::Nibbles(Isa::Widen(p + 16 * g + h * kW), &lo, &hi);
          acc[g * kV + h] = Isa::Fma(lo, d, acc[g * kV + h]);
          acc[g * kV + kH + h] = Isa::Fma(hi, d, acc[g * kV + kH + h]);
        }
      } else {
        SCAP_UNROLL
        for (int v = 0; v < kV; ++v) {
          acc[g * kV + v] = Isa::Fma(Isa::Cvt(Isa::Widen(p + 32 * g + v * kW)), d, acc[g * kV + v]);
        }
      }
    }
  }
  const Vec minus_dsum = Isa::Set(-dsum);
  SCAP_UNROLL
  for (int v = 0; v < kGroups * kV; ++v) {
    const Vec s = LoadScales<Isa, P>(scale + v * kW);
    const Vec r = Isa::Fma(Isa::Cvt(LoadZeroPoints<Isa, P>(zp, v * kW)), minus_dsum, acc[v]);
    Isa::Store(y + v * kW, first ? Isa::Mul(r, s) : Isa::Fma(r, s, Isa::Load(y + v * kW)));
  }
}

// 4 bits, a whole register tile: BlockTile without widening. The tile's codes are read as kW
// 32-bit lanes of 8 nibbles; Isa::NibbleAt(x, t) gives nibble t of every lane as a float without
// moving it (q * 16^t, masked in place, or q itself from vpermps for t = 0), and it is multiplied
// by ds[i * 8 + t] = d_i * Isa::NibbleScale(t) = d_i / 16^t: each product is d_i * q exactly as in
// BlockTile, with no widening and no shifts in the rows' loop. On Zen 4 that costs 8-10% less time
// per weight in L2 (docs/kernel_benchmarks.md; BlockTile's vpmovzxbd, vpsrld and vpermps share two
// pipes). Accumulator t then holds, in lane j, the column of nibble t of lane j's bytes;
// Isa::ToColumns puts the accumulators in column order once per chunk. Only where no d_i / 16^7
// is subnormal (RowRangeBits checks).
template <class Isa, class P>
inline void BlockTileLanes(const uint8_t* const* rows, const float* ds, int64_t count, int64_t byte_off,
                           const typename P::Scale* scale, const uint8_t* zp /* or nullptr: 8 */, float* y,
                           bool first, float dsum) {
  using Vec = typename Isa::Vec;
  using IVec = typename Isa::IVec;
  constexpr int kW = Isa::kWidth;
  constexpr int kLoads = Isa::kTileGroups * 16 / (4 * kW);  // lane vectors of a row's tile bytes
  static_assert(kLoads >= 1 && kLoads * 4 * kW == Isa::kTileGroups * 16, "whole lane vectors");
  Vec acc[kLoads * 8];
  SCAP_UNROLL
  for (int v = 0; v < kLoads * 8; ++v) acc[v] = Isa::Zero();
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* p = rows[i] + byte_off;
    SCAP_UNROLL
    for (int l = 0; l < kLoads; ++l) {
      const IVec x = Isa::LoadI(p + l * 4 * kW);
      SCAP_UNROLL
      for (int t = 0; t < 8; ++t) {
        acc[l * 8 + t] = Isa::Fma(Isa::NibbleAt(x, t), Isa::Broadcast(ds + i * 8 + t), acc[l * 8 + t]);
      }
    }
  }
  Isa::ToColumns(acc);
  constexpr int kV = kLoads * 8;
  const Vec minus_dsum = Isa::Set(-dsum);
  const Vec minus_8dsum = Isa::Set(-8.0f * dsum);  // no zero points: 8 (exact: a power of two)
  SCAP_UNROLL
  for (int v = 0; v < kV; ++v) {
    const Vec s = LoadScales<Isa, P>(scale + v * kW);
    const Vec r = zp != nullptr ? Isa::Fma(Isa::Cvt(LoadZeroPoints<Isa, P>(zp, v * kW)), minus_dsum, acc[v])
                                : Isa::Add(acc[v], minus_8dsum);
    Isa::Store(y + v * kW, first ? Isa::Mul(r, s) : Isa::Fma(r, s, Isa::Load(y + v * kW)));
  }
}

// BlockTile or, for a block whose activations could overflow it (Inf, NaN, or near FLT_MAX),
// BlockTileExact.
template <class Isa, int kBits, int kGroups, class P>
inline void BlockTileAny(const uint8_t* const* rows, const float* dv, int64_t count, int64_t byte_off,
                         const typename P::Scale* scale, const uint8_t* zp, float* y, bool first, float dsum,
                         bool exact) {
  if (exact) {
    BlockTileExact<Isa, kBits, kGroups, P>(rows, dv, count, byte_off, scale, zp, y, first);
  } else {
    BlockTile<Isa, kBits, kGroups, P>(rows, dv, count, byte_off, scale, zp, y, first, dsum);
  }
}

// The rows of the block holding kept[i], up to i1 and at most `most`: their pointers and
// activations; returns how many.
inline int64_t GatherBlock(const NBitsRow& w, int64_t i, int64_t i1, const uint8_t** rows, float* dv,
                           int64_t most = kMaxBlock) {
  const int64_t end = (w.kept[i] / w.block_size + 1) * w.block_size;
  int64_t count = 0;
  for (; i < i1 && count < most && w.kept[i] < end; ++i, ++count) {
    const int64_t k = w.kept[i];
    rows[count] = w.b + k * w.row_bytes;
    if (dv != nullptr) dv[count] = w.d[k];
  }
  return count;
}

// One row of A streams a block's kept rows in chunks of at most kChunkRows, split evenly (32 rows:
// 16 + 16; 20 rows: 10 + 10): the rows of a chunk are read side by side, and more than 16 rows
// 2^11 bytes apart (row_bytes of N = 4096) share too few L1 sets of 8 ways for their prefetched
// lines to stay there.
constexpr int64_t kChunkRows = 16;

// Far prefetches step by a cache line (their tile's bytes are fewer on AVX2).
constexpr int64_t kFarStep = 64;


// The size of the chunk that starts at kept[i] (up to i1).
inline int64_t ChunkRows(const NBitsRow& w, int64_t i, int64_t i1) {
  const int64_t end = (w.kept[i] / w.block_size + 1) * w.block_size;
  int64_t j = i;
  while (j < i1 && w.kept[j] < end) ++j;
  const int64_t count = j - i;
  const int64_t pieces = (count + kChunkRows - 1) / kChunkRows;
  return (count + pieces - 1) / pieces;
}

template <class Isa, int kBits, class P>
void RowRangeBits(const NBitsRow& w, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y) {
  using Scale = typename P::Scale;
  constexpr int64_t kTile = Isa::kTileGroups * kGroup;
  constexpr int64_t kTileBytes = kTile * kBits / 8;
  const int64_t n = w.n;
  const Scale* const scales = static_cast<const Scale*>(w.scales);
  const int64_t zp_stride = P::kPacked ? w.row_bytes : n;  // bytes of a block's zero points
  alignas(64) uint8_t default_zp[kTile];
  std::memset(default_zp, 1 << (kBits - 1), sizeof default_zp);
  auto bytes_of = [](int64_t c) { return c * kBits / 8; };
  // The bytes of each row that the columns [c0, c1) read (4 bits: whole groups).
  const int64_t byte0 = bytes_of(c0);
  const int64_t byte1 = kBits == 4 ? Min64(w.row_bytes, (c1 + kGroup - 1) / kGroup * (kGroup / 2)) : c1;
  const int64_t full_end = c1 / kGroup * kGroup;  // whole groups end here

  const uint8_t* rows[kChunkRows];
  const uint8_t* next[kChunkRows];
  float dv[kChunkRows];
  alignas(64) float ds[kChunkRows * 8];  // BlockTileLanes: dv[r] / 16^t
  int64_t i = i0;
  int64_t count = GatherBlock(w, i, i1, rows, dv, ChunkRows(w, i, i1));
  // The first block's first lines; later blocks' were prefetched during the block before.
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t t = byte0; t < Min64(byte1, byte0 + kPrefetchBytes); t += 64) Isa::Prefetch(rows[r] + t);
  }
  int64_t pf = byte0 + kPrefetchBytes;  // the current block's rows are prefetched up to here
  bool first = true;
  while (i < i1) {
    const int64_t block = w.kept[i] / w.block_size;
    const int64_t next_i = i + count;
    const int64_t next_count = next_i < i1 ? GatherBlock(w, next_i, i1, next, nullptr, ChunkRows(w, next_i, i1)) : 0;
    const Scale* scale = scales + block * n;
    const uint8_t* zp_row = w.zero_points != nullptr ? w.zero_points + block * zp_stride : nullptr;
    const int64_t next_block = next_count > 0 ? w.kept[next_i] / w.block_size : block;
    const Scale* next_scale = next_block != block ? scales + next_block * n : nullptr;
    const uint8_t* next_zp =
        next_block != block && w.zero_points != nullptr ? w.zero_points + next_block * zp_stride : nullptr;
    float dsum = 0.0f, dabs = 0.0f;
    for (int64_t r = 0; r < count; ++r) {
      dsum += dv[r];
      dabs += Abs(dv[r]);
    }
    // NaN compares false: exact then too. 2^120 * 256 * 256 rows stays below FLT_MAX.
    const bool exact = !(dabs < 1.329228e36f);
    // BlockTileLanes where no d / 16^7 is subnormal: every nonzero |d| >= 2^-98.
    bool lanes = false;
    if constexpr (Isa::kLanes && kBits == 4) {
      lanes = !exact;
      for (int64_t r = 0; lanes && r < count; ++r) {
        const float a = Abs(dv[r]);
        if (a != 0.0f && a < 3.1554436e-30f) lanes = false;
        for (int t = 0; t < 8; ++t) ds[r * 8 + t] = dv[r] * Isa::NibbleScale(t);
      }
    }
    auto prefetch_to = [&](int64_t want) {
      for (; pf < want; pf += 64) {
        if (pf < byte1) {
          for (int64_t r = 0; r < count; ++r) Isa::Prefetch(rows[r] + pf);
        } else {
          const int64_t t = byte0 + (pf - byte1);
          if (t >= byte1) continue;
          for (int64_t r = 0; r < next_count; ++r) Isa::Prefetch(next[r] + t);
        }
      }
    };
    int64_t c = c0;
    for (; c + kTile <= full_end; c += kTile) {
      bool lanes_done = false;
      if constexpr (Isa::kLanes) {
        if (lanes) {
          BlockTileLanes<Isa, P>(rows, ds, count, bytes_of(c), scale + c,
                                 zp_row != nullptr ? zp_row + P::ZeroPointOffset(c) : nullptr, y + c, first, dsum);
          lanes_done = true;
        }
      }
      if (!lanes_done) {
        BlockTileAny<Isa, kBits, Isa::kTileGroups, P>(rows, dv, count, bytes_of(c), scale + c,
                                                      zp_row != nullptr ? zp_row + P::ZeroPointOffset(c) : default_zp,
                                                      y + c, first, dsum, exact);
      }
      prefetch_to(bytes_of(c) + kTileBytes + kPrefetchBytes);
      // The next chunk's lines under this tile, into L2: a whole chunk ahead, the memory's latency
      // is hidden however long a chunk takes (the near prefetch above then reads L2).
      for (int64_t t = bytes_of(c) & ~(kFarStep - 1); t < bytes_of(c) + kTileBytes; t += kFarStep) {
        for (int64_t r = 0; r < next_count; ++r) PrefetchL2(next[r] + t);
      }
      if (next_scale != nullptr) {  // and its block's scales and zero points, where a new block starts
        for (int64_t t = 0; t < kTile * int64_t{sizeof(Scale)}; t += kFarStep) {
          PrefetchL2(reinterpret_cast<const char*>(next_scale + c) + t);
        }
        if (next_zp != nullptr) {
          const uint8_t* zp_tile = next_zp + P::ZeroPointOffset(c);
          for (int64_t t = 0; t < P::ZeroPointOffset(kTile); t += kFarStep) PrefetchL2(zp_tile + t);
        }
      }
    }
    for (; c + kGroup <= full_end; c += kGroup) {
      BlockTileAny<Isa, kBits, 1, P>(rows, dv, count, bytes_of(c), scale + c,
                                     zp_row != nullptr ? zp_row + P::ZeroPointOffset(c) : default_zp, y + c, first,
                                     dsum, exact);
    }
    if (c < c1) {  // a last, partial group of columns
      const int64_t tail = c1 - c;
      if constexpr (kBits == 4) {  // its bytes are there (padding columns): pad the rest
        alignas(64) float s[kGroup], yy[kGroup] = {};
        alignas(64) uint8_t z[kGroup];
        PaddedBlockParams(w, block, c, tail, kGroup, s, z);
        for (int64_t j = 0; j < tail; ++j) yy[j] = first ? 0.0f : y[c + j];
        BlockTileAny<Isa, 4, 1, PlainParams>(rows, dv, count, bytes_of(c), s, z, yy, first, dsum, exact);
        for (int64_t j = 0; j < tail; ++j) y[c + j] = yy[j];
      } else {
        for (int64_t j = c; j < c1; ++j) {
          const float zj = static_cast<float>(ZeroPointAt(w, block, j)), sj = ScaleAt(w, block, j);
          float sum = 0.0f;
          for (int64_t r = 0; r < count; ++r) sum += dv[r] * (static_cast<float>(rows[r][j]) - zj);
          y[j] = first ? sum * sj : y[j] + sum * sj;
        }
      }
    }
    prefetch_to(byte1 + kPrefetchBytes);
    // The next block: its rows are prefetched up to byte0 + (pf - byte1).
    pf = byte0 + (pf > byte1 ? pf - byte1 : 0);
    for (int64_t r = 0; r < next_count; ++r) rows[r] = next[r];
    for (int64_t r = 0; r < next_count; ++r) dv[r] = w.d[w.kept[next_i + r]];
    count = next_count;
    i = next_i;
    first = false;
  }
  if (first) std::memset(y + c0, 0, static_cast<size_t>(c1 - c0) * sizeof(float));
}

// Several rows of A. A column strip of kStrip columns at a time: per block, the kept rows'
// W = (q - zp) * scale are dequantised once into a float panel (L1), then every tile of kRows rows of
// A adds D_tile @ panel with kRows x kVecs vectors of accumulators in registers, into a float32
// strip of Y (L2) copied out at the end.
template <class Isa, int kBits, int kGroups, class P>
void DequantisePanel(const uint8_t* const* rows, int64_t count, int64_t byte_off, const typename P::Scale* scale,
                     const uint8_t* zp, float* panel, int64_t stride) {
  using Vec = typename Isa::Vec;
  using IVec = typename Isa::IVec;
  constexpr int kW = Isa::kWidth;
  constexpr int kV = 32 / kW;
  constexpr int kH = 16 / kW;
  IVec z[kGroups * kV];
  Vec sc[kGroups * kV];
  SCAP_UNROLL
  for (int v = 0; v < kGroups * kV; ++v) {
    z[v] = LoadZeroPoints<Isa, P>(zp, v * kW);
    sc[v] = LoadScales<Isa, P>(scale + v * kW);
  }
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* p = rows[i] + byte_off;
    float* out = panel + i * stride;
    SCAP_UNROLL
    for (int g = 0; g < kGroups; ++g) {
      if constexpr (kBits == 4) {
        SCAP_UNROLL
        for (int h = 0; h < kH; ++h) {
          const IVec x = Isa::Widen(p + 16 * g + h * kW);
          const int lo = g * kV + h, hi = g * kV + kH + h;
          Isa::Store(out + lo * kW, Isa::Mul(Isa::Cvt(Isa::SubI(Isa::Low4(x), z[lo])), sc[lo]));
          Isa::Store(out + hi * kW, Isa::Mul(Isa::Cvt(Isa::SubI(Isa::High4(x), z[hi])), sc[hi]));
        }
      } else {
        SCAP_UNROLL
        for (int v = 0; v < kV; ++v) {
          const IVec x = Isa::Widen(p + 32 * g + v * kW);
          Isa::Store(out + (g * kV + v) * kW, Isa::Mul(Isa::Cvt(Isa::SubI(x, z[g * kV + v])), sc[g * kV + v]));
        }
      }
    }
  }
}

// acc[r][0 : kVecs * kWidth) += sum over i < count of act[r * act_stride + i] * panel[i], r < kLive.
template <class Isa, int kLive>
inline void PanelTile(const float* panel, int64_t stride, int64_t count, const float* act, int64_t act_stride,
                      float* acc, int64_t acc_stride) {
  constexpr int kVecs = Isa::kVecs;
  constexpr int kW = Isa::kWidth;
  typename Isa::Vec sum[kLive][kVecs];
  for (int r = 0; r < kLive; ++r)
    for (int v = 0; v < kVecs; ++v) sum[r][v] = Isa::Load(acc + r * acc_stride + v * kW);
  for (int64_t i = 0; i < count; ++i) {
    typename Isa::Vec b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = Isa::Load(panel + i * stride + v * kW);
    for (int r = 0; r < kLive; ++r) {
      const auto a = Isa::Set(act[r * act_stride + i]);
      for (int v = 0; v < kVecs; ++v) sum[r][v] = Isa::Fma(b[v], a, sum[r][v]);
    }
  }
  for (int r = 0; r < kLive; ++r)
    for (int v = 0; v < kVecs; ++v) Isa::Store(acc + r * acc_stride + v * kW, sum[r][v]);
}

template <class Isa, int kLive = Isa::kRows>
inline void PanelTileLive(int64_t live, const float* panel, int64_t stride, int64_t count, const float* act,
                          int64_t act_stride, float* acc, int64_t acc_stride) {
  if constexpr (kLive > 1) {
    if (live < kLive) {
      PanelTileLive<Isa, kLive - 1>(live, panel, stride, count, act, act_stride, acc, acc_stride);
      return;
    }
  }
  PanelTile<Isa, kLive>(panel, stride, count, act, act_stride, acc, acc_stride);
}

// Several rows: column strips multiplied side by side, one block at a time, so that the block's
// columns of D (rows of A 4 * K bytes apart: L3) are read once for all of them.
constexpr int64_t kStripsAtOnce = 4;

template <class Isa>
constexpr int64_t RowsWorkFloats() {
  constexpr int64_t kStrip = Isa::kTileGroups * kGroup;
  return kMaxBlock * (kStrip + 16) + kRowsPerPass * (kStripsAtOnce * kStrip + 16);
}

template <class Isa, int kBits, class P>
void RowsRangeBits(const NBitsRow& w, int64_t rows, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y,
                   float* work) {
  using Scale = typename P::Scale;
  constexpr int64_t kStrip = Isa::kTileGroups * kGroup;
  constexpr int64_t kStride = kStrip + 16;  // a cache line more: panel and strip rows do not alias in L1
  constexpr int64_t kYStride = kStripsAtOnce * kStrip + 16;
  constexpr int64_t kRows = Isa::kRows;
  constexpr int64_t kCols = Isa::kVecs * Isa::kWidth;
  static_assert(kStrip % kCols == 0, "the strip is whole register tiles");
  const int64_t n = w.n;
  float* panel = work;
  float* ys = panel + kMaxBlock * kStride;  // [kRowsPerPass, kYStride]: Y of the strips side by side
  alignas(64) uint8_t default_zp[kStrip];
  std::memset(default_zp, 1 << (kBits - 1), sizeof default_zp);
  alignas(64) float pad_scale[kStrip];
  alignas(64) uint8_t pad_zp[kStrip];
  const uint8_t* brows[kMaxBlock];
  for (int64_t cs = c0; cs < c1; cs += kStripsAtOnce * kStrip) {
    const int64_t ce = Min64(c1, cs + kStripsAtOnce * kStrip);
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
      const int64_t pass = Min64(kRowsPerPass, rows - m0);
      for (int64_t m = 0; m < pass; ++m) std::memset(ys + m * kYStride, 0, kYStride * sizeof(float));
      for (int64_t i = i0; i < i1;) {
        const int64_t block = w.kept[i] / w.block_size;
        const int64_t count = GatherBlock(w, i, i1, brows, nullptr);
        const float* act = w.d_kept + m0 * w.kept_stride + i;  // D at the block's kept k
        for (int64_t c = cs; c < ce; c += kStrip) {
          const int64_t width = Min64(kStrip, c1 - c);
          if (width == kStrip) {
            const Scale* scale = static_cast<const Scale*>(w.scales) + block * n + c;
            const uint8_t* zp = w.zero_points != nullptr
                                    ? w.zero_points + block * (P::kPacked ? w.row_bytes : n) + P::ZeroPointOffset(c)
                                    : default_zp;
            DequantisePanel<Isa, kBits, Isa::kTileGroups, P>(brows, count, c * kBits / 8, scale, zp, panel, kStride);
          } else if (kBits == 4) {
            // The last strip, 4 bits: the codes of its whole groups are there (padding) up to
            // row_bytes; scales 0 past N.
            PaddedBlockParams(w, block, c, width, kStrip, pad_scale, pad_zp);
            const int64_t groups = (width + kGroup - 1) / kGroup;
            for (int64_t g = 0; g < groups; ++g) {
              DequantisePanel<Isa, kBits, 1, PlainParams>(brows, count, (c + g * kGroup) * kBits / 8,
                                                          pad_scale + g * kGroup, pad_zp + g * kGroup,
                                                          panel + g * kGroup, kStride);
            }
            for (int64_t r = 0; r < count; ++r) {
              std::memset(panel + r * kStride + groups * kGroup, 0, (kStrip - groups * kGroup) * sizeof(float));
            }
          } else {  // 8 bits, partial strip: scalar, codes read in range only
            PaddedBlockParams(w, block, c, width, kStrip, pad_scale, pad_zp);
            for (int64_t r = 0; r < count; ++r) {
              for (int64_t j = 0; j < kStrip; ++j) {
                panel[r * kStride + j] =
                    j < width ? (static_cast<float>(brows[r][c + j]) - static_cast<float>(pad_zp[j])) * pad_scale[j]
                              : 0.0f;
              }
            }
          }
          float* strip = ys + (c - cs);
          for (int64_t m = 0; m < pass; m += kRows) {
            for (int64_t v = 0; v < kStrip; v += kCols) {
              PanelTileLive<Isa>(pass - m, panel + v, kStride, count, act + m * w.kept_stride, w.kept_stride,
                                 strip + m * kYStride + v, kYStride);
            }
          }
        }
        i += count;
      }
      for (int64_t m = 0; m < pass; ++m) {
        std::memcpy(y + (m0 + m) * n + cs, ys + m * kYStride, (ce - cs) * sizeof(float));
      }
    }
  }
}

// Calls Kernel<kBits, P>::Run(args...) for the weights' bits and storage of scales and zero points
// (packed zero points: 4 bits only).
template <template <int, class> class Kernel, class... Args>
void ForFormat(const NBitsRow& w, Args... args) {
  const bool packed = w.zp_packed && w.zero_points != nullptr;
  if (w.bits == 8) {
    if (w.scales_half) {
      Kernel<8, Params<true, false>>::Run(w, args...);
    } else {
      Kernel<8, PlainParams>::Run(w, args...);
    }
  } else if (w.scales_half) {
    if (packed) {
      Kernel<4, Params<true, true>>::Run(w, args...);
    } else {
      Kernel<4, Params<true, false>>::Run(w, args...);
    }
  } else if (packed) {
    Kernel<4, Params<false, true>>::Run(w, args...);
  } else {
    Kernel<4, PlainParams>::Run(w, args...);
  }
}

template <class Isa>
struct RowsKernel {
  template <int kBits, class P>
  struct Of {
    static void Run(const NBitsRow& w, int64_t rows, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y,
                    float* work) {
      RowsRangeBits<Isa, kBits, P>(w, rows, i0, i1, c0, c1, y, work);
    }
  };
};

template <class Isa>
struct RowKernel {
  template <int kBits, class P>
  struct Of {
    static void Run(const NBitsRow& w, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y) {
      RowRangeBits<Isa, kBits, P>(w, i0, i1, c0, c1, y);
    }
  };
};

template <class Isa>
void RowsRange(const NBitsRow& w, int64_t rows, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y, float* work) {
  if (c1 > c0) ForFormat<RowsKernel<Isa>::template Of>(w, rows, i0, i1, c0, c1, y, work);
}

template <class Isa>
void RowRange(const NBitsRow& w, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y) {
  if (c1 > c0) ForFormat<RowKernel<Isa>::template Of>(w, i0, i1, c0, c1, y);
}

template <class Isa>
constexpr NBitsKernels MakeNBitsKernels(const char* isa) {
  return NBitsKernels{&RowRange<Isa>, &RowsRange<Isa>, RowsWorkFloats<Isa>(), Isa::kTileGroups * kGroup, isa,
                      &QuantizeRowsGeneric, nullptr};
}

}  // namespace nbits
}  // namespace SCAP_KERNEL_NS
}  // namespace scap
