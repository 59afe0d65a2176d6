// CPU radix select: the exact k-th largest (or smallest) |x| without sorting x.
// One histogram pass per digit of the order-preserving key (select_keys.h), each
// pass counting only the elements whose higher digits match the prefix chosen so
// far. Integer counts make the result deterministic for any thread count; it works
// for any number of elements (torch.quantile stops at 2^24).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "sparse/select_keys.h"

namespace lrk {
namespace {

template <typename scalar_t>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  using key_t = uint32_t;
};
template <>
struct KeyTraits<double> {
  using key_t = uint64_t;
};
template <>
struct KeyTraits<at::BFloat16> {
  using key_t = uint16_t;
};
template <>
struct KeyTraits<at::Half> {
  using key_t = uint16_t;
};

template <typename scalar_t>
inline typename KeyTraits<scalar_t>::key_t abs_key(scalar_t v) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  key_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  constexpr key_t kSign = key_t(1) << (8 * sizeof(key_t) - 1);
  return bits & ~kSign;
}

template <typename scalar_t>
scalar_t from_key(typename KeyTraits<scalar_t>::key_t key) {
  scalar_t v;
  std::memcpy(&v, &key, sizeof(v));
  return v;
}

template <typename scalar_t>
scalar_t kth_abs(const scalar_t* data, int64_t n, int64_t rank) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  constexpr int kBits = 8 * sizeof(key_t);
  key_t prefix = 0, fixed = 0;  // value and mask of the digits chosen so far
  uint64_t remaining = static_cast<uint64_t>(rank);
  const int threads = at::get_num_threads();
  for (int pass = 0; pass < radix_passes(kBits); ++pass) {
    const RadixDigit dg = radix_digit(kBits, pass);
    const int64_t bins = int64_t(1) << dg.width;
    const key_t digit_mask = static_cast<key_t>(bins - 1);
    std::vector<uint64_t> local(static_cast<size_t>(threads) * bins, 0);
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      uint64_t* h = local.data() + static_cast<size_t>(at::get_thread_num()) * bins;
      for (int64_t i = begin; i < end; ++i) {
        const key_t key = abs_key(data[i]);
        if ((key & fixed) == prefix) ++h[(key >> dg.shift) & digit_mask];
      }
    });
    // Walk the digits from the top until the running count reaches the rank.
    uint64_t above = 0;
    int64_t chosen = 0;
    for (int64_t dgt = bins - 1; dgt >= 0; --dgt) {
      uint64_t c = 0;
      for (int t = 0; t < threads; ++t) c += local[static_cast<size_t>(t) * bins + dgt];
      if (above + c >= remaining) {
        chosen = dgt;
        break;
      }
      above += c;
    }
    remaining -= above;
    prefix |= static_cast<key_t>(chosen) << dg.shift;
    fixed |= digit_mask << dg.shift;
  }
  return from_key<scalar_t>(prefix);
}

at::Tensor abs_kth_value_cpu(const at::Tensor& x, int64_t k, bool largest) {
  check_kth_args(x, k);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor out = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "abs_kth_value_cpu", [&] {
    *out.mutable_data_ptr<scalar_t>() = kth_abs(xc.const_data_ptr<scalar_t>(), n, rank_from_top(n, k, largest));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) { m.impl("abs_kth_value", &abs_kth_value_cpu); }

}  // namespace lrk
