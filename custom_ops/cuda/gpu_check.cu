// GPU check of the CUDA kernels, without onnxruntime and without network (tools/gpu_check.sh builds
// and runs it). Three parts, one table and one JSON file:
//   1. correctness against a float64 CPU reference: fresh random inputs per case, the output
//      poisoned (NaN) before each run; thresholds 0, typical (half the activations dropped) and
//      +inf; NaN in A; odd K and N; M in 1, 4, 64, 256; float16 and float32; each case run twice
//      and required to give the same bits (once with the stream's kept tile counters, once with
//      counters zeroed in scratch, or replayed from a CUDA graph);
//   2. the device's copy bandwidth (cudaMemcpy device to device: bytes read + written per second);
//   3. timings with CUDA events against cuBLAS when built with it (SCAP_HAVE_CUBLAS), else against
//      a plain dense GEMV of this file (M = 1) and the SCAP kernels at threshold 0 on dense data
//      (M > 1), rotating through enough copies of B to defeat L2.
// Usage: scap_gpu_check [--json PATH]. Exit status 1 if a correctness case fails (the timing
// targets are reported, not enforced).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef SCAP_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "launch.h"
#include "plan.h"

namespace {

using scap::cuda::DType;
using scap::cuda::Problem;

#define CHECK_CUDA(call)                                                                                  \
  do {                                                                                                    \
    const cudaError_t e_ = (call);                                                                        \
    if (e_ != cudaSuccess) {                                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));         \
      std::exit(2);                                                                                       \
    }                                                                                                     \
  } while (0)

void CheckEnqueue(int error) {
  if (error != 0) {
    std::fprintf(stderr, "Enqueue failed: %s\n", scap::cuda::ErrorString(error));
    std::exit(2);
  }
}

struct Rng {
  uint64_t state;
  uint64_t Next() {  // splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }
  float Normal() {
    const double u = Uniform() + 1e-300, v = Uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v));
  }
};

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) CHECK_CUDA(cudaMalloc(&p, bytes));
  }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Host values of one operand as the device sees them: float32, or float16 (kept also as floats).
struct HostTensor {
  std::vector<float> values;   // what the device holds, as float
  std::vector<__half> halves;  // float16 storage
  void Round(DType dt) {
    if (dt != DType::kFloat16) return;
    halves.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      halves[i] = __float2half_rn(values[i]);
      values[i] = __half2float(halves[i]);
    }
  }
  const void* Data(DType dt) const { return dt == DType::kFloat16 ? static_cast<const void*>(halves.data()) : values.data(); }
  size_t Bytes(DType dt) const { return values.size() * (dt == DType::kFloat16 ? 2 : 4); }
};

void Upload(const HostTensor& t, DType dt, void* device) {
  CHECK_CUDA(cudaMemcpy(device, t.Data(dt), t.Bytes(dt), cudaMemcpyHostToDevice));
}

