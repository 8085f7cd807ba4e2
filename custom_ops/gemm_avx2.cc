// AVX2 kernels (x86-64 with AVX2, F16C, FMA), compiled with those flags only here.
#include <immintrin.h>

#define SCAP_KERNEL_NS avx2
#include "gemm_impl.h"

namespace scap {
namespace avx2 {
namespace {

struct Isa {
  using Vec = __m256;
  static constexpr int64_t kTileRows = 4;
  // 4 x 24: 12 accumulators, 3 loads of B a step (4 x 16 left FMA latency exposed: on one Zen 4 thread
  // at M = 32-128 the tiles went from 0.63-0.76x to 0.74-0.86x of onnxruntime's MatMul at 0%, and
  // the pair lists, with 2 strips of 3, from 0.83-1.01x to 0.93-1.11x at 50%).
  static constexpr int64_t kTileVecs = 3;
  static constexpr int64_t kWidth = 8;
  static constexpr int64_t kRegisters = 16;  // vector registers
  static Vec Set(float x) { return _mm256_set1_ps(x); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  // A load that feeds several FMAs, held in a register: GCC would fold it into each FMA as a memory
  // operand and so load it once per FMA (the pair lists' walk is bound by loads).
  static Vec LoadShared(const float* p) {
    Vec v = _mm256_loadu_ps(p);
    SCAP_IN_REGISTER(v, "x");
    return v;
  }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec LoadB(const float* p) { return _mm256_loadu_ps(p); }
  static Vec LoadB(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec Sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec ChannelThreshold(Vec threshold, Vec scale) {
    const Vec product = _mm256_mul_ps(threshold, scale);
    return _mm256_blendv_ps(product, scale, _mm256_cmp_ps(product, product, _CMP_UNORD_Q));  // 0 * inf
  }
  static uint32_t Drop(Vec diff, Vec threshold, Vec* kept) {
    const Vec abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), diff);
    const Vec keep = _mm256_cmp_ps(abs, threshold, _CMP_NLE_UQ);  // NaN: kept
    *kept = _mm256_and_ps(keep, diff);
    return static_cast<uint32_t>(_mm256_movemask_ps(keep));
  }
  static void KeptPairParts(const float* d0, const float* d1, int32_t j, PairParts& out) {
    KeptPairColumns<kWidth>(d0, d1, j, out);
  }
  static void StoreHalf(uint16_t* p, Vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace avx2

const GemmKernels& Avx2Kernels() {
  static const GemmKernels kernels{avx2::MakeKernelSet<avx2::Isa, float>(), avx2::MakeKernelSet<avx2::Isa, uint16_t>(), "avx2"};
  return kernels;
}

}  // namespace scap
