// The int8 path of ScapSparseMatMulNBits (accuracy_level 4, several rows) in plain C++: the
// quantisation of D and the products, for CPUs without int8 dot products (nbits_vnni.cc has the
// AVX-512 VNNI kernels). The rule (scap_sparse_matmul_nbits.h): per row and block of K, amax =
// max |D|, qa = rint(D * (127 / amax)), sa = amax / 127; Y = sum over blocks of (sa * scale) *
// sum(qa * (q - zp)), the integer sums exact.
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

bool QuantizeRowsGeneric(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                         const NBitsQuantized& q, uint8_t* row_finite) {
  const int64_t k_blocks = (depth + block_size - 1) / block_size;
  bool all_finite = true;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = d + r * depth;
    int8_t* qa = const_cast<int8_t*>(q.qa) + r * q.stride;
    float* sa = const_cast<float*>(q.sa) + r * k_blocks;
    int32_t* qsum = const_cast<int32_t*>(q.qsum) + r * k_blocks;
    bool finite = true;
    for (int64_t k = 0; k < depth; ++k) finite = finite && std::isfinite(row[k]);
    row_finite[r] = finite ? 1 : 0;
    all_finite = all_finite && finite;
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
  return all_finite;
}

void RowsInt8Generic(const NBitsRow& w, const NBitsQuantized& a, int64_t rows, int64_t c0, int64_t c1, float* y,
                     uint8_t* work) {
  const int64_t k_blocks = (w.depth + w.block_size - 1) / w.block_size;
  const int64_t default_zp = int64_t{1} << (w.bits - 1);
  uint8_t* codes = work;  // [block_size][32] of the current block and group
  for (int64_t g0 = c0; g0 < c1; g0 += 32) {
    const int64_t width = c1 - g0 < 32 ? c1 - g0 : 32;
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t j = 0; j < width; ++j) y[m * w.n + g0 + j] = 0.0f;
    }
    for (int64_t b = 0; b < k_blocks; ++b) {
      const int64_t k0 = b * w.block_size, k1 = k0 + w.block_size < w.depth ? k0 + w.block_size : w.depth;
      for (int64_t k = k0; k < k1; ++k) {
        const uint8_t* row = w.b + k * w.row_bytes;
        uint8_t* out = codes + (k - k0) * 32;
        for (int64_t j = 0; j < 32; ++j) {
          if (j >= width) {
            out[j] = 0;
          } else if (w.bits == 8) {
            out[j] = row[g0 + j];
          } else {
            const uint8_t byte = row[g0 / 2 + (j & 15)];
            out[j] = j < 16 ? (byte & 0x0F) : (byte >> 4);
          }
        }
      }
      const float* scale = w.scales + b * w.n + g0;
      for (int64_t m = 0; m < rows; ++m) {
        const float sa = a.sa[m * k_blocks + b];
        if (sa == 0.0f) continue;
        const int8_t* qa = a.qa + m * a.stride;
        const int32_t qsum = a.qsum[m * k_blocks + b];
        int32_t acc[32] = {};
        for (int64_t k = k0; k < k1; ++k) {
          const int32_t x = qa[k];
          if (x == 0) continue;
          const uint8_t* c = codes + (k - k0) * 32;
          for (int64_t j = 0; j < 32; ++j) acc[j] += x * static_cast<int32_t>(c[j]);
        }
        float* out = y + m * w.n + g0;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t zp = w.zero_points != nullptr ? w.zero_points[b * w.n + g0 + j] : default_zp;
          const float t = static_cast<float>(acc[j] - static_cast<int32_t>(zp) * qsum);
          out[j] = std::fma(t, sa * scale[j], out[j]);
        }
      }
    }
  }
}

}  // namespace scap
