// CPU kernel of ScapSparseMatMul: validates inputs, applies the drop rule, and runs either the
// row-skipping kernels (sparse_gemm.h) over column blocks in ONNX Runtime's thread pool, or, for
// tall float32 A where skipping rows of B no longer pays, onnxruntime's own MatMul on the
// sparsified A.
#include "scap_sparse_matmul.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "sparse_gemm.h"

namespace scap {
namespace {

// Rows of A from which float32 goes through onnxruntime's MatMul: by then the union of the rows'
// kept activations covers nearly all of K, and a tuned dense GEMM beats row skipping.
constexpr int64_t kDenseMatMulMinRows = 16;

// Below this many multiply-adds a pass runs on the calling thread alone.
constexpr int64_t kMinWorkForThreads = 1 << 16;
constexpr int64_t kMinColumnsPerTask = 256;
constexpr int64_t kTargetTasks = 16;
// Decoding splits the kept rows of B into this many tasks (partial sums added at the end): enough
// to balance a pool of a few threads, few enough that the partial sums stay cheap.
constexpr int64_t kDecodeTasks = 8;
constexpr int64_t kMinKeptRowsPerTask = 16;

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return HalfToFloat(x); }

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using Bits = float;
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
template <>
struct Traits<Ort::Float16_t> {
  using Bits = uint16_t;
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

float ReadFloatAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, bool required,
                         float fallback) {
  float value = fallback;
  OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    if (required) throw std::invalid_argument(std::string("missing required float attribute '") + name + "'");
    return fallback;
  }
  return value;
}

// Per-thread scratch, reused across calls so that decoding does not allocate per token.
struct Scratch {
  std::vector<float> d;        // sparsified activations of one pass
  std::vector<int32_t> kept;   // union of kept columns of one pass
  std::vector<uint8_t> seen;
  std::vector<float> bias;     // bias as float32
  std::vector<float> partials; // per-task partial sums of a decoding pass
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The drop rule on rows of A: d = A - offset with dropped elements set to 0, and the ascending
// union of kept columns.
template <typename Bits>
void Sparsify(const Bits* a, int64_t rows, int64_t depth, float threshold, float offset, Scratch& s) {
  s.d.resize(static_cast<size_t>(rows * depth));
  s.seen.assign(static_cast<size_t>(depth), 0);
  for (int64_t m = 0; m < rows; ++m) {
    const Bits* a_row = a + m * depth;
    float* d_row = s.d.data() + m * depth;
    for (int64_t k = 0; k < depth; ++k) {
      const float diff = ToFloat(a_row[k]) - offset;
      const bool dropped = std::fabs(diff) <= threshold;  // NaN compares false: kept
      d_row[k] = dropped ? 0.0f : diff;
      s.seen[static_cast<size_t>(k)] |= static_cast<uint8_t>(!dropped);
    }
  }
  s.kept.clear();
  for (int64_t k = 0; k < depth; ++k)
    if (s.seen[static_cast<size_t>(k)]) s.kept.push_back(static_cast<int32_t>(k));
}

template <typename Bits>
const KernelSet<Bits>& Kernels();
template <>
const KernelSet<float>& Kernels<float>() { return SelectKernels().f32; }
template <>
const KernelSet<uint16_t>& Kernels<uint16_t>() { return SelectKernels().f16; }

// One pass of at most kMaxRowsPerPass rows of A, split into tasks for the thread pool.
template <typename Bits>
struct PassJob {
  const KernelSet<Bits>* kernels;
  SparseActivations act;
  const Bits* b;
  int64_t n;
  const float* bias;
  Bits* y;
  int64_t per_task;  // columns per task (column split) or kept rows per task (row split)
  float* partials;   // row split: one [n] partial sum per task
};

template <typename Bits>
void RunColumnTask(void* data, size_t index) {
  const auto& job = *static_cast<const PassJob<Bits>*>(data);
  const int64_t n0 = static_cast<int64_t>(index) * job.per_task;
  const int64_t n1 = n0 + job.per_task < job.n ? n0 + job.per_task : job.n;
  job.kernels->columns(job.act, job.b, job.n, job.bias, job.y, n0, n1);
}

template <typename Bits>
void RunRowTask(void* data, size_t index) {
  const auto& job = *static_cast<const PassJob<Bits>*>(data);
  const int64_t i0 = static_cast<int64_t>(index) * job.per_task;
  const int64_t count = job.act.kept_count;
  const int64_t i1 = i0 + job.per_task < count ? i0 + job.per_task : count;
  job.kernels->rows_partial(job.act, job.b, job.n, i0 < count ? i0 : count, i1, job.partials + index * job.n);
}

// Column blocks wide enough to stream long runs of each kept row of B, numerous enough to keep
// every thread of the pool busy.
int64_t ColumnsPerTask(int64_t n) {
  int64_t columns = (n + kTargetTasks - 1) / kTargetTasks;
  columns = (columns + 15) / 16 * 16;
  return columns < kMinColumnsPerTask ? kMinColumnsPerTask : columns;
}


}  // namespace

