// NBits kernels for AVX-512 (AVX512F/BW/VL), compiled with those flags only here. A register tile
// is 128 columns: 8 float accumulators and 8 int32 zero-point vectors; a row's 64 bytes of 4-bit
// codes are one cache line, read at M = 1 as one vector of 16 lanes (BlockTileLanes).
#include <immintrin.h>

#define SCAP_KERNEL_NS avx512
#include "nbits_impl.h"

namespace scap {
namespace avx512 {
namespace {

struct NBitsIsa {
  using Vec = __m512;
  using IVec = __m512i;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 8;  // several rows: a register tile of kRows rows by kVecs vectors
  static constexpr int kVecs = 2;
  static constexpr bool kLanes = true;  // BlockTileLanes
  static constexpr int kTileGroups = 4;
  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Set(float x) { return _mm512_set1_ps(x); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec LoadHalf(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static IVec Widen(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static IVec Low4(IVec x) { return _mm512_and_si512(x, _mm512_set1_epi32(0x0F)); }
  static IVec High4(IVec x) { return _mm512_srli_epi32(x, 4); }
  static IVec SubI(IVec a, IVec b) { return _mm512_sub_epi32(a, b); }
  static Vec Cvt(IVec x) { return _mm512_cvtepi32_ps(x); }
  // The low and high nibbles of each lane's low byte as floats: vpermps reads an index's low 4 bits.
  static void Nibbles(IVec x, Vec* lo, Vec* hi) {
    const Vec table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    *lo = _mm512_permutexvar_ps(x, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), table);
  }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  // BlockTileLanes: a tile's 64 bytes as 16 lanes of 8 nibbles.
  static IVec LoadI(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static Vec Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  // Nibble t of each lane as the float q * 16^t, masked in place (the top one converted unsigned,
  // exact: 4 significant bits); nibble 0 by vpermps, which reads only an index's low 4 bits.
  static constexpr float NibbleScale(int t) { return nbits::NibbleScaleAt(t); }
  static Vec NibbleAt(IVec x, int t) {
    if (t == 0) return _mm512_permutexvar_ps(x, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const IVec m = _mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFu << (4 * t))));
    return t == 7 ? _mm512_cvtepu32_ps(m) : _mm512_cvtepi32_ps(m);
  }
  // acc[t] lane j holds column 32 (j / 4) + 16 (t % 2) + 4 (j % 4) + t / 2 of the tile: for each
  // t % 2, a 4 x 4 transpose of 4-lane pieces in two rounds of vpermt2ps, into columns in order.
  static void ToColumns(Vec* acc) {
    const IVec i1[2] = {_mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)};
    const IVec i2[2] = {_mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23),
                        _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31)};
    Vec out[8];
    for (int h = 0; h < 2; ++h) {
      Vec u[2][2];
      for (int p = 0; p < 2; ++p) {
        for (int gh = 0; gh < 2; ++gh) u[p][gh] = _mm512_permutex2var_ps(acc[4 * p + h], i1[gh], acc[4 * p + 2 + h]);
      }
      for (int g = 0; g < 4; ++g) out[2 * g + h] = _mm512_permutex2var_ps(u[0][g / 2], i2[g % 2], u[1][g / 2]);
    }
    for (int v = 0; v < 8; ++v) acc[v] = out[v];
  }
};

}  // namespace
}  // namespace avx512

const NBitsKernels& Avx512NBitsKernels() {
  static const NBitsKernels kernels = avx512::nbits::MakeNBitsKernels<avx512::NBitsIsa>("avx512");
  return kernels;
}

}  // namespace scap
