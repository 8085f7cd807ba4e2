// AVX-512 kernels (x86-64 with AVX512F/BW/VL, F16C, FMA), compiled with those flags only here.
#include <immintrin.h>

#define SCAP_KERNEL_NS avx512
#include "gemm_impl.h"

namespace scap {
namespace avx512 {
namespace {

struct Isa {
  using Vec = __m512;
  static constexpr int64_t kTileRows = 8;
  static constexpr int64_t kTileVecs = 3;
  static constexpr int64_t kWidth = 16;
  static constexpr int64_t kRegisters = 32;  // vector registers
  static Vec Set(float x) { return _mm512_set1_ps(x); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  // A load that feeds several FMAs, held in a register: GCC would fold it into each FMA as a memory
  // operand and so load it once per FMA (the pair lists' walk is bound by loads).
  static Vec LoadShared(const float* p) {
    Vec v = _mm512_loadu_ps(p);
    SCAP_IN_REGISTER(v, "v");
    return v;
  }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec LoadB(const float* p) { return _mm512_loadu_ps(p); }
  static Vec LoadB(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec Sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec ChannelThreshold(Vec threshold, Vec scale) {
    const Vec product = _mm512_mul_ps(threshold, scale);
    return _mm512_mask_mov_ps(product, _mm512_cmp_ps_mask(product, product, _CMP_UNORD_Q), scale);  // 0 * inf
  }
  static uint32_t Drop(Vec diff, Vec threshold, Vec* kept) {
    const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(diff), threshold, _CMP_NLE_UQ);  // NaN: kept
    *kept = _mm512_maskz_mov_ps(keep, diff);
    return keep;
  }
  // Compressed in registers, then stored whole: Zen 4 runs vcompressps to memory in microcode.
  static void KeptPairParts(const float* d0, const float* d1, int32_t j, PairParts& out) {
    const Vec a0 = _mm512_loadu_ps(d0), a1 = _mm512_loadu_ps(d1), zero = _mm512_setzero_ps();
    const __mmask16 keep0 = _mm512_cmp_ps_mask(a0, zero, _CMP_NEQ_UQ), keep1 = _mm512_cmp_ps_mask(a1, zero, _CMP_NEQ_UQ);
    const __mmask16 both = keep0 & keep1, first = keep0 & ~keep1, second = keep1 & ~keep0;
    const __m512i columns = _mm512_add_epi32(_mm512_set1_epi32(j), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                        11, 12, 13, 14, 15));
    int64_t& c0 = out.count[0];
    int64_t& c1 = out.count[1];
    int64_t& c2 = out.count[2];
    _mm512_storeu_si512(out.k[0] + c0, _mm512_maskz_compress_epi32(both, columns));
    _mm512_storeu_ps(out.v0[0] + c0, _mm512_maskz_compress_ps(both, a0));
    _mm512_storeu_ps(out.v1[0] + c0, _mm512_maskz_compress_ps(both, a1));
    _mm512_storeu_si512(out.k[1] + c1, _mm512_maskz_compress_epi32(first, columns));
    _mm512_storeu_ps(out.v0[1] + c1, _mm512_maskz_compress_ps(first, a0));
    _mm512_storeu_si512(out.k[2] + c2, _mm512_maskz_compress_epi32(second, columns));
    _mm512_storeu_ps(out.v1[2] + c2, _mm512_maskz_compress_ps(second, a1));
    c0 += PopCount(both);
    c1 += PopCount(first);
    c2 += PopCount(second);
  }
  static void StoreHalf(uint16_t* p, Vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace avx512

const GemmKernels& Avx512Kernels() {
  static const GemmKernels kernels{avx512::MakeKernelSet<avx512::Isa, float>(), avx512::MakeKernelSet<avx512::Isa, uint16_t>(), "avx512"};
  return kernels;
}

}  // namespace scap
