#pragma once
// Argument validation for the 4-bit weight ops (bitsandbytes' layout, see
// python/lrk/reference_quant.py), shared by the CPU and CUDA kernels.
#include "common/checks.h"

namespace lrk {

// A frozen weight W [rows, cols] stored in 4 bits.
struct Weight4bitDims {
  int64_t rows;       // out_features
  int64_t cols;       // in_features
  int64_t blocksize;  // elements per absmax, over the flattened row-major W
  int64_t blocks;     // ceil(rows * cols / blocksize)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// packed: uint8, ceil(rows * cols / 2) bytes (any shape, contiguous); absmax: float32
// [blocks]; code: float32 [16]; all on ref's device.
inline Weight4bitDims check_weight_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                        int64_t blocksize, int64_t rows, int64_t cols, const at::Tensor& ref,
                                        std::string_view ref_name) {
  TORCH_CHECK(rows >= 1 && cols >= 1, "out_features, in_features: expected positive sizes, got ", rows, " and ",
              cols);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize: expected a power of two in [32, 4096] (bitsandbytes' block sizes), got ", blocksize);
  TORCH_CHECK(packed.defined() && packed.scalar_type() == at::kByte,
              "packed: expected a uint8 tensor of 4-bit codes (two per byte), got ",
              packed.defined() ? c10::toString(packed.scalar_type()) : "None");
  const int64_t numel = rows * cols;
  TORCH_CHECK(packed.numel() == ceil_div(numel, 2), "packed: expected ", ceil_div(numel, 2),
              " bytes (two 4-bit codes each for a ", rows, " x ", cols, " weight), got ", packed.numel(),
              " (shape ", packed.sizes(), ")");
  TORCH_CHECK(packed.is_contiguous(), "packed: expected a contiguous tensor");
  const int64_t blocks = ceil_div(numel, blocksize);
  TORCH_CHECK(absmax.defined() && absmax.scalar_type() == at::kFloat,
              "absmax: expected a float32 tensor (dequantize double-quantized absmax first: "
              "lrk.dequantize_absmax), got ",
              absmax.defined() ? c10::toString(absmax.scalar_type()) : "None");
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == blocks, "absmax: expected shape [", blocks,
              "] (one scale per block of ", blocksize, " elements of a ", rows, " x ", cols,
              " weight), got shape ", absmax.sizes(), "; is blocksize the one the weight was quantized with?");
  TORCH_CHECK(absmax.is_contiguous(), "absmax: expected a contiguous tensor");
  TORCH_CHECK(code.defined() && code.scalar_type() == at::kFloat && code.dim() == 1 && code.numel() == 16,
              "code: expected a float32 tensor of shape [16] (the NF4 or FP4 code table), got ",
              code.defined() ? c10::toString(code.scalar_type()) : "None", " of shape ",
              code.defined() ? code.sizes() : at::IntArrayRef{});
  TORCH_CHECK(code.is_contiguous(), "code: expected a contiguous tensor");
  check_same_device(packed, "packed", ref, ref_name);
  check_same_device(absmax, "absmax", ref, ref_name);
  check_same_device(code, "code", ref, ref_name);
  return Weight4bitDims{rows, cols, blocksize, blocks};
}

// Double-quantized absmax: absmax_q uint8 [blocks], absmax2 float32 [ceil(blocks / blocksize2)],
// code2 float32 [256].
inline void check_absmax_8bit(const at::Tensor& absmax_q, const at::Tensor& absmax2, const at::Tensor& code2,
                              int64_t blocksize2, double offset) {
  TORCH_CHECK(absmax_q.defined() && absmax_q.scalar_type() == at::kByte && absmax_q.dim() == 1,
              "absmax_q: expected a 1-D uint8 tensor, got ",
              absmax_q.defined() ? c10::toString(absmax_q.scalar_type()) : "None");
  TORCH_CHECK(blocksize2 >= 1, "blocksize2: expected a positive block size, got ", blocksize2);
  TORCH_CHECK(absmax2.defined() && absmax2.scalar_type() == at::kFloat && absmax2.dim() == 1 &&
                  absmax2.numel() == ceil_div(absmax_q.numel(), blocksize2),
              "absmax2: expected a float32 tensor of shape [", ceil_div(absmax_q.numel(), blocksize2),
              "] (one scale per ", blocksize2, " entries of absmax_q), got ",
              absmax2.defined() ? c10::toString(absmax2.scalar_type()) : "None", " of shape ",
              absmax2.defined() ? absmax2.sizes() : at::IntArrayRef{});
  TORCH_CHECK(code2.defined() && code2.scalar_type() == at::kFloat && code2.dim() == 1 && code2.numel() == 256,
              "code2: expected a float32 tensor of shape [256] (the 8-bit code table), got ",
              code2.defined() ? c10::toString(code2.scalar_type()) : "None", " of shape ",
              code2.defined() ? code2.sizes() : at::IntArrayRef{});
  check_finite(offset, "offset");
  check_same_device(absmax2, "absmax2", absmax_q, "absmax_q");
  check_same_device(code2, "code2", absmax_q, "absmax_q");
}

// x (or grad_y) of a 4-bit linear: a float tensor [..., last] on the weight's device.
inline int64_t check_linear_4bit_input(const at::Tensor& x, std::string_view name, int64_t last,
                                       std::string_view what) {
  check_float_tensor(x, name);
  TORCH_CHECK(x.dim() >= 1, name, ": expected a tensor of shape [..., ", last, "], got a 0-D tensor");
  TORCH_CHECK(x.size(-1) == last, name, ": expected shape [..., ", last, "] (", what, "), got ", x.sizes());
  return x.numel() / last;
}

}  // namespace lrk
