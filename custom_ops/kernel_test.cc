// scap_kernel_test: the kernels of sparse_gemm.h against a float64 reference, without ONNX Runtime,
// so that cross builds (ARM64 under qemu-user) and CPUs without some feature can check them.
//
//   scap_kernel_test [--expect ISA]
//
// Tests the portable kernels and the ones SelectKernels() picks (SCAP_ONNX_ISA caps the pick) over
// odd shapes, thresholds 0 / typical / +inf, offsets, per-channel threshold scales (0, +inf and
// others) and offsets, NaN in A, Inf and NaN in B, float32 and float16 weights, each path the op uses (one row split over K, tiles over column ranges, tiles
// split over K). --expect fails unless the pick is ISA. Exit status 0 when everything matches.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "sparse_gemm.h"

namespace {

using scap::KernelSet;
using scap::SparseRow;
using scap::SparseTiles;

int g_failures = 0;
int g_checks = 0;

float ToFloat(float x) { return x; }
float ToFloat(uint16_t x) { return scap::HalfToFloat(x); }
template <typename TW>
TW FromFloat(float x);
template <>
float FromFloat<float>(float x) { return x; }
template <>
uint16_t FromFloat<uint16_t>(float x) { return scap::FloatToHalf(x); }

struct Case {
  int64_t rows, depth, n;
  float threshold, offset;
  bool bias, nan_in_a, inf_in_b;
  const float* threshold_scale = nullptr;  // [depth] or nullptr
  const float* channel_offset = nullptr;
};

// D[k] and whether it is kept, as the contract defines them: without per-channel vectors in float64
// (D = A - offset, dropped iff |D| <= threshold), with them in float32 as the op computes D (A -
// offset - channel_offset[k], dropped iff |D| <= threshold * scale[k], the scale where that is 0 *
// inf). NaN is kept.
bool Kept(const Case& c, float a, int64_t k, double* d) {
  if (c.threshold_scale == nullptr && c.channel_offset == nullptr) {
    *d = static_cast<double>(a) - c.offset;
    return !(std::fabs(*d) <= c.threshold);
  }
  float df = a - c.offset;
  if (c.channel_offset != nullptr) df -= c.channel_offset[k];
  float tau = c.threshold;
  if (c.threshold_scale != nullptr) {
    tau = c.threshold * c.threshold_scale[k];
    if (std::isnan(tau)) tau = c.threshold_scale[k];
  }
  *d = df;
  return !(std::fabs(df) <= tau);
}

// Y as the contract defines it, in float64: Y = D_kept @ B (+ bias); a dropped element never meets
// its row of B.
template <typename TW>
std::vector<double> Reference(const Case& c, const std::vector<TW>& a, const std::vector<TW>& b,
                              const std::vector<float>& bias) {
  std::vector<double> y(static_cast<size_t>(c.rows * c.n), 0.0);
  for (int64_t m = 0; m < c.rows; ++m) {
    for (int64_t k = 0; k < c.depth; ++k) {
      double d;
      if (!Kept(c, ToFloat(a[m * c.depth + k]), k, &d)) continue;
      for (int64_t j = 0; j < c.n; ++j) y[m * c.n + j] += d * ToFloat(b[k * c.n + j]);
    }
    if (c.bias)
      for (int64_t j = 0; j < c.n; ++j) y[m * c.n + j] += bias[j];
  }
  return y;
}

// max |y - ref| / max |ref| over finite ref, with NaN and Inf in the same places.
template <typename TW>
void Compare(const char* isa, const char* path, const Case& c, const std::vector<TW>& y,
             const std::vector<double>& ref, double tol) {
  ++g_checks;
  double scale = 0.0, worst = 0.0;
  std::string problem;
  for (size_t i = 0; i < ref.size(); ++i)
    if (std::isfinite(ref[i])) scale = std::fmax(scale, std::fabs(ref[i]));
  if (scale == 0.0) scale = 1.0;
  for (size_t i = 0; i < ref.size() && problem.empty(); ++i) {
    // In float16 output, finite float64 values beyond its range are Inf too.
    const double expected = sizeof(TW) == 2 ? static_cast<double>(scap::HalfToFloat(scap::FloatToHalf(
                                                  static_cast<float>(ref[i]))))
                                            : ref[i];
    const double got = ToFloat(y[i]);
    if (std::isnan(expected) != std::isnan(got)) {
      problem = "NaN differs at " + std::to_string(i);
    } else if (std::isinf(expected) || std::isinf(got)) {
      if (expected != got) problem = "Inf differs at " + std::to_string(i);
    } else if (!std::isnan(expected)) {
      worst = std::fmax(worst, std::fabs(got - ref[i]) / scale);
    }
  }
  if (problem.empty() && worst > tol) problem = "relative error " + std::to_string(worst);
  if (!problem.empty()) {
    ++g_failures;
    if (g_failures <= 20)
      std::printf("FAIL %s %s %s rows=%lld K=%lld N=%lld threshold=%g offset=%g bias=%d nan=%d inf=%d scale=%d "
                  "channel_offset=%d: %s\n", isa, path, sizeof(TW) == 2 ? "float16" : "float32",
                  static_cast<long long>(c.rows), static_cast<long long>(c.depth), static_cast<long long>(c.n),
                  c.threshold, c.offset, c.bias, c.nan_in_a, c.inf_in_b, c.threshold_scale != nullptr,
                  c.channel_offset != nullptr, problem.c_str());
  }
}

// Work space of the several-rows kernels, as the op sizes it.
template <typename TW>
std::vector<float> TileWork(const KernelSet<TW>& ks, const SparseTiles& t, int64_t columns) {
  return std::vector<float>(
      static_cast<size_t>(scap::TileWorkFloats(t.tiles, t.tile_rows, scap::RoundUp(columns, ks.tile_columns))));
}

template <typename TW>
void RunCase(const char* isa, const KernelSet<TW>& ks, const Case& c, std::mt19937& rng, double tol) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<TW> a(static_cast<size_t>(c.rows * c.depth)), b(static_cast<size_t>(c.depth * c.n));
  std::vector<float> bias(static_cast<size_t>(c.n));
  for (auto& x : a) {
    const float p = uniform(rng);
    // Exact zeros, exact offsets (D = 0) and ties |D| == threshold among normal values.
    float v = normal(rng) + c.offset;
    if (p < 0.08f) v = 0.0f;
    else if (p < 0.14f) v = c.offset;
    else if (p < 0.18f && std::isfinite(c.threshold)) v = c.offset + c.threshold;
    x = FromFloat<TW>(v);
  }
  if (c.nan_in_a && !a.empty()) a[a.size() / 3] = FromFloat<TW>(std::numeric_limits<float>::quiet_NaN());
  for (auto& x : b) x = FromFloat<TW>(normal(rng) / std::sqrt(static_cast<float>(c.depth)));
  if (c.inf_in_b && c.depth > 1 && c.n > 1) {
    b[1 * c.n + 1] = FromFloat<TW>(std::numeric_limits<float>::infinity());
    b[(c.depth - 1) * c.n] = FromFloat<TW>(std::numeric_limits<float>::quiet_NaN());
  }
  for (auto& x : bias) x = normal(rng);
  // float16 bias values, as the op converts them.
  if (sizeof(TW) == 2)
    for (auto& x : bias) x = scap::HalfToFloat(scap::FloatToHalf(x));
  const float* bias_ptr = c.bias ? bias.data() : nullptr;
  const std::vector<double> ref = Reference(c, a, b, bias);

