// The int8 path of ScapSparseMatMulNBits (accuracy_level 4, several rows) with AVX-512 VNNI,
// compiled with those flags only here and chosen only on CPUs that have them (dispatch.cc; other
// CPUs quantise with nbits_int8.cc and multiply the dequantised activations with the float
// kernels, the same rule up to float rounding). As in the other kernel files, nothing here calls
// std:: templates, so that no code built with -mavx512vnni is linked into a caller on a CPU
// without it.
//
// Per column task, K in chunks of kNBitsInt8ChunkRows: the chunk's codes of a 32-column group (or
// of four at once) are put into the order vpdpbusd reads (for each 4 consecutive rows k, a lane per
// column holding their 4 codes); then tiles of 4 rows of A walk it, each block summed in int32
// (vpdpbusd: unsigned codes times signed activations) and added to float accumulators as
// (sum - zp * qsum) * (sa * scale), the scales and zero points read in place.
#include <immintrin.h>

#include <cstring>

#include "nbits_kernels.h"

namespace scap {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kPackPrefetchRows = 16;

inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }

// The first `left` of 16 lanes (all 16 from 16 on, none from 0 down).
inline __mmask16 TailMask16(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// Four rows' 16 codes (one byte each, columns 0..15) into 64 bytes: lane j holds column j's 4 codes.
inline __m512i Interleave4(__m128i x0, __m128i x1, __m128i x2, __m128i x3) {
  const __m128i a01l = _mm_unpacklo_epi8(x0, x1), a01h = _mm_unpackhi_epi8(x0, x1);
  const __m128i a23l = _mm_unpacklo_epi8(x2, x3), a23h = _mm_unpackhi_epi8(x2, x3);
  __m512i out = _mm512_castsi128_si512(_mm_unpacklo_epi16(a01l, a23l));
  out = _mm512_inserti32x4(out, _mm_unpackhi_epi16(a01l, a23l), 1);
  out = _mm512_inserti32x4(out, _mm_unpacklo_epi16(a01h, a23h), 2);
  return _mm512_inserti32x4(out, _mm_unpackhi_epi16(a01h, a23h), 3);
}

// The group's codes (columns g0 .. g0 + 31, `width` of them real) of rows [k0, k1) in vpdpbusd's
// order: panel[((k - k0) / 4) * 2 + h] covers columns 16h .. 16h + 15; rows at or past K are 0.
void PackGroup(const NBitsRow& w, int64_t g0, int64_t width, int64_t k0, int64_t k1, __m512i* panel) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  alignas(64) uint8_t tail[4][32];
  for (int64_t k = k0; k < k1; k += 4) {
    __m128i lo[4], hi[4];
    for (int r = 0; r < 4; ++r) {
      if (k + r >= w.depth) {
        lo[r] = hi[r] = _mm_setzero_si128();
        continue;
      }
      const uint8_t* row = w.b + (k + r) * w.row_bytes;
      if (w.bits == 4) {  // 16 bytes: low nibbles columns 0..15, high nibbles 16..31 (padding is 0)
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g0 / 2));
        lo[r] = _mm_and_si128(x, low4);
        hi[r] = _mm_and_si128(_mm_srli_epi16(x, 4), low4);
      } else if (width == 32) {
        lo[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g0));
        hi[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g0 + 16));
      } else {  // 8 bits, the last group: only the bytes that are there
        std::memset(tail[r], 0, 32);
        std::memcpy(tail[r], row + g0, static_cast<size_t>(width));
        lo[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(tail[r]));
        hi[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(tail[r] + 16));
      }
    }
    _mm512_storeu_si512(panel + ((k - k0) / 4) * 2, Interleave4(lo[0], lo[1], lo[2], lo[3]));
    _mm512_storeu_si512(panel + ((k - k0) / 4) * 2 + 1, Interleave4(hi[0], hi[1], hi[2], hi[3]));
  }
}

