// Numeric core of ScapSparseMatMul, free of ONNX Runtime types.
//
// The kernels multiply already-sparsified activations by B, visiting only the rows of B whose
// activations survived the drop rule. They compute one block of output columns [n0, n1) so that
// the caller can spread column blocks over threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace scap {

// Activations after the drop rule, for up to kMaxRowsPerPass rows of A.
struct SparseActivations {
  const float* values;   // rows x depth, row-major: D = A - offset, dropped elements set to 0
  int64_t rows;          // M of this pass
  int64_t depth;         // K
  const int32_t* kept;   // ascending indices k kept in at least one of the rows
  int64_t kept_count;
};

// The kernels keep rows x (column tile) float accumulators in a fixed buffer on the stack;
// the caller splits taller A into passes of at most this many rows.
constexpr int64_t kMaxRowsPerPass = 32;

// The kernels for weights of one type TW: float, or uint16_t holding IEEE binary16 bit patterns.
// B is row-major [depth, N]; Y is row-major [rows, N] of TW; bias is float32 or nullptr.
template <typename TW>
struct KernelSet {
  // Y[m, n0:n1] = sum over kept k of values[m, k] * B[k, n0:n1] (+ bias[n0:n1]), for every row m.
  void (*columns)(const SparseActivations& act, const TW* b, int64_t n, const float* bias, TW* y, int64_t n0,
                  int64_t n1);
  // One row of A (act.rows == 1): partial[0:n] = sum over kept[i0:i1] of values[k] * B[k, :].
  void (*rows_partial)(const SparseActivations& act, const TW* b, int64_t n, int64_t i0, int64_t i1,
                       float* partial);
  // y[0:n] = sum of `parts` partials laid out [parts, n] (+ bias).
  void (*reduce)(const float* partials, int64_t parts, int64_t n, const float* bias, TW* y);
};

struct GemmKernels {
  KernelSet<float> f32;
  KernelSet<uint16_t> f16;
  const char* isa;  // "avx512", "avx2" or "portable"
};

// The fastest kernels this CPU runs, chosen once at run time.
const GemmKernels& SelectKernels();

// The portable kernels (also the reference for the vectorised ones in tests of the dispatch).
const GemmKernels& PortableKernels();

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace scap
