// CPU kernel of ScapSparseMatMul: validates inputs, applies the drop rule, and runs the
// row-skipping kernels (sparse_gemm.h) as tasks in ONNX Runtime's intra-op thread pool.
// Several rows of float32 A over a constant B multiply over B packed once (PackedWins; tiles or pair
// lists timed per kind of pass, PassKind);
// several rows that keep most of K between them go to onnxruntime's own Gemm through
// OrtApi::InvokeOp instead, where measured faster (DenseWins). (Long because every path's task
// split and choice lives here, beside the one Compute that picks among them.)
#include "scap_sparse_matmul.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "run_tasks.h"
#include "cpu_kernels.h"
#include "huge_pages.h"
#include "sparse_gemm.h"
#include "timed_choice.h"

namespace scap {
namespace {

// Below this many multiply-adds a pass runs on the calling thread alone; above, each task gets at
// least this many.
constexpr int64_t kMinWorkForThreads = 1 << 16;
constexpr int64_t kMaxColumnsPerTask = 1024;
constexpr int64_t kTargetTasks = 16;
// Rows of A per pass of the several-rows path: bounds the sparsified activations kept in scratch.
// Each pass copies B's panels once, so longer passes spread that copy over more rows (SmolLM2's
// 256-token prefill: 0.72x of onnxruntime's MatMul with 128 rows, 0.82x with 256).
constexpr int64_t kMaxRowsPerPass = 256;
// Short A (decoding included) splits the kept rows of B into this many tasks, whose partial sums
// are added at the end: enough to balance a pool of a few threads, few enough that the partial
// sums stay cheap. Taller A splits the columns instead: the work is then bound by compute and
// each task reuses its panel of B for every tile of A.
constexpr int64_t kKSplitTasks = 8;
constexpr int64_t kKSplitMaxRows = 16;
constexpr int64_t kMinKeptRowsPerTask = 16;
constexpr int64_t kAmxColumnsPerTask = 1024;
constexpr int64_t kMinPairsPerTask = 8;

// Per-thread scratch, reused across calls so that decoding does not allocate per token.
struct Scratch {
  std::vector<float> d;           // sparsified activations: one row, or one tile of rows
  std::vector<int32_t> kept;      // kept columns: of the row, or of every tile one after another
  std::vector<float> packed;      // D at the kept columns, when some are dropped (SparseTiles)
  std::vector<uint32_t> seen;    // bitmap of kept columns
  std::vector<float> bias;        // bias as float32
  std::vector<float> partials;    // per-task partial sums of a decoding call
  std::vector<uint16_t> parts;    // bfloat16 parts of the activations (AMX)
  std::vector<char> split_ok;     // per split task: no Inf or NaN met (AMX)
  std::vector<int32_t> list_k;    // each pair of rows' kept columns (RowPairLists)
  std::vector<float> list_value;  // and their values
  std::vector<int64_t> list_count;
  std::vector<int64_t> list_start;   // where each pair's list enters each block of B's rows
  std::vector<int64_t> task_counts;  // per task of the drop rule: kept elements, kept columns
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Task `index` of `tasks` near-equal runs of [0, count), cut at multiples of `unit`. Every run of
// consecutive tasks gets its share of the work: onnxruntime hands each thread a contiguous batch of
// tasks, and with a short last task one thread would get a full extra task (up to 12% of a call
// measured at 2 threads).
std::pair<int64_t, int64_t> TaskRange(size_t index, int64_t tasks, int64_t count, int64_t unit = 1) {
  const int64_t units = (count + unit - 1) / unit;
  const int64_t i = static_cast<int64_t>(index);
  return {std::min(i * units / tasks * unit, count), std::min((i + 1) * units / tasks * unit, count)};
}

// Elements of A per task of the drop rule, at least: below twice this a call sparsifies on its own thread.
constexpr int64_t kMinSparsifyElementsPerTask = 1 << 15;

// The drop rule on a range of rows per task, each into its own bitmap of kept columns, and the
// count of the elements its rows keep.
template <typename Bits>
struct SparsifyJob {
  const KernelSet<Bits>* kernels;
  const Bits* a;
  int64_t rows, depth, tasks, words;
  DropRule rule;
  float* d;
  uint32_t* seen;    // tasks * words
  int32_t* kept;     // tasks * depth: the kernel's own list of each task's kept columns
  int64_t* counts;   // 2 * tasks: per task, the elements its rows keep and the length of its list
};

template <typename Bits>
void RunSparsifyTask(void* data, size_t index) {
  const auto& job = *static_cast<const SparsifyJob<Bits>*>(data);
  const auto [r0, r1] = TaskRange(index, job.tasks, job.rows);
  int64_t* counts = job.counts + 2 * index;
  counts[0] = counts[1] = 0;
  if (r0 == r1) {
    std::memset(job.seen + index * job.words, 0, static_cast<size_t>(job.words) * sizeof(uint32_t));
    return;
  }
  counts[1] = job.kernels->sparsify(job.a + r0 * job.depth, r1 - r0, job.depth, job.rule, job.d + r0 * job.depth,
                                    job.seen + index * job.words, job.kept + index * job.depth, &counts[0]);
}

// The drop rule on rows [0, rows) of A into s.d (row-major, dropped elements 0), the ascending union
// of their kept columns into s.kept, and the number of kept elements (returned). Several rows run as
// tasks over ranges of rows: done on the calling thread alone, the drop rule over all of A was a
// serial share of every several-rows call.
template <typename Bits>
int64_t Sparsify(Ort::KernelContext& context, const Bits* a, int64_t rows, int64_t depth, const DropRule& rule,
                 Scratch& s) {
  const int64_t words = SeenWords(depth);
  const int64_t tasks = std::max<int64_t>(1, std::min({kTargetTasks, rows, rows * depth / kMinSparsifyElementsPerTask}));
  s.d.resize(static_cast<size_t>(rows * depth));
  s.seen.resize(static_cast<size_t>(tasks * words));
  s.kept.resize(static_cast<size_t>(tasks * depth));
  s.task_counts.resize(static_cast<size_t>(2 * tasks));
  SparsifyJob<Bits> job{&Kernels<Bits>(), a, rows, depth, tasks, words, rule, s.d.data(), s.seen.data(),
                        s.kept.data(), s.task_counts.data()};
  RunTasks(context, &RunSparsifyTask<Bits>, tasks, &job);
  int64_t kept_elements = 0;
  for (int64_t t = 0; t < tasks; ++t) kept_elements += s.task_counts[static_cast<size_t>(2 * t)];
  int64_t count = s.task_counts[1];  // one task: its kernel's list is the union
  if (tasks > 1) {
    // The union of the tasks' bitmaps, as ascending columns.
    count = 0;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = 0;
      for (int64_t t = 0; t < tasks; ++t) bits |= s.seen[static_cast<size_t>(t * words + w)];
      for (int32_t bit = 0; bits != 0; ++bit, bits >>= 1) {
        if ((bits & 1u) != 0) s.kept[static_cast<size_t>(count++)] = static_cast<int32_t>(w * 32 + bit);
      }
    }
  }
  s.kept.resize(static_cast<size_t>(count));
  return kept_elements;
}

// Rows of D to gather at the kept columns (see SparseTiles), a tile of rows per task.
struct GatherJob {
  const float* d;  // [rows, depth]
  int64_t rows, depth, tile_rows;
  const int32_t* kept;
  int64_t kept_count;
  float* values;  // [rows, kept_count]
};

void RunGatherTask(void* data, size_t index) {
  const auto& job = *static_cast<const GatherJob*>(data);
  const int64_t row_end = std::min(job.rows, (static_cast<int64_t>(index) + 1) * job.tile_rows);
  for (int64_t m = static_cast<int64_t>(index) * job.tile_rows; m < row_end; ++m) {
    const float* d_row = job.d + m * job.depth;
    float* out = job.values + m * job.kept_count;
    for (int64_t i = 0; i < job.kept_count; ++i) out[i] = d_row[job.kept[i]];
  }
}

// The drop rule on rows [0, rows) of A, in tiles of tile_rows rows (see SparseTiles), and the number
// of elements kept (kept_elements). When the rows keep every column between them (usual for tall A)
// the kernels read D in place; otherwise the kept columns are gathered, a tile per task.
template <typename Bits>
SparseTiles SparsifyTiles(Ort::KernelContext& context, const Bits* a, int64_t rows, int64_t depth,
                          const DropRule& rule, int64_t tile_rows, Scratch& s, int64_t* kept_elements) {
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const int64_t padded_rows = tiles * tile_rows;
  *kept_elements = Sparsify(context, a, rows, depth, rule, s);
  const int64_t kept = static_cast<int64_t>(s.kept.size());
  if (kept == depth) {
    s.d.resize(static_cast<size_t>(padded_rows * depth));
    std::fill(s.d.begin() + rows * depth, s.d.end(), 0.0f);
    return SparseTiles{rows, tile_rows, tiles, s.kept.data(), kept, s.d.data(), depth};
  }
  s.packed.resize(static_cast<size_t>(padded_rows * kept));
  std::fill(s.packed.begin() + rows * kept, s.packed.end(), 0.0f);
  GatherJob job{s.d.data(), rows, depth, tile_rows, s.kept.data(), kept, s.packed.data()};
  if (rows * kept >= kMinWorkForThreads) {
    RunTasks(context, &RunGatherTask, tiles, &job);
  } else {
    for (int64_t t = 0; t < tiles; ++t) RunGatherTask(&job, static_cast<size_t>(t));
  }
  return SparseTiles{rows, tile_rows, tiles, s.kept.data(), kept, s.packed.data(), kept};
}

// One call's work, split into tasks for the thread pool.
template <typename Bits>
struct Job {
  const KernelSet<Bits>* kernels;
  SparseRow row;      // one row of A
  SparseTiles tiles;  // several rows of A
  const Bits* b;
  int64_t n;
  const float* bias;
  Bits* y;
  int64_t tasks;         // the split: of the kept rows (over K) or of the columns (over N)
  float* partials;       // split over K: one partial sum per task
  int64_t part_stride;   // floats between two tasks' partial sums
  bool direct = false;   // several rows split over K: tiles_partial_direct
  const PackedB* packed = nullptr;  // several rows over packed B (tiles_packed)
  const RowPairLists* lists = nullptr;  // ... each pair of rows of A over its own kept rows of B
  int64_t pair_tasks = 1;               // ... the split over those pairs (tasks = columns * pairs)
};

// Whether values hold Inf or NaN.
bool HasNonFinite(const float* values, int64_t count) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(values);
  uint32_t found = 0;
  for (int64_t i = 0; i < count; ++i) found |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  return found != 0;
}

bool HasNonFinite(const uint16_t* values, int64_t count) {
  uint32_t found = 0;
  for (int64_t i = 0; i < count; ++i) found |= static_cast<uint32_t>((values[i] & 0x7c00u) == 0x7c00u);
  return found != 0;
}

// Tasks for a split over K: enough to balance a pool of a few threads, each with enough work to
// outweigh its dispatch and its partial sum (small layers of small models run in few tasks). A
// power of two, so that pools of 2, 4 or 8 threads get equal shares: 7 tasks on 2 threads left one
// thread 4/7 of the work (SmolLM2's down_proj, 1536x576 at 47% kept: 85-92 us a call, 72-76 us
// with 4 tasks). A call under twice kMinWorkForThreads stays one task (576x576 at 70%: two tasks
// took 1.24x the time of one); above, tasks of half that: 8 tasks where 4 of kMinWorkForThreads
// left a thread idle at the end (Zen 5 EPYC, 2 threads, SmolLM2's shapes at 55%: 576x1536, 1536x576
// and 576x576 took 1.07-1.22x the time with the old split, in both places of an A/B).
constexpr int64_t kMinWorkPerKSplitTask = kMinWorkForThreads / 2;

int64_t KSplitTasks(int64_t kept, int64_t work) {
  const int64_t by_rows = kept / kMinKeptRowsPerTask;
  const int64_t by_work = work < 2 * kMinWorkForThreads ? 1 : work / kMinWorkPerKSplitTask;
  const int64_t most = std::max<int64_t>(1, std::min({kKSplitTasks, by_rows, by_work}));
  int64_t tasks = 1;
  while (tasks * 2 <= most) tasks *= 2;
  return tasks;
}


template <typename Bits>
void RunRowTask(void* data, size_t index) {
  const auto& job = *static_cast<const Job<Bits>*>(data);
  const auto [i0, i1] = TaskRange(index, job.tasks, job.row.kept_count);
  job.kernels->row_partial(job.row, job.b, job.n, i0, i1, job.partials + index * job.part_stride);
}

template <typename Bits>
void RunTilesPartialTask(void* data, size_t index) {
  const auto& job = *static_cast<const Job<Bits>*>(data);
  const auto [i0, i1] = TaskRange(index, job.tasks, job.tiles.kept_count);
  if (job.direct) {
    job.kernels->tiles_partial_direct(job.tiles, job.b, job.n, i0, i1, job.partials + index * job.part_stride);
    return;
  }
  thread_local std::vector<float> work;  // per pool thread: the panel
  const int64_t width = RoundUp(job.n, job.kernels->tile_columns);
  work.resize(static_cast<size_t>(PanelRowsForWidth(width) * PanelStride(width)));
  job.kernels->tiles_partial(job.tiles, job.b, job.n, i0, i1, work.data(), job.partials + index * job.part_stride);
}

// Y[:, n0:n1] through the vector kernels of the several-rows path.
template <typename Bits>
void TileColumns(const Job<Bits>& job, int64_t n0, int64_t n1) {
  const int64_t block = job.kernels->tile_columns;
  thread_local std::vector<float> work;  // per pool thread: panel and accumulators
  work.resize(static_cast<size_t>(TileWorkFloats(job.tiles.tiles, job.tiles.tile_rows, RoundUp(n1 - n0, block))));
  job.kernels->tiles(job.tiles, job.b, job.n, job.bias, job.y, n0, n1, work.data());
}

template <typename Bits>
void RunColumnTask(void* data, size_t index) {
  const auto& job = *static_cast<const Job<Bits>*>(data);
  const auto [n0, n1] = TaskRange(index, job.tasks, job.n, job.kernels->tile_columns);
  TileColumns(job, n0, n1);
}

template <typename Bits>
void RunPackedColumnTask(void* data, size_t index) {
  const auto& job = *static_cast<const Job<Bits>*>(data);
  const int64_t block = job.kernels->tile_columns;
  const auto [n0, n1] = TaskRange(index, job.tasks, job.n, block);
  if (n0 == n1) return;
  thread_local std::vector<float> work;  // per pool thread: the accumulators
  work.resize(static_cast<size_t>(PackedWorkFloats(job.tiles.tiles * job.tiles.tile_rows, RoundUp(n1 - n0, block))));
  job.kernels->tiles_packed(job.tiles, nullptr, *job.packed, job.n, job.bias, job.y, n0, n1, work.data());
}

// Tasks of the pair lists over packed B: column ranges of whole groups of list_columns (a range of
// single strips would walk every list once per strip, at half the FMAs per entry), times ranges of
// pairs where there are fewer column ranges than kTargetTasks.
struct ListSplit {
  int64_t column_tasks, pair_tasks;
};

ListSplit PairListSplit(int64_t n, int64_t list_columns, int64_t pairs) {
  const int64_t groups = (n + list_columns - 1) / list_columns;
  const int64_t columns = std::min(groups, kTargetTasks);
  const int64_t rows = std::max<int64_t>(1, std::min(kTargetTasks / columns, pairs / kMinPairsPerTask));
  return {columns, rows};
}

template <typename Bits>
void RunPairListTask(void* data, size_t index) {
  const auto& job = *static_cast<const Job<Bits>*>(data);
  const RowPairLists& all = *job.lists;
  // Consecutive tasks share their columns of B: onnxruntime hands each thread a run of consecutive
  // tasks, which then reads those columns from memory once and from its cache after that.
  const int64_t column_tasks = job.tasks / job.pair_tasks;
  const size_t pair_tasks = static_cast<size_t>(job.pair_tasks);
  const auto [n0, n1] = TaskRange(index / pair_tasks, column_tasks, job.n, job.kernels->list_columns);
  const auto [p0, p1] = TaskRange(index % pair_tasks, job.pair_tasks, all.pairs);
  if (n0 == n1 || p0 == p1) return;
  // The pairs' rows of A (and of Y) as a pass of their own.
  const int64_t row0 = 2 * p0, rows = std::min(2 * p1, job.tiles.rows) - row0;
  SparseTiles tiles = job.tiles;
  tiles.rows = rows;
  tiles.tiles = (rows + tiles.tile_rows - 1) / tiles.tile_rows;
  const RowPairLists lists{all.k + p0 * all.stride, all.value + 2 * p0 * all.stride, all.count + p0, p1 - p0,
                           all.stride, all.start + p0 * PairListStarts(all.blocks), all.blocks};
  const int64_t block = job.kernels->tile_columns;
  thread_local std::vector<float> work;  // per pool thread: the accumulators
  work.resize(static_cast<size_t>(PackedWorkFloats(tiles.tiles * tiles.tile_rows, RoundUp(n1 - n0, block))));
  job.kernels->tiles_packed(tiles, &lists, *job.packed, job.n, job.bias, job.y + row0 * job.n, n0, n1, work.data());
}

// RowPairLists of rows of D (dropped elements are 0, kept ones never are), a range of pairs per task.
struct ListJob {
  const KernelSet<float>* kernels;
  const float* d;
  int64_t rows, depth, stride, pairs, tasks;
  int32_t* k;
  float* value;
  int64_t* count;
  int64_t* start;
};

void RunListTask(void* data, size_t index) {
  const auto& job = *static_cast<const ListJob*>(data);
  const auto [p0, p1] = TaskRange(index, job.tasks, job.pairs);
  job.kernels->pair_lists(job.d, job.rows, job.depth, job.stride, p0, p1, job.k, job.value, job.count, job.start);
}

// The RowPairLists of the `rows` rows of A that Sparsify left in s.d, in s's list buffers.
RowPairLists MakePairLists(Ort::KernelContext& context, const KernelSet<float>& kernels, int64_t rows, int64_t depth,
                           Scratch& s) {
  const int64_t pairs = (rows + 1) / 2;
  const int64_t blocks = (depth + kPairListBlock - 1) / kPairListBlock;
  const int64_t stride = depth + kPairListSlack;
  s.list_k.resize(static_cast<size_t>(pairs * stride));
  s.list_value.resize(static_cast<size_t>(2 * pairs * stride));
  s.list_count.resize(static_cast<size_t>(pairs));
  s.list_start.resize(static_cast<size_t>(pairs * PairListStarts(blocks)));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(kTargetTasks, rows * depth / kMinWorkForThreads));
  ListJob job{&kernels, s.d.data(), rows, depth, stride, pairs, std::min(tasks, pairs), s.list_k.data(),
              s.list_value.data(), s.list_count.data(), s.list_start.data()};
  RunTasks(context, &RunListTask, job.tasks, &job);
  return RowPairLists{s.list_k.data(), s.list_value.data(), s.list_count.data(), pairs, stride, s.list_start.data(), blocks};
}

