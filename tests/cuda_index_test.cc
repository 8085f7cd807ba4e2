// Host test of the CUDA kernels' index arithmetic (custom_ops/cuda/plan.h), compiled with the host
// compiler by tests/test_cuda_build.py: the drop rule, the kept-index compaction, the split of K,
// column tiles and their tails, the plans and the scratch layout. The last checks walk the kernels'
// decompositions (tile, split, window, compaction round, warp, lane, element) on the host and
// compare the products they visit with a direct float64 product: every kept (k, column) pair must
// be visited once. Prints each failure; exit status 1 if any.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "plan.h"

using namespace scap::cuda;

namespace {

int failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++failures;                                                     \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

void TestDropRule() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(!Kept(0.0f, 0.0f), "exact zero dropped at threshold 0");
  CHECK(!Kept(-0.0f, 0.0f), "negative zero dropped");
  CHECK(Kept(1e-30f, 0.0f), "tiny kept at threshold 0");
  CHECK(!Kept(0.5f, 0.5f) && !Kept(-0.5f, 0.5f), "|d| == threshold dropped");
  CHECK(Kept(std::nextafter(0.5f, 1.0f), 0.5f) && Kept(-std::nextafter(0.5f, 1.0f), 0.5f), "just above kept");
  CHECK(Kept(nan, 0.0f) && Kept(nan, inf), "NaN always kept");
  CHECK(!Kept(inf, inf) && !Kept(-inf, inf) && !Kept(3e38f, inf), "threshold inf drops every non-NaN");
  CHECK(Kept(inf, 1.0f) && Kept(-inf, 1.0f), "Inf kept at finite threshold");
}

// One window's compaction as the kernels run it: rounds of kThreads elements, a ballot per warp.
std::vector<int> Compact(const std::vector<bool>& keep) {
  const int len = static_cast<int>(keep.size());
  std::vector<int> idx(static_cast<size_t>(len) + 1, -1);
  int kept = 0;
  for (int r = 0; r < len; r += kThreads) {
    uint32_t masks[kWarps] = {};
    for (int t = 0; t < kThreads; ++t) {
      if (r + t < len && keep[static_cast<size_t>(r + t)]) masks[t / 32] |= 1u << (t % 32);
    }
    for (int t = 0; t < kThreads; ++t) {
      if (masks[t / 32] >> (t % 32) & 1u) {
        const int position = kept + CompactPosition(masks, t / 32, t % 32);
        CHECK(position >= 0 && position < len, "position %d in window of %d", position, len);
        if (position >= 0 && position < len) idx[static_cast<size_t>(position)] = r + t;
      }
    }
    kept += RoundKept(masks);
  }
  idx.resize(static_cast<size_t>(kept));
  return idx;
}

void TestCompaction(std::mt19937& rng) {
  for (int len : {0, 1, 31, 32, 33, 255, 256, 257, 700, kWindow}) {
    for (double p : {0.0, 0.03, 0.5, 0.97, 1.0}) {
      std::bernoulli_distribution coin(p);
      std::vector<bool> keep(static_cast<size_t>(len));
      std::vector<int> expected;
      for (int i = 0; i < len; ++i) {
        keep[static_cast<size_t>(i)] = coin(rng);
        if (keep[static_cast<size_t>(i)]) expected.push_back(i);
      }
      CHECK(Compact(keep) == expected, "compaction of %d elements at p = %.2f", len, p);
    }
  }
}

void TestSplits() {
  for (int64_t k : {0, 1, 2, 7, 127, 1023, 1025, 4096, 11008, 28673}) {
    for (int64_t splits : {1, 2, 3, 7, 64, 66, 300}) {
      int64_t next = 0, smallest = k, largest = 0;
      for (int64_t s = 0; s < splits; ++s) {
        const Range r = SplitRange(k, splits, s);
        CHECK(r.begin == next && r.end >= r.begin, "k %lld split %lld/%lld", (long long)k, (long long)s,
              (long long)splits);
        next = r.end;
        smallest = std::min(smallest, r.end - r.begin);
        largest = std::max(largest, r.end - r.begin);
      }
      CHECK(next == k, "splits of %lld end at %lld", (long long)k, (long long)next);
      CHECK(largest - smallest <= 1, "k %lld in %lld splits: sizes %lld..%lld", (long long)k, (long long)splits,
            (long long)smallest, (long long)largest);
    }
  }
}

void TestTiles() {
  for (int vec : {4, 8}) {
    const int64_t width = 32 * vec;
    for (int64_t n : {1, 3, 7, 9, 127, 128, 129, 255, 256, 257, 1000, 4096, 11008, 11001}) {
      std::vector<int> seen(static_cast<size_t>(n), 0);
      const int64_t tiles = CeilDiv(n, width);
      for (int64_t t = 0; t < tiles; ++t) {
        const Range cols = TileRange(n, width, t);
        CHECK(cols.begin < cols.end && cols.end - cols.begin <= width, "tile %lld of n %lld", (long long)t,
              (long long)n);
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t col = cols.begin + lane * vec;
          const int count = VecCount(col, vec, n);
          CHECK(count >= 0 && count <= vec, "count %d", count);
          for (int e = 0; e < count; ++e) ++seen[static_cast<size_t>(col + e)];
        }
      }
      for (int64_t c = 0; c < n; ++c) {
        CHECK(seen[static_cast<size_t>(c)] == 1, "n %lld vec %d: column %lld covered %d times", (long long)n, vec,
              (long long)c, seen[static_cast<size_t>(c)]);
      }
    }
  }
}

