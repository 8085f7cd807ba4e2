// Picks the fastest kernels the running CPU supports, once. SCAP_ONNX_ISA caps the choice (tests use
// it to check every path on one machine): amx|avx512|avx2|portable on x86-64, neon|portable on ARM64;
// any other value gives the portable kernels.
#include <cstdlib>
#include <cstring>

#include "nbits_kernels.h"
#include "sparse_gemm.h"

#if defined(SCAP_HAVE_X86_KERNELS)
#include <cpuid.h>  // the x86 kernels are built by GCC and Clang only (CMakeLists.txt)
#endif

namespace scap {

#if defined(SCAP_HAVE_X86_KERNELS)
const GemmKernels& Avx512Kernels();
const GemmKernels& Avx2Kernels();
const NBitsKernels& Avx512NBitsKernels();
const NBitsKernels& Avx2NBitsKernels();
void QuantizeRowsAvx512(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                        const NBitsQuantized& q, uint8_t* row_finite);
void RowsInt8Vnni(const NBitsRow& w, const NBitsQuantized& a, int64_t rows, int64_t c0, int64_t c1, float* y,
                  uint8_t* work);
#endif
const NBitsKernels& PortableNBitsKernels();
#if defined(SCAP_HAVE_AMX_KERNELS)
const AmxGemm* AmxKernelsIfAvailable();
#endif
#if defined(SCAP_HAVE_NEON_KERNELS)
const GemmKernels& NeonKernels();
#endif

namespace {

bool CapIs(const char* isa) {
  const char* cap = std::getenv("SCAP_ONNX_ISA");
  return cap != nullptr && std::strcmp(cap, isa) == 0;
}

bool Uncapped() { return std::getenv("SCAP_ONNX_ISA") == nullptr; }

#if defined(SCAP_HAVE_X86_KERNELS)
bool AllowAmx() { return Uncapped() || CapIs("amx"); }

// F16C (the float16 loads and stores of both x86 kernel sets), which __builtin_cpu_supports does
// not name in every compiler: CPUID leaf 1, ECX bit 29. CPUs and VMs with AVX2 and FMA but without
// it exist; the AVX2 kernels would die there with an illegal instruction.
bool HasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && ((ecx >> 29) & 1u) != 0;
}
#endif

const GemmKernels& Choose() {
#if defined(SCAP_HAVE_X86_KERNELS)
  const bool allow_avx512 = AllowAmx() || CapIs("avx512");
  const bool allow_avx2 = allow_avx512 || CapIs("avx2");
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HasF16c();
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  if (allow_avx512 && has_avx512) return Avx512Kernels();
  if (allow_avx2 && has_avx2) return Avx2Kernels();
#elif defined(SCAP_HAVE_NEON_KERNELS)
  // Every ARM64 CPU has NEON and its float16 conversions.
  if (Uncapped() || CapIs("neon")) return NeonKernels();
#endif
  return PortableKernels();
}

}  // namespace

const GemmKernels& SelectKernels() {
  static const GemmKernels& kernels = Choose();
  return kernels;
}

const AmxGemm* SelectAmx() {
#if defined(SCAP_HAVE_AMX_KERNELS)
  // AMX comes with AVX-512, whose kernels run everything the tile kernels do not.
  static const AmxGemm* kernels =
      AllowAmx() && std::strcmp(SelectKernels().isa, "avx512") == 0 ? AmxKernelsIfAvailable() : nullptr;
  return kernels;
#else
  return nullptr;
#endif
}

// The NBits kernels follow the float kernels' choice (NEON has none of its own: portable); on
// AVX-512 with VNNI the int8 path (accuracy_level 4) takes the int8 dot products.
const NBitsKernels& SelectNBitsKernels() {
  static const NBitsKernels kernels = [] () -> NBitsKernels {
#if defined(SCAP_HAVE_X86_KERNELS)
    const char* isa = SelectKernels().isa;
    if (std::strcmp(isa, "avx512") == 0) {
      NBitsKernels avx512 = Avx512NBitsKernels();
      if (__builtin_cpu_supports("avx512vnni")) {  // both built with -mavx512vnni
        avx512.quantize_rows = &QuantizeRowsAvx512;
        avx512.rows_int8 = &RowsInt8Vnni;
      }
      return avx512;
    }
    if (std::strcmp(isa, "avx2") == 0) return Avx2NBitsKernels();
#endif
    return PortableNBitsKernels();
  }();
  return kernels;
}

const char* SelectedIsa() { return SelectAmx() != nullptr ? "amx" : SelectKernels().isa; }

}  // namespace scap