// Packing of B's rows, a range per task.
template <typename Bits>
struct PackJob {
  const KernelSet<Bits>* kernels;
  const Bits* b;
  int64_t depth, n, tasks;
  float* packed;
  uint8_t* row_finite;
};

template <typename Bits>
void RunPackTask(void* data, size_t index) {
  const auto& job = *static_cast<const PackJob<Bits>*>(data);
  const auto [k0, k1] = TaskRange(index, job.tasks, job.depth);
  job.kernels->pack(job.b, job.depth, job.n, k0, k1, job.packed, job.row_finite);
}

// Tall A through the AMX kernels: the activations are split once, by row blocks, then column
// ranges multiply; a range whose weights hold Inf or NaN runs the AVX-512 kernels instead.
template <typename Bits>
struct AmxJob {
  const AmxGemm* amx;
  const Job<Bits>* job;
  uint16_t* parts;
  char* split_ok;
};

template <typename Bits>
void RunAmxSplitTask(void* data, size_t index) {
  const auto& job = *static_cast<const AmxJob<Bits>*>(data);
  const int64_t rows = job.amx->split_rows, m0 = static_cast<int64_t>(index) * rows;
  job.split_ok[index] = job.amx->split(job.job->tiles, m0, m0 + rows, job.parts);
}