  // The drop rule over all rows, as the op runs it.
  std::vector<float> d(static_cast<size_t>(c.rows * c.depth));
  std::vector<uint32_t> seen(static_cast<size_t>(scap::SeenWords(c.depth)));
  std::vector<int32_t> kept(static_cast<size_t>(c.depth));
  int64_t kept_elements = -1;
  const int64_t kept_count =
      ks.sparsify(a.data(), c.rows, c.depth, scap::DropRule{c.threshold, c.offset, c.threshold_scale, c.channel_offset},
                  d.data(), seen.data(), kept.data(), &kept_elements);
  int64_t nonzero = 0;  // kept values are never 0 (a NaN is kept and is not 0)
  for (const float v : d) nonzero += v != 0.0f ? 1 : 0;
  ++g_checks;
  if (kept_elements != nonzero) {
    ++g_failures;
    std::printf("FAIL %s sparsify rows=%lld K=%lld: counted %lld kept elements, D holds %lld\n", isa,
                static_cast<long long>(c.rows), static_cast<long long>(c.depth), static_cast<long long>(kept_elements),
                static_cast<long long>(nonzero));
  }
  std::vector<TW> y(static_cast<size_t>(c.rows * c.n));

  if (c.rows == 1) {
    // One row split over K into 1 to 3 tasks' partial sums, then reduced.
    for (int64_t parts = 1; parts <= 3; ++parts) {
      std::vector<float> partials(static_cast<size_t>(parts * c.n));
      const SparseRow row{d.data(), kept.data(), kept_count};
      for (int64_t p = 0; p < parts; ++p)
        ks.row_partial(row, b.data(), c.n, p * kept_count / parts, (p + 1) * kept_count / parts,
                       partials.data() + p * c.n);
      ks.reduce(partials.data(), parts, c.n, c.n, bias_ptr, y.data());
      Compare(isa, parts == 1 ? "row" : "row-split", c, y, ref, tol);
    }
    return;
  }

