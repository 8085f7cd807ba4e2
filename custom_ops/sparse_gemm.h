// Numeric core of ScapSparseMatMul, free of ONNX Runtime types.
//
// The kernels apply the drop rule (vectorised, see KernelSet::sparsify) and multiply the sparsified
// activations by B, visiting only the rows of B whose activations survived. One row of A
// (decoding) splits the kept rows of B over tasks, each adding into a partial sum; several rows
// split the output columns over tasks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_common.h"

namespace scap {

// The drop rule of one node: d[k] = a[k] - offset - channel_offset[k]; d[k] is dropped iff
// |d[k]| <= threshold * threshold_scale[k] (where that is 0 * inf: threshold_scale[k]). The vectors
// ([K] float32) may be nullptr: channel_offset 0, threshold_scale 1.
struct DropRule {
  float threshold;
  float offset;
  const float* threshold_scale = nullptr;
  const float* channel_offset = nullptr;
};

// One row of A after the drop rule (decoding).
struct SparseRow {
  const float* values;  // [K]: D = A - offset, dropped elements set to 0
  const int32_t* kept;  // ascending indices k of the kept elements
  int64_t kept_count;
};

// Several rows of A after the drop rule, in tiles of tile_rows rows. All tiles visit the union of
// the rows' kept k, kept[0 .. kept_count): values[m * row_stride + i] = D[m, kept[i]] for the rows m
// of every tile (rows past the end of A are 0). When every k is kept, values is D itself.
struct SparseTiles {
  int64_t rows;
  int64_t tile_rows;
  int64_t tiles;
  const int32_t* kept;
  int64_t kept_count;
  const float* values;  // tiles * tile_rows rows
  int64_t row_stride;
};

// The several-rows kernel copies kPanelRows kept rows of a column block of B at a time into a
// contiguous float32 panel (streaming whole row segments from memory), then multiplies from it.
// 128 rows keep one register block's column strip (24 KiB on AVX-512) in L1 while every tile of A
// passes over it; 256 rows measured 10-15% slower at M = 128.
constexpr int64_t kPanelRows = 128;

// Floats between two rows of a panel `columns` wide: one cache line more, so that the rows of a
// column strip do not all fall into the same few L1 sets when `columns` is a power of two.
inline int64_t PanelStride(int64_t columns) { return columns + 16; }

// Floats between two rows of A's partial sums in the split over K (tiles_partial): N rounded up to
// the register block, plus a cache line, so that the rows of a tile (N = 4096: 16 KiB apart) do not
// alias in L1 (the direct kernel on AVX2 at M = 16, K = N = 4096: 19 ms a call, 6.7 ms padded).
inline int64_t PartialStride(int64_t n, int64_t tile_columns) {
  return PanelStride((n + tile_columns - 1) / tile_columns * tile_columns);
}

// Floats of work space `tiles` needs for a block of `columns` columns (a multiple of tile_columns).
inline int64_t TileWorkFloats(int64_t tiles, int64_t tile_rows, int64_t columns) {
  return kPanelRows * PanelStride(columns) + tiles * tile_rows * columns;
}

// x rounded up to a multiple of `to`.
inline int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// 32-bit words of the kept-column bitmap that `sparsify` works in.
inline int64_t SeenWords(int64_t depth) { return (depth + 31) / 32; }

// Rows of B per panel when whole rows `width` floats wide are copied: about 256 KiB, so that it and
// the next panel, prefetched meanwhile, stay in L2.
inline int64_t PanelRowsForWidth(int64_t width) {
  const int64_t rows = (int64_t{1} << 16) / (width > 0 ? width : 1);
  return rows < 8 ? 8 : (rows > kPanelRows ? kPanelRows : rows);
}

// B packed once into column strips for the several-rows kernels (tiles_packed): strip s holds B's
// columns [s * strip, (s + 1) * strip) as float32, row after row (strip floats a row, the last strip
// zero-padded), so that a register block's kept rows are read one after another instead of from
// rows N floats apart, and no call copies B into panels again (onnxruntime's MatMul packs its
// constant B once the same way).
struct PackedB {
  const float* data;          // strips * depth * strip floats: strip s, row k at (s * depth + k) * strip
  const uint8_t* row_finite;  // [depth]: 1 where B's row k holds no Inf or NaN
  int64_t depth;
  int64_t strip;  // columns per strip: the kernels' tile_columns
};

// Several rows of A as lists over pairs of rows (pair p: rows 2p and 2p + 1, the second all zeros
// past the last row): the union of the pair's kept elements, k[p * stride + j] for j < count[p], with
// the first row's values at value[2 * p * stride + j] and the second's at value[(2 * p + 1) * stride +
// j] (0 where that row drops k). Within each block of kPairListBlock rows of B the entries come in
// kPairListParts parts, each with k ascending: the rows of B both rows keep, then those only the
// first keeps, then those only the second keeps. A pair multiplies each row of B of its union once
// for both its rows (their loads shared) yet does the FMAs of kept elements only: at 50% sparsity
// the union of 8 rows keeps nearly every row of B, that of two rows three quarters, and the kept
// elements are half. No dropped element meets a row of B, so Inf and NaN in B need no care.
struct RowPairLists {
  const int32_t* k;
  const float* value;
  const int64_t* count;
  int64_t pairs;
  int64_t stride;  // entries between two lists: K + kPairListSlack
  // Pair p's parts in block b start at start[p * PairListStarts(blocks) + kPairListParts * b + part];
  // the block's last part ends where the next block starts (the last entry: count[p]), so that every
  // column task walks the lists block by block without a search.
  const int64_t* start;
  int64_t blocks;
};

// Both rows, the first only, the second only.
constexpr int64_t kPairListParts = 3;

// Entries of RowPairLists::start per pair.
inline int64_t PairListStarts(int64_t blocks) { return kPairListParts * blocks + 1; }

// Rows of B per block of the pair lists' walk: the block of a few strips stays in L1.
constexpr int64_t kPairListBlock = 64;
// Room past each list for its builder, which stores whole vectors.
constexpr int64_t kPairListSlack = 16;

// The kernels for weights of one type TW: float, or uint16_t holding IEEE binary16 bit patterns.
// B is row-major [K, N]; Y is row-major [rows, N] of TW; bias is float32 or nullptr.
template <typename TW>
struct KernelSet {
  int64_t tile_rows;     // rows per tile that `tiles` expects
  int64_t tile_columns;  // columns of its register block: column ranges should be multiples of it
  int64_t list_columns;  // columns a pair of rows walks at once over packed B (tiles_packed with lists)
  // The drop rule on `rows` rows of A (TW as well), `depth` elements each: d = A - offset -
  // channel_offset with the dropped elements (see DropRule; NaN is kept) set to 0. Writes the
  // ascending union of the rows' kept columns to kept[0 .. returned count) and the number of kept
  // elements of all rows to *kept_elements; seen: SeenWords(depth) of work space.
  int64_t (*sparsify)(const TW* a, int64_t rows, int64_t depth, const DropRule& rule, float* d, uint32_t* seen,
                      int32_t* kept, int64_t* kept_elements);
  // One row of A: partial[0:N] = sum over kept[i0:i1] of values[k] * B[k, :].
  void (*row_partial)(const SparseRow& row, const TW* b, int64_t n, int64_t i0, int64_t i1, float* partial);
  // y[0:N] = sum of `parts` partials, part_stride floats apart (+ bias).
  void (*reduce)(const float* partials, int64_t parts, int64_t part_stride, int64_t n, const float* bias, TW* y);
  // Several rows of A: Y[:, n0:n1] = D @ B[:, n0:n1] (+ bias[n0:n1]), with TileWorkFloats of work space.
  void (*tiles)(const SparseTiles& act, const TW* b, int64_t n, const float* bias, TW* y, int64_t n0, int64_t n1,
                float* work);
  // Several rows of A, split over K: partial (every row of A, PartialStride(N, tile_columns) floats
  // apart) = D[:, kept[i0:i1]] @ B[kept[i0:i1], :], with PanelRowsForWidth(that width) rows of
  // PanelStride(that width) floats as work space.
  void (*tiles_partial)(const SparseTiles& act, const TW* b, int64_t n, int64_t i0, int64_t i1, float* work,
                        float* partial);
  // The same without a panel, multiplying B's rows where they lie (faster for few tiles); where a
  // kept row of B holds Inf or NaN, partials may hold NaN that tiles_partial would not give.
  void (*tiles_partial_direct)(const SparseTiles& act, const TW* b, int64_t n, int64_t i0, int64_t i1,
                               float* partial);
  // Packs rows [k0, k1) of B ([depth, n]) into `packed` (PackedB's layout, strips of tile_columns)
  // and sets row_finite[k0:k1].
  void (*pack)(const TW* b, int64_t depth, int64_t n, int64_t k0, int64_t k1, float* packed, uint8_t* row_finite);
  // Several rows of A over packed B: Y[:, n0:n1] = D @ B[:, n0:n1] (+ bias[n0:n1]), n0 a multiple of
  // tile_columns, with PackedWorkFloats of work space: register tiles of rows of A over the union
  // of their kept rows of B, or (lists not nullptr) each pair of rows of A over the union of its kept rows.
  void (*tiles_packed)(const SparseTiles& act, const RowPairLists* lists, const PackedB& b, int64_t n, const float* bias,
                       TW* y, int64_t n0, int64_t n1, float* work);
  // Writes pairs [p0, p1) of RowPairLists (k, value, count, start; lists `stride` >= depth +
  // kPairListSlack entries apart) for the `rows` rows of D ([rows, depth], dropped elements 0, kept
  // ones never 0).
  void (*pair_lists)(const float* d, int64_t rows, int64_t depth, int64_t stride, int64_t p0, int64_t p1, int32_t* k,
                     float* value, int64_t* count, int64_t* start);
};

// Floats of work space tiles_packed needs for `rows` padded rows of A over `columns` columns.
inline int64_t PackedWorkFloats(int64_t rows, int64_t columns) { return rows * PanelStride(columns); }

struct GemmKernels {
  KernelSet<float> f32;
  KernelSet<uint16_t> f16;
  const char* isa;  // "avx512", "avx2", "neon" or "portable"
};

// The fastest kernels this CPU runs, chosen once at run time.
const GemmKernels& SelectKernels();

// Several rows of A on CPUs with AMX-BF16 (gemm_amx.cc): the activations are split once per pass
// into bfloat16 parts, then column ranges multiply as the `tiles` kernels do.
struct AmxGemm {
  // uint16_t elements of the split activations of `act`.
  int64_t (*parts_elements)(const SparseTiles& act);
  // Splits rows [m0, m1) of act (multiples of split_rows) into parts; false if a value is Inf or
  // NaN, which the split cannot carry (use the float32 kernels then).
  bool (*split)(const SparseTiles& act, int64_t m0, int64_t m1, uint16_t* parts);
  // Y[:, n0:n1] = D @ B[:, n0:n1] (+ bias[n0:n1]), n0 a multiple of tile_columns; false, with
  // nothing written, if B's kept rows hold Inf or NaN in those columns.
  bool (*tiles)(const SparseTiles& act, const uint16_t* parts, const float* b, int64_t n, const float* bias, float* y,
                int64_t n0, int64_t n1);
  // The same for float16 weights and output (uint16_t bit patterns).
  bool (*tiles_f16)(const SparseTiles& act, const uint16_t* parts, const uint16_t* b, int64_t n, const float* bias,
                    uint16_t* y, int64_t n0, int64_t n1);
  int64_t split_rows;
  int64_t tile_columns;
};

// The AMX kernels when the CPU, the operating system and SCAP_ONNX_ISA allow them, else nullptr.
const AmxGemm* SelectAmx();

// The kernels this process runs: "amx" when SelectAmx() gives the tile kernels, else
// SelectKernels().isa. Exported as ScapOnnxKernelIsa (register.cc).
const char* SelectedIsa();

// The portable kernels (also the reference for the vectorised ones in tests of the dispatch).
const GemmKernels& PortableKernels();


}  // namespace scap