// Four rows' 16-byte pieces of four groups (one per 128-bit lane of x0..x3) into each group's
// 64 bytes of Interleave4: the unpacks work within lanes, then a 4 x 4 transpose of the lanes.
inline void Interleave4x4(__m512i x0, __m512i x1, __m512i x2, __m512i x3, __m512i* out) {
  const __m512i a01l = _mm512_unpacklo_epi8(x0, x1), a01h = _mm512_unpackhi_epi8(x0, x1);
  const __m512i a23l = _mm512_unpacklo_epi8(x2, x3), a23h = _mm512_unpackhi_epi8(x2, x3);
  const __m512i p0 = _mm512_unpacklo_epi16(a01l, a23l), p1 = _mm512_unpackhi_epi16(a01l, a23l);
  const __m512i p2 = _mm512_unpacklo_epi16(a01h, a23h), p3 = _mm512_unpackhi_epi16(a01h, a23h);
  const __m512i t0 = _mm512_shuffle_i64x2(p0, p1, 0x44), t1 = _mm512_shuffle_i64x2(p0, p1, 0xEE);
  const __m512i t2 = _mm512_shuffle_i64x2(p2, p3, 0x44), t3 = _mm512_shuffle_i64x2(p2, p3, 0xEE);
  out[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);
  out[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);
  out[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);
}

// PackGroup for four whole 4-bit groups at once (columns g0 .. g0 + 127: one 64-byte load a row),
// into panels[i] for group i: about a third of the instructions of four PackGroup calls, which
// matters where few rows of A share the panels.
void PackGroups4(const NBitsRow& w, int64_t g0, int64_t k0, int64_t k1, __m512i* const* panels) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t k = k0; k < k1; k += 4) {
    __m512i lo[4], hi[4];
    for (int r = 0; r < 4; ++r) {
      if (k + r >= w.depth) {
        lo[r] = hi[r] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t* at = w.b + (k + r) * w.row_bytes + g0 / 2;
      // Rows 2^n bytes apart defeat the hardware prefetchers: ask kPackPrefetchRows ahead.
      if (k + r + kPackPrefetchRows < w.depth) _mm_prefetch(reinterpret_cast<const char*>(at + kPackPrefetchRows * w.row_bytes), _MM_HINT_T0);
      const __m512i x = _mm512_loadu_si512(at);
      lo[r] = _mm512_and_si512(x, low4);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
    }
    __m512i qlo[4], qhi[4];
    Interleave4x4(lo[0], lo[1], lo[2], lo[3], qlo);
    Interleave4x4(hi[0], hi[1], hi[2], hi[3], qhi);
    const int64_t at = ((k - k0) / 4) * 2;
    for (int i = 0; i < 4; ++i) {
      _mm512_storeu_si512(panels[i] + at, qlo[i]);
      _mm512_storeu_si512(panels[i] + at + 1, qhi[i]);
    }
  }
}

// The group's scales and zero points: block b's at scale + b * stride (float32, or float16 where
// half) and zp + b * zp_stride (a byte each, or where packed the group's 16 bytes of nibbles as in
// a row of B; nullptr: every zero point default_zp).
struct GroupScales {
  const void* scale;
  bool half;
  int64_t stride;
  const uint8_t* zp;
  bool packed;
  int64_t zp_stride;
  float default_zp;

  // Columns 16h .. 16h + 15 of block b.
  __m512 Scales(int64_t b, int h) const {
    if (half) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(scale) + b * stride + 16 * h)));
    }
    return _mm512_loadu_ps(static_cast<const float*>(scale) + b * stride + 16 * h);
  }
  __m512 ZeroPoints(int64_t b, int h) const {
    if (zp == nullptr) return _mm512_set1_ps(default_zp);
    const uint8_t* p = zp + b * zp_stride + (packed ? 0 : 16 * h);
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    if (packed) x = h == 0 ? _mm512_and_si512(x, _mm512_set1_epi32(0x0F)) : _mm512_srli_epi32(x, 4);
    return _mm512_cvtepi32_ps(x);
  }
};

