#pragma once
// Argument validation for the batched multi-adapter LoRA ops (ops.md section 2),
// shared by the CPU and CUDA kernels.
//
// What is checked where. Dtypes, devices and shapes are checked here on every
// device. The VALUES of the index tensors (adapter ids, ranks, segment offsets)
// are checked only when those tensors live on the CPU: reading a CUDA tensor's
// values would synchronise with the device, which breaks CUDA-graph capture and
// costs a round trip per call. CUDA kernels instead treat bad values safely and
// never read outside the pool: an adapter id outside [0, n) means "no adapter",
// a rank is clamped to [0, r_max], a segment's bounds are clamped to [0, M].
// Adapter ids normally come from the host, where lrk.nn.MultiLoRALinear (and
// lrk.multi_lora_ops.check_adapter_ids) validate them before the copy.
#include <ATen/MemoryOverlap.h>
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"

namespace lrk {

// dtype of h (the shrink output): float64 for float64 inputs, else float32.
inline at::ScalarType multi_lora_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Grid and shared-memory limits of the CUDA kernels, checked on every device so
// that CPU and CUDA accept the same inputs.
constexpr int64_t kMultiLoraMaxRank = 4096;

inline void check_index_tensor(const at::Tensor& t, std::string_view name, const at::Tensor& ref,
                               std::string_view ref_name, int64_t len, std::string_view what) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
              ": expected dtype int32 or int64, got ", t.scalar_type());
  check_same_device(t, name, ref, ref_name);
  check_dim(t, name, 1);
  check_size(t, name, 0, len, what);
}

// Values of a CPU index tensor as int64.
inline std::vector<int64_t> index_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

struct MultiLoraPool {
  int64_t n;      // adapters in the pool
  int64_t r_max;  // rank capacity of each slot
};

// One pool per slice: lora_a[s] is [n, r_max, K], lora_b[s] is [n, N_s, r_max].
// All slices share n, r_max (and ranks / scales); dtype and device are `ref`'s.
inline MultiLoraPool check_pools(at::TensorList pools, std::string_view name, const at::Tensor& ref,
                                 std::string_view ref_name, int64_t inner_dim, int64_t inner_size,
                                 std::string_view inner_what) {
  TORCH_CHECK(!pools.empty(), name, ": expected a list of at least one pool (one per output slice), got an empty list");
  const int rank_dim = inner_dim == 2 ? 1 : 2;  // lora_a: [n, r_max, K]; lora_b: [n, N_s, r_max]
  MultiLoraPool pool{-1, -1};
  for (size_t s = 0; s < pools.size(); ++s) {
    const std::string nm = std::string(name) + "[" + std::to_string(s) + "]";
    const at::Tensor& p = pools[s];
    check_float_tensor(p, nm);
    check_same_dtype(p, nm, ref, ref_name);
    check_same_device(p, nm, ref, ref_name);
    check_dim(p, nm, 3);
    TORCH_CHECK(p.is_contiguous(), nm, ": expected a contiguous pool, got strides ", p.strides(), " for shape ",
                p.sizes());
    if (inner_size >= 0) check_size(p, nm, inner_dim, inner_size, inner_what);
    if (s == 0) {
      pool = MultiLoraPool{p.size(0), p.size(rank_dim)};
      TORCH_CHECK(pool.r_max >= 1 && pool.r_max <= kMultiLoraMaxRank, nm, ": expected r_max (dim ", rank_dim,
                  ") in [1, ", kMultiLoraMaxRank, "], got shape ", p.sizes());
    } else {
      check_size(p, nm, 0, pool.n, "adapters, as in " + std::string(name) + "[0]");
      check_size(p, nm, rank_dim, pool.r_max, "r_max, as in " + std::string(name) + "[0]");
    }
  }
  return pool;
}

inline void check_ranks(const at::Tensor& ranks, const at::Tensor& ref, std::string_view ref_name,
                        const MultiLoraPool& pool, std::string_view r_max_from) {
  check_index_tensor(ranks, "ranks", ref, ref_name, pool.n, "one rank per adapter in the pool");
  if (!ranks.is_cpu()) return;  // values: see the comment at the top
  const std::vector<int64_t> r = index_values(ranks);
  for (size_t j = 0; j < r.size(); ++j) {
    TORCH_CHECK(r[j] >= 0, "ranks: the rank of adapter ", j, " is negative (", r[j], ")");
    TORCH_CHECK(r[j] <= pool.r_max, "ranks: the rank of adapter ", j, " is ", r[j], ", above r_max = ", pool.r_max,
                " (", r_max_from, ")");
  }
}