template <typename Bits>
void RunAmxColumnTask(void* data, size_t index) {
  const auto& amx_job = *static_cast<const AmxJob<Bits>*>(data);
  const Job<Bits>& job = *amx_job.job;
  const auto [n0, n1] = TaskRange(index, job.tasks, job.n, amx_job.amx->tile_columns);
  bool done;
  if constexpr (std::is_same<Bits, float>::value) {
    done = amx_job.amx->tiles(job.tiles, amx_job.parts, job.b, job.n, job.bias, job.y, n0, n1);
  } else {
    done = amx_job.amx->tiles_f16(job.tiles, amx_job.parts, job.b, job.n, job.bias, job.y, n0, n1);
  }
  // Inf or NaN in these columns of B: the AVX-512 kernels skip them where A's element is dropped.
  if (!done) TileColumns(job, n0, n1);
}

// Column tasks numerous enough to balance the pool's threads (the thread count is not known
// here), narrow enough for the panel to stay in L2, of whole register blocks.
int64_t ColumnTasks(int64_t n, int64_t block) {
  const int64_t blocks = (n + block - 1) / block;
  return std::min(blocks, std::max(kTargetTasks, (n + kMaxColumnsPerTask - 1) / kMaxColumnsPerTask));
}

// Column tasks of the AMX kernels: about 1024 columns or more, because they copy their columns of B
// row by row and longer runs per row read memory faster (M = 128, K = N = 4096: 256-column tasks
// 0.82-0.95x of onnxruntime's MatMul, 1024 columns 0.99-1.20x; N = 11008: 8 tasks 0.97-1.03x, 16
// tasks 0.88-0.90x); at least 4 for small N, and a power of two, so that pools of 2, 4 or 8
// threads get equal shares.
int64_t AmxColumnTasks(int64_t n, int64_t block) {
  const int64_t blocks = (n + block - 1) / block;
  const int64_t wanted = std::max(n / kAmxColumnsPerTask, std::min<int64_t>(4, blocks));
  int64_t tasks = 1;
  while (tasks * 2 <= wanted) tasks *= 2;
  return tasks;
}

