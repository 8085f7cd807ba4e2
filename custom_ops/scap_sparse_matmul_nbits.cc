// CPU kernel of ScapSparseMatMulNBits (contract: scap_sparse_matmul_nbits.h). The drop rule is the
// float op's (KernelSet::sparsify); the products are portable loops written for the compiler to
// vectorise. Tasks split the output columns, a multiple of 32 each, so that no partial sums are
// added at the end and each task streams its slice of every kept row.
//
// One row of A: per block of input channels, the kept rows' d * (q - zp) are summed into a block
// accumulator, which is multiplied by the block's scales once (not once per row) and added to Y.
// Several rows: per block, the kept rows (those any row of A keeps) are dequantised once into a
// panel that every row of A then reads.
#include "scap_sparse_matmul_nbits.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "nbits_kernels.h"
#include "run_tasks.h"
#include "sparse_gemm.h"

namespace scap {
namespace {

constexpr int64_t kGroupColumns = 32;  // columns of a 4-bit group: 16 bytes
// Below this many multiply-adds a call runs on the calling thread; above, tasks of at least
// kColumnsPerTask columns (a slice of a row long enough to stream), at most kMaxTasks.
constexpr int64_t kMinWorkForThreads = 1 << 16;
constexpr int64_t kColumnsPerTask = 256;
constexpr int64_t kMaxTasks = 16;

// TEMPORARY measurement knobs.
bool SplitK() {
  static const bool k = [] { const char* v = std::getenv("SCAP_NBITS_SPLIT"); return v == nullptr || v[0] != 'n'; }();
  return k;
}
int64_t KSplitMax() {
  static const int64_t t = [] { const char* v = std::getenv("SCAP_NBITS_KTASKS"); return v ? std::atoll(v) : 4; }();
  return t;
}
int64_t NSplitTasks() {
  static const int64_t t = [] { const char* v = std::getenv("SCAP_NBITS_NTASKS"); return v ? std::atoll(v) : 2; }();
  return t;
}

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using Bits = float;
};
template <>
struct Traits<Ort::Float16_t> {
  using Bits = uint16_t;
};

template <typename Bits>
const KernelSet<Bits>& Kernels();
template <>
const KernelSet<float>& Kernels<float>() { return SelectKernels().f32; }
template <>
const KernelSet<uint16_t>& Kernels<uint16_t>() { return SelectKernels().f16; }

// The calling thread's scratch, reused across calls so that decoding does not allocate per token.
struct Scratch {
  std::vector<float> d;
  std::vector<uint32_t> seen;
  std::vector<int32_t> kept;
  std::vector<float> bias;
  std::vector<float> y;  // float32 Y of float16 calls
  std::vector<float> partials;  // one row of A split over K: a partial Y per task
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// A task's scratch, on whichever thread runs it.
struct TaskScratch {
  std::vector<float> zero_points;  // the block's zero points for the task's columns (padding 0)
  std::vector<float> block;        // the block accumulator (one row), or the block's panel (rows)
};

TaskScratch& ThreadTaskScratch() {
  thread_local TaskScratch scratch;
  return scratch;
}

struct Job {
  const NBitsShape* shape;
  const uint8_t* b;
  const float* scales;
  const uint8_t* zero_points;  // nullptr: 2^(bits-1)
  const float* d;              // [rows, K], dropped elements 0
  int64_t rows;
  const int32_t* kept;  // ascending union of the rows' kept k
  int64_t kept_count;
  float* y;  // [rows, N] float32, bias not yet added
  int64_t tasks;
};

// acc[0:width) += d * (q[k, n0 + j] - zp[j]) for the row `row` of B_packed, n0 a multiple of 32;
// width is a multiple of 32 for 4 bits (padding columns read as code 0).
void AccumulateRow(const uint8_t* __restrict row, int64_t bits, int64_t n0, int64_t width, float d,
                   const float* __restrict zp, float* __restrict acc) {
  if (bits == 8) {
    const uint8_t* q = row + n0;
    for (int64_t j = 0; j < width; ++j) acc[j] += d * (static_cast<float>(q[j]) - zp[j]);
    return;
  }
  const uint8_t* q = row + n0 / 2;
  for (int64_t g = 0; g < width; g += kGroupColumns) {
    const uint8_t* bytes = q + g / 2;
    float* lo = acc + g;
    float* hi = acc + g + 16;
    const float* zlo = zp + g;
    const float* zhi = zp + g + 16;
    for (int t = 0; t < 16; ++t) lo[t] += d * (static_cast<float>(bytes[t] & 0x0F) - zlo[t]);
    for (int t = 0; t < 16; ++t) hi[t] += d * (static_cast<float>(bytes[t] >> 4) - zhi[t]);
  }
}

// The task's columns [n0, n1): a multiple of 32 wide except at N.
void TaskColumns(const Job& job, size_t index, int64_t* n0, int64_t* n1) {
  const int64_t groups = (job.shape->n + kGroupColumns - 1) / kGroupColumns;
  const int64_t t = static_cast<int64_t>(index);
  *n0 = groups * t / job.tasks * kGroupColumns;
  *n1 = std::min(job.shape->n, groups * (t + 1) / job.tasks * kGroupColumns);
}

// zp[0:padded) = the zero points of `block` for columns [n0, n0 + width), then 0.
void BlockZeroPoints(const Job& job, int64_t block, int64_t n0, int64_t width, int64_t padded, float* zp) {
  const int64_t n = job.shape->n;
  if (job.zero_points == nullptr) {
    std::fill(zp, zp + width, static_cast<float>(1 << (job.shape->bits - 1)));
  } else {
    const uint8_t* z = job.zero_points + block * n + n0;
    for (int64_t j = 0; j < width; ++j) zp[j] = static_cast<float>(z[j]);
  }
  std::fill(zp + width, zp + padded, 0.0f);
}

// One row of A through the vector kernels (nbits_kernels.h), split over K or over N.
struct RowJob {
  const NBitsKernels* kernels;
  NBitsRow w;
  int64_t kept_count;
  int64_t tasks;
  bool split_k;
  float* out;           // split over N: Y; over K: the partials
  int64_t part_stride;  // floats between two tasks' partials
};

void RunVectorRowTask(void* data, size_t index) {
  const RowJob& job = *static_cast<const RowJob*>(data);
  const int64_t t = static_cast<int64_t>(index);
  if (job.split_k) {
    const int64_t i0 = job.kept_count * t / job.tasks, i1 = job.kept_count * (t + 1) / job.tasks;
    job.kernels->row(job.w, i0, i1, 0, job.w.n, job.out + t * job.part_stride);
    return;
  }
  const int64_t unit = job.kernels->tile_columns;
  const int64_t units = (job.w.n + unit - 1) / unit;
  const int64_t c0 = std::min(job.w.n, units * t / job.tasks * unit);
  const int64_t c1 = std::min(job.w.n, units * (t + 1) / job.tasks * unit);
  job.kernels->row(job.w, 0, job.kept_count, c0, c1, job.out);
}

// Several rows of A: per block, the kept rows of W[:, n0:n1) dequantised into a panel, then each
// row of A adds d * (its panel row) for the elements it keeps.
void RunRowsTask(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const NBitsShape& s = *job.shape;
  int64_t n0, n1;
  TaskColumns(job, index, &n0, &n1);
  const int64_t width = n1 - n0;
  if (width <= 0) return;
  const int64_t padded = s.bits == 4 ? RoundUp(width, kGroupColumns) : width;
  TaskScratch& scratch = ThreadTaskScratch();
  scratch.zero_points.resize(static_cast<size_t>(padded));
  scratch.block.resize(static_cast<size_t>(padded * std::min(s.block_size, s.k)));
  float* zp = scratch.zero_points.data();
  float* panel = scratch.block.data();
  for (int64_t m = 0; m < job.rows; ++m) std::fill(job.y + m * s.n + n0, job.y + m * s.n + n1, 0.0f);
  for (int64_t i = 0; i < job.kept_count;) {
    const int64_t block = job.kept[i] / s.block_size, end = (block + 1) * s.block_size;
    BlockZeroPoints(job, block, n0, width, padded, zp);
    const float* scale = job.scales + block * s.n + n0;
    const int64_t first = i;
    for (; i < job.kept_count && job.kept[i] < end; ++i) {
      float* w = panel + (i - first) * padded;
      std::fill(w, w + padded, 0.0f);
      AccumulateRow(job.b + job.kept[i] * s.row_bytes, s.bits, n0, padded, 1.0f, zp, w);
      for (int64_t j = 0; j < width; ++j) w[j] *= scale[j];
    }
    for (int64_t m = 0; m < job.rows; ++m) {
      const float* d = job.d + m * s.k;
      float* __restrict y = job.y + m * s.n + n0;
      for (int64_t p = first; p < i; ++p) {
        const float dk = d[job.kept[p]];
        if (dk == 0.0f) continue;  // dropped by this row (kept by another)
        const float* __restrict w = panel + (p - first) * padded;
        for (int64_t j = 0; j < width; ++j) y[j] += dk * w[j];
      }
    }
  }
}

// Tasks of a split over K: a power of two (pools of 2, 4 or 8 threads get equal shares), each with
// enough kept rows and work to outweigh its partial Y.
int64_t KSplitTasks(int64_t kept, int64_t n) {
  const int64_t most = std::max<int64_t>(1, std::min({KSplitMax(), kept / 16, kept * n / kMinWorkForThreads}));
  int64_t tasks = 1;
  while (tasks * 2 <= most) tasks *= 2;
  return tasks;
}

// One row of A: Y (float32, bias not yet added) through the vector kernels.
void RunRow(Ort::KernelContext& context, const NBitsShape& s, const Job& job, Scratch& scratch) {
  const NBitsKernels& kernels = SelectNBitsKernels();
  RowJob row{&kernels,
             NBitsRow{job.b, s.row_bytes, job.scales, job.zero_points, s.n, s.bits, s.block_size, job.d, job.kept},
             job.kept_count, 1, SplitK(), job.y, 0};
  if (row.split_k) {
    row.tasks = KSplitTasks(job.kept_count, s.n);
  } else {
    const int64_t units = (s.n + kernels.tile_columns - 1) / kernels.tile_columns;
    row.tasks = job.kept_count * s.n < kMinWorkForThreads ? 1 : std::min(units, NSplitTasks());
  }
  if (!row.split_k || row.tasks == 1) {
    row.split_k = false;
    RunTasks(context, &RunVectorRowTask, row.tasks, &row);
    return;
  }
  row.part_stride = RoundUp(s.n, 16) + 16;
  scratch.partials.resize(static_cast<size_t>(row.tasks * row.part_stride));
  row.out = scratch.partials.data();
  RunTasks(context, &RunVectorRowTask, row.tasks, &row);
  float* __restrict y = job.y;
  const float* p = scratch.partials.data();
  std::copy(p, p + s.n, y);
  for (int64_t t = 1; t < row.tasks; ++t) {
    const float* __restrict part = p + t * row.part_stride;
    for (int64_t j = 0; j < s.n; ++j) y[j] += part[j];
  }
}

int64_t ReadIntAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  int64_t value = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    throw std::invalid_argument(std::string("missing required INT attribute '") + name + "'");
  }
  return value;
}

