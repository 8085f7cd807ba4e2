// PrefetchL2: one home for the L2 prefetch hint shared by the float and NBits kernels.
#pragma once

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

}  // namespace scap

// Holds a vector value in a register (constraint: "v"/"x" on x86, "w" on ARM64) so that the compiler
// cannot fold its load into each instruction that uses it. GCC and Clang only; elsewhere a no-op.
#if defined(__GNUC__)
#define SCAP_IN_REGISTER(value, constraint) asm("" : "+" constraint(value))
#else
#define SCAP_IN_REGISTER(value, constraint) ((void)0)
#endif