  // Several rows: tiles of tile_rows rows, D gathered at the kept columns (or read in place).
  const int64_t tile_rows = ks.tile_rows;
  const int64_t tiles = (c.rows + tile_rows - 1) / tile_rows;
  std::vector<float> values;
  int64_t stride;
  if (kept_count == c.depth) {
    values = d;
    stride = c.depth;
  } else {
    stride = kept_count;
    for (int64_t m = 0; m < c.rows; ++m)
      for (int64_t i = 0; i < kept_count; ++i) values.push_back(d[m * c.depth + kept[i]]);
  }
  values.resize(static_cast<size_t>(tiles * tile_rows * stride), 0.0f);
  const SparseTiles act{c.rows, tile_rows, tiles, kept.data(), kept_count, values.data(), stride};

  // Column ranges at multiples of the register block: the whole width, then two ranges.
  const int64_t split = scap::RoundUp(c.n / 2, ks.tile_columns);
  for (int ranges = 1; ranges <= 2; ++ranges) {
    const int64_t cut = ranges == 1 || split >= c.n ? c.n : split;
    std::vector<float> work = TileWork(ks, act, cut);
    ks.tiles(act, b.data(), c.n, bias_ptr, y.data(), 0, cut, work.data());
    if (cut < c.n) {
      work = TileWork(ks, act, c.n - cut);
      ks.tiles(act, b.data(), c.n, bias_ptr, y.data(), cut, c.n, work.data());
    }
    Compare(isa, ranges == 1 ? "tiles" : "tiles-2-ranges", c, y, ref, tol);
  }

  // Split over K (short A): partial sums of every row, then reduced row by row.
  const int64_t width = scap::PartialStride(c.n, ks.tile_columns);
  const int64_t panel_width = scap::RoundUp(c.n, ks.tile_columns);
  const int64_t part_stride = tiles * tile_rows * width;
  const int64_t parts = kept_count >= 2 ? 2 : 1;
  std::vector<float> partials(static_cast<size_t>(parts * part_stride));
  std::vector<float> panel(static_cast<size_t>(scap::PanelRowsForWidth(panel_width) * scap::PanelStride(panel_width)));
  for (int64_t p = 0; p < parts; ++p)
    ks.tiles_partial(act, b.data(), c.n, p * kept_count / parts, (p + 1) * kept_count / parts, panel.data(),
                     partials.data() + p * part_stride);
  for (int64_t m = 0; m < c.rows; ++m)
    ks.reduce(partials.data() + m * width, parts, part_stride, c.n, bias_ptr, y.data() + m * c.n);
  Compare(isa, "tiles-split-k", c, y, ref, tol);
  if (!c.inf_in_b) {  // the direct kernel leaves 0 * Inf to its caller
    for (int64_t p = 0; p < parts; ++p)
      ks.tiles_partial_direct(act, b.data(), c.n, p * kept_count / parts, (p + 1) * kept_count / parts,
                              partials.data() + p * part_stride);
    for (int64_t m = 0; m < c.rows; ++m)
      ks.reduce(partials.data() + m * width, parts, part_stride, c.n, bias_ptr, y.data() + m * c.n);
    Compare(isa, "tiles-split-k-direct", c, y, ref, tol);
  }

