// The CUDA kernels themselves (custom_ops/cuda/kernels.cu, through Enqueue) on the CPU, under the
// emulator in tests/cuda_emu (threads as user contexts switched at barriers, WMMA fragments as
// plain matrices), against a float64 reference: one row and several, odd K and N, thresholds 0,
// typical and +inf, per-channel threshold scales (0, +inf among others) and offsets, NaN in A, with
// and without bias, B misaligned (the scalar loads), splits of K,
// the stream's kept counters and counters zeroed in scratch (same bits required, and the kept
// counters left zero). Compiled and run by tests/test_cuda_build.py. What the emulator cannot
// show (memory ordering, speed) is for tools/gpu_check.sh on a GPU.
#define SCAP_CUDA_EMULATION 1
#include "kernels.cu"  // NOLINT: the translation unit under test

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using scap::cuda::DType;
using scap::cuda::Problem;

int failures = 0;

struct Case {
  DType dtype;
  int64_t m, k, n;
  std::string threshold_name;
  bool nan, bias, misaligned;
  bool channels = false;  // threshold_scale and channel_offset inputs
};

// Runs Enqueue with Y poisoned (NaN); returns Y as doubles.
std::vector<double> Run(const Problem& p, const void* a, const void* b, const void* bias, int* counters, int sm) {
  const size_t count = static_cast<size_t>(p.m * p.n);
  std::vector<double> out(count);
  std::vector<unsigned char> scratch(scap::cuda::ScratchBytes(p, sm) + 256);
  void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 255) / 256 * 256);
  if (p.dtype == DType::kFloat16) {
    std::vector<__half> y(count, __half{0x7e00});
    const int e = scap::cuda::Enqueue(p, a, b, bias, y.data(), aligned, counters, sm, nullptr);
    if (e != 0) std::printf("FAIL Enqueue returned %d\n", e), ++failures;
    for (size_t i = 0; i < count; ++i) out[i] = __half2float(y[i]);
  } else {
    std::vector<float> y(count, std::numeric_limits<float>::quiet_NaN());
    const int e = scap::cuda::Enqueue(p, a, b, bias, y.data(), aligned, counters, sm, nullptr);
    if (e != 0) std::printf("FAIL Enqueue returned %d\n", e), ++failures;
    for (size_t i = 0; i < count; ++i) out[i] = y[i];
  }
  return out;
}