NBitsShape ReadShape(const OrtApi& api, const OrtKernelInfo* info) {
  NBitsShape s;
  s.k = ReadIntAttribute(api, info, "K");
  s.n = ReadIntAttribute(api, info, "N");
  s.bits = ReadIntAttribute(api, info, "bits");
  s.block_size = ReadIntAttribute(api, info, "block_size");
  if (s.bits != 4 && s.bits != 8)
    throw std::invalid_argument("attribute 'bits' must be 4 or 8, got " + std::to_string(s.bits));
  if (s.block_size < 16 || s.block_size > 256 || (s.block_size & (s.block_size - 1)) != 0)
    throw std::invalid_argument("attribute 'block_size' must be a power of two from 16 to 256, got " +
                                std::to_string(s.block_size));
  if (s.k < 1 || s.k > kMaxDepth || s.n < 1)
    throw std::invalid_argument("attributes K and N must be >= 1 (K below 2^31), got K = " + std::to_string(s.k) +
                                ", N = " + std::to_string(s.n));
  s.k_blocks = (s.k + s.block_size - 1) / s.block_size;
  s.row_bytes = s.bits == 8 ? s.n : RoundUp(s.n, kGroupColumns) / 2;
  return s;
}

std::string Dims(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void CheckInput(const char* name, const std::vector<int64_t>& shape, const std::vector<int64_t>& expected) {
  if (shape != expected)
    throw std::invalid_argument(std::string(name) + " must have shape " + Dims(expected) + ", got " + Dims(shape));
}

void CheckType(const char* name, ONNXTensorElementDataType type, ONNXTensorElementDataType expected) {
  if (type != expected)
    throw std::invalid_argument(std::string(name) + " has element type " + std::to_string(static_cast<int>(type)) +
                                ", expected " + std::to_string(static_cast<int>(expected)));
}

}  // namespace