inline void check_scales(const at::Tensor& scales, const at::Tensor& ref, std::string_view ref_name,
                         const MultiLoraPool& pool) {
  TORCH_CHECK(scales.defined(), "scales: expected a tensor, got None");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales: expected dtype float32, got ", scales.scalar_type());
  check_same_device(scales, "scales", ref, ref_name);
  check_dim(scales, "scales", 1);
  check_size(scales, "scales", 0, pool.n, "one scale per adapter in the pool");
}

// Per-token layout: adapter_ids [M], -1 = no adapter.
inline void check_adapter_ids(const at::Tensor& ids, const at::Tensor& ref, std::string_view ref_name, int64_t M,
                              const MultiLoraPool& pool) {
  check_index_tensor(ids, "adapter_ids", ref, ref_name, M, "one adapter id per token");
  if (!ids.is_cpu()) return;
  const std::vector<int64_t> v = index_values(ids);
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK(v[i] >= -1 && v[i] < pool.n, "adapter_ids: id ", v[i], " of token ", i,
                " is out of range for a pool of ", pool.n, " adapters (expected -1 <= id < ", pool.n, ")");
  }
}

// Segment layout: tokens [seg_offsets[s], seg_offsets[s+1]) use adapter
// seg_adapters[s] (-1 = none); offsets non-decreasing within [0, M], so empty
// segments are allowed; tokens outside every segment get no adapter.
inline void check_segments(const at::Tensor& seg_offsets, const at::Tensor& seg_adapters, const at::Tensor& ref,
                           std::string_view ref_name, int64_t M, const MultiLoraPool& pool) {
  TORCH_CHECK(seg_adapters.defined(), "seg_adapters: expected a tensor, got None");
  check_dim(seg_adapters, "seg_adapters", 1);
  const int64_t S = seg_adapters.size(0);
  check_index_tensor(seg_adapters, "seg_adapters", ref, ref_name, S, "segments");
  check_index_tensor(seg_offsets, "seg_offsets", ref, ref_name, S + 1, "segments + 1 = seg_adapters.shape[0] + 1");
  if (!seg_offsets.is_cpu()) return;
  const std::vector<int64_t> off = index_values(seg_offsets);
  const std::vector<int64_t> ad = index_values(seg_adapters);
  TORCH_CHECK(off.front() >= 0 && off.back() <= M, "seg_offsets: expected offsets within [0, ", M,
              "] (the tokens), got first ", off.front(), " and last ", off.back());
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(off[s] <= off[s + 1], "seg_offsets: expected non-decreasing offsets, got ", off[s], " at position ",
                s, " before ", off[s + 1]);
    TORCH_CHECK(ad[s] >= -1 && ad[s] < pool.n, "seg_adapters: id ", ad[s], " of segment ", s,
                " is out of range for a pool of ", pool.n, " adapters (expected -1 <= id < ", pool.n, ")");
  }
}

struct ShrinkDims {
  int64_t M;       // tokens (leading dims of x flattened)
  int64_t K;       // in features
  int64_t slices;  // len(lora_a)
  MultiLoraPool pool;
};

// x [..., K], lora_a: list of [n, r_max, K], ranks [n].
inline ShrinkDims check_shrink_inputs(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor of shape [..., in_features], got a 0-D tensor");
  const int64_t K = x.size(-1);
  const MultiLoraPool pool = check_pools(lora_a, "lora_a", x, "x", 2, K, "in_features = x.shape[-1]");
  check_ranks(ranks, x, "x", pool, "lora_a.shape[1]");
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return ShrinkDims{rows, K, static_cast<int64_t>(lora_a.size()), pool};
}

struct ExpandDims {
  int64_t M;        // tokens (leading dims of y flattened)
  int64_t N_total;  // y.shape[-1]
  int64_t ld_y;     // distance between rows of y, in elements
  MultiLoraPool pool;
  std::vector<int64_t> n_out;    // N_s of each slice
  std::vector<int64_t> col_off;  // first column of each slice in y
};

