#pragma once
// Order-preserving integer keys of |v| for the radix select (abs_kth_value), shared
// by the CPU and CUDA kernels. Clearing the sign bit gives |v|, and the bits of a
// non-negative IEEE float, read as an unsigned integer, sort like the value
// (+0 < subnormals < normals < +inf < NaN), so the k-th largest key is the k-th
// largest magnitude. NaN therefore counts as larger than +inf.
#include <cstdint>

#include "sparse/sparse_checks.h"

namespace lrk {

// Digits per pass: 8 bits for 16-bit keys (2 passes), 11 bits for 32-bit (3 passes:
// 11, 11, 10) and 64-bit keys (6 passes); a histogram of 2^11 counters fits in
// shared memory and keeps the number of passes over the data small.
constexpr int radix_digit_bits(int key_bits) { return key_bits == 16 ? 8 : 11; }

constexpr int radix_passes(int key_bits) {
  return (key_bits + radix_digit_bits(key_bits) - 1) / radix_digit_bits(key_bits);
}

// The digit of pass p (0 = most significant): bits [shift, shift + width).
struct RadixDigit {
  int shift;
  int width;
};

constexpr RadixDigit radix_digit(int key_bits, int pass) {
  const int d = radix_digit_bits(key_bits);
  const int hi = key_bits - pass * d;  // bits above hi are already fixed
  const int width = hi < d ? hi : d;
  return RadixDigit{hi - width, width};
}

// Rank from the top (1 = largest) of the k-th value for largest / smallest.
inline int64_t rank_from_top(int64_t n, int64_t k, bool largest) { return largest ? k : n - k + 1; }

inline void check_kth_args(const at::Tensor& x, int64_t k) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.numel() >= 1, "x: expected at least one element, got shape ", x.sizes());
  TORCH_CHECK(k >= 1 && k <= x.numel(), "k: expected a rank in [1, numel(x)] = [1, ", x.numel(), "], got ", k);
}

}  // namespace lrk
