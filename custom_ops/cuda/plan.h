// Index arithmetic of the CUDA kernels (kernels.cu): the drop rule, the compaction of kept indices,
// the split of K over blocks, column tiles and their tails, and the launch plans. Everything here is
// __host__ __device__ so that the host tests (tests/cuda_index_test.cc) run the very functions the
// kernels run, over odd shapes, on machines without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define SCAP_HD __host__ __device__ __forceinline__
#else
#define SCAP_HD inline
#endif

namespace scap {
namespace cuda {

// Threads of every block; the compaction works in rounds of this many elements, one per thread.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements of K compacted at a time into shared memory (indices, and values for one row of A).
constexpr int kWindow = 1024;

// A split of K over blocks gets at least this many elements of K: each split costs a partial sum
// of its tile, written and read once.
constexpr int64_t kGemvMinSplitK = 128;
constexpr int64_t kGemmMinSplitK = 512;

// The drop rule on d = a - offset: d is dropped iff |d| <= threshold, so NaN is always kept.
SCAP_HD bool Kept(float d, float threshold) { return !(d <= threshold && -d <= threshold); }

// A node's drop rule with its optional per-channel vectors (device memory, [K] float32, or null):
// d[k] = a[k] - offset - channel_offset[k], dropped iff |d[k]| <= threshold * threshold_scale[k]
// (where that is 0 * inf, the scale decides). The contract: custom_ops/op_base.h.
struct DropRule {
  float threshold, offset;
  const float* threshold_scale;
  const float* channel_offset;
};

SCAP_HD float ChannelThreshold(float threshold, float scale) {
  const float product = threshold * scale;
  return product != product ? scale : product;
}

// d[k] for the value a of channel k.
SCAP_HD float Diff(float a, const DropRule& rule, int64_t k) {
  const float d = a - rule.offset;
  return rule.channel_offset != nullptr ? d - rule.channel_offset[k] : d;
}

// Whether d[k] is kept.
SCAP_HD bool KeptAt(float d, const DropRule& rule, int64_t k) {
  return Kept(d, rule.threshold_scale != nullptr ? ChannelThreshold(rule.threshold, rule.threshold_scale[k])
                                                 : rule.threshold);
}

SCAP_HD int Popc(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

SCAP_HD int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
SCAP_HD int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
SCAP_HD int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }

// One compaction round: warp w's ballot of kept elements is masks[w] (bit l: lane l keeps its
// element). A keeping lane writes at this position, after the kept elements of the warps before
// it and of the lanes before it, so the kept elements stay in ascending order.
SCAP_HD int CompactPosition(const uint32_t* masks, int warp, int lane) {
  int position = 0;
  for (int w = 0; w < warp; ++w) position += Popc(masks[w]);
  return position + Popc(masks[warp] & ((1u << lane) - 1u));
}

// Kept elements of a whole round.
SCAP_HD int RoundKept(const uint32_t* masks) {
  int kept = 0;
  for (int w = 0; w < kWarps; ++w) kept += Popc(masks[w]);
  return kept;
}

// Split `split` of `splits` over [0, k): near-equal runs, so that every block of a tile gets its
// share of the work (the kept rows of a split vary with the activations, not with the split).
struct Range {
  int64_t begin, end;
};
SCAP_HD Range SplitRange(int64_t k, int64_t splits, int64_t split) {
  return {split * k / splits, (split + 1) * k / splits};
}

// Column tile `tile` of width `width` over [0, n): the last tile is cut at n.
SCAP_HD Range TileRange(int64_t n, int64_t width, int64_t tile) {
  return {Min64(tile * width, n), Min64((tile + 1) * width, n)};
}

// Elements of a vector of `vec` elements starting at column `col` that lie inside [0, n): vec for
// every vector but the tail one, 0 past the end.
SCAP_HD int VecCount(int64_t col, int vec, int64_t n) {
  return static_cast<int>(Max64(0, Min64(vec, n - col)));
}

// Splits of K that fill the GPU with one wave of resident blocks (`resident`: blocks the GPU runs at
// once) and no more, so that no second wave runs a few blocks alone; each split keeps at least
// `min_split` elements of K.
SCAP_HD int64_t ChooseSplits(int64_t k, int64_t tiles, int64_t resident, int64_t min_split) {
  const int64_t wanted = resident / tiles;
  const int64_t most = Max64(1, k / min_split);
  return Max64(1, Min64(wanted, most));
}

// One row of A (decoding): a block per (column tile, split of K); each warp reads 16 bytes a lane
// of every kept row of its split, so a tile is 32 vectors wide.
struct GemvPlan {
  int vec;          // elements of T per 16-byte load
  int64_t width;    // columns of a tile: 32 * vec
  int64_t tiles;    // column tiles
  int64_t splits;   // splits of K (blocks per tile)
};

// blocks_per_sm: resident blocks of the kernel per SM (the occupancy calculator's answer).
SCAP_HD GemvPlan MakeGemvPlan(int64_t k, int64_t n, int elem_bytes, int sm_count, int blocks_per_sm) {
  GemvPlan plan;
  plan.vec = 16 / elem_bytes;
  plan.width = 32 * plan.vec;
  plan.tiles = Max64(1, CeilDiv(n, plan.width));
  plan.splits = ChooseSplits(k, plan.tiles, static_cast<int64_t>(sm_count) * blocks_per_sm, kGemvMinSplitK);
  return plan;
}

// Several rows of A: a block per (column tile, row tile, split of K), over the kept rows of B of
// its row tile (the union of its rows' kept elements).
struct GemmPlan {
  int64_t bm, bn, bk;      // block tile: rows of A, columns of B, kept rows of B per step
  int64_t mtiles, ntiles;  // row and column tiles
  int64_t splits;          // splits of K (blocks per output tile)
};

// Tiles of the float16 (tensor core) and float32 (CUDA core) kernels.
constexpr int64_t kGemmHalfBm = 64, kGemmHalfBn = 128, kGemmHalfBk = 64;
constexpr int64_t kGemmFloatBm = 64, kGemmFloatBn = 64, kGemmFloatBk = 16;

SCAP_HD GemmPlan MakeGemmPlan(int64_t m, int64_t k, int64_t n, int elem_bytes, int sm_count, int blocks_per_sm) {
  GemmPlan plan;
  const bool half = elem_bytes == 2;
  plan.bm = half ? kGemmHalfBm : kGemmFloatBm;
  plan.bn = half ? kGemmHalfBn : kGemmFloatBn;
  plan.bk = half ? kGemmHalfBk : kGemmFloatBk;
  plan.mtiles = Max64(1, CeilDiv(m, plan.bm));
  plan.ntiles = Max64(1, CeilDiv(n, plan.bn));
  plan.splits = ChooseSplits(k, plan.mtiles * plan.ntiles, static_cast<int64_t>(sm_count) * blocks_per_sm,
                             kGemmMinSplitK);
  return plan;
}

// Scratch of one call, in one buffer: a counter per output tile (the last block of a tile to finish
// sums the splits' partial sums; unused when the stream keeps counters), then the partial sums
// [splits, rows, n] when K is split.
struct ScratchLayout {
  size_t counters;  // byte offsets
  size_t partials;
  size_t bytes;     // total
};

SCAP_HD size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

SCAP_HD ScratchLayout MakeScratchLayout(int64_t rows, int64_t n, int64_t tiles, int64_t splits) {
  ScratchLayout layout;
  layout.counters = 0;
  layout.partials = AlignUp(static_cast<size_t>(tiles) * sizeof(int));
  const size_t partial_bytes = splits > 1 ? static_cast<size_t>(splits * rows * n) * sizeof(float) : 0;
  layout.bytes = layout.partials + AlignUp(partial_bytes);
  return layout;
}

}  // namespace cuda
}  // namespace scap