std::vector<double> Download(const void* device, size_t count, DType dt) {
  std::vector<double> out(count);
  if (dt == DType::kFloat16) {
    std::vector<__half> h(count);
    CHECK_CUDA(cudaMemcpy(h.data(), device, count * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) out[i] = __half2float(h[i]);
  } else {
    std::vector<float> f(count);
    CHECK_CUDA(cudaMemcpy(f.data(), device, count * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) out[i] = f[i];
  }
  return out;
}

const char* Name(DType dt) { return dt == DType::kFloat16 ? "float16" : "float32"; }

// ---- 1. Correctness ----

struct CaseResult {
  DType dtype;
  int64_t m, k, n;
  std::string threshold_name;
  bool nan, bias, graph;
  double error, tolerance;
  bool same_bits, nan_match, pass;
};

// The threshold at which `fraction` of |D| lies at or below it.
float Quantile(std::vector<float> magnitudes, double fraction) {
  if (magnitudes.empty() || fraction <= 0.0) return 0.0f;
  const size_t at = std::min(magnitudes.size() - 1, static_cast<size_t>(fraction * magnitudes.size()));
  std::nth_element(magnitudes.begin(), magnitudes.begin() + static_cast<long>(at), magnitudes.end());
  return magnitudes[at];
}

// Runs one problem through Enqueue (or a CUDA graph of it) with Y poisoned first; returns Y.
// counters: the stream's kept counters, or null for counters zeroed in the scratch.
std::vector<double> RunOnce(const Problem& p, const void* a, const void* b, const void* bias, void* y, void* scratch,
                            int* counters, int sm, cudaStream_t stream, bool graph) {
  const size_t elem = p.dtype == DType::kFloat16 ? 2 : 4;
  CHECK_CUDA(cudaMemsetAsync(y, 0xff, static_cast<size_t>(p.m * p.n) * elem, stream));  // NaN
  if (graph) {
    // Capture fails if the call synchronises with the host or allocates.
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    CheckEnqueue(scap::cuda::Enqueue(p, a, b, bias, y, scratch, counters, sm, stream));
    CHECK_CUDA(cudaStreamEndCapture(stream, &g));
    CHECK_CUDA(cudaGraphInstantiate(&exec, g, 0));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaGraphExecDestroy(exec));
    CHECK_CUDA(cudaGraphDestroy(g));
  } else {
    CheckEnqueue(scap::cuda::Enqueue(p, a, b, bias, y, scratch, counters, sm, stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  return Download(y, static_cast<size_t>(p.m * p.n), p.dtype);
}

CaseResult RunCase(DType dt, int64_t m, int64_t k, int64_t n, const char* threshold_name, bool nan, bool with_bias,
                   bool graph, uint64_t seed, int sm, cudaStream_t stream) {
  Rng rng{seed};
  const float offset = 0.25f;
  HostTensor a, b, bias;
  a.values.resize(static_cast<size_t>(m * k));
  b.values.resize(static_cast<size_t>(k * n));
  for (float& x : a.values) x = rng.Uniform() < 0.2 ? offset : offset + rng.Normal();  // some exact D = 0
  for (float& x : b.values) x = rng.Normal();
  if (with_bias) {
    bias.values.resize(static_cast<size_t>(n));
    for (float& x : bias.values) x = rng.Normal();
  }
  if (nan && m * k > 0) {
    a.values[rng.Next() % static_cast<uint64_t>(k)] = std::numeric_limits<float>::quiet_NaN();  // row 0
    a.values[static_cast<size_t>((m - 1) * k) + rng.Next() % static_cast<uint64_t>(k)] =
        std::numeric_limits<float>::quiet_NaN();
  }
  a.Round(dt);
  b.Round(dt);
  bias.Round(dt);

  // D as the contract defines it: float32 A - offset.
  std::vector<float> d(a.values.size());
  std::vector<float> magnitudes;
  for (size_t i = 0; i < d.size(); ++i) {
    d[i] = a.values[i] - offset;
    if (!std::isnan(d[i])) magnitudes.push_back(std::fabs(d[i]));
  }
  float threshold = 0.0f;
  if (std::string(threshold_name) == "typical") threshold = Quantile(magnitudes, 0.5);
  if (std::string(threshold_name) == "inf") threshold = std::numeric_limits<float>::infinity();

  const Problem p{dt, m, k, n, threshold, offset};
  const size_t elem = dt == DType::kFloat16 ? 2 : 4;
  DeviceBuffer da(a.Bytes(dt)), db(b.Bytes(dt)), dbias(bias.Bytes(dt)), dy(static_cast<size_t>(m * n) * elem),
      scratch(scap::cuda::ScratchBytes(p, sm));
  Upload(a, dt, da.p);
  Upload(b, dt, db.p);
  if (with_bias) Upload(bias, dt, dbias.p);
  const void* bias_ptr = with_bias ? dbias.p : nullptr;
  // The second run takes the other counters (the stream's kept ones, then zeroed scratch ones), or
  // replays a CUDA graph of the call: both must give the same bits.
  int* counters = scap::cuda::StreamCounters(stream);
  if (counters == nullptr) {
    std::fprintf(stderr, "StreamCounters failed\n");
    std::exit(2);
  }
  const std::vector<double> y1 = RunOnce(p, da.p, db.p, bias_ptr, dy.p, scratch.p, counters, sm, stream, false);
  const std::vector<double> y2 =
      RunOnce(p, da.p, db.p, bias_ptr, dy.p, scratch.p, graph ? counters : nullptr, sm, stream, graph);

  // Reference over every column of small problems, a sample (with the last) of large ones.
  std::vector<int64_t> columns;
  const int64_t samples = m * k * n <= 50000000 ? n : 97;
  for (int64_t s = 0; s < samples; ++s) columns.push_back(samples == n ? s : s * (n - 1) / (samples - 1));
  double err = 0.0, scale = 0.0;
  bool nan_match = true;
  std::vector<std::pair<size_t, double>> refs;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c : columns) {
      double ref = with_bias ? bias.values[static_cast<size_t>(c)] : 0.0;
      for (int64_t i = 0; i < k; ++i) {
        const float di = d[static_cast<size_t>(r * k + i)];
        if (scap::cuda::Kept(di, threshold)) ref += static_cast<double>(di) * b.values[static_cast<size_t>(i * n + c)];
      }
      if (dt == DType::kFloat16) ref = __half2float(__double2half(ref));
      const size_t at = static_cast<size_t>(r * n + c);
      if (std::isnan(ref) != std::isnan(y1[at]) || std::isnan(ref) != std::isnan(y2[at])) nan_match = false;
      if (!std::isnan(ref)) {
        refs.push_back({at, ref});
        scale = std::max(scale, std::fabs(ref));
      }
    }
  }
  for (const auto& [at, ref] : refs) err = std::max(err, std::fabs(y1[at] - ref));
  err = scale > 0.0 ? err / scale : err;
  if (std::isnan(err)) err = std::numeric_limits<double>::infinity();
  bool same_bits = true;
  for (size_t i = 0; i < y1.size(); ++i) {
    if (!(y1[i] == y2[i] || (std::isnan(y1[i]) && std::isnan(y2[i])))) same_bits = false;
  }
  const double tolerance = dt == DType::kFloat16 ? 3e-3 : 1e-5;
  return {dt, m, k, n, threshold_name, nan, with_bias, graph, err, tolerance, same_bits, nan_match,
          err <= tolerance && same_bits && nan_match};
}

// ---- 2. Copy bandwidth ----

double CopyBandwidth(cudaStream_t stream) {
  size_t free_bytes = 0, total = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total));
  const size_t bytes = std::min<size_t>(size_t{1} << 30, free_bytes / 4);
  DeviceBuffer src(bytes), dst(bytes);
  CHECK_CUDA(cudaMemset(src.p, 1, bytes));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int i = 0; i < 7; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;  // GB/s, read + written
}