void Check(const Case& c, int sm, std::mt19937& rng) {
  const bool half = c.dtype == DType::kFloat16;
  const float offset = 0.25f;
  std::normal_distribution<float> normal;
  std::bernoulli_distribution centre(0.2);
  std::vector<float> a(static_cast<size_t>(c.m * c.k)), b(static_cast<size_t>(c.k * c.n)), bias(static_cast<size_t>(c.n));
  for (float& x : a) x = centre(rng) ? offset : offset + normal(rng);  // some exact D = 0
  for (float& x : b) x = normal(rng);
  for (float& x : bias) x = normal(rng);
  if (c.nan && !a.empty()) {
    a[rng() % static_cast<size_t>(c.k)] = std::numeric_limits<float>::quiet_NaN();
    a[a.size() - 1 - rng() % static_cast<size_t>(c.k)] = std::numeric_limits<float>::quiet_NaN();
  }
  // Storage as the kernels see it; values rounded to float16 where T is.
  std::vector<__half> ah(a.size()), bh(b.size() + 1), biash(bias.size());
  auto round = [&](std::vector<float>& v, std::vector<__half>& h, size_t at) {
    for (size_t i = 0; i < v.size(); ++i) {
      h[at + i] = __float2half_rn(v[i]);
      if (half) v[i] = __half2float(h[at + i]);
    }
  };
  round(a, ah, 0);
  round(b, bh, c.misaligned ? 1 : 0);
  round(bias, biash, 0);
  std::vector<float> bf(b.size() + 1);
  std::copy(b.begin(), b.end(), bf.begin() + (c.misaligned ? 1 : 0));

  std::vector<float> magnitudes;
  for (float x : a)
    if (!std::isnan(x)) magnitudes.push_back(std::fabs(x - offset));
  float threshold = 0.0f;
  if (c.threshold_name == "typical" && !magnitudes.empty()) {
    std::nth_element(magnitudes.begin(), magnitudes.begin() + magnitudes.size() / 2, magnitudes.end());
    threshold = magnitudes[magnitudes.size() / 2];
  }
  if (c.threshold_name == "inf") threshold = std::numeric_limits<float>::infinity();

  // Per-channel vectors: scales in [0, 2) with 0 and +inf among them (the 0 * inf of threshold 0
  // and +inf included), offsets N(0, 0.5).
  std::vector<float> threshold_scale(static_cast<size_t>(c.k)), channel_offset(static_cast<size_t>(c.k));
  std::uniform_real_distribution<float> uniform(0.0f, 2.0f);
  for (int64_t i = 0; i < c.k; ++i) {
    threshold_scale[static_cast<size_t>(i)] = i % 11 == 3 ? 0.0f : i % 13 == 5 ? std::numeric_limits<float>::infinity()
                                                                       : uniform(rng);
    channel_offset[static_cast<size_t>(i)] = 0.5f * normal(rng);
  }
  Problem p{c.dtype, c.m, c.k, c.n, threshold, offset};
  if (c.channels) {
    p.threshold_scale = threshold_scale.data();
    p.channel_offset = channel_offset.data();
  }
  const void* ap = half ? static_cast<const void*>(ah.data()) : a.data();
  const void* bp = half ? static_cast<const void*>(bh.data() + (c.misaligned ? 1 : 0))
                        : static_cast<const void*>(bf.data() + (c.misaligned ? 1 : 0));
  const void* biasp = !c.bias ? nullptr : half ? static_cast<const void*>(biash.data()) : bias.data();
  std::vector<int> counters(static_cast<size_t>(scap::cuda::kStreamCounters), 0);
  const std::vector<double> y1 = Run(p, ap, bp, biasp, counters.data(), sm);
  const std::vector<double> y2 = Run(p, ap, bp, biasp, nullptr, sm);
  const bool zero_again = std::all_of(counters.begin(), counters.end(), [](int x) { return x == 0; });

  double err = 0.0, scale = 0.0;
  bool nan_match = true, same = true;
  for (int64_t r = 0; r < c.m; ++r) {
    for (int64_t col = 0; col < c.n; ++col) {
      double ref = c.bias ? bias[static_cast<size_t>(col)] : 0.0;
      for (int64_t i = 0; i < c.k; ++i) {
        float d = a[static_cast<size_t>(r * c.k + i)] - offset;
        float tau = threshold;
        if (c.channels) {  // the contract, written out: D - channel_offset, threshold * scale (0 * inf: the scale)
          d -= channel_offset[static_cast<size_t>(i)];
          tau = threshold * threshold_scale[static_cast<size_t>(i)];
          if (std::isnan(tau)) tau = threshold_scale[static_cast<size_t>(i)];
        }
        if (!(std::fabs(d) <= tau)) ref += static_cast<double>(d) * b[static_cast<size_t>(i * c.n + col)];
      }
      if (half) ref = __half2float(__float2half_rn(static_cast<float>(ref)));
      const size_t at = static_cast<size_t>(r * c.n + col);
      if (std::isnan(ref) != std::isnan(y1[at])) nan_match = false;
      if (!(y1[at] == y2[at] || (std::isnan(y1[at]) && std::isnan(y2[at])))) same = false;
      if (!std::isnan(ref)) {
        err = std::max(err, std::fabs(y1[at] - ref));
        scale = std::max(scale, std::fabs(ref));
      }
    }
  }
  err = scale > 0 ? err / scale : err;
  if (std::isnan(err)) err = std::numeric_limits<double>::infinity();
  const double tolerance = half ? 3e-3 : 1e-5;
  const bool pass = err <= tolerance && nan_match && same && zero_again;
  if (!pass) ++failures;
  std::printf("%s %-7s M %4lld K %5lld N %4lld %-7s nan %d bias %d misaligned %d channels %d sm %3d: err %.2e%s%s%s\n",
              pass ? "ok  " : "FAIL", half ? "float16" : "float32", (long long)c.m, (long long)c.k, (long long)c.n,
              c.threshold_name.c_str(), c.nan, c.bias, c.misaligned, c.channels, sm, err, nan_match ? "" : " NaN places differ",
              same ? "" : " bits differ between counters", zero_again ? "" : " counters not zero again");
}

}  // namespace

int main() {
  std::mt19937 rng(15);
  // (M, K, N): one row (tails, windows over 1024, splits); several rows (row tiles, splits of K).
  const int64_t shapes[][3] = {{1, 7, 9},    {1, 300, 517}, {1, 2500, 264}, {1, 0, 5},    {2, 37, 19},
                               {4, 300, 136}, {65, 1100, 130}, {130, 90, 70}, {3, 0, 5}};
  for (DType dt : {DType::kFloat16, DType::kFloat32}) {
    for (const auto& s : shapes) {
      for (const char* t : {"zero", "typical", "inf"}) {
        const bool typical = std::string(t) == "typical";
        Check({dt, s[0], s[1], s[2], t, typical && s[1] > 0, s[2] != 9, false}, 4, rng);
      }
      if (s[1] > 0) Check({dt, s[0], s[1], s[2], "typical", false, true, true}, 4, rng);  // scalar loads of B
      for (const char* t : {"zero", "typical", "inf"}) {  // per-channel vectors
        Check({dt, s[0], s[1], s[2], t, s[0] > 1 && std::string(t) == "typical", s[2] % 2 == 0, false, true}, 4, rng);
      }
    }
    // Many SMs: more splits of K for the one-row kernel.
    Check({dt, 1, 2500, 264, "typical", true, true, false}, 64, rng);
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
