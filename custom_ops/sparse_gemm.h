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

// Y[m, n0:n1] = sum over kept k of values[m, k] * B[k, n0:n1] (+ bias[n0:n1]).
// B is row-major [depth, N]; Y is row-major [rows, N]; bias is float32 or nullptr.
// Half-precision data is passed as IEEE binary16 bit patterns.
using GemmBlockF32 = void (*)(const SparseActivations& act, const float* b, int64_t n, const float* bias,
                              float* y, int64_t n0, int64_t n1);
using GemmBlockF16 = void (*)(const SparseActivations& act, const uint16_t* b, int64_t n, const float* bias,
                              uint16_t* y, int64_t n0, int64_t n1);

struct GemmKernels {
  GemmBlockF32 f32;
  GemmBlockF16 f16;
  const char* isa;  // "avx512", "avx2" or "portable"
};

// The fastest kernels this CPU runs, chosen once at run time.
const GemmKernels& SelectKernels();

// The portable kernels (also the reference for the vectorised ones in tests of the dispatch).
const GemmKernels& PortableKernels();

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace scap