void TestPlans() {
  const int sm = 132;
  for (int bytes : {2, 4}) {
    for (auto kn : {std::pair<int64_t, int64_t>{4096, 11008}, {11008, 4096}, {8192, 28672}, {1, 1}, {0, 5},
                    {300, 17}}) {
      const GemvPlan g = MakeGemvPlan(kn.first, kn.second, bytes, sm, 8);
      CHECK(g.vec * bytes == 16 && g.width == 32 * g.vec, "vector of 16 bytes");
      CHECK(g.tiles * g.width >= kn.second && (g.tiles - 1) * g.width < std::max<int64_t>(kn.second, 1), "tiles");
      CHECK(g.splits >= 1 && (g.splits == 1 || kn.first / g.splits >= kGemvMinSplitK), "splits %lld",
            (long long)g.splits);
      CHECK(g.splits <= 65535, "grid y limit");
      // The large layers fill the GPU with one wave: more than half the resident blocks, no more than all.
      if (kn.first >= 4096)
        CHECK(g.tiles * g.splits > 4 * sm && g.tiles * g.splits <= 8 * sm, "blocks %lld", (long long)(g.tiles * g.splits));
    }
    for (int64_t m : {2, 4, 63, 64, 65, 256, 1000}) {
      for (auto kn : {std::pair<int64_t, int64_t>{4096, 11008}, {11008, 4096}, {7, 9}, {0, 3}}) {
        const GemmPlan g = MakeGemmPlan(m, kn.first, kn.second, bytes, sm, 2);
        CHECK(g.mtiles * g.bm >= m && (g.mtiles - 1) * g.bm < m, "row tiles");
        CHECK(g.ntiles * g.bn >= kn.second, "column tiles");
        CHECK(g.splits >= 1 && (g.splits == 1 || kn.first / g.splits >= kGemmMinSplitK), "gemm splits");
        CHECK(g.bk % 16 == 0 || bytes == 4, "tensor-core steps of 16");
      }
    }
  }
  const ScratchLayout s = MakeScratchLayout(64, 4097, 33, 9);
  CHECK(s.partials % 256 == 0 && s.bytes % 256 == 0, "aligned");
  CHECK(s.partials >= 33 * sizeof(int) && s.bytes >= s.partials + 9 * 64 * 4097 * sizeof(float),
        "regions do not overlap");
  const ScratchLayout one = MakeScratchLayout(1, 100, 1, 1);
  CHECK(one.bytes == one.partials, "no partial sums without a split");
}

// The one-row kernel's decomposition, on the host: sums per (tile, split) in warp order, splits
// added in split order. Returns max |y - ref| / max |ref|.
double GemvWalk(int64_t k, int64_t n, int bytes, int sm, float threshold, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> a(static_cast<size_t>(k)), b(static_cast<size_t>(k * n));
  for (float& x : a) x = normal(rng);
  for (float& x : b) x = normal(rng);
  const GemvPlan plan = MakeGemvPlan(k, n, bytes, sm, 8);
  std::vector<float> y(static_cast<size_t>(n), 0.0f);
  std::vector<int> visits(static_cast<size_t>(k * n), 0);
  for (int64_t t = 0; t < plan.tiles; ++t) {
    const Range cols = TileRange(n, plan.width, t);
    for (int64_t s = 0; s < plan.splits; ++s) {
      const Range split = SplitRange(k, plan.splits, s);
      std::vector<float> warp_acc(static_cast<size_t>(kWarps * plan.width), 0.0f);
      for (int64_t w0 = split.begin; w0 < split.end; w0 += kWindow) {
        const int len = static_cast<int>(Min64(kWindow, split.end - w0));
        std::vector<bool> keep(static_cast<size_t>(len));
        for (int i = 0; i < len; ++i) keep[static_cast<size_t>(i)] = Kept(a[static_cast<size_t>(w0 + i)], threshold);
        const std::vector<int> idx = Compact(keep);
        for (int warp = 0; warp < kWarps; ++warp) {
          for (size_t j = static_cast<size_t>(warp); j < idx.size(); j += kWarps) {
            const int64_t row = w0 + idx[j];
            for (int lane = 0; lane < 32; ++lane) {
              const int64_t col = cols.begin + lane * plan.vec;
              for (int e = 0; e < VecCount(col, plan.vec, n); ++e) {
                warp_acc[static_cast<size_t>(warp * plan.width + lane * plan.vec + e)] +=
                    a[static_cast<size_t>(row)] * b[static_cast<size_t>(row * n + col + e)];
                ++visits[static_cast<size_t>(row * n + col + e)];
              }
            }
          }
        }
      }
      for (int64_t c = cols.begin; c < cols.end; ++c) {
        float sum = 0.0f;
        for (int w = 0; w < kWarps; ++w) sum += warp_acc[static_cast<size_t>(w * plan.width + c - cols.begin)];
        y[static_cast<size_t>(c)] += sum;
      }
    }
  }
  double err = 0.0, scale = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    double ref = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const bool kept = Kept(a[static_cast<size_t>(i)], threshold);
      CHECK(visits[static_cast<size_t>(i * n + c)] == (kept ? 1 : 0), "gemv k %lld n %lld: (%lld, %lld) visited %d",
            (long long)k, (long long)n, (long long)i, (long long)c, visits[static_cast<size_t>(i * n + c)]);
      if (kept) ref += static_cast<double>(a[static_cast<size_t>(i)]) * b[static_cast<size_t>(i * n + c)];
    }
    err = std::max(err, std::fabs(ref - y[static_cast<size_t>(c)]));
    scale = std::max(scale, std::fabs(ref));
  }
  return scale > 0 ? err / scale : err;
}

