// NBits kernels for AVX2 (with FMA), compiled with those flags only here. A register tile is two
// 32-column groups: 8 float accumulators; for 4 bits, a row's 32 bytes of codes are one load.
#include <immintrin.h>

#define SCAP_KERNEL_NS avx2
#include "nbits_impl.h"

namespace scap {
namespace avx2 {
namespace {

struct NBitsIsa {
  using Vec = __m256;
  using IVec = __m256i;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 4;  // several rows: a register tile of kRows rows by kVecs vectors
  static constexpr int kVecs = 2;
  static constexpr bool kLanes = true;  // BlockTileLanes
  static constexpr int kTileGroups = 2;
  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Set(float x) { return _mm256_set1_ps(x); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static IVec Widen(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static IVec Low4(IVec x) { return _mm256_and_si256(x, _mm256_set1_epi32(0x0F)); }
  static IVec High4(IVec x) { return _mm256_srli_epi32(x, 4); }
  static IVec SubI(IVec a, IVec b) { return _mm256_sub_epi32(a, b); }
  static Vec Cvt(IVec x) { return _mm256_cvtepi32_ps(x); }
  static void Nibbles(IVec x, Vec* lo, Vec* hi) {
    *lo = Cvt(Low4(x));
    *hi = Cvt(High4(x));
  }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  // BlockTileLanes: a tile's 32 bytes as 8 lanes of 8 nibbles.
  static IVec LoadI(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Vec Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  // Nibble t of each lane as the float q * 16^t in place; the top one (no unsigned conversion)
  // shifted down to q * 16^6.
  static constexpr float NibbleScale(int t) { return t == 7 ? 1.0f / 16777216.0f : nbits::NibbleScaleAt(t); }
  static Vec NibbleAt(IVec x, int t) {
    if (t == 7) return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, 4), _mm256_set1_epi32(0x0F000000)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xF << (4 * t))));
  }
  // acc[t] lane j holds column 32 (j / 4) + 16 (t % 2) + 4 (j % 4) + t / 2 of the tile: for each
  // t % 2, unpack, shuffle and swap 128-bit halves into columns in order.
  static void ToColumns(Vec* acc) {
    Vec out[8];
    for (int h = 0; h < 2; ++h) {
      const Vec a0 = acc[h], a1 = acc[2 + h], a2 = acc[4 + h], a3 = acc[6 + h];
      const Vec u01[2] = {_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1)};
      const Vec u23[2] = {_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3)};
      for (int m = 0; m < 2; ++m) {
        const Vec x = _mm256_shuffle_ps(u01[m], u23[m], _MM_SHUFFLE(1, 0, 1, 0));
        const Vec y = _mm256_shuffle_ps(u01[m], u23[m], _MM_SHUFFLE(3, 2, 3, 2));
        out[2 * h + m] = _mm256_permute2f128_ps(x, y, 0x20);
        out[4 + 2 * h + m] = _mm256_permute2f128_ps(x, y, 0x31);
      }
    }
    for (int v = 0; v < 8; ++v) acc[v] = out[v];
  }
};

}  // namespace
}  // namespace avx2

const NBitsKernels& Avx2NBitsKernels() {
  static const NBitsKernels kernels = avx2::nbits::MakeNBitsKernels<avx2::NBitsIsa>("avx2");
  return kernels;
}

}  // namespace scap