// Rows [m0, m0 + kRows) of Y over blocks [b0, b1) of one packed group (panel: block b0's first
// row), added to Y unless `first` (columns past `width` are neither read nor stored).
template <int kRows>
void GroupTile(const __m512i* panel, const GroupScales& gs, const NBitsQuantized& a, int64_t m0, int64_t k_blocks,
               int64_t b0, int64_t b1, int64_t block_size, float* y, int64_t n, int64_t width, bool first) {
  const __mmask16 m_lo = TailMask16(width), m_hi = TailMask16(width - 16);
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    acc[r][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m_lo, y + (m0 + r) * n);
    acc[r][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m_hi, y + (m0 + r) * n + 16);
  }
  const int8_t* qa[kRows];
  const float* sa[kRows];
  const int32_t* qsum[kRows];
  for (int r = 0; r < kRows; ++r) {
    qa[r] = a.qa + (m0 + r) * a.stride;
    sa[r] = a.sa + (m0 + r) * k_blocks;
    qsum[r] = a.qsum + (m0 + r) * k_blocks;
  }
  const int64_t quads = block_size / 4;
  for (int64_t b = b0; b < b1; ++b) {
    bool live = false;
    for (int r = 0; r < kRows; ++r) live = live || sa[r][b] != 0.0f;
    if (!live) continue;  // every row's block dropped (or 0)
    __m512i dot[kRows][2];
    for (int r = 0; r < kRows; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    const __m512i* p = panel + (b - b0) * quads * 2;
    const int64_t k0 = b * block_size;
    for (int64_t i = 0; i < quads; ++i) {
      const __m512i codes_lo = _mm512_loadu_si512(p + 2 * i), codes_hi = _mm512_loadu_si512(p + 2 * i + 1);
      for (int r = 0; r < kRows; ++r) {
        int32_t four;
        std::memcpy(&four, qa[r] + k0 + 4 * i, 4);
        const __m512i x = _mm512_set1_epi32(four);
        dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], codes_lo, x);
        dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], codes_hi, x);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512 s = gs.Scales(b, h), z = gs.ZeroPoints(b, h);
      for (int r = 0; r < kRows; ++r) {
        if (sa[r][b] == 0.0f) continue;  // adds nothing (and 0 * an Inf scale must not make NaN)
        // dot - zp * qsum is an integer below 2^24 in magnitude: exact in float32.
        const __m512 t = _mm512_fnmadd_ps(z, _mm512_set1_ps(static_cast<float>(qsum[r][b])), _mm512_cvtepi32_ps(dot[r][h]));
        acc[r][h] = _mm512_fmadd_ps(t, _mm512_mul_ps(s, _mm512_set1_ps(sa[r][b])), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_mask_storeu_ps(y + (m0 + r) * n, m_lo, acc[r][0]);
    _mm512_mask_storeu_ps(y + (m0 + r) * n + 16, m_hi, acc[r][1]);
  }
}

}  // namespace

// AVX-512F: 16 values at a time, masked at the block's end.
void QuantizeRowsAvx512(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                        const NBitsQuantized& q, uint8_t* row_finite) {
  const int64_t k_blocks = (depth + block_size - 1) / block_size;
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = d + r * depth;
    int8_t* qa = const_cast<int8_t*>(q.qa) + r * q.stride;
    float* sa = const_cast<float*>(q.sa) + r * k_blocks;
    int32_t* qsum = const_cast<int32_t*>(q.qsum) + r * k_blocks;
    // Finite: |x| < Inf, which NaN fails too.
    __mmask16 bad = 0;
    for (int64_t k = 0; k < depth; k += 16) {
      const __mmask16 m = TailMask16(depth - k);
      const __m512 x = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + k));
      bad |= _mm512_mask_cmp_ps_mask(m, x, inf, _CMP_NLT_UQ);
    }
    const bool finite = bad == 0;
    row_finite[r] = finite ? 1 : 0;
    std::memset(qa, 0, static_cast<size_t>(q.stride));
    for (int64_t b = 0; b < k_blocks; ++b) {
      sa[b] = 0.0f;
      qsum[b] = 0;
      if (!finite) continue;
      const int64_t k0 = b * block_size, k1 = MinI(k0 + block_size, depth);
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 m = TailMask16(k1 - k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + k)));
      }
      const float top = _mm512_reduce_max_ps(amax);
      if (top == 0.0f) continue;
      const __m512 inv = _mm512_set1_ps(127.0f / top);
      const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 m = TailMask16(k1 - k);
        // ClampScaled: NaN (0 * Inf, where 127 / amax overflowed) to 0, then into [-127, 127].
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), inv);
        x = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x);
        x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        const __m512i v = _mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(qa + k, m, _mm512_cvtepi32_epi8(v));
        sum = _mm512_add_epi32(sum, v);
      }
      sa[b] = top / 127.0f;
      qsum[b] = _mm512_reduce_add_epi32(sum);
    }
  }
}

