// NBits kernels for AVX-512 (AVX512F/BW/VL), compiled with those flags only here. A register tile
// is 128 columns: 8 float accumulators and 8 int32 zero-point vectors; a row's 64 bytes of 4-bit
// codes are one cache line.
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
  static constexpr int kTileGroups = 4;
  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Set(float x) { return _mm512_set1_ps(x); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
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
};

}  // namespace
}  // namespace avx512

const NBitsKernels& Avx512NBitsKernels() {
  static const NBitsKernels kernels = avx512::nbits::MakeNBitsKernels<avx512::NBitsIsa>("avx512");
  return kernels;
}

}  // namespace scap
