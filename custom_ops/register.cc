// The library's exports: RegisterCustomOps, called by onnxruntime when a session registers this
// library (it adds ScapSparseMatMul and ScapSparseMatMulNBits, float32 and float16, in domain com.scap), and
// ScapOnnxKernelIsa, which tells callers (Python, tests) which kernels this process runs.
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "scap_sparse_matmul.h"
#include "scap_sparse_matmul_nbits.h"
#include "sparse_gemm.h"
#if defined(SCAP_WITH_CUDA)
#include "cuda/cuda_op.h"  // libscap_onnx_ops_cuda: the CUDA kernels beside the CPU ones
#endif

#if defined(_WIN32)
#define SCAP_EXPORT __declspec(dllexport)
#else
#define SCAP_EXPORT __attribute__((visibility("default")))
#endif

namespace {

// The C API version to use: the running onnxruntime's (1.x offers version x), at most the one these
// headers know; 0 when the runtime is older than kOldestOrtApi. (Asking GetApi for a version the
// runtime lacks prints an error to stderr, so the version string decides.)
uint32_t NegotiateApiVersion(const OrtApiBase* api_base) {
  const char* version = api_base->GetVersionString();
  if (version == nullptr || version[0] != '1' || version[1] != '.') return 0;
  const unsigned long minor = std::strtoul(version + 2, nullptr, 10);
  if (minor < scap::kOldestOrtApi) return 0;
  return minor < ORT_API_VERSION ? static_cast<uint32_t>(minor) : ORT_API_VERSION;
}

}  // namespace

extern "C" SCAP_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const uint32_t version = NegotiateApiVersion(api_base);
  const OrtApi* api = version != 0 ? api_base->GetApi(version) : nullptr;
  if (api == nullptr) {
    // Report with the oldest API, which every runtime has.
    const std::string message = std::string("scap_onnx_ops needs onnxruntime >= 1.") +
                                std::to_string(scap::kOldestOrtApi) + ", this is " + api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);

  // Ops and domains must outlive every session that uses them: they live as long as the library.
  // Their version tells onnxruntime which fields of OrtCustomOp (and which OrtApi) to use: it
  // refuses ops newer than itself.
  static scap::ScapSparseMatMulOp<float> op_float;
  static scap::ScapSparseMatMulOp<Ort::Float16_t> op_float16;
  static scap::ScapSparseMatMulNBitsOp<float> nbits_float;
  static scap::ScapSparseMatMulNBitsOp<Ort::Float16_t> nbits_float16;
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;

  try {
    std::lock_guard<std::mutex> lock(mutex);
    op_float.version = version;
    op_float16.version = version;
    nbits_float.version = version;
    nbits_float16.version = version;
    Ort::CustomOpDomain domain{scap::kDomain};
    domain.Add(&op_float);
    domain.Add(&op_float16);
    domain.Add(&nbits_float);
    domain.Add(&nbits_float16);
#if defined(SCAP_WITH_CUDA)
    // One domain holds both providers' kernels: onnxruntime takes one schema per op name.
    static scap::ScapSparseMatMulCudaOp<float> cuda_float;
    static scap::ScapSparseMatMulCudaOp<Ort::Float16_t> cuda_float16;
    if (version >= scap::kOldestOrtApiCuda) {
      cuda_float.version = version;
      cuda_float16.version = version;
      domain.Add(&cuda_float);
      domain.Add(&cuda_float16);
    }
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    domains.push_back(std::move(domain));
  } catch (...) {
    return scap::StatusFromCurrentException(*api, "");
  }
  return nullptr;
}

// "amx", "avx512", "avx2", "neon" or "portable": the kernels chosen for this process (CPU and
// SCAP_ONNX_ISA, read once). A static string; safe to call before or without any session.
extern "C" SCAP_EXPORT const char* ScapOnnxKernelIsa(void) { return scap::SelectedIsa(); }
