// The library's exports: RegisterCustomOps, called by onnxruntime when a session registers this
// library (it adds ScapSparseMatMul, float32 and float16, in domain com.scap), and
// ScapOnnxKernelIsa, which tells callers (Python, tests) which kernels this process runs.
#include <mutex>
#include <vector>

#include "scap_sparse_matmul.h"
#include "sparse_gemm.h"

#if defined(_WIN32)
#define SCAP_EXPORT __declspec(dllexport)
#else
#define SCAP_EXPORT __attribute__((visibility("default")))
#endif

extern "C" SCAP_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // This runtime predates the API the library was built against; report with its oldest API.
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "scap_onnx_ops needs onnxruntime >= 1.21 (ORT API version 21)");
  }
  Ort::InitApi(api);

  // Ops and domains must outlive every session that uses them: they live as long as the library.
  static scap::ScapSparseMatMulOp<float> op_float;
  static scap::ScapSparseMatMulOp<Ort::Float16_t> op_float16;
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;

  try {
    Ort::CustomOpDomain domain{scap::kDomain};
    domain.Add(&op_float);
    domain.Add(&op_float16);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// "amx", "avx512", "avx2", "neon" or "portable": the kernels chosen for this process (CPU and
// SCAP_ONNX_ISA, read once). A static string; safe to call before or without any session.
extern "C" SCAP_EXPORT const char* ScapOnnxKernelIsa(void) { return scap::SelectedIsa(); }