// The several-rows pass through the AMX kernels, when they run here; false if they do not (no AMX,
// or Inf or NaN in the activations).
template <typename Bits>
bool RunAmx(Ort::KernelContext& context, Job<Bits>& job, Scratch& scratch) {
  const AmxGemm* amx = SelectAmx();
  if (amx == nullptr) return false;
  const SparseTiles& act = job.tiles;
  scratch.parts.resize(static_cast<size_t>(amx->parts_elements(act)));
  const int64_t blocks = (act.rows + amx->split_rows - 1) / amx->split_rows;
  scratch.split_ok.assign(static_cast<size_t>(blocks), 0);
  AmxJob<Bits> amx_job{amx, &job, scratch.parts.data(), scratch.split_ok.data()};
  RunTasks(context, &RunAmxSplitTask<Bits>, blocks, &amx_job);
  for (char ok : scratch.split_ok) {
    if (!ok) return false;
  }
  job.tasks = AmxColumnTasks(job.n, amx->tile_columns);
  RunTasks(context, &RunAmxColumnTask<Bits>, job.tasks, &amx_job);
  return true;
}

// True if status is OK; releases it otherwise.
bool Ok(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

// onnxruntime's CPU Gemm (opset 13, float32) with `inputs` inputs (A, B and optionally C), Y = A @ B
// (+ C); nullptr if the runtime cannot create it. A standalone node has no schema defaults: every
// attribute the kernel reads is given.
OrtOp* CreateGemm(const OrtApi& api, const OrtKernelInfo* info, int inputs) {
  const int64_t no = 0;
  const float one = 1.0f;
  OrtOpAttr* attrs[4] = {nullptr, nullptr, nullptr, nullptr};
  OrtOp* op = nullptr;
  if (Ok(api, api.CreateOpAttr("transA", &no, 1, ORT_OP_ATTR_INT, &attrs[0])) &&
      Ok(api, api.CreateOpAttr("transB", &no, 1, ORT_OP_ATTR_INT, &attrs[1])) &&
      Ok(api, api.CreateOpAttr("alpha", &one, 1, ORT_OP_ATTR_FLOAT, &attrs[2])) &&
      Ok(api, api.CreateOpAttr("beta", &one, 1, ORT_OP_ATTR_FLOAT, &attrs[3]))) {
    const char* names[] = {"T"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    if (!Ok(api, api.CreateOp(info, "Gemm", "", 13, names, types, 1, attrs, 4, inputs, 1, &op))) op = nullptr;
  }
  for (OrtOpAttr* attr : attrs) {
    if (attr != nullptr) api.ReleaseOpAttr(attr);
  }
  return op;
}

GemmPolicy ReadGemmPolicy() {
  const char* value = std::getenv("SCAP_ONNX_GEMM");
  if (value == nullptr) return GemmPolicy::kChoose;
  if (std::strcmp(value, "sparse") == 0) return GemmPolicy::kSparse;
  if (std::strcmp(value, "panels") == 0) return GemmPolicy::kPanels;
  if (std::strcmp(value, "dense") == 0) return GemmPolicy::kDense;
  if (std::strcmp(value, "packed") == 0) return GemmPolicy::kPacked;
  if (std::strcmp(value, "packed_rows") == 0) return GemmPolicy::kPackedRows;
  return GemmPolicy::kChoose;
}

// Whether onnxruntime's Gemm on the sparsified A beats skipping B's dropped rows, for `rows` rows of
// A that keep `kept` of the `depth` rows of B between them. Called through OrtApi::InvokeOp, the Gemm
// packs B on every call (the dense session's MatMul packs its constant B once), which the break-even
// points below include. Measured per kernel family with tools/bench_kernel.py and SCAP_ONNX_GEMM=
// sparse|dense on a Zen 4 EPYC (docs/kernel_benchmarks.md, "Dense fallback"): against the AVX-512 and
// AVX2 kernels the Gemm lost at every M from 2 to 128 even with every row of B kept (M = 2: 4.7 ms
// against 2.1-2.8 ms; M = 128: 25.8-27.8 ms against 22.7-25.5 ms, K = N = 4096), so they never hand
// over; the portable kernels lose to it from a kept share of 0.25-0.65 depending on M. AMX and NEON
// were not measured: their kernels keep every call.
struct BreakEven {
  int64_t rows;       // from this many rows of A ...
  double kept_share;  // ... the Gemm wins from this share of K kept
};

constexpr BreakEven kPortableBreakEven[] = {{2, 0.65}, {4, 0.25}, {16, 0.40}, {64, 0.29}};

// The kept share of K from which the Gemm wins for `rows` rows of A; above 1 where it never does.
double BreakEvenShare(int64_t rows) {
  static const bool portable = std::strcmp(SelectedIsa(), "portable") == 0;
  double share = 2.0;
  if (!portable) return share;
  for (const BreakEven& point : kPortableBreakEven) {
    if (rows >= point.rows) share = point.kept_share;
  }
  return share;
}

// (N is not an input: the points were measured at K = N = 4096 only.)
bool DenseWins(int64_t rows, int64_t depth, int64_t kept) {
  return static_cast<double>(kept) >= BreakEvenShare(rows) * static_cast<double>(depth);
}

// Whether `rows` rows of A that keep `kept` of the `depth` rows of B between them multiply faster over
// packed B (tiles_packed) than over B as it lies. Measured on a Zen 4 EPYC with tools/bench_kernel.py
// --gemm sparse packed (docs/kernel_benchmarks.md, "B packed once"), for the AVX-512 and AVX2
// kernels: from 16 rows packed B wins at every kept share; from 4 rows (AVX-512 only) it wins when the
// rows keep (nearly) every row of B between them, and loses where they skip some (a kept row is then a short
// piece of each strip, read at a lower rate than the whole rows the direct kernel streams); for 2-3
// rows it loses. Where AMX multiplies tall A, that path stays (not measured against packed B); the
// NEON and portable kernels were not measured and keep their paths.
constexpr int64_t kPackedAlwaysRows = 16;
constexpr int64_t kPackedFewRows = 4;
constexpr double kPackedFewRowsShare = 0.98;

// Over packed B, each pair of rows of A can walk the union of its own kept rows of B (RowPairLists)
// rather than the register tiles the union of 8 rows (AVX-512; 4 on AVX2): at 50% sparsity the
// tiles' union keeps nearly all of K, a pair's three quarters. A pair's walk loads each kept row of
// B once for 2 FMAs a vector where the tiles load it once for 8, so it pays only when the rows drop
// enough, and where that is depends on the microarchitecture, not only on the instruction set
// (TimedChoice): on a Zen 4 EPYC the pairs won from 64 rows at 50% sparsity (1.28x of onnxruntime's
// MatMul against 1.17x for the tiles, K = N = 4096, M = 128); on a Zen 5 EPYC they lose there
// (0.81-0.83x against 1.05x) and tie at 70%. So from kPairListsMinRows rows that keep at most
// kPairListsMaxShare of K, the process times both on its first passes of each kind over each shape
// of B (rows by powers of two, kept share by tenths; TilesOrPairs) and keeps the faster; where the
// rows keep more, the tiles win on both (the pairs 0.64-0.70x of onnxruntime at 0% on the Zen 5).
constexpr int64_t kPairListsMinRows = 32;
constexpr double kPairListsMaxShare = 0.75;
constexpr int kRowKinds = 4;  // 32-63, 64-127, 128-255, 256 (kMaxRowsPerPass) rows
constexpr int kShareKinds = 8;
constexpr int kPassKinds = kRowKinds * kShareKinds;
static_assert(kPairListsMinRows << (kRowKinds - 1) == kMaxRowsPerPass, "the last row kind is a full pass");

// The kind of a pass of `rows` rows that keep kept_elements of rows * depth, for TimedChoice; -1
// where the tiles take it untimed.
int PassKind(int64_t rows, int64_t depth, int64_t kept_elements) {
  const double share = static_cast<double>(kept_elements) / static_cast<double>(rows * depth);
  if (rows < kPairListsMinRows || share > kPairListsMaxShare) return -1;
  int row_kind = 0;
  while (row_kind + 1 < kRowKinds && rows >= (kPairListsMinRows << (row_kind + 1))) ++row_kind;
  const int share_kind = std::min(kShareKinds - 1, static_cast<int>(share * 10.0));
  return row_kind * kShareKinds + share_kind;
}

// The choice for B of `depth` x `n`, one for the whole process: every node over that shape, in any
// session, takes the way chosen once (the trials are shared), so that two sessions of one model sum
// in the same order (the two ways round differently in the last bits).
TimedChoice<kPassKinds>& TilesOrPairs(int64_t depth, int64_t n) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<TimedChoice<kPassKinds>>> choices;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<TimedChoice<kPassKinds>>& choice = choices[{depth, n}];
  if (choice == nullptr) choice = std::make_unique<TimedChoice<kPassKinds>>();
  return *choice;
}

bool PackedWins(int64_t rows, int64_t depth, int64_t kept) {
  if (SelectAmx() != nullptr && rows > kKSplitMaxRows) return false;
  const char* isa = SelectKernels().isa;
  if (std::strcmp(isa, "avx512") != 0 && std::strcmp(isa, "avx2") != 0) return false;
  if (rows >= kPackedAlwaysRows) return true;
  // AVX2's narrow strips: few rows read them slower than whole rows of B (M = 8, K = N = 4096, with
  // strips of 16 columns: 0.51x against 0.80x for the direct kernel at 0%, 0.52x against 1.07x at
  // 50%; not measured again with the 24 columns of the 4 x 24 tile).
  if (std::strcmp(isa, "avx512") != 0) return false;
  return rows >= kPackedFewRows && static_cast<double>(kept) >= kPackedFewRowsShare * static_cast<double>(depth);
}

}  // namespace