// Rows of y as a 2-D [M, N_total] view with a row stride: the last dim must be
// dense and the leading dims must flatten without a copy (y is written in place).
inline int64_t row_stride_of(const at::Tensor& y) {
  TORCH_CHECK(y.stride(-1) == 1 || y.size(-1) <= 1, "y: expected a unit stride in the last dim (it is updated in place), got strides ",
              y.strides());
  // Only leading dims of size > 1 say where rows are: each must step over whole
  // copies of the next such dim, and the innermost one's stride is the row pitch.
  int64_t ld = y.size(-1);
  int64_t inner_stride = -1, inner_size = 1;
  for (int64_t d = y.dim() - 2; d >= 0; --d) {
    if (y.size(d) <= 1) continue;
    if (inner_stride < 0) {
      ld = y.stride(d);
    } else {
      TORCH_CHECK(y.stride(d) == inner_stride * inner_size,
                  "y: expected leading dims that flatten into rows without a copy (it is updated in place), got shape ",
                  y.sizes(), " and strides ", y.strides());
    }
    inner_stride = y.stride(d);
    inner_size = y.size(d);
  }
  TORCH_CHECK(inner_stride < 0 || ld >= y.size(-1),
              "y: rows overlap (row stride ", ld, " < ", y.size(-1), " columns); it is updated in place");
  return ld;
}

// y [..., N_total] (updated in place), h [slices, M, r_max], lora_b: list of [n, N_s, r_max].
inline ExpandDims check_expand_inputs(const at::Tensor& y, const at::Tensor& h, at::TensorList lora_b,
                                      const at::Tensor& ranks, const at::Tensor& scales,
                                      at::OptionalIntArrayRef slice_offsets) {
  check_float_tensor(y, "y");
  TORCH_CHECK(y.dim() >= 1, "y: expected a tensor of shape [..., out_features], got a 0-D tensor");
  // Each element of y must have one writer (an expanded y would race on CUDA).
  TORCH_CHECK(at::has_internal_overlap(y) != at::MemOverlap::Yes,
              "y: it is updated in place, but some of its elements share memory (an expanded tensor?); "
              "pass a tensor with its own storage per element");
  const MultiLoraPool pool = check_pools(lora_b, "lora_b", y, "y", 1, -1, "");
  check_ranks(ranks, y, "y", pool, "lora_b.shape[2]");
  check_scales(scales, y, "y", pool);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < y.dim(); ++d) M *= y.size(d);
  const int64_t N_total = y.size(-1);
  const int64_t S = static_cast<int64_t>(lora_b.size());

  TORCH_CHECK(h.defined(), "h: expected a tensor, got None");
  const auto acc = multi_lora_acc_dtype(y.scalar_type());
  TORCH_CHECK(h.scalar_type() == acc, "h: expected dtype ", acc, " (the accumulation dtype of y, ", y.scalar_type(),
              "; multi_lora_shrink returns it), got ", h.scalar_type());
  check_same_device(h, "h", y, "y");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == S && h.size(1) == M && h.size(2) == pool.r_max, "h: expected shape [", S,
              ", ", M, ", ", pool.r_max, "] (slices = len(lora_b), tokens of y, r_max), got ", h.sizes());

  ExpandDims d{M, N_total, M > 0 ? row_stride_of(y) : N_total, pool, {}, {}};
  for (int64_t s = 0; s < S; ++s) d.n_out.push_back(lora_b[s].size(1));
  if (slice_offsets.has_value()) {
    TORCH_CHECK(static_cast<int64_t>(slice_offsets->size()) == S, "slice_offsets: expected ", S,
                " offsets (one per pool in lora_b), got ", slice_offsets->size());
    d.col_off.assign(slice_offsets->begin(), slice_offsets->end());
  } else {
    int64_t off = 0;
    for (int64_t s = 0; s < S; ++s) {
      d.col_off.push_back(off);
      off += d.n_out[s];
    }
  }
  // Slices must fit in y and must not overlap: each column of y has one writer.
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(d.col_off[s] >= 0 && d.col_off[s] <= N_total - d.n_out[s], "slice_offsets: slice ", s, " (columns [",
                d.col_off[s], ", ", d.col_off[s] + d.n_out[s], ") for lora_b[", s, "] of shape ", lora_b[s].sizes(),
                ") does not fit in y's ", N_total, " columns");
    if (d.n_out[s] > 0) spans.emplace_back(d.col_off[s], d.col_off[s] + d.n_out[s]);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    TORCH_CHECK(spans[i].first >= spans[i - 1].second, "slice_offsets: slices overlap (columns [", spans[i - 1].first,
                ", ", spans[i - 1].second, ") and [", spans[i].first, ", ", spans[i].second, "))");
  }
  return d;
}

}  // namespace lrk
