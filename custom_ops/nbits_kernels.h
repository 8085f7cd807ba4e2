// Vector kernels of ScapSparseMatMulNBits (contract: scap_sparse_matmul_nbits.h), free of ONNX
// Runtime types: one row of A against block-quantized weights in the repacked row layout, compiled
// per instruction set (nbits_avx512.cc, nbits_avx2.cc, nbits_portable.cc) and chosen at run time
// with the float kernels (SCAP_ONNX_ISA caps both).
#pragma once

#include <cstdint>

#include "kernel_common.h"

namespace scap {

// The weights and one row of A after the drop rule.
struct NBitsRow {
  const uint8_t* b;  // B_packed [K, row_bytes]
  int64_t row_bytes;
  // A block's scales and zero points for all n columns, one row of each per block of K: scales
  // [k_blocks, n] float32, or float16 where scales_half; zero points one code a byte [k_blocks, n],
  // or (4 bits, zp_packed) packed like a row of b [k_blocks, row_bytes]; nullptr: 2^(bits-1).
  const void* scales;
  bool scales_half;
  const uint8_t* zero_points;
  bool zp_packed;
  int64_t n, bits, block_size;
  int64_t depth;               // K: floats between two rows of d
  const float* d;              // [rows, K]: D = A - offset, dropped elements 0
  const int32_t* kept;         // ascending kept k
  // Several rows of A: D's kept columns gathered once, d_kept[m * kept_stride + i] = d[m * depth +
  // kept[i]] (nullptr for one row).
  const float* d_kept = nullptr;
  int64_t kept_stride = 0;
};

// Block `block`'s scale and zero point of column j, one at a time (for padded tails). static, as
// kernel_common.h's helpers: the kernel files compiled for other ISAs each keep their own copy.
static inline float ScaleAt(const NBitsRow& w, int64_t block, int64_t j) {
  const int64_t i = block * w.n + j;
  if (w.scales_half) return HalfToFloat(static_cast<const uint16_t*>(w.scales)[i]);
  return static_cast<const float*>(w.scales)[i];
}

static inline int32_t ZeroPointAt(const NBitsRow& w, int64_t block, int64_t j) {
  if (w.zero_points == nullptr) return int32_t{1} << (w.bits - 1);
  if (!w.zp_packed) return w.zero_points[block * w.n + j];
  const uint8_t byte = w.zero_points[block * w.row_bytes + 16 * (j / 32) + j % 16];
  return j % 32 < 16 ? byte & 0x0F : byte >> 4;
}

// Block `block`'s scales and zero points of columns [c, c + width) as float32 and a byte each,
// padded with 0 up to `total`: what the kernels read for a last, partial group or strip.
static inline void PaddedBlockParams(const NBitsRow& w, int64_t block, int64_t c, int64_t width, int64_t total,
                                     float* scale, uint8_t* zp) {
  for (int64_t j = 0; j < total; ++j) {
    scale[j] = j < width ? ScaleAt(w, block, c + j) : 0.0f;
    zp[j] = j < width ? static_cast<uint8_t>(ZeroPointAt(w, block, c + j)) : 0;
  }
}

// Several rows of A quantised to int8 per row and block of K (accuracy_level 4; the rule is in
// scap_sparse_matmul_nbits.h): what the int8 kernels read besides the weights.
struct NBitsQuantized {
  const int8_t* qa;     // [rows, stride]: the quantised D, 0 past K
  int64_t stride;       // k_blocks * block_size: bytes between two rows of qa
  const float* sa;      // [rows, k_blocks]: each block's activation scale, 0 where the block is all 0
  const int32_t* qsum;  // [rows, k_blocks]: each block's sum of qa (for the zero points)
};

// Rows [r0, r1) of D ([rows, depth], dropped elements 0) quantised by the rule into q (sa, qsum at
// row r: q.sa + r * k_blocks ...); row_finite[r] is 1, or 0 for a row that holds Inf or NaN (its
// quantised values are then all 0).
using QuantizeRowsFn = void (*)(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                                const NBitsQuantized& q, uint8_t* row_finite);

// Y[0:rows, c0:c1) = sum over blocks of (sa * scales) * (qa . (q - zp)) (Y rows n floats apart; c0 a
// multiple of 32); work: NBitsInt8WorkBytes(k_blocks) bytes.
using RowsInt8Fn = void (*)(const NBitsRow& w, const NBitsQuantized& a, int64_t rows, int64_t c0, int64_t c1, float* y,
                            uint8_t* work);

// Rows of K per pass of RowsInt8Fn over its codes (a multiple of every block size).
constexpr int64_t kNBitsInt8ChunkRows = 1024;

// Bytes of work for RowsInt8Fn: four 32-column groups' codes of a chunk of rows, as bytes, and a
// partial group's scales (float) and zero points (byte), padded.
inline int64_t NBitsInt8WorkBytes(int64_t k_blocks) { return 4 * 32 * kNBitsInt8ChunkRows + 32 * 5 * k_blocks + 64; }

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
  // Several rows at accuracy_level 4: the quantisation, and the int8 products where the CPU has
  // them (AVX-512 VNNI; nullptr elsewhere: the float kernels multiply the dequantised activations).
  QuantizeRowsFn quantize_rows;
  RowsInt8Fn rows_int8;
};

// The quantisation in plain C++ (nbits_int8.cc), where the CPU has no AVX-512 VNNI.
void QuantizeRowsGeneric(const float* d, int64_t depth, int64_t block_size, int64_t r0, int64_t r1,
                         const NBitsQuantized& q, uint8_t* row_finite);

// The NBits kernels of the ISA that SelectKernels() chose.
const NBitsKernels& SelectNBitsKernels();

}  // namespace scap