template <typename T>
ScapSparseMatMulKernel<T>::ScapSparseMatMulKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
  Ort::ConstKernelInfo kernel_info(info);
  node_name_ = kernel_info.GetNodeName();
  const auto fail = [&](const std::string& message) {
    throw std::invalid_argument(std::string(kOpType) + " node '" + node_name_ + "': " + message);
  };
  try {
    threshold_ = ReadFloatAttribute(api, info, "threshold", /*required=*/true, 0.0f);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  offset_ = ReadFloatAttribute(api, info, "offset", /*required=*/false, 0.0f);
  if (std::isnan(threshold_) || threshold_ < 0.0f)
    fail("attribute 'threshold' must be >= 0, got " + std::to_string(threshold_));
  if (std::isnan(offset_)) fail("attribute 'offset' must not be NaN");

  if constexpr (std::is_same<T, float>::value) {
    // float16 always takes the row-skipping kernels: they accumulate in float32 as the
    // contract asks, which onnxruntime's float16 MatMul on CPU need not.
    const char* type_names[] = {"T"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    try {
      dense_matmul_ = Ort::Op::Create(info, "MatMul", "", 13, type_names, types, 1, nullptr, 0, 2, 1);
    } catch (const Ort::Exception&) {
      dense_matmul_ = Ort::Op{nullptr};  // older runtimes: row-skipping kernels for every height
    }
  }
}

template <typename T>
OrtStatusPtr ScapSparseMatMulKernel<T>::ComputeV2(OrtKernelContext* context) noexcept {
  try {
    Compute(context);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api_.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    const std::string message = std::string(kOpType) + " node '" + node_name_ + "': " + e.what();
    return api_.CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
  }
}

template <typename T>
void ScapSparseMatMulKernel<T>::Compute(OrtKernelContext* raw_context) {
  using Bits = typename Traits<T>::Bits;
  Ort::KernelContext context(raw_context);
  const Ort::ConstValue a = context.GetInput(0);
  const Ort::ConstValue b = context.GetInput(1);
  const Ort::ConstValue bias = context.GetInputCount() > 2 ? context.GetInput(2) : Ort::ConstValue{nullptr};

  const std::vector<int64_t> a_shape = a.GetTensorTypeAndShapeInfo().GetShape();
  const std::vector<int64_t> b_shape = b.GetTensorTypeAndShapeInfo().GetShape();
  if (b_shape.size() != 2) throw std::invalid_argument("B must be 2-D [K, N], got shape " + ShapeString(b_shape));
  if (a_shape.empty()) throw std::invalid_argument("A must have rank >= 1, got a scalar");
  const int64_t depth = b_shape[0], n = b_shape[1];
  if (a_shape.back() != depth)
    throw std::invalid_argument("A's last dimension must equal B's first: A " + ShapeString(a_shape) + ", B " +
                                ShapeString(b_shape));
  const Bits* bias_data = nullptr;
  if (bias != nullptr) {
    const std::vector<int64_t> bias_shape = bias.GetTensorTypeAndShapeInfo().GetShape();
    if (bias_shape.size() != 1 || bias_shape[0] != n)
      throw std::invalid_argument("bias must have shape [" + std::to_string(n) + "], got " + ShapeString(bias_shape));
    bias_data = reinterpret_cast<const Bits*>(bias.GetTensorRawData());
  }

  std::vector<int64_t> y_shape(a_shape.begin(), a_shape.end() - 1);
  y_shape.push_back(n);
  Ort::UnownedValue y = context.GetOutput(0, y_shape);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < a_shape.size(); ++i) rows *= a_shape[i];
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
    if (rows >= kDenseMatMulMinRows && dense_matmul_ != nullptr) {
      // onnxruntime's MatMul on the sparsified A, then the bias.
      Sparsify(a_data, rows, depth, threshold_, offset_, scratch);
      const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      Ort::Value d = Ort::Value::CreateTensor<float>(cpu, scratch.d.data(), scratch.d.size(), a_shape.data(),
                                                     a_shape.size());
      const OrtValue* inputs[] = {d, static_cast<const OrtValue*>(b)};
      OrtValue* outputs[] = {static_cast<OrtValue*>(y)};
      dense_matmul_.Invoke(raw_context, inputs, 2, outputs, 1);
      if (bias_f32 != nullptr) {
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t j = 0; j < n; ++j) y_data[m * n + j] += bias_f32[j];
      }
      return;
    }
  }

  for (int64_t row0 = 0; row0 < rows; row0 += kMaxRowsPerPass) {
    const int64_t pass_rows = rows - row0 < kMaxRowsPerPass ? rows - row0 : kMaxRowsPerPass;
    Sparsify(a_data + row0 * depth, pass_rows, depth, threshold_, offset_, scratch);
    const int64_t kept = static_cast<int64_t>(scratch.kept.size());
    PassJob<Bits> job{&Kernels<Bits>(),
                      {scratch.d.data(), pass_rows, depth, scratch.kept.data(), kept},
                      b_data, n, bias_f32, y_data + row0 * n, 0, nullptr};
    const bool threaded = pass_rows * kept * n >= kMinWorkForThreads;
    if (pass_rows == 1) {
      // Decoding: split the kept rows of B over tasks; each streams whole rows into its own partial sum.
      const int64_t tasks = threaded ? std::max<int64_t>(1, std::min<int64_t>(kDecodeTasks, kept / kMinKeptRowsPerTask)) : 1;
      job.per_task = (kept + tasks - 1) / tasks;
      scratch.partials.resize(static_cast<size_t>(tasks * n));
      job.partials = scratch.partials.data();
      if (tasks == 1) {
        RunRowTask<Bits>(&job, 0);
      } else {
        context.ParallelFor(&RunRowTask<Bits>, static_cast<size_t>(tasks), 0, &job);
      }
      job.kernels->reduce(job.partials, tasks, n, bias_f32, job.y);
    } else {
      job.per_task = threaded ? ColumnsPerTask(n) : n;
      const int64_t tasks = (n + job.per_task - 1) / job.per_task;
      if (tasks == 1) {
        RunColumnTask<Bits>(&job, 0);
      } else {
        context.ParallelFor(&RunColumnTask<Bits>, static_cast<size_t>(tasks), 0, &job);
      }
    }
  }
}

template <typename T>
OrtStatusPtr ScapSparseMatMulOp<T>::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                                   void** kernel) const noexcept {
  try {
    *kernel = new ScapSparseMatMulKernel<T>(api, info);
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

template <typename T>
ONNXTensorElementDataType ScapSparseMatMulOp<T>::GetInputType(size_t) const {
  return Traits<T>::kType;
}

template struct ScapSparseMatMulKernel<float>;
template struct ScapSparseMatMulKernel<Ort::Float16_t>;
template struct ScapSparseMatMulOp<float>;
template struct ScapSparseMatMulOp<Ort::Float16_t>;

}  // namespace scap
