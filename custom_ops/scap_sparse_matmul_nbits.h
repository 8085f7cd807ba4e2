// ScapSparseMatMulNBits: ScapSparseMatMul over block-quantized weights, on the CPU. The weights are
// repacked at rewrite time (scap_onnx/op/nbits.py) so that each input channel's codes form one row:
// a dropped activation skips one contiguous row, as in the float op.
//
//   inputs     A: T [..., K]; B_packed: uint8 [K, row_bytes]; scales: float32 or float16
//              [k_blocks, N]; zero_points (optional): uint8 [k_blocks, N], a code a byte, or for
//              bits 4 [k_blocks, row_bytes], packed as a row of B_packed (absent: 2^(bits-1));
//              bias (optional): T [N]; threshold_scale (optional): float32 [K];
//              channel_offset (optional): float32 [K] (inputs 5 and 6: after every input the op
//              had before them, so that older models keep their positions)
//   output     Y: T [..., N]
//   attributes K, N, bits (4 or 8), block_size (16 .. 256, a power of two): INT, required;
//              threshold, offset: as ScapSparseMatMul; accuracy_level: INT 0 .. 4, default 0
//              (the source MatMulNBits' own)
//   layout     k_blocks = ceil(K / block_size); bits 8: row_bytes = N, byte j = code of column j;
//              bits 4: row_bytes = 16 * ceil(N / 32), column 32g + t in the low nibble of byte
//              16g + t (t < 16) or the high nibble of byte 16g + t - 16 (t >= 16)
//   semantics  W[k, j] = (q[k, j] - zp[k / block_size, j]) * scales[k / block_size, j] (a float16
//              scale converted exactly to float32);
//              D, and which elements are dropped: as ScapSparseMatMul (op_base.h);
//              Y = D_kept @ W (+ bias), accumulated in float32
//   int8       accuracy_level 4 and more than one row of A (as MatMulNBits there, for prefill and
//              batches): per row m and block b of K, amax = max |D[m, block]| (a block with
//              amax 0 adds nothing), qa = rint(D * (127 / amax)) (clamped to +-127, NaN to 0:
//              only where 127 / amax overflows), sa = amax / 127, all float32;
//              Y[m, j] = sum over b of (sa[m, b] * scales[b, j]) * sum over the block of
//              qa * (q - zp), the integer sums exact (+ bias). A row holding Inf or NaN after the
//              drop rule is multiplied as at accuracy_level 0. One row of A never quantises.
#pragma once

#include <cstdint>

#include "huge_pages.h"
#include "op_base.h"

namespace scap {

// A node's integer attributes, checked.
struct NBitsShape {
  int64_t k = 0, n = 0, bits = 0, block_size = 0;
  int64_t k_blocks = 0, row_bytes = 0;
  int64_t accuracy_level = 0;
};

template <typename T>
struct ScapSparseMatMulNBitsKernel : KernelShell<ScapSparseMatMulNBitsKernel<T>> {
  ScapSparseMatMulNBitsKernel(const OrtApi& api, const OrtKernelInfo* info);

 private:
  friend KernelShell<ScapSparseMatMulNBitsKernel<T>>;
  using KernelShell<ScapSparseMatMulNBitsKernel<T>>::api_;
  using KernelShell<ScapSparseMatMulNBitsKernel<T>>::attributes_;

  void Compute(OrtKernelContext* context);

  NBitsShape shape_;
  // B_packed and scales where they are read from 2 MiB pages of a copy (huge_pages.h).
  HugePageInput b_packed_pages_;
  HugePageInput scales_pages_;
};

template <typename T>
struct ScapSparseMatMulNBitsOp
    : Ort::CustomOpBase<ScapSparseMatMulNBitsOp<T>, ScapSparseMatMulNBitsKernel<T>, /*WithStatus=*/true> {
  ScapSparseMatMulNBitsOp() {
    this->InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* context) -> OrtStatusPtr {
      return InferOutputShape(Ort::GetApi(), context, /*n_input=scales [k_blocks, N]*/ 2);
    };
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    try {
      *kernel = new ScapSparseMatMulNBitsKernel<T>(api, info);
      return nullptr;
    } catch (...) {
      return StatusFromCurrentException(api, "");  // the kernel's messages name the node
    }
  }

  const char* GetName() const { return kOpTypeNBits; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1:
      case 3:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 2:  // scales: float32 or float16 (Compute checks)
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      case kThresholdScaleInputNBits:
      case kChannelOffsetInputNBits:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default:
        return ElementType<T>::kValue;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>::kValue; }
};

}  // namespace scap
