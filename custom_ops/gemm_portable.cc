// Portable kernels: plain C++ over 8-float blocks that compilers vectorise for the baseline ISA
// (SSE2 on x86-64, NEON on ARM64). Used where no faster kernel fits the CPU.
#define SCAP_KERNEL_NS portable
#include "gemm_impl.h"

namespace scap {
namespace portable {
namespace {

struct Isa {
  static constexpr int64_t kTileRows = 4;
  static constexpr int64_t kTileVecs = 2;
  static constexpr int64_t kWidth = 8;
  static constexpr int64_t kRegisters = 16;  // vector registers
  struct Vec {
    float v[8];
  };
  static Vec Set(float x) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = x;
    return r;
  }
  static Vec Load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static void Store(float* p, const Vec& v) { std::memcpy(p, v.v, sizeof v.v); }
  static Vec LoadShared(const float* p) { return Load(p); }
  static Vec LoadB(const float* p) { return Load(p); }
  static Vec LoadB(const uint16_t* p) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = HalfToFloat(p[i]);
    return r;
  }
  static Vec Fma(const Vec& a, const Vec& b, const Vec& c) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static Vec Mul(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static Vec Add(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static Vec Sub(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
  static Vec ChannelThreshold(const Vec& threshold, const Vec& scale) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = SCAP_KERNEL_NS::ChannelThreshold(threshold.v[i], scale.v[i]);
    return r;
  }
  static uint32_t Drop(const Vec& diff, const Vec& threshold, Vec* kept) {
    uint32_t bits = 0;
    for (int i = 0; i < 8; ++i) {
      const bool keep = !(Abs(diff.v[i]) <= threshold.v[i]);  // NaN: kept
      kept->v[i] = keep ? diff.v[i] : 0.0f;
      bits |= static_cast<uint32_t>(keep) << i;
    }
    return bits;
  }
  static void KeptPairParts(const float* d0, const float* d1, int32_t j, PairParts& out) {
    KeptPairColumns<kWidth>(d0, d1, j, out);
  }
  static void StoreHalf(uint16_t* p, const Vec& v) {
    for (int i = 0; i < 8; ++i) p[i] = FloatToHalf(v.v[i]);
  }
};

}  // namespace
}  // namespace portable

const GemmKernels& PortableKernels() {
  static const GemmKernels kernels{portable::MakeKernelSet<portable::Isa, float>(), portable::MakeKernelSet<portable::Isa, uint16_t>(), "portable"};
  return kernels;
}

}  // namespace scap