template <typename T>
ScapSparseMatMulKernel<T>::ScapSparseMatMulKernel(const OrtApi& api, const OrtKernelInfo* info)
    : KernelShell<ScapSparseMatMulKernel<T>>(api, info), policy_(ReadGemmPolicy()) {
  if constexpr (std::is_same<T, float>::value) {
    if (Ok(api_, api_.CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_memory_))) {
      gemm_ = CreateGemm(api_, info, 2);
      gemm_bias_ = CreateGemm(api_, info, 3);
    } else {
      cpu_memory_ = nullptr;
    }
    int is_constant = 0;
    const OrtValue* b = nullptr;
    if (Ok(api_, api_.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &b)) && is_constant != 0) {
      b_constant_ = b;
    }
  }
  BackConstantInputWithHugePages(api, info, 1);
}

template <typename T>
const PackedB* ScapSparseMatMulKernel<T>::Packed(OrtKernelContext* raw_context) {
  using Bits = typename Traits<T>::Bits;
  if (b_constant_ == nullptr) return nullptr;
  std::call_once(pack_once_, [&] {
    Ort::KernelContext context(raw_context);
    const Ort::ConstValue b(b_constant_);
    const std::vector<int64_t> shape = b.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 2) return;
    const KernelSet<Bits>& kernels = Kernels<Bits>();
    const int64_t depth = shape[0], n = shape[1], strip = kernels.tile_columns;
    packed_.resize(static_cast<size_t>(RoundUp(n, strip) * depth));
    packed_finite_.resize(static_cast<size_t>(depth));
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(kTargetTasks, depth * n / kMinWorkForThreads));
    PackJob<Bits> job{&kernels, reinterpret_cast<const Bits*>(b.GetTensorRawData()), depth, n, tasks,
                      packed_.data(), packed_finite_.data()};
    RunTasks(context, &RunPackTask<Bits>, tasks, &job);
    // Few rows of A stream packed B from memory as decoding streams B (huge_pages.h).
    BackWithHugePages(packed_.data(), packed_.size() * sizeof(float));
    packed_b_ = PackedB{packed_.data(), packed_finite_.data(), depth, strip};
    packed_ready_ = true;
  });
  return packed_ready_ ? &packed_b_ : nullptr;
}