  // B packed once (float32 strips of tile_columns), two column ranges; over the union of kept rows,
  // then each pair of rows of A over the union of its kept rows (RowPairLists of D's non-zeros).
  const int64_t strips = scap::RoundUp(c.n, ks.tile_columns) / ks.tile_columns;
  std::vector<float> packed(static_cast<size_t>(strips * c.depth * ks.tile_columns));
  std::vector<uint8_t> finite(static_cast<size_t>(c.depth));
  ks.pack(b.data(), c.depth, c.n, 0, c.depth / 2, packed.data(), finite.data());
  ks.pack(b.data(), c.depth, c.n, c.depth / 2, c.depth, packed.data(), finite.data());
  const scap::PackedB packed_b{packed.data(), finite.data(), c.depth, ks.tile_columns};
  const int64_t pairs = (c.rows + 1) / 2;
  const int64_t list_stride = c.depth + scap::kPairListSlack;
  const int64_t blocks = (c.depth + scap::kPairListBlock - 1) / scap::kPairListBlock;
  std::vector<int32_t> list_k(static_cast<size_t>(pairs * list_stride));
  std::vector<float> list_value(static_cast<size_t>(2 * pairs * list_stride));
  std::vector<int64_t> list_count(static_cast<size_t>(pairs), 0);
  const int64_t starts = scap::PairListStarts(blocks);
  std::vector<int64_t> list_start(static_cast<size_t>(pairs * starts));
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t& count = list_count[static_cast<size_t>(p)];
    for (int64_t block = 0; block < blocks; ++block) {
      // Parts: both rows keep k, the first only, the second only.
      for (int part = 0; part < scap::kPairListParts; ++part) {
        list_start[static_cast<size_t>(p * starts + scap::kPairListParts * block + part)] = count;
        for (int64_t k = block * scap::kPairListBlock; k < std::min(c.depth, (block + 1) * scap::kPairListBlock); ++k) {
          const float v0 = d[static_cast<size_t>(2 * p * c.depth + k)];
          const float v1 = 2 * p + 1 < c.rows ? d[static_cast<size_t>((2 * p + 1) * c.depth + k)] : 0.0f;
          const int kind = v0 != 0.0f && v1 != 0.0f ? 0 : v0 != 0.0f ? 1 : v1 != 0.0f ? 2 : -1;
          if (kind != part) continue;
          list_k[static_cast<size_t>(p * list_stride + count)] = static_cast<int32_t>(k);
          list_value[static_cast<size_t>(2 * p * list_stride + count)] = v0;
          list_value[static_cast<size_t>((2 * p + 1) * list_stride + count)] = v1;
          ++count;
        }
      }
    }
    list_start[static_cast<size_t>(p * starts + scap::kPairListParts * blocks)] = count;
  }
  const scap::RowPairLists lists{list_k.data(), list_value.data(), list_count.data(), pairs, list_stride,
                                 list_start.data(), blocks};
  // The kernels' own list builder, in two ranges of pairs, against the lists above.
  {
    ++g_checks;
    std::vector<int32_t> got_k(list_k.size(), -1);
    std::vector<float> got_value(list_value.size(), 0.0f);
    std::vector<int64_t> got_count(list_count.size(), -1), got_start(list_start.size(), -1);
    ks.pair_lists(d.data(), c.rows, c.depth, list_stride, 0, pairs / 2, got_k.data(), got_value.data(), got_count.data(),
                  got_start.data());
    ks.pair_lists(d.data(), c.rows, c.depth, list_stride, pairs / 2, pairs, got_k.data(), got_value.data(), got_count.data(),
                  got_start.data());
    bool same = got_count == list_count && got_start == list_start;
    for (int64_t p = 0; same && p < pairs; ++p) {
      for (int64_t j = 0; j < list_count[static_cast<size_t>(p)]; ++j) {
        const size_t at = static_cast<size_t>(p * list_stride + j);
        const size_t v0 = static_cast<size_t>(2 * p * list_stride + j), v1 = static_cast<size_t>((2 * p + 1) * list_stride + j);
        same = same && got_k[at] == list_k[at] &&
               std::memcmp(&got_value[v0], &list_value[v0], sizeof(float)) == 0 &&
               std::memcmp(&got_value[v1], &list_value[v1], sizeof(float)) == 0;
      }
    }
    if (!same) {
      ++g_failures;
      std::printf("FAIL %s pair-lists rows=%lld depth=%lld: the builder's lists differ\n", isa, static_cast<long long>(c.rows),
                  static_cast<long long>(c.depth));
    }
  }
  for (const scap::RowPairLists* per_row : {static_cast<const scap::RowPairLists*>(nullptr), &lists}) {
    const int64_t cut = split >= c.n ? c.n : split;
    for (const auto& range : {std::pair<int64_t, int64_t>{0, cut}, std::pair<int64_t, int64_t>{cut, c.n}}) {
      if (range.first == range.second) continue;
      std::vector<float> work(static_cast<size_t>(scap::PackedWorkFloats(
          tiles * tile_rows, scap::RoundUp(range.second - range.first, ks.tile_columns))));
      ks.tiles_packed(act, per_row, packed_b, c.n, bias_ptr, y.data(), range.first, range.second, work.data());
    }
    Compare(isa, per_row == nullptr ? "tiles-packed" : "tiles-packed-pair-lists", c, y, ref, tol);
  }
}

