// Vector kernels of ScapSparseMatMulNBits (contract: scap_sparse_matmul_nbits.h), free of ONNX
// Runtime types: one row of A against block-quantized weights in the repacked row layout, compiled
// per instruction set (nbits_avx512.cc, nbits_avx2.cc, nbits_portable.cc) and chosen at run time
// with the float kernels (SCAP_ONNX_ISA caps both).
#pragma once

#include <cstdint>

namespace scap {

// The weights and one row of A after the drop rule.
struct NBitsRow {
  const uint8_t* b;            // B_packed [K, row_bytes]
  int64_t row_bytes;
  const float* scales;         // [k_blocks, n]
  const uint8_t* zero_points;  // [k_blocks, n], or nullptr: 2^(bits-1)
  int64_t n, bits, block_size;
  int64_t depth;               // K: floats between two rows of d
  const float* d;              // [rows, K]: D = A - offset, dropped elements 0
  const int32_t* kept;         // ascending kept k
  // Several rows of A: D's kept columns gathered once, d_kept[m * kept_stride + i] = d[m * depth +
  // kept[i]] (nullptr for one row).
  const float* d_kept = nullptr;
  int64_t kept_stride = 0;
};

struct NBitsKernels {
  // y[c0:c1) = sum over the kept k in kept[i0:i1) of d[k] * W[k, c0:c1), accumulated in float32
  // per block of K (per chunk of at most 16 of its kept rows) and scaled once per chunk (0 where
  // i0 == i1). c0 is a multiple of 32, c1 one or n.
  void (*row)(const NBitsRow& w, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y);
  // Several rows of A: Y[0:rows, c0:c1) = D[:, kept[i0:i1)] @ W[kept[i0:i1), c0:c1) (Y rows n floats
  // apart; D read from d_kept), the kept rows of each block dequantised once per pass of up to 128
  // rows of A; work: rows_work_floats floats.
  void (*rows)(const NBitsRow& w, int64_t rows, int64_t i0, int64_t i1, int64_t c0, int64_t c1, float* y,
               float* work);
  int64_t rows_work_floats;
  // Columns of the kernel's register tile: column ranges should be multiples of it.
  int64_t tile_columns;
  const char* isa;
};

// The NBits kernels of the ISA that SelectKernels() chose.
const NBitsKernels& SelectNBitsKernels();

}  // namespace scap