template <typename T>
ScapSparseMatMulKernel<T>::~ScapSparseMatMulKernel() {
  if (gemm_ != nullptr) api_.ReleaseOp(gemm_);
  if (gemm_bias_ != nullptr) api_.ReleaseOp(gemm_bias_);
  if (cpu_memory_ != nullptr) api_.ReleaseMemoryInfo(cpu_memory_);
}

template <typename T>
bool ScapSparseMatMulKernel<T>::DenseGemm(OrtKernelContext* context, const float* d, int64_t rows, int64_t depth,
                                          int64_t n, const OrtValue* b, const OrtValue* bias, float* y) {
  OrtOp* op = bias != nullptr ? gemm_bias_ : gemm_;
  if (op == nullptr) return false;
  const int64_t a_shape[2] = {rows, depth};
  const int64_t y_shape[2] = {rows, n};
  OrtValue* a_value = nullptr;
  OrtValue* y_value = nullptr;
  bool done = Ok(api_, api_.CreateTensorWithDataAsOrtValue(cpu_memory_, const_cast<float*>(d),
                                                          static_cast<size_t>(rows * depth) * sizeof(float), a_shape,
                                                          2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &a_value)) &&
              Ok(api_, api_.CreateTensorWithDataAsOrtValue(cpu_memory_, y, static_cast<size_t>(rows * n) * sizeof(float),
                                                          y_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &y_value));
  if (done) {
    const OrtValue* inputs[3] = {a_value, b, bias};
    done = Ok(api_, api_.InvokeOp(context, op, inputs, bias != nullptr ? 3 : 2, &y_value, 1));
  }
  if (a_value != nullptr) api_.ReleaseValue(a_value);
  if (y_value != nullptr) api_.ReleaseValue(y_value);
  if (!done) return false;
  // 0 * Inf or 0 * NaN (a dropped activation against a non-finite weight) leaves NaN in Y; so may
  // kept values, which the sparse path then reproduces.
  return !HasNonFinite(y, rows * n);
}