void RowsInt8Vnni(const NBitsRow& w, const NBitsQuantized& a, int64_t rows, int64_t c0, int64_t c1, float* y,
                  uint8_t* work) {
  const int64_t k_blocks = (w.depth + w.block_size - 1) / w.block_size;
  const int64_t k_pad = k_blocks * w.block_size;
  const int64_t chunk_blocks = kNBitsInt8ChunkRows / w.block_size;  // block sizes divide the chunk
  const float default_zp = static_cast<float>(int64_t{1} << (w.bits - 1));
  // work: four groups' panels of a chunk of rows (64-byte aligned), then a partial group's scales
  // and zero points, padded (NBitsInt8WorkBytes).
  __m512i* panel = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(work) + 63) & ~uintptr_t{63});
  __m512i* const panels[4] = {panel, panel + kNBitsInt8ChunkRows / 2, panel + kNBitsInt8ChunkRows,
                              panel + 3 * kNBitsInt8ChunkRows / 2};
  float* pad_scale = reinterpret_cast<float*>(panel + 2 * kNBitsInt8ChunkRows);
  uint8_t* pad_zp = reinterpret_cast<uint8_t*>(pad_scale + 32 * k_blocks);
  const bool packed = w.zp_packed && w.zero_points != nullptr;
  const int64_t zp_stride = packed ? w.row_bytes : w.n;
  const int64_t scale_bytes = w.scales_half ? 2 : 4;
  for (int64_t g0 = c0; g0 < c1;) {
    // Four whole 4-bit groups packed together where they are there, else one.
    const int64_t groups = w.bits == 4 && c1 - g0 >= 128 ? 4 : 1;
    const int64_t width = MinI(c1 - g0, 32);  // of the last (or only) group
    for (int64_t b0 = 0; b0 < k_blocks; b0 += chunk_blocks) {
      const int64_t b1 = MinI(b0 + chunk_blocks, k_blocks);
      const int64_t k0 = b0 * w.block_size, k1 = MinI(b1 * w.block_size, k_pad);
      if (groups == 4) {
        PackGroups4(w, g0, k0, k1, panels);
      } else {
        PackGroup(w, g0, width, k0, k1, panel);
      }
      for (int64_t i = 0; i < groups; ++i) {
        const int64_t gi = g0 + 32 * i, gw = groups == 4 ? 32 : width;
        GroupScales gs{static_cast<const uint8_t*>(w.scales) + gi * scale_bytes,
                       w.scales_half,
                       w.n,
                       w.zero_points != nullptr ? w.zero_points + (packed ? gi / 2 : gi) : nullptr,
                       packed,
                       zp_stride,
                       default_zp};
        if (gw < 32) {  // past N: scale 0 (and no reads beyond the rows)
          for (int64_t b = b0; b < b1; ++b) PaddedBlockParams(w, b, gi, gw, 32, pad_scale + b * 32, pad_zp + b * 32);
          gs = GroupScales{pad_scale, false, 32, w.zero_points != nullptr ? pad_zp : nullptr, false, 32, default_zp};
        }
        int64_t m = 0;
        for (; m + kTileRows <= rows; m += kTileRows) {
          GroupTile<kTileRows>(panels[i], gs, a, m, k_blocks, b0, b1, w.block_size, y + gi, w.n, gw, b0 == 0);
        }
        switch (rows - m) {  // the last rows in one tile: each tile walks the whole panel
          case 3:
            GroupTile<3>(panels[i], gs, a, m, k_blocks, b0, b1, w.block_size, y + gi, w.n, gw, b0 == 0);
            break;
          case 2:
            GroupTile<2>(panels[i], gs, a, m, k_blocks, b0, b1, w.block_size, y + gi, w.n, gw, b0 == 0);
            break;
          case 1:
            GroupTile<1>(panels[i], gs, a, m, k_blocks, b0, b1, w.block_size, y + gi, w.n, gw, b0 == 0);
            break;
          default:
            break;
        }
      }
    }
    g0 += 32 * groups;
  }
}

}  // namespace scap
