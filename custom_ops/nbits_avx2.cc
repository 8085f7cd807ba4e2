// NBits kernels for AVX2 (with FMA), compiled with those flags only here. A register tile is one
// 32-column group: 4 float accumulators and 4 int32 zero-point vectors of the 16 registers.
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
  // BlockTileLanes (two groups a tile, 8 nibbles a lane, ands and conversions in place of the
  // widening) measured 5-15% slower than this tile on Zen 4: not used.
  static constexpr bool kLanes = false;
  static constexpr int kTileGroups = 1;
  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Set(float x) { return _mm256_set1_ps(x); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec LoadHalf(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
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
};

}  // namespace
}  // namespace avx2

const NBitsKernels& Avx2NBitsKernels() {
  static const NBitsKernels kernels = avx2::nbits::MakeNBitsKernels<avx2::NBitsIsa>("avx2");
  return kernels;
}

}  // namespace scap