// The several-rows kernel's decomposition: row tiles' unions of kept elements, column tiles, splits, windows and
// steps of bk kept rows; every kept (row, k, column) visited once, every dropped one contributes 0.
void GemmWalk(int64_t m, int64_t k, int64_t n, int bytes, float threshold, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> a(static_cast<size_t>(m * k));
  for (float& x : a) x = normal(rng);
  const GemmPlan plan = MakeGemmPlan(m, k, n, bytes, 132, 2);
  std::vector<int> visits(static_cast<size_t>(m * k * n), 0);
  for (int64_t mt = 0; mt < plan.mtiles; ++mt) {
    const int64_t m0 = mt * plan.bm;
    std::vector<bool> flags(static_cast<size_t>(k), false);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t r = m0; r < Min64(m0 + plan.bm, m); ++r)
        if (Kept(a[static_cast<size_t>(r * k + i)], threshold)) flags[static_cast<size_t>(i)] = true;
    for (int64_t nt = 0; nt < plan.ntiles; ++nt) {
      const int64_t n0 = nt * plan.bn;
      for (int64_t s = 0; s < plan.splits; ++s) {
        const Range split = SplitRange(k, plan.splits, s);
        for (int64_t w0 = split.begin; w0 < split.end; w0 += kWindow) {
          const int len = static_cast<int>(Min64(kWindow, split.end - w0));
          const std::vector<int> idx =
              Compact(std::vector<bool>(flags.begin() + w0, flags.begin() + w0 + len));
          const int kept = static_cast<int>(idx.size());
          for (int s0 = 0; s0 < kept; s0 += static_cast<int>(plan.bk)) {
            for (int64_t r = 0; r < plan.bm; ++r) {
              for (int64_t c = 0; c < plan.bk; ++c) {
                if (m0 + r >= m || s0 + c >= kept) continue;  // StepSource::A's zero padding
                const int64_t i = w0 + idx[static_cast<size_t>(s0 + c)];
                if (!Kept(a[static_cast<size_t>((m0 + r) * k + i)], threshold)) continue;
                for (int64_t cv = 0; cv < plan.bn; cv += 16 / bytes) {  // StepSource::B's vectors
                  for (int e = 0; e < VecCount(n0 + cv, 16 / bytes, n); ++e)
                    ++visits[static_cast<size_t>(((m0 + r) * k + i) * n + n0 + cv + e)];
                }
              }
            }
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const int want = Kept(a[static_cast<size_t>(r * k + i)], threshold) ? 1 : 0;
      for (int64_t c = 0; c < n; ++c)
        CHECK(visits[static_cast<size_t>((r * k + i) * n + c)] == want, "gemm m %lld k %lld n %lld", (long long)m,
              (long long)k, (long long)n);
    }
}

}  // namespace

int main() {
  std::mt19937 rng(15);
  TestDropRule();
  TestCompaction(rng);
  TestSplits();
  TestTiles();
  TestPlans();
  for (int bytes : {2, 4}) {
    for (auto kn : {std::pair<int64_t, int64_t>{1, 1}, {7, 9}, {300, 257}, {1025, 129}, {3001, 33}, {2500, 1000}}) {
      for (float threshold : {0.0f, 0.67f, std::numeric_limits<float>::infinity()}) {
        // Few SMs make few splits, many SMs many: both through windows and tails.
        for (int sm : {1, 132}) {
          const double err = GemvWalk(kn.first, kn.second, bytes, sm, threshold, rng);
          CHECK(err <= 1e-5, "gemv walk k %lld n %lld: error %g", (long long)kn.first, (long long)kn.second, err);
        }
      }
    }
    for (auto mkn : {std::array<int64_t, 3>{2, 7, 9}, {65, 300, 131}, {4, 1500, 70}, {130, 33, 200}}) {
      for (float threshold : {0.0f, 0.67f, 2.5f})
        GemmWalk(mkn[0], mkn[1], mkn[2], bytes, threshold, rng);
    }
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
