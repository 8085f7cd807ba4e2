// Small helpers shared by the float and NBits kernels (gemm_impl.h, nbits_impl.h): the L2 prefetch
// hint, |x| without builtins, float16 conversions, and a value held in a register.
#pragma once

#include <cstdint>
#include <cstring>

namespace scap {

// Asks for the cache line at p to be fetched into L2 (a hint; nothing where the compiler has none).
// static: each kernel file keeps its own copy, so the linker never swaps in one compiled for another
// ISA (see gemm_impl.h on namespaces).
static inline void PrefetchL2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

// |x| by clearing the sign bit (NaN stays NaN), without compiler builtins (MSVC has none). static,
// as PrefetchL2.
static inline float Abs(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= 0x7fffffffu;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

// float16 <-> float32 in plain C++ (half.cc, built for the baseline ISA): IEEE binary16, round to
// nearest even.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace scap

// Holds a vector value in a register (constraint: "v"/"x" on x86, "w" on ARM64) so that the compiler
// cannot fold its load into each instruction that uses it. GCC and Clang only; elsewhere a no-op.
#if defined(__GNUC__)
#define SCAP_IN_REGISTER(value, constraint) asm("" : "+" constraint(value))
#else
#define SCAP_IN_REGISTER(value, constraint) ((void)0)
#endif