// float16 conversions exactly: B holds every float16 bit pattern but one and A is 1, so Y is B value
// for value (NaN as NaN, subnormals included); then D exactly halfway between two float16 values
// must round to even.
void CheckFloat16Exact(const char* isa, const KernelSet<uint16_t>& ks) {
  const int64_t n = 65535;
  std::vector<uint16_t> b(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) b[j] = static_cast<uint16_t>(j);
  for (int64_t rows : {1, 3}) {
    std::vector<uint16_t> a(static_cast<size_t>(rows), scap::FloatToHalf(1.0f));
    float d[3];
    uint32_t seen[1];
    int32_t kept[1];
    int64_t kept_elements = 0;
    const int64_t kept_count = ks.sparsify(a.data(), rows, 1, scap::DropRule{0.0f, 0.0f}, d, seen, kept, &kept_elements);
    std::vector<uint16_t> y(static_cast<size_t>(rows * n));
    if (rows == 1) {
      std::vector<float> partial(static_cast<size_t>(n));
      ks.row_partial(SparseRow{d, kept, kept_count}, b.data(), n, 0, kept_count, partial.data());
      ks.reduce(partial.data(), 1, n, n, nullptr, y.data());
    } else {
      std::vector<float> values(static_cast<size_t>(scap::RoundUp(rows, ks.tile_rows)), 0.0f);
      for (int64_t m = 0; m < rows; ++m) values[m] = d[m];
      const SparseTiles act{rows, ks.tile_rows, (rows + ks.tile_rows - 1) / ks.tile_rows, kept, kept_count,
                            values.data(), 1};
      std::vector<float> work(static_cast<size_t>(
          scap::TileWorkFloats(act.tiles, act.tile_rows, scap::RoundUp(n, ks.tile_columns))));
      ks.tiles(act, b.data(), n, nullptr, y.data(), 0, n, work.data());
    }
    ++g_checks;
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t got = y[m * n + j], want = b[j];
        // Equal values (0 + -0 sums to +0, as in any float32 accumulation), NaN as NaN.
        const float g = scap::HalfToFloat(got), w = scap::HalfToFloat(want);
        if (!(g == w || (std::isnan(g) && std::isnan(w)))) {
          ++g_failures;
          std::printf("FAIL %s float16 exact rows=%lld: 0x%04x became 0x%04x\n", isa, static_cast<long long>(rows),
                      want, got);
          m = rows;
          break;
        }
      }
    }
  }
  // Ties: D = A + 2^-11 with A in [1, 2) lies halfway between two float16 values.
  const int64_t n2 = 17;
  std::vector<uint16_t> ones(static_cast<size_t>(n2), scap::FloatToHalf(1.0f));
  std::vector<float> partial(static_cast<size_t>(n2));
  std::vector<uint16_t> y(static_cast<size_t>(n2));
  ++g_checks;
  for (int i = 0; i < 1024; ++i) {
    const uint16_t a = scap::FloatToHalf(1.0f + static_cast<float>(i) / 1024.0f);
    const float offset = -1.0f / 2048.0f;
    float d;
    uint32_t seen;
    int32_t kept;
    int64_t kept_elements = 0;
    const int64_t kept_count = ks.sparsify(&a, 1, 1, scap::DropRule{0.0f, offset}, &d, &seen, &kept, &kept_elements);
    ks.row_partial(SparseRow{&d, &kept, kept_count}, ones.data(), n2, 0, kept_count, partial.data());
    ks.reduce(partial.data(), 1, n2, n2, nullptr, y.data());
    const uint16_t want = scap::FloatToHalf(scap::HalfToFloat(a) - offset);
    for (int64_t j = 0; j < n2; ++j) {
      if (y[j] != want) {
        ++g_failures;
        std::printf("FAIL %s float16 tie %d: got 0x%04x, want 0x%04x\n", isa, i, y[j], want);
        return;
      }
    }
  }
}

