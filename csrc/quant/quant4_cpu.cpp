// CPU kernels of the 4-bit weight ops (bitsandbytes' layout: see
// python/lrk/reference_quant.py). W is dequantized one block of rows at a time
// into a small buffer and multiplied there: W never exists in full, so the
// memory of a 4-bit base stays what bitsandbytes stores plus one tile.
// Half-precision inputs are computed in float32 (fp32 accumulation, as on
// CUDA), float64 inputs in float64. Dequantized values are formed in float32
// (code * absmax, as bitsandbytes does) and then widened, so a float64 tile
// holds exactly the values of the float64 reference.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "quant/quant4_checks.h"

namespace lrk {
namespace {

at::ScalarType compute_dtype(at::ScalarType t) { return is_half_precision(t) ? at::kFloat : t; }

// Rows of W per tile: about 256K elements (1 MB in float32), at least 16 rows so
// that each matmul has some width, at most all of W.
int64_t rows_per_tile(const Weight4bitDims& w) {
  constexpr int64_t kTileElements = int64_t{1} << 18;
  return std::min(w.rows, std::max<int64_t>(16, kTileElements / w.cols));
}

// Dequantizes elements [begin, end) of the flattened W into out. Per block, a
// 16-entry table of code * absmax (the same float32 product as elementwise),
// then two table reads per byte.
template <typename T>
void dequantize_range(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                      int64_t begin, int64_t end, T* out) {
  int64_t i = begin;
  while (i < end) {
    const int64_t block = i / blocksize;
    const int64_t stop = std::min(end, (block + 1) * blocksize);  // block ends are even: blocksize >= 32
    float table[16];
    for (int c = 0; c < 16; ++c) table[c] = code[c] * absmax[block];
    T* o = out + (i - begin);
    if (i & 1) {  // a range that starts on a low nibble (odd in_features)
      *o++ = static_cast<T>(table[packed[i >> 1] & 15]);
      ++i;
    }
    for (; i + 1 < stop; i += 2, o += 2) {
      const uint8_t byte = packed[i >> 1];
      o[0] = static_cast<T>(table[byte >> 4]);
      o[1] = static_cast<T>(table[byte & 15]);
    }
    if (i < stop) {  // a range that ends on a high nibble
      *o = static_cast<T>(table[packed[i >> 1] >> 4]);
      ++i;
    }
  }
}

// Dequantizes rows [row0, row0 + tile.size(0)) of W into tile (contiguous, [rows, cols]),
// rows split across threads.
template <typename T>
void dequantize_rows(const uint8_t* packed, const float* absmax, const float* code, const Weight4bitDims& w,
                     int64_t row0, at::Tensor& tile) {
  T* out = tile.data_ptr<T>();
  const int64_t cols = w.cols;
  at::parallel_for(0, tile.size(0), std::max<int64_t>(1, 16384 / cols), [&](int64_t r0, int64_t r1) {
    dequantize_range<T>(packed, absmax, code, w.blocksize, (row0 + r0) * cols, (row0 + r1) * cols, out + r0 * cols);
  });
}

// Calls body(row0, tile) for each tile of dequantized rows of W, in dtype acc.
template <class Body>
void for_each_row_tile(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                       const Weight4bitDims& w, at::ScalarType acc, Body body) {
  const int64_t tile_rows = rows_per_tile(w);
  at::Tensor buffer = at::empty({tile_rows, w.cols}, packed.options().dtype(acc));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* c = code.data_ptr<float>();
  for (int64_t row0 = 0; row0 < w.rows; row0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, w.rows - row0);
    at::Tensor tile = buffer.narrow(0, 0, rows);
    if (acc == at::kDouble) {
      dequantize_rows<double>(p, a, c, w, row0, tile);
    } else {
      dequantize_rows<float>(p, a, c, w, row0, tile);
    }
    body(row0, tile);
  }
}

// y = x @ W^T: y[:, tile rows] = x @ tile^T.
at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features) {
  LRK_NO_AUTOCAST();
  const Weight4bitDims w = check_weight_4bit(packed, absmax, code, blocksize, out_features, in_features, x, "x");
  const int64_t M = check_linear_4bit_input(x, "x", in_features, "in_features");
  const auto acc = compute_dtype(x.scalar_type());
  at::Tensor y = at::zeros({M, w.rows}, x.options().dtype(acc));
  if (M > 0) {
    const at::Tensor x2 = x.reshape({M, w.cols}).to(acc);
    for_each_row_tile(packed, absmax, code, w, acc, [&](int64_t row0, const at::Tensor& tile) {
      y.narrow(1, row0, tile.size(0)).copy_(at::mm(x2, tile.t()));
    });
  }
  return y.to(x.scalar_type()).reshape(with_last_dim(x, w.rows));
}

// grad_x = grad_y @ W = sum over tiles of grad_y[:, tile rows] @ tile.
at::Tensor linear_4bit_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize, int64_t out_features,
                                      int64_t in_features) {
  LRK_NO_AUTOCAST();
  const Weight4bitDims w =
      check_weight_4bit(packed, absmax, code, blocksize, out_features, in_features, grad_y, "grad_y");
  const int64_t M = check_linear_4bit_input(grad_y, "grad_y", out_features, "out_features");
  const auto acc = compute_dtype(grad_y.scalar_type());
  at::Tensor grad_x = at::zeros({M, w.cols}, grad_y.options().dtype(acc));
  if (M > 0) {
    const at::Tensor dy = grad_y.reshape({M, w.rows}).to(acc);
    for_each_row_tile(packed, absmax, code, w, acc, [&](int64_t row0, const at::Tensor& tile) {
      grad_x.addmm_(dy.narrow(1, row0, tile.size(0)), tile);
    });
  }
  return grad_x.to(grad_y.scalar_type()).reshape(with_last_dim(grad_y, w.cols));
}

// absmax[j] = code2[absmax_q[j]] * absmax2[j / blocksize2] + offset, in float32
// as bitsandbytes forms it.
at::Tensor dequantize_absmax_cpu(const at::Tensor& absmax_q, const at::Tensor& absmax2, const at::Tensor& code2,
                                 int64_t blocksize2, double offset) {
  LRK_NO_AUTOCAST();
  check_absmax_8bit(absmax_q, absmax2, code2, blocksize2, offset);
  const at::Tensor q = absmax_q.contiguous();
  const at::Tensor scales = absmax2.contiguous();
  const at::Tensor table = code2.contiguous();
  at::Tensor out = at::empty({q.numel()}, absmax2.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* cp = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float off = static_cast<float>(offset);
  for (int64_t j = 0; j < q.numel(); ++j) op[j] = cp[qp[j]] * sp[j / blocksize2] + off;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("linear_4bit", &linear_4bit_cpu);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cpu);
  m.impl("dequantize_absmax", &dequantize_absmax_cpu);
}

}  // namespace lrk
