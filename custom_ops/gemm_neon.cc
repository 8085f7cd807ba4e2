// NEON kernels (ARM64, where NEON and its float16 conversions are part of the base ISA).
#include <arm_neon.h>

#define SCAP_KERNEL_NS neon
#include "gemm_impl.h"

namespace scap {
namespace neon {
namespace {

struct Isa {
  using Vec = float32x4_t;
  // 4 rows x 4 vectors: 16 accumulators and 4 vectors of B in the 32 registers.
  static constexpr int64_t kTileRows = 4;
  static constexpr int64_t kTileVecs = 4;
  static constexpr int64_t kWidth = 4;
  static constexpr int64_t kRegisters = 32;  // vector registers
  static Vec Set(float x) { return vdupq_n_f32(x); }
  static Vec Load(const float* p) { return vld1q_f32(p); }
  // A load that feeds several FMAs, held in a register: GCC would fold it into each FMA as a memory
  // operand and so load it once per FMA (the pair lists' walk is bound by loads).
  static Vec LoadShared(const float* p) {
    Vec v = vld1q_f32(p);
    SCAP_IN_REGISTER(v, "w");
    return v;
  }
  static void Store(float* p, Vec v) { vst1q_f32(p, v); }
  static Vec LoadB(const float* p) { return vld1q_f32(p); }
  static Vec LoadB(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static Vec Fma(Vec a, Vec b, Vec c) { return vfmaq_f32(c, a, b); }
  static Vec Add(Vec a, Vec b) { return vaddq_f32(a, b); }
  static Vec Mul(Vec a, Vec b) { return vmulq_f32(a, b); }
  static Vec Sub(Vec a, Vec b) { return vsubq_f32(a, b); }
  static Vec ChannelThreshold(Vec threshold, Vec scale) {
    const Vec product = vmulq_f32(threshold, scale);
    return vbslq_f32(vceqq_f32(product, product), product, scale);  // NaN (0 * inf): the scale
  }
  static uint32_t Drop(Vec diff, Vec threshold, Vec* kept) {
    const uint32x4_t keep = vmvnq_u32(vcleq_f32(vabsq_f32(diff), threshold));  // NaN compares false: kept
    *kept = vreinterpretq_f32_u32(vandq_u32(keep, vreinterpretq_u32_f32(diff)));
    const uint32_t lane_bits[4] = {1, 2, 4, 8};
    return vaddvq_u32(vandq_u32(keep, vld1q_u32(lane_bits)));
  }
  static void KeptPairParts(const float* d0, const float* d1, int32_t j, PairParts& out) {
    KeptPairColumns<kWidth>(d0, d1, j, out);
  }
  static void StoreHalf(uint16_t* p, Vec v) {
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v)));  // rounds to nearest even (FPCR default)
  }
};

}  // namespace
}  // namespace neon

const GemmKernels& NeonKernels() {
  static const GemmKernels kernels{neon::MakeKernelSet<neon::Isa, float>(), neon::MakeKernelSet<neon::Isa, uint16_t>(),
                                   "neon"};
  return kernels;
}

}  // namespace scap
