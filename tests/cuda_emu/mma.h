// CPU emulation of the WMMA fragments kernels.cu uses (see cuda_runtime.h here). Every emulated
// thread of a warp holds the whole 16 x 16 matrix and does the whole warp's operation; all lanes
// end with the same values, which is what the kernels rely on.
#pragma once

#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float v[16 * 16];
};

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& x : f.v) x = value;
}

template <class Use>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, row_major>& f, const __half* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = __half2float(p[r * ldm + c]);
}

inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __half, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, row_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float sum = c.v[r * 16 + col];
      for (int k = 0; k < 16; ++k) sum += a.v[r * 16 + k] * b.v[k * 16 + col];
      out[r * 16 + col] = sum;
    }
  for (int i = 0; i < 256; ++i) d.v[i] = out[i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.v[r * 16 + c];
}

}  // namespace wmma
}  // namespace nvcuda
