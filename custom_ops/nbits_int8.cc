// The quantisation of the int8 path of ScapSparseMatMulNBits (accuracy_level 4, several rows) in
// plain C++, for CPUs without AVX-512 VNNI (nbits_vnni.cc has its own with the int8 kernels). The
// rule (scap_sparse_matmul_nbits.h): per row and block of K, amax = max |D|, qa = rint(D * (127 /
// amax)), sa = amax / 127. Those CPUs then multiply qa * sa with the float kernels: the same
// products as sa * scale * sum(qa * (q - zp)), rounded in another order.
#include <cmath>
#include <cstring>

#include "nbits_kernels.h"

namespace scap {
namespace {

// D * (127 / amax) into [-127, 127], NaN to 0: only where 127 / amax overflowed to Inf (amax below
// 127 / FLT_MAX) is there anything to clamp (0 * Inf is NaN, a nonzero value times Inf is +-Inf).
float ClampScaled(float x) {
  if (x != x) return 0.0f;
  return x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
}

}  // namespace

void QuantizeRowsGeneric(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                         const NBitsQuantized& q, uint8_t* row_finite) {
  const int64_t k_blocks = (depth + block_size - 1) / block_size;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = d + r * depth;
    int8_t* qa = const_cast<int8_t*>(q.qa) + r * q.stride;
    float* sa = const_cast<float*>(q.sa) + r * k_blocks;
    int32_t* qsum = const_cast<int32_t*>(q.qsum) + r * k_blocks;
    bool finite = true;
    for (int64_t k = 0; k < depth; ++k) finite = finite && std::isfinite(row[k]);
    row_finite[r] = finite ? 1 : 0;
    std::memset(qa, 0, static_cast<size_t>(q.stride));
    for (int64_t b = 0; b < k_blocks; ++b) {
      sa[b] = 0.0f;
      qsum[b] = 0;
      if (!finite) continue;
      const int64_t k0 = b * block_size, k1 = k0 + block_size < depth ? k0 + block_size : depth;
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::fabs(row[k]) > amax ? std::fabs(row[k]) : amax;
      if (amax == 0.0f) continue;
      const float inv = 127.0f / amax;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(ClampScaled(row[k] * inv)));
        qa[k] = static_cast<int8_t>(v);
        sum += v;
      }
      sa[b] = amax / 127.0f;
      qsum[b] = sum;
    }
  }
}

}  // namespace scap