template <typename T>
ScapSparseMatMulNBitsKernel<T>::ScapSparseMatMulNBitsKernel(const OrtApi& api, const OrtKernelInfo* info)
    : api_(api), attributes_(ReadNodeAttributes(api, info, kOpTypeNBits)) {
  try {
    shape_ = ReadShape(api, info);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(kOpTypeNBits) + " node '" + attributes_.node_name + "': " + e.what());
  }
}

template <typename T>
OrtStatusPtr ScapSparseMatMulNBitsKernel<T>::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Compute(context);
    return nullptr;
  } catch (...) {
    return StatusFromCurrentException(api_, attributes_.node_name, kOpTypeNBits);
  }
}

template <typename T>
void ScapSparseMatMulNBitsKernel<T>::Compute(OrtKernelContext* raw_context) {
  using Bits = typename Traits<T>::Bits;
  Ort::KernelContext context(raw_context);
  const NBitsShape& s = shape_;
  const size_t inputs = context.GetInputCount();
  auto input = [&](size_t i) { return i < inputs ? context.GetInput(i) : Ort::ConstValue{nullptr}; };
  const Ort::ConstValue a = input(0), b = input(1), scales = input(2), zero_points = input(3), bias = input(4);

  const Ort::TensorTypeAndShapeInfo a_info = a.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> a_shape = a_info.GetShape();
  CheckType("A", a_info.GetElementType(), ElementType<T>::kValue);
  if (a_shape.empty() || a_shape.back() != s.k)
    throw std::invalid_argument("A must have shape [..., K = " + std::to_string(s.k) + "], got " + Dims(a_shape));
  CheckType("B_packed", b.GetTensorTypeAndShapeInfo().GetElementType(), ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  CheckInput("B_packed", b.GetTensorTypeAndShapeInfo().GetShape(), {s.k, s.row_bytes});
  CheckType("scales", scales.GetTensorTypeAndShapeInfo().GetElementType(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  CheckInput("scales", scales.GetTensorTypeAndShapeInfo().GetShape(), {s.k_blocks, s.n});
  if (zero_points != nullptr) {
    CheckType("zero_points", zero_points.GetTensorTypeAndShapeInfo().GetElementType(),
              ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    CheckInput("zero_points", zero_points.GetTensorTypeAndShapeInfo().GetShape(), {s.k_blocks, s.n});
  }
  if (bias != nullptr) {
    CheckType("bias", bias.GetTensorTypeAndShapeInfo().GetElementType(), ElementType<T>::kValue);
    CheckInput("bias", bias.GetTensorTypeAndShapeInfo().GetShape(), {s.n});
  }

  int64_t rows = 1;
  for (size_t i = 0; i + 1 < a_shape.size(); ++i) rows *= a_shape[i];
  std::vector<int64_t> y_shape(a_shape.begin(), a_shape.end() - 1);
  y_shape.push_back(s.n);
  Ort::UnownedValue y = context.GetOutput(0, y_shape);
  if (rows == 0) return;
  Bits* y_data = reinterpret_cast<Bits*>(y.GetTensorMutableRawData());

  Scratch& scratch = ThreadScratch();
  scratch.d.resize(static_cast<size_t>(rows * s.k));
  scratch.seen.resize(static_cast<size_t>(SeenWords(s.k)));
  scratch.kept.resize(static_cast<size_t>(s.k));
  const int64_t kept = Kernels<Bits>().sparsify(reinterpret_cast<const Bits*>(a.GetTensorRawData()), rows, s.k,
                                        attributes_.threshold, attributes_.offset, scratch.d.data(),
                                        scratch.seen.data(), scratch.kept.data());

  float* y_f32;
  if constexpr (std::is_same<Bits, float>::value) {
    y_f32 = y_data;
  } else {
    scratch.y.resize(static_cast<size_t>(rows * s.n));
    y_f32 = scratch.y.data();
  }
  const int64_t groups = (s.n + kGroupColumns - 1) / kGroupColumns;
  const int64_t wanted = std::min(kMaxTasks, std::max<int64_t>(1, s.n / kColumnsPerTask));
  const int64_t tasks = rows * kept * s.n < kMinWorkForThreads ? 1 : std::min(groups, wanted);
  Job job{&s,
          reinterpret_cast<const uint8_t*>(b.GetTensorRawData()),
          reinterpret_cast<const float*>(scales.GetTensorRawData()),
          zero_points != nullptr ? reinterpret_cast<const uint8_t*>(zero_points.GetTensorRawData()) : nullptr,
          scratch.d.data(),
          rows,
          scratch.kept.data(),
          kept,
          y_f32,
          tasks};
  if (rows == 1) {
    RunRow(context, s, job, scratch);
  } else {
    RunTasks(context, &RunRowsTask, tasks, &job);
  }

  // Bias, and float16 out.
  const float* bias_f32 = nullptr;
  if (bias != nullptr) {
    const Bits* bias_data = reinterpret_cast<const Bits*>(bias.GetTensorRawData());
    if constexpr (std::is_same<Bits, float>::value) {
      bias_f32 = bias_data;
    } else {
      scratch.bias.resize(static_cast<size_t>(s.n));
      for (int64_t j = 0; j < s.n; ++j) scratch.bias[static_cast<size_t>(j)] = HalfToFloat(bias_data[j]);
      bias_f32 = scratch.bias.data();
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* row = y_f32 + m * s.n;
    if (bias_f32 != nullptr) {
      for (int64_t j = 0; j < s.n; ++j) row[j] += bias_f32[j];
    }
    if constexpr (!std::is_same<Bits, float>::value) {
      for (int64_t j = 0; j < s.n; ++j) y_data[m * s.n + j] = FloatToHalf(row[j]);
    }
  }
}

template struct ScapSparseMatMulNBitsKernel<float>;
template struct ScapSparseMatMulNBitsKernel<Ort::Float16_t>;
template struct ScapSparseMatMulNBitsOp<float>;
template struct ScapSparseMatMulNBitsOp<Ort::Float16_t>;

}  // namespace scap