// ---- 3. Timings ----

__global__ void FillKernel(__half* p, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = __float2half_rn(static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

#ifndef SCAP_HAVE_CUBLAS
// The baseline without cuBLAS for one row: a plain dense GEMV, the same 16-byte loads over every
// row of B, float atomics across the splits of K (y32 zeroed first).
__global__ void __launch_bounds__(256) DenseGemv(const __half* a, const __half* b, float* y32, int64_t k, int64_t n,
                                                 int64_t splits) {
  __shared__ float warp_sums[8][256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = blockIdx.x * 256 + lane * 8;
  const scap::cuda::Range split = scap::cuda::SplitRange(k, splits, blockIdx.y);
  float acc[8] = {};
  if (col + 8 <= n) {
    for (int64_t i = split.begin + warp; i < split.end; i += 8) {
      const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(b + i * n + col));
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
      const float d = __half2float(a[i]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(h[e]);
        acc[2 * e] = fmaf(d, f.x, acc[2 * e]);
        acc[2 * e + 1] = fmaf(d, f.y, acc[2 * e + 1]);
      }
    }
  }
  for (int e = 0; e < 8; ++e) warp_sums[warp][lane * 8 + e] = acc[e];
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < 8; ++w) s += warp_sums[w][threadIdx.x];
  if (blockIdx.x * 256 + threadIdx.x < n) atomicAdd(y32 + blockIdx.x * 256 + threadIdx.x, s);
}
#endif

struct TimeResult {
  int64_t m, k, n;
  double sparsity, kept;  // asked for; kept fraction of rows of B (M > 1: the union)
  double scap_us, base_us, kept_gbps, kept_of_copy;
  double target;          // speedup asked for
  bool pass;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

class Timer {
 public:
  explicit Timer(cudaStream_t stream) : stream_(stream) {
    CHECK_CUDA(cudaEventCreate(&start_));
    CHECK_CUDA(cudaEventCreate(&stop_));
  }
  ~Timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  // Mean microseconds of `iters` calls of f(i), after warm-up calls.
  template <class F>
  double Time(F&& f, int iters) {
    for (int i = 0; i < 3; ++i) f(i);
    CHECK_CUDA(cudaEventRecord(start_, stream_));
    for (int i = 0; i < iters; ++i) f(i);
    CHECK_CUDA(cudaEventRecord(stop_, stream_));
    CHECK_CUDA(cudaEventSynchronize(stop_));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e3 / iters;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_, stop_;
};

struct Baseline {
  std::string name;
#ifdef SCAP_HAVE_CUBLAS
  cublasHandle_t handle = nullptr;
#endif
};

TimeResult TimeShape(int64_t m, int64_t k, int64_t n, double sparsity, double copy_gbps, int sm, int l2_bytes,
                     cudaStream_t stream, Baseline& base, uint64_t seed) {
  const size_t b_bytes = static_cast<size_t>(k * n) * 2;
  size_t free_bytes = 0, total = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total));
  // Copies of B that together hold at least four times L2, within half the free memory.
  int copies = static_cast<int>(std::max<size_t>(2, (4 * static_cast<size_t>(l2_bytes) + b_bytes - 1) / b_bytes));
  copies = static_cast<int>(std::max<size_t>(1, std::min<size_t>(copies, free_bytes / 2 / b_bytes)));
  std::vector<DeviceBuffer*> bs;
  for (int c = 0; c < copies; ++c) {
    bs.push_back(new DeviceBuffer(b_bytes));
    FillKernel<<<1024, 256, 0, stream>>>(static_cast<__half*>(bs.back()->p), static_cast<size_t>(k * n), seed + c);
  }
  DeviceBuffer a(static_cast<size_t>(m * k) * 2), y(static_cast<size_t>(m * n) * 2), y32(static_cast<size_t>(m * n) * 4),
      bias(static_cast<size_t>(n) * 2);
  FillKernel<<<256, 256, 0, stream>>>(static_cast<__half*>(a.p), static_cast<size_t>(m * k), seed + 1000);
  FillKernel<<<64, 256, 0, stream>>>(static_cast<__half*>(bias.p), static_cast<size_t>(n), seed + 2000);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // The threshold that drops `sparsity` of A's elements, and the kept rows it leaves.
  std::vector<__half> host_a(static_cast<size_t>(m * k));
  CHECK_CUDA(cudaMemcpy(host_a.data(), a.p, host_a.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> magnitudes(host_a.size());
  for (size_t i = 0; i < host_a.size(); ++i) magnitudes[i] = std::fabs(__half2float(host_a[i]));
  const float threshold = sparsity > 0 ? Quantile(magnitudes, sparsity) : 0.0f;
  int64_t kept = 0;
  for (int64_t i = 0; i < k; ++i) {
    bool any = false;
    for (int64_t r = 0; r < m && !any; ++r)
      any = scap::cuda::Kept(std::fabs(__half2float(host_a[static_cast<size_t>(r * k + i)])), threshold);
    kept += any;
  }

  const Problem p{DType::kFloat16, m, k, n, threshold, 0.0f};
  DeviceBuffer scratch(scap::cuda::ScratchBytes(p, sm));
  const Problem dense{DType::kFloat16, m, k, n, 0.0f, 0.0f};
  DeviceBuffer dense_scratch(scap::cuda::ScratchBytes(dense, sm));
  (void)y32;  // the baselines without cuBLAS use these
  (void)dense_scratch;

  int* counters = scap::cuda::StreamCounters(stream);
  auto scap_call = [&](int i) {
    CheckEnqueue(scap::cuda::Enqueue(p, a.p, bs[i % copies]->p, bias.p, y.p, scratch.p, counters, sm, stream));
  };
  auto base_call = [&](int i) {
    const void* b = bs[i % copies]->p;
#ifdef SCAP_HAVE_CUBLAS
    const float one = 1.0f, zero = 0.0f;
    // Row-major Y = A B is column-major Y^T = B^T A^T.
    const cublasStatus_t s = cublasGemmEx(base.handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                          static_cast<int>(k), &one, b, CUDA_R_16F, static_cast<int>(n), a.p, CUDA_R_16F,
                                          static_cast<int>(k), &zero, y.p, CUDA_R_16F, static_cast<int>(n),
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasGemmEx failed: %d\n", static_cast<int>(s));
      std::exit(2);
    }
#else
    if (m == 1) {
      CHECK_CUDA(cudaMemsetAsync(y32.p, 0, static_cast<size_t>(n) * 4, stream));
      // As many blocks as the SCAP kernel could run at once (8 per SM), in splits of K.
      const int64_t tiles = (n + 255) / 256, splits = std::max<int64_t>(1, std::min<int64_t>(8 * sm / tiles, k / 128));
      DenseGemv<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), 256, 0, stream>>>(
          static_cast<const __half*>(a.p), static_cast<const __half*>(b), static_cast<float*>(y32.p), k, n, splits);
    } else {
      CheckEnqueue(scap::cuda::Enqueue(dense, a.p, b, nullptr, y.p, dense_scratch.p, counters, sm, stream));
    }
#endif
  };
  // Enough calls for about 20 ms of streaming at copy speed; five rounds, alternating, medians.
  const int iters = static_cast<int>(std::max<double>(20.0, std::min<double>(2000.0, 20e-3 * copy_gbps * 1e9 / b_bytes)));
  std::vector<double> scap_us, base_us;
  Timer timer(stream);
  for (int round = 0; round < 5; ++round) {
    scap_us.push_back(timer.Time(scap_call, iters));
    base_us.push_back(timer.Time(base_call, iters));
  }
  CHECK_CUDA(cudaGetLastError());
  for (DeviceBuffer* d : bs) delete d;

  TimeResult r{};
  r.m = m;
  r.k = k;
  r.n = n;
  r.sparsity = sparsity;
  r.kept = k ? static_cast<double>(kept) / k : 0.0;
  r.scap_us = Median(scap_us);
  r.base_us = Median(base_us);
  r.kept_gbps = static_cast<double>(kept) * n * 2 / (r.scap_us * 1e-6) / 1e9;
  r.kept_of_copy = r.kept_gbps / copy_gbps;
  const double speedup = r.base_us / r.scap_us;
  if (m == 1) {
    r.target = sparsity >= 0.7 ? 2.6 : sparsity >= 0.5 ? 1.7 : 0.9;
    r.pass = speedup >= r.target && r.kept_of_copy >= 0.8;
  } else {
    r.target = 0.9;
    r.pass = speedup >= r.target;
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path = "gpu_check.json";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--json") json_path = argv[i + 1];
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  const int sm = scap::cuda::SmCount(device);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::printf("device: %s (sm_%d%d, %d SMs, L2 %d MiB)\n", prop.name, prop.major, prop.minor, sm,
              prop.l2CacheSize >> 20);

  // 1. Correctness.
  std::vector<CaseResult> cases;
  uint64_t seed = 1;
  const int64_t shapes[][2] = {{7, 9}, {301, 517}, {1023, 1001}, {4096, 4097}};
  for (DType dt : {DType::kFloat16, DType::kFloat32}) {
    for (int64_t m : {1, 4, 64, 256}) {
      for (const auto& kn : shapes) {
        if (m == 256 && kn[0] == 4096) continue;  // the reference's cost; M = 256 runs the other shapes
        for (const char* t : {"zero", "typical", "inf"}) {
          const bool nan = std::string(t) == "typical" && kn[0] == 301;
          const bool bias = kn[1] != 9;
          const bool graph = std::string(t) == "typical" && kn[0] == 1023 && (m == 1 || m == 64);
          cases.push_back(RunCase(dt, m, kn[0], kn[1], t, nan, bias, graph, seed++, sm, stream));
        }
      }
    }
    // The timing shapes, sampled columns: many splits, windows and tiles.
    cases.push_back(RunCase(dt, 1, 4096, 11008, "typical", false, true, false, seed++, sm, stream));
    cases.push_back(RunCase(dt, 1, 11008, 4096, "typical", true, true, false, seed++, sm, stream));
    cases.push_back(RunCase(dt, 64, 4096, 11008, "typical", false, true, false, seed++, sm, stream));
  }
  int failed = 0;
  std::printf("\n%-8s %5s %6s %6s %-8s %-4s %-4s %-5s %10s %8s %-4s %s\n", "dtype", "M", "K", "N", "thresh", "nan",
              "bias", "graph", "max_rel_err", "tol", "bits", "result");
  for (const CaseResult& c : cases) {
    failed += !c.pass;
    std::printf("%-8s %5lld %6lld %6lld %-8s %-4s %-4s %-5s %10.2e %8.0e %-4s %s\n", Name(c.dtype), (long long)c.m,
                (long long)c.k, (long long)c.n, c.threshold_name.c_str(), c.nan ? "yes" : "no", c.bias ? "yes" : "no",
                c.graph ? "yes" : "no", c.error, c.tolerance, c.same_bits ? "same" : "DIFF",
                c.pass ? "ok" : (c.nan_match ? "FAIL" : "FAIL (NaN places)"));
  }

  // 2. Copy bandwidth.
  const double copy_gbps = CopyBandwidth(stream);
  std::printf("\ncopy bandwidth (device to device, read + written): %.0f GB/s\n", copy_gbps);

  // 3. Timings.
  Baseline base;
#ifdef SCAP_HAVE_CUBLAS
  base.name = "cuBLAS cublasGemmEx (float16, float32 compute)";
  if (cublasCreate(&base.handle) != CUBLAS_STATUS_SUCCESS || cublasSetStream(base.handle, stream) != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS initialisation failed\n");
    return 2;
  }
#else
  base.name = "no cuBLAS: own dense GEMV (M = 1) and the SCAP kernels at threshold 0 on dense data (M > 1)";
#endif
  std::printf("baseline: %s\n", base.name.c_str());
  std::vector<TimeResult> times;
  const int64_t timed[][2] = {{4096, 11008}, {11008, 4096}, {8192, 28672}};
  for (const auto& kn : timed) {
    for (double s : {0.0, 0.5, 0.7}) times.push_back(TimeShape(1, kn[0], kn[1], s, copy_gbps, sm, prop.l2CacheSize, stream, base, seed++));
    for (double s : {0.0, 0.5}) times.push_back(TimeShape(64, kn[0], kn[1], s, copy_gbps, sm, prop.l2CacheSize, stream, base, seed++));
  }
#ifdef SCAP_HAVE_CUBLAS
  cublasDestroy(base.handle);
#endif
  std::printf("\n%4s %6s %6s %8s %6s %9s %9s %8s %7s %9s %7s %s\n", "M", "K", "N", "sparsity", "kept", "scap_us",
              "base_us", "speedup", "target", "kept_GB/s", "of_copy", "result");
  for (const TimeResult& t : times) {
    std::printf("%4lld %6lld %6lld %8.2f %6.3f %9.2f %9.2f %8.2f %7.1f %9.0f %6.0f%% %s\n", (long long)t.m,
                (long long)t.k, (long long)t.n, t.sparsity, t.kept, t.scap_us, t.base_us, t.base_us / t.scap_us,
                t.target, t.kept_gbps, 100 * t.kept_of_copy, t.pass ? "ok" : "below target");
  }

  FILE* f = std::fopen(json_path.c_str(), "w");
  if (f == nullptr) {
    std::perror(json_path.c_str());
    return 2;
  }
  std::fprintf(f, "{\n  \"device\": \"%s\", \"sm\": \"%d%d\", \"sm_count\": %d,\n", prop.name, prop.major, prop.minor,
               sm);
  std::fprintf(f, "  \"copy_bandwidth_gbps\": %.1f,\n  \"baseline\": \"%s\",\n  \"correctness\": [\n", copy_gbps,
               base.name.c_str());
  for (size_t i = 0; i < cases.size(); ++i) {
    const CaseResult& c = cases[i];
    std::fprintf(f,
                 "    {\"dtype\": \"%s\", \"m\": %lld, \"k\": %lld, \"n\": %lld, \"threshold\": \"%s\", \"nan\": %s, "
                 "\"bias\": %s, \"graph\": %s, \"max_rel_err\": %.3e, \"tolerance\": %.0e, \"same_bits\": %s, "
                 "\"nan_match\": %s, \"pass\": %s}%s\n",
                 Name(c.dtype), (long long)c.m, (long long)c.k, (long long)c.n, c.threshold_name.c_str(),
                 c.nan ? "true" : "false", c.bias ? "true" : "false", c.graph ? "true" : "false",
                 std::isfinite(c.error) ? c.error : 1e300, c.tolerance, c.same_bits ? "true" : "false",
                 c.nan_match ? "true" : "false", c.pass ? "true" : "false", i + 1 < cases.size() ? "," : "");
  }
  std::fprintf(f, "  ],\n  \"timings\": [\n");
  for (size_t i = 0; i < times.size(); ++i) {
    const TimeResult& t = times[i];
    std::fprintf(f,
                 "    {\"dtype\": \"float16\", \"m\": %lld, \"k\": %lld, \"n\": %lld, \"sparsity\": %.2f, "
                 "\"kept\": %.4f, \"scap_us\": %.3f, \"baseline_us\": %.3f, \"speedup\": %.3f, \"target\": %.1f, "
                 "\"kept_gbps\": %.1f, \"kept_of_copy\": %.3f, \"pass\": %s}%s\n",
                 (long long)t.m, (long long)t.k, (long long)t.n, t.sparsity, t.kept, t.scap_us, t.base_us,
                 t.base_us / t.scap_us, t.target, t.kept_gbps, t.kept_of_copy, t.pass ? "true" : "false",
                 i + 1 < times.size() ? "," : "");
  }
  std::fprintf(f, "  ],\n  \"correctness_failures\": %d\n}\n", failed);
  std::fclose(f);
  std::printf("\n%d of %zu correctness cases failed; JSON: %s\n", failed, cases.size(), json_path.c_str());
  CHECK_CUDA(cudaStreamDestroy(stream));
  return failed ? 1 : 0;
}