void CheckKernels(const scap::GemmKernels& kernels) {
  const char* isa = kernels.isa;
  std::mt19937 rng(12345);
  const int64_t rows_list[] = {1, 2, 3, 5, 9, 17, 33};
  const int64_t depth_list[] = {1, 7, 33, 130};
  const int64_t n_list[] = {1, 5, 17, 33, 70};
  const float inf = std::numeric_limits<float>::infinity();
  const float attrs[][2] = {{0.0f, 0.0f}, {0.5f, 0.25f}, {1.0f, -1.25f}, {inf, 0.5f}};
  // Per-channel vectors over the largest K: scales with 0 and +inf among uniform [0, 2) ones, offsets
  // N(0, 0.5); each case runs without them, then with one or both (a prefix serves every smaller K).
  const int64_t most_depth = depth_list[sizeof depth_list / sizeof depth_list[0] - 1];
  std::vector<float> scale(static_cast<size_t>(most_depth)), channel_offset(static_cast<size_t>(most_depth));
  std::uniform_real_distribution<float> uniform(0.0f, 2.0f);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  for (int64_t k = 0; k < most_depth; ++k) {
    scale[k] = k % 11 == 3 ? 0.0f : k % 13 == 5 ? inf : uniform(rng);
    channel_offset[k] = normal(rng);
  }
  int variant = 0;
  for (int64_t rows : rows_list)
    for (int64_t depth : depth_list)
      for (int64_t n : n_list)
        for (const auto& attr : attrs) {
          ++variant;
          Case c{rows, depth, n, attr[0], attr[1], variant % 2 == 0, variant % 3 == 0, variant % 5 == 0};
          RunCase(isa, kernels.f32, c, rng, 1e-5);
          RunCase(isa, kernels.f16, c, rng, 3e-3);
          if (variant % 3 != 1) c.threshold_scale = scale.data();
          if (variant % 3 != 2) c.channel_offset = channel_offset.data();
          RunCase(isa, kernels.f32, c, rng, 1e-5);
          RunCase(isa, kernels.f16, c, rng, 3e-3);
        }
  // K beyond one block of the packed kernels (kPackedBlockRows) and over many blocks of the pair lists.
  for (int64_t rows : {9, 33})
    for (const auto& attr : attrs) {
      ++variant;
      const Case c{rows, 1100, 70, attr[0], attr[1], variant % 2 == 0, variant % 3 == 0, variant % 5 == 0};
      RunCase(isa, kernels.f32, c, rng, 1e-5);
    }
  CheckFloat16Exact(isa, kernels.f16);
}

}  // namespace

int main(int argc, char** argv) {
  const char* expect = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--expect") == 0 && i + 1 < argc) {
      expect = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--expect ISA]\n", argv[0]);
      return 2;
    }
  }
  const char* selected = scap::SelectedIsa();
  std::printf("selected kernels: %s\n", selected);
  if (expect != nullptr && std::strcmp(expect, selected) != 0) {
    std::printf("FAIL expected the %s kernels, the dispatch picked %s\n", expect, selected);
    return 1;
  }
  CheckKernels(scap::PortableKernels());
  if (&scap::SelectKernels() != &scap::PortableKernels()) CheckKernels(scap::SelectKernels());
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