template <typename T>
void ScapSparseMatMulKernel<T>::Compute(OrtKernelContext* raw_context) {
  using Bits = typename Traits<T>::Bits;
  Ort::KernelContext context(raw_context);
  const Ort::ConstValue a = context.GetInput(0);
  const Ort::ConstValue b = context.GetInput(1);
  const Ort::ConstValue bias = context.GetInputCount() > 2 ? context.GetInput(2) : Ort::ConstValue{nullptr};

  const Ort::TensorTypeAndShapeInfo a_info = a.GetTensorTypeAndShapeInfo();
  const Ort::TensorTypeAndShapeInfo b_info = b.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> a_shape = a_info.GetShape(), b_shape = b_info.GetShape();
  std::vector<int64_t> bias_shape;
  ONNXTensorElementDataType bias_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (bias != nullptr) {
    const Ort::TensorTypeAndShapeInfo bias_info = bias.GetTensorTypeAndShapeInfo();
    bias_shape = bias_info.GetShape();
    bias_type = bias_info.GetElementType();
  }
  CheckElementTypes(ElementType<T>::kValue, a_info.GetElementType(), b_info.GetElementType(), bias_type);
  const MatMulShape shape = CheckShapes(a_shape, b_shape, bias != nullptr ? &bias_shape : nullptr);
  const int64_t rows = shape.rows, depth = shape.depth, n = shape.n;
  const ChannelInputs channels = ReadChannelInputs(context, kThresholdScaleInput, kChannelOffsetInput, depth);
  if (channels.threshold_scale != nullptr) CheckThresholdScale(channels.threshold_scale, depth);
  const DropRule rule{attributes_.threshold, attributes_.offset, channels.threshold_scale, channels.channel_offset};
  const Bits* bias_data = bias != nullptr ? reinterpret_cast<const Bits*>(bias.GetTensorRawData()) : nullptr;

  Ort::UnownedValue y = context.GetOutput(0, shape.y);
  if (rows == 0 || n == 0) return;

  const Bits* a_data = reinterpret_cast<const Bits*>(a.GetTensorRawData());
  const Bits* b_data = reinterpret_cast<const Bits*>(b.GetTensorRawData());
  Bits* y_data = reinterpret_cast<Bits*>(y.GetTensorMutableRawData());
  Scratch& scratch = ThreadScratch();

  const float* bias_f32 = nullptr;
  if (bias_data != nullptr) {
    if constexpr (std::is_same<Bits, float>::value) {
      bias_f32 = bias_data;
    } else {
      scratch.bias.resize(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) scratch.bias[static_cast<size_t>(j)] = HalfToFloat(bias_data[j]);
      bias_f32 = scratch.bias.data();
    }
  }

  if constexpr (std::is_same<Bits, float>::value) {
    // Several rows that keep most of K between them: onnxruntime's Gemm on the sparsified A, where
    // measured faster.
    const GemmPolicy policy = policy_;
    if (rows > 1 && gemm_ != nullptr &&
        (policy == GemmPolicy::kDense || (policy == GemmPolicy::kChoose && BreakEvenShare(rows) <= 1.0))) {
      Sparsify(context, a_data, rows, depth, rule, scratch);
      const int64_t kept = static_cast<int64_t>(scratch.kept.size());
      if ((policy == GemmPolicy::kDense || DenseWins(rows, depth, kept)) &&
          DenseGemm(raw_context, scratch.d.data(), rows, depth, n, b, bias, y_data)) {
        return;
      }
    }
  }

  const KernelSet<Bits>& kernels = Kernels<Bits>();
  if (rows == 1) {
    // Decoding: each task streams whole kept rows of B into a partial sum.
    Sparsify(context, a_data, 1, depth, rule, scratch);
    const int64_t kept = static_cast<int64_t>(scratch.kept.size());
    const int64_t tasks = KSplitTasks(kept, kept * n);
    scratch.partials.resize(static_cast<size_t>(tasks * n));
    Job<Bits> job{&kernels, {scratch.d.data(), scratch.kept.data(), kept}, {}, b_data, n, bias_f32, y_data,
                  tasks, scratch.partials.data(), n};
    RunTasks(context, &RunRowTask<Bits>, tasks, &job);
    kernels.reduce(job.partials, tasks, n, n, bias_f32, y_data);
    return;
  }
  // Several rows: passes bound the scratch memory; each pass reads the kept rows of B once.
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxRowsPerPass) {
    const int64_t pass_rows = std::min(rows - row0, kMaxRowsPerPass);
    int64_t kept_elements = 0;
    Job<Bits> job{&kernels, {},
                  SparsifyTiles(context, a_data + row0 * depth, pass_rows, depth, rule, kernels.tile_rows, scratch,
                                &kept_elements),
                  b_data, n, bias_f32, y_data + row0 * n, 0, nullptr, 0};
    const GemmPolicy policy = policy_;
    if (std::is_same<Bits, float>::value &&
        (policy == GemmPolicy::kPacked || policy == GemmPolicy::kPackedRows ||
         (policy == GemmPolicy::kChoose && PackedWins(pass_rows, depth, job.tiles.kept_count))) &&
        (job.packed = Packed(raw_context)) != nullptr) {
      // B packed once into strips: Y's columns split over tasks, each reading its strips once.
      const bool threaded = pass_rows * depth * n >= kMinWorkForThreads;
      const int kind = policy == GemmPolicy::kChoose ? PassKind(pass_rows, depth, kept_elements) : -1;
      TimedChoice<kPassKinds>* choice = kind >= 0 ? &TilesOrPairs(depth, n) : nullptr;
      const bool pairs = policy == GemmPolicy::kPackedRows || (choice != nullptr && choice->Next(kind) == 1);
      const auto start = std::chrono::steady_clock::now();
      if (pairs) {
        const RowPairLists lists = MakePairLists(context, Kernels<float>(), pass_rows, depth, scratch);
        const ListSplit split = threaded ? PairListSplit(n, kernels.list_columns, lists.pairs) : ListSplit{1, 1};
        job.lists = &lists;
        job.pair_tasks = split.pair_tasks;
        job.tasks = split.column_tasks * split.pair_tasks;
        RunTasks(context, &RunPairListTask<Bits>, job.tasks, &job);
      } else {
        job.tasks = threaded ? ColumnTasks(n, kernels.tile_columns) : 1;
        RunTasks(context, &RunPackedColumnTask<Bits>, job.tasks, &job);
      }
      if (choice != nullptr) choice->Record(kind, pairs ? 1 : 0, SecondsSince(start));
      continue;
    }
    if (pass_rows <= kKSplitMaxRows) {
      // Short A is bound by memory like decoding: tasks stream whole kept rows of B.
      const int64_t kept = job.tiles.kept_count;
      const int64_t tasks = KSplitTasks(kept, pass_rows * kept * n);
      const int64_t width = PartialStride(n, kernels.tile_columns);
      job.tasks = tasks;
      job.part_stride = job.tiles.tiles * job.tiles.tile_rows * width;
      scratch.partials.resize(static_cast<size_t>(tasks * job.part_stride));
      job.partials = scratch.partials.data();
      // B's rows multiplied where they lie; if Y comes out with Inf or NaN (maybe 0 * Inf from a
      // dropped activation), again through panels, which skip those products.
      const bool panels_only = policy_ == GemmPolicy::kPanels;
      for (const bool direct : {!panels_only, false}) {
        job.direct = direct;
        RunTasks(context, &RunTilesPartialTask<Bits>, tasks, &job);
        for (int64_t m = 0; m < pass_rows; ++m) {
          kernels.reduce(job.partials + m * width, tasks, job.part_stride, n, bias_f32, job.y + m * n);
        }
        if (!direct || !HasNonFinite(job.y, pass_rows * n)) break;
      }
    } else {
      // Small passes stay on the calling thread, with the vector kernels.
      const bool threaded = pass_rows * depth * n >= kMinWorkForThreads;
      if (!threaded || !RunAmx(context, job, scratch)) {
        job.tasks = threaded ? ColumnTasks(n, kernels.tile_columns) : 1;
        RunTasks(context, &RunColumnTask<Bits>, job.tasks, &job);
      }
    }
  }
}

template struct ScapSparseMatMulKernel<float>;
template struct ScapSparseMatMulKernel<Ort::Float16_t>;
template struct ScapSparseMatMulOp<float>;
template struct ScapSparseMatMulOp<Ort::Float16_t>;

}  // namespace scap
