// CPU kernel of ScapSparseMatMulNBits (contract: scap_sparse_matmul_nbits.h). The drop rule is the
// float op's (KernelSet::sparsify); the products are the vector kernels of nbits_kernels.h (AVX-512,
// AVX2 or portable, chosen with the float kernels).
//
// One row of A: tasks split the kept rows (K), each streaming whole rows of B_packed into a partial
// Y, summed at the end. Several rows: tasks split the columns, whole register strips each; every
// block's kept rows (those any row of A keeps) are dequantised once per strip and pass of rows. At
// accuracy_level 4, several rows are quantised to int8 per block first and multiplied with the
// int8 kernels (nbits_vnni.cc), or dequantised again for the float ones on CPUs without them.
#include "scap_sparse_matmul_nbits.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nbits_kernels.h"
#include "run_tasks.h"
#include "cpu_kernels.h"
#include "sparse_gemm.h"

namespace scap {
namespace {

// Below this many multiply-adds a call runs on the calling thread.
constexpr int64_t kGroupColumns = 32;  // columns of a 4-bit group: 16 bytes
constexpr int64_t kMinWorkForThreads = 1 << 16;
// Several rows: column tasks, enough to balance a pool of a few threads (its size is not known
// here), of whole strips.
constexpr int64_t kColumnTasks = 16;

// One row of A: at most this many tasks over K (each adds a partial Y of N floats).
constexpr int64_t kKSplitTasks = 4;

// The calling thread's scratch, reused across calls so that decoding does not allocate per token.
struct Scratch {
  std::vector<float> d;
  std::vector<uint32_t> seen;
  std::vector<int32_t> kept;
  std::vector<float> bias;
  std::vector<float> y;         // float32 Y of float16 calls
  std::vector<float> partials;  // one row of A split over K: a partial Y per task
  std::vector<float> d_kept;    // several rows: D's kept columns, gathered once
  std::vector<int8_t> qa;       // accuracy_level 4: D quantised (NBitsQuantized)
  std::vector<float> sa;
  std::vector<int32_t> qsum;
  std::vector<uint8_t> row_finite;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// One call's work for the vector kernels.
struct RowJob {
  const NBitsKernels* kernels;
  NBitsRow w;
  int64_t rows;
  int64_t kept_count;
  int64_t tasks;
  bool split_k;         // tasks split the kept rows (one row of A) rather than the columns
  float* out;           // split over N: Y; over K: the partials
  int64_t part_stride;  // floats between two tasks' partials
};

// Columns [c0, c1) of task t of `tasks` over N: near-equal runs of whole `unit`s.
std::pair<int64_t, int64_t> ColumnRange(int64_t t, int64_t tasks, int64_t n, int64_t unit) {
  const int64_t units = (n + unit - 1) / unit;
  return {std::min(n, units * t / tasks * unit), std::min(n, units * (t + 1) / tasks * unit)};
}

void RunVectorTask(void* data, size_t index) {
  const RowJob& job = *static_cast<const RowJob*>(data);
  const int64_t t = static_cast<int64_t>(index);
  if (job.split_k) {
    const int64_t i0 = job.kept_count * t / job.tasks, i1 = job.kept_count * (t + 1) / job.tasks;
    job.kernels->row(job.w, i0, i1, 0, job.w.n, job.out + t * job.part_stride);
    return;
  }
  const auto [c0, c1] = ColumnRange(t, job.tasks, job.w.n, job.kernels->tile_columns);
  if (job.rows == 1) {
    job.kernels->row(job.w, 0, job.kept_count, c0, c1, job.out);
    return;
  }
  thread_local std::vector<float> work;  // per pool thread
  work.resize(static_cast<size_t>(job.kernels->rows_work_floats));
  job.kernels->rows(job.w, job.rows, 0, job.kept_count, c0, c1, job.out, work.data());
}

// Tasks of a split over K: a power of two (pools of 2, 4 or 8 threads get equal shares), each with
// enough kept rows and work to outweigh its partial Y.
int64_t KSplitTasks(int64_t kept, int64_t n) {
  const int64_t most = std::max<int64_t>(1, std::min({kKSplitTasks, kept / 16, kept * n / kMinWorkForThreads}));
  int64_t tasks = 1;
  while (tasks * 2 <= most) tasks *= 2;
  return tasks;
}

// Y (float32, bias not yet added) = D_kept @ W through the vector kernels.
void RunVector(Ort::KernelContext& context, const NBitsShape& s, const NBitsRow& row, int64_t rows, int64_t kept,
               float* y, Scratch& scratch) {
  const NBitsKernels& kernels = SelectNBitsKernels();
  NBitsRow w = row;
  if (rows > 1) {  // every column task reads D's kept columns: gather them once (a cache line more
                   // per row, so that the rows of a register tile do not share L1 sets)
    w.kept_stride = RoundUp(kept, 16) + 16;
    scratch.d_kept.resize(static_cast<size_t>(rows * w.kept_stride));
    for (int64_t m = 0; m < rows; ++m) {
      const float* d = w.d + m * w.depth;
      float* out = scratch.d_kept.data() + m * w.kept_stride;
      for (int64_t i = 0; i < kept; ++i) out[i] = d[w.kept[i]];
    }
    w.d_kept = scratch.d_kept.data();
  }
  RowJob job{&kernels, w, rows, kept, 1, rows == 1, y, 0};
  const int64_t units = (s.n + kernels.tile_columns - 1) / kernels.tile_columns;
  const bool small = rows * kept * s.n < kMinWorkForThreads;
  if (job.split_k) {
    job.tasks = small ? 1 : KSplitTasks(kept, s.n);
  } else {
    job.tasks = small ? 1 : std::min(units, kColumnTasks);
  }
  if (!job.split_k || job.tasks == 1) {
    job.split_k = false;
    RunTasks(context, &RunVectorTask, job.tasks, &job);
    return;
  }
  job.part_stride = RoundUp(s.n, 16) + 16;
  scratch.partials.resize(static_cast<size_t>(job.tasks * job.part_stride));
  job.out = scratch.partials.data();
  RunTasks(context, &RunVectorTask, job.tasks, &job);
  const float* p = scratch.partials.data();
  std::copy(p, p + s.n, y);
  for (int64_t t = 1; t < job.tasks; ++t) {
    const float* __restrict part = p + t * job.part_stride;
    float* __restrict out = y;
    for (int64_t j = 0; j < s.n; ++j) out[j] += part[j];
  }
}

// An INT attribute (ReadInt); absent: `fallback` where given, else an error.
int64_t ReadIntAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name,
                         const int64_t* fallback = nullptr) {
  int64_t value = 0;
  if (ReadInt(api, info, name, &value)) return value;
  if (fallback != nullptr) return *fallback;
  throw std::invalid_argument(std::string("missing required INT attribute '") + name + "'");
}

// Several rows at accuracy_level 4: D quantised per row and block (tasks over rows), then the int8
// kernels over column tasks; rows holding Inf or NaN again through the float kernel, one at a time.
struct Int8Job {
  const NBitsKernels* kernels;
  const NBitsRow* w;
  const NBitsQuantized* q;
  int64_t rows, tasks;
  float* y;
  uint8_t* row_finite;
};

void RunQuantizeTask(void* data, size_t index) {
  const Int8Job& job = *static_cast<const Int8Job*>(data);
  const int64_t t = static_cast<int64_t>(index);
  job.kernels->quantize_rows(job.w->d, job.w->depth, job.w->block_size, job.rows * t / job.tasks,
                             job.rows * (t + 1) / job.tasks, *job.q, job.row_finite);
}

void RunInt8Task(void* data, size_t index) {
  const Int8Job& job = *static_cast<const Int8Job*>(data);
  const int64_t t = static_cast<int64_t>(index);
  const auto [c0, c1] = ColumnRange(t, job.tasks, job.w->n, kGroupColumns);
  if (c0 == c1) return;
  thread_local std::vector<uint8_t> work;  // per pool thread
  work.resize(static_cast<size_t>(NBitsInt8WorkBytes((job.w->depth + job.w->block_size - 1) / job.w->block_size)));
  job.kernels->rows_int8(*job.w, *job.q, job.rows, c0, c1, job.y, work.data());
}

void RunInt8(Ort::KernelContext& context, const NBitsShape& s, const NBitsRow& w, int64_t rows, int64_t kept, float* y,
             Scratch& scratch) {
  const NBitsKernels& kernels = SelectNBitsKernels();
  const int64_t stride = s.k_blocks * s.block_size;
  scratch.qa.resize(static_cast<size_t>(rows * stride));
  scratch.sa.resize(static_cast<size_t>(rows * s.k_blocks));
  scratch.qsum.resize(static_cast<size_t>(rows * s.k_blocks));
  scratch.row_finite.resize(static_cast<size_t>(rows));
  const NBitsQuantized q{scratch.qa.data(), stride, scratch.sa.data(), scratch.qsum.data()};
  Int8Job job{&kernels, &w, &q, rows, 1, y, scratch.row_finite.data()};
  job.tasks = std::max<int64_t>(1, std::min<int64_t>(kColumnTasks, rows * s.k / kMinWorkForThreads));
  RunTasks(context, &RunQuantizeTask, job.tasks, &job);
  if (kernels.rows_int8 == nullptr) {
    // No int8 products on this CPU: D becomes qa * sa (rows with Inf or NaN stay as they are) and
    // the float kernels multiply it, the same products in another order of rounding.
    for (int64_t m = 0; m < rows; ++m) {
      if (scratch.row_finite[static_cast<size_t>(m)] == 0) continue;
      float* d = const_cast<float*>(w.d) + m * s.k;
      const int8_t* qa = q.qa + m * stride;
      const float* sa = q.sa + m * s.k_blocks;
      for (int64_t k = 0; k < s.k; ++k) d[k] = static_cast<float>(qa[k]) * sa[k / s.block_size];
    }
    RunVector(context, s, w, rows, kept, y, scratch);
    return;
  }
  const int64_t units = (s.n + kGroupColumns - 1) / kGroupColumns;
  job.tasks = rows * s.k * s.n < kMinWorkForThreads ? 1 : std::min(units, kColumnTasks);
  RunTasks(context, &RunInt8Task, job.tasks, &job);
  for (int64_t m = 0; m < rows; ++m) {
    if (scratch.row_finite[static_cast<size_t>(m)] != 0) continue;
    NBitsRow row = w;
    row.d = w.d + m * s.k;
    kernels.row(row, 0, kept, 0, s.n, y + m * s.n);
  }
}

NBitsShape ReadShape(const OrtApi& api, const OrtKernelInfo* info) {
  NBitsShape s;
  s.k = ReadIntAttribute(api, info, "K");
  s.n = ReadIntAttribute(api, info, "N");
  s.bits = ReadIntAttribute(api, info, "bits");
  s.block_size = ReadIntAttribute(api, info, "block_size");
  const int64_t float_accuracy = 0;
  s.accuracy_level = ReadIntAttribute(api, info, "accuracy_level", &float_accuracy);
  if (s.accuracy_level < 0 || s.accuracy_level > 4)
    throw std::invalid_argument("attribute 'accuracy_level' must be 0 to 4 (MatMulNBits' values), got " +
                                std::to_string(s.accuracy_level));
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
    : KernelShell<ScapSparseMatMulNBitsKernel<T>>(api, info, kOpTypeNBits),
      b_packed_pages_(api, info, 1),
      scales_pages_(api, info, 2) {
  try {
    shape_ = ReadShape(api, info);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(kOpTypeNBits) + " node '" + attributes_.node_name + "': " + e.what());
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
  const ONNXTensorElementDataType scale_type = scales.GetTensorTypeAndShapeInfo().GetElementType();
  if (scale_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && scale_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    throw std::invalid_argument("scales has element type " + std::to_string(static_cast<int>(scale_type)) +
                                ", expected float32 (1) or float16 (10)");
  CheckInput("scales", scales.GetTensorTypeAndShapeInfo().GetShape(), {s.k_blocks, s.n});
  // 4 bits: zero points packed like a row of B_packed, or a byte each. The two shapes agree only at
  // N = 16, where both read the same (a byte's code is below 16: its low nibble).
  bool zp_packed = false;
  if (zero_points != nullptr) {
    CheckType("zero_points", zero_points.GetTensorTypeAndShapeInfo().GetElementType(),
              ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    const std::vector<int64_t> zp_shape = zero_points.GetTensorTypeAndShapeInfo().GetShape();
    zp_packed = s.bits == 4 && zp_shape == std::vector<int64_t>{s.k_blocks, s.row_bytes};
    if (!zp_packed && zp_shape != std::vector<int64_t>{s.k_blocks, s.n}) {
      throw std::invalid_argument("zero_points must have shape " + Dims({s.k_blocks, s.n}) +
                                  (s.bits == 4 ? " or, packed as B_packed's rows, " + Dims({s.k_blocks, s.row_bytes})
                                               : std::string()) +
                                  ", got " + Dims(zp_shape));
    }
  }
  if (bias != nullptr) {
    CheckType("bias", bias.GetTensorTypeAndShapeInfo().GetElementType(), ElementType<T>::kValue);
    CheckInput("bias", bias.GetTensorTypeAndShapeInfo().GetShape(), {s.n});
  }

  const ChannelInputs channels = ReadChannelInputs(context, kThresholdScaleInputNBits, kChannelOffsetInputNBits, s.k);
  if (channels.threshold_scale != nullptr) CheckThresholdScale(channels.threshold_scale, s.k);

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
  const DropRule rule{attributes_.threshold, attributes_.offset, channels.threshold_scale, channels.channel_offset};
  int64_t kept_elements = 0;
  const int64_t kept = Kernels<Bits>().sparsify(reinterpret_cast<const Bits*>(a.GetTensorRawData()), rows, s.k, rule,
                                                scratch.d.data(), scratch.seen.data(), scratch.kept.data(),
                                                &kept_elements);

  float* y_f32;
  if constexpr (std::is_same<Bits, float>::value) {
    y_f32 = y_data;
  } else {
    scratch.y.resize(static_cast<size_t>(rows * s.n));
    y_f32 = scratch.y.data();
  }
  const void* b_packed = b_packed_pages_.data() != nullptr ? b_packed_pages_.data() : b.GetTensorRawData();
  const NBitsRow w{static_cast<const uint8_t*>(b_packed),
                   s.row_bytes,
                   scales_pages_.data() != nullptr ? scales_pages_.data() : scales.GetTensorRawData(),
                   scale_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                   zero_points != nullptr ? reinterpret_cast<const uint8_t*>(zero_points.GetTensorRawData()) : nullptr,
                   zp_packed,
                   s.n,
                   s.bits,
                   s.block_size,
                   s.k,
                   scratch.d.data(),
                   scratch.kept.data()};
  if (s.accuracy_level == 4 && rows > 1) {
    RunInt8(context, s, w, rows, kept, y_f32, scratch);
  } else {
    RunVector(context, s, w, rows, kept, y_f32, scratch);
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
