// Portable NBits kernels: plain C++ over 8-lane blocks that compilers vectorise for the baseline
// ISA (SSE2 on x86-64, NEON on ARM64). Used where no faster kernel fits the CPU.
#define SCAP_KERNEL_NS portable
#include "nbits_impl.h"

namespace scap {
namespace portable {
namespace {

struct NBitsIsa {
  static constexpr int kWidth = 8;
  static constexpr int kRows = 4;  // several rows: a register tile of kRows rows by kVecs vectors
  static constexpr int kVecs = 1;
  static constexpr bool kLanes = false;  // no BlockTileLanes
  static constexpr int kTileGroups = 1;
  struct Vec {
    float v[8];
  };
  struct IVec {
    int32_t v[8];
  };
  static Vec Zero() { return Set(0.0f); }
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
  static Vec LoadHalf(const uint16_t* p) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = HalfToFloat(p[i]);
    return r;
  }
  static void Store(float* p, const Vec& v) { std::memcpy(p, v.v, sizeof v.v); }
  static Vec Mul(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static Vec Fma(const Vec& a, const Vec& b, const Vec& c) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static IVec Widen(const uint8_t* p) {
    IVec r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static IVec Low4(const IVec& x) {
    IVec r;
    for (int i = 0; i < 8; ++i) r.v[i] = x.v[i] & 0x0F;
    return r;
  }
  static IVec High4(const IVec& x) {
    IVec r;
    for (int i = 0; i < 8; ++i) r.v[i] = x.v[i] >> 4;
    return r;
  }
  static IVec SubI(const IVec& a, const IVec& b) {
    IVec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
  static Vec Cvt(const IVec& x) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(x.v[i]);
    return r;
  }
  static void Nibbles(const IVec& x, Vec* lo, Vec* hi) {
    *lo = Cvt(Low4(x));
    *hi = Cvt(High4(x));
  }
  static void Prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
  }
};

}  // namespace
}  // namespace portable

const NBitsKernels& PortableNBitsKernels() {
  static const NBitsKernels kernels = portable::nbits::MakeNBitsKernels<portable::NBitsIsa>("portable");
  return kernels;
}

}  // namespace scap
