#pragma once
// Host interface between the 4-bit weight ops (quant4_cuda.cu) and their CUDA
// kernels: one product with a 4-bit W [rows, cols] in bitsandbytes' layout,
//   forward    (transposed = false): out [M, rows] = act [M, cols] @ W^T
//   grad_input (transposed = true):  out [M, cols] = act [M, rows] @ W
// read from the same packed bytes; only the walk over W's tiles differs.
#include <ATen/ATen.h>

#include <cstdint>

namespace lrk {

struct Quant4Product {
  at::Tensor act;     // [M, reduction], contiguous, float32/64, bf16 or fp16
  at::Tensor out;     // [M, output], contiguous, act's dtype
  at::Tensor packed;  // uint8, ceil(rows * cols / 2) bytes
  at::Tensor absmax;  // float32 [blocks]
  at::Tensor code;    // float32 [16]
  int64_t rows = 0, cols = 0, blocks = 0;
  int shift = 0;      // log2(blocksize)
  bool transposed = false;
  int64_t M() const { return act.size(0); }
};

// Rows of act up to which the small-M (weight-streaming) kernels are used.
constexpr int64_t kQuant4SmallM = 16;

// The tiled kernels: WMMA (fp32 accumulation) for bf16/fp16, SIMT for float32/float64.
void quant4_tiled_cuda(Quant4Product& p);
// The small-M kernels (M <= kQuant4SmallM): the packed weight is read once.
void quant4_small_m_cuda(Quant4Product& p);

}  // namespace lrk
