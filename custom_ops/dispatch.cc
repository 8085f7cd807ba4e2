// Picks the fastest kernels the running CPU supports, once. SCAP_ONNX_ISA=portable|avx2|avx512|amx
// caps the choice (tests use it to check every path on one machine).
#include <cstdlib>
#include <cstring>

#include "sparse_gemm.h"

namespace scap {

#if defined(SCAP_HAVE_X86_KERNELS)
const GemmKernels& Avx512Kernels();
const GemmKernels& Avx2Kernels();
#endif
#if defined(SCAP_HAVE_AMX_KERNELS)
const AmxGemm* AmxKernelsIfAvailable();
#endif

namespace {

bool AllowAmx() {
  const char* cap = std::getenv("SCAP_ONNX_ISA");
  return cap == nullptr || std::strcmp(cap, "amx") == 0;
}

const GemmKernels& Choose() {
  const char* cap = std::getenv("SCAP_ONNX_ISA");
  const bool allow_avx512 = AllowAmx() || std::strcmp(cap, "avx512") == 0;
  const bool allow_avx2 = allow_avx512 || std::strcmp(cap, "avx2") == 0;
#if defined(SCAP_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  // F16C comes with every AVX2 CPU that also has FMA (Haswell and later, Zen and later).
  if (allow_avx512 && has_avx512) return Avx512Kernels();
  if (allow_avx2 && has_avx2) return Avx2Kernels();
#else
  (void)allow_avx2;
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

const char* SelectedIsa() { return SelectAmx() != nullptr ? "amx" : SelectKernels().isa; }

}  // namespace scap
