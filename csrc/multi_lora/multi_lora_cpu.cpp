// CPU kernels of the multi-adapter LoRA ops: the reference that runs everywhere.
// Tokens are grouped by adapter (index tensors are on the CPU here, so their
// values are read and validated), then each group is one small product with the
// first r_j rows / columns of its adapter: an adapter of rank r costs r.
// Half-precision inputs are computed in float32 and y is rounded once, as on CUDA.
#include <torch/library.h>

#include "multi_lora/multi_lora_checks.h"

namespace lrk {
namespace {

// Tokens that use one adapter: a range [lo, hi) or a list of rows.
struct RowGroup {
  int64_t adapter;
  int64_t lo = 0, hi = 0;
  at::Tensor rows;  // defined: gather these rows instead of the range
};

std::vector<RowGroup> groups_from_ids(const at::Tensor& adapter_ids, int64_t n) {
  const std::vector<int64_t> ids = index_values(adapter_ids);
  std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(n));
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] >= 0) rows_of[ids[i]].push_back(static_cast<int64_t>(i));
  }
  std::vector<RowGroup> groups;
  for (int64_t j = 0; j < n; ++j) {
    if (rows_of[j].empty()) continue;
    RowGroup g{j};
    g.rows = at::tensor(rows_of[j], at::kLong);
    groups.push_back(std::move(g));
  }
  return groups;
}

std::vector<RowGroup> groups_from_segments(const at::Tensor& seg_offsets, const at::Tensor& seg_adapters) {
  const std::vector<int64_t> off = index_values(seg_offsets);
  const std::vector<int64_t> ad = index_values(seg_adapters);
  std::vector<RowGroup> groups;
  for (size_t s = 0; s < ad.size(); ++s) {
    if (ad[s] >= 0 && off[s + 1] > off[s]) groups.push_back(RowGroup{ad[s], off[s], off[s + 1], {}});
  }
  return groups;
}

at::Tensor read_rows(const at::Tensor& t, const RowGroup& g) {
  return g.rows.defined() ? t.index_select(0, g.rows) : t.narrow(0, g.lo, g.hi - g.lo);
}

void write_rows(const at::Tensor& t, const RowGroup& g, const at::Tensor& v) {
  if (g.rows.defined()) {
    t.index_copy_(0, g.rows, v);
  } else {
    t.narrow(0, g.lo, g.hi - g.lo).copy_(v);
  }
}

at::Tensor shrink_groups(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks, const ShrinkDims& d,
                         const std::vector<RowGroup>& groups) {
  const auto acc = multi_lora_acc_dtype(x.scalar_type());
  at::Tensor h = at::zeros({d.slices, d.M, d.pool.r_max}, x.options().dtype(acc));
  if (d.M == 0) return h;
  const at::Tensor x2 = x.reshape({d.M, d.K});
  const std::vector<int64_t> rank = index_values(ranks);
  for (const RowGroup& g : groups) {
    const int64_t r = rank[g.adapter];
    if (r == 0) continue;
    const at::Tensor xg = read_rows(x2, g).to(acc);
    for (int64_t s = 0; s < d.slices; ++s) {
      const at::Tensor a = lora_a[s][g.adapter].narrow(0, 0, r).to(acc);  // [r, K]
      write_rows(h[s].narrow(1, 0, r), g, at::mm(xg, a.t()));
    }
  }
  return h;
}

void expand_groups(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b, const at::Tensor& ranks,
                   const at::Tensor& scales, const ExpandDims& d, const std::vector<RowGroup>& groups) {
  if (d.M == 0) return;
  const auto acc = multi_lora_acc_dtype(y.scalar_type());
  const at::Tensor y2 = y.as_strided({d.M, d.N_total}, {d.ld_y, 1}, y.storage_offset());
  const std::vector<int64_t> rank = index_values(ranks);
  const at::Tensor scale_values = scales.contiguous();
  const float* scale = scale_values.const_data_ptr<float>();
  for (const RowGroup& g : groups) {
    const int64_t r = rank[g.adapter];
    if (r == 0) continue;
    for (size_t s = 0; s < lora_b.size(); ++s) {
      if (d.n_out[s] == 0) continue;
      const at::Tensor ys = y2.narrow(1, d.col_off[s], d.n_out[s]);
      const at::Tensor b = lora_b[s][g.adapter].narrow(1, 0, r).to(acc);  // [N_s, r]
      const at::Tensor hg = read_rows(h[s], g).narrow(1, 0, r);
      at::Tensor out = read_rows(ys, g).to(acc);
      out.addmm_(hg, b.t(), /*beta=*/1.0, /*alpha=*/static_cast<double>(scale[g.adapter]));
      write_rows(ys, g, out.to(y.scalar_type()));
    }
  }
}

at::Tensor multi_lora_shrink_cpu(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks,
                                 const at::Tensor& adapter_ids) {
  const ShrinkDims d = check_shrink_inputs(x, lora_a, ranks);
  check_adapter_ids(adapter_ids, x, "x", d.M, d.pool);
  return shrink_groups(x, lora_a, ranks, d, groups_from_ids(adapter_ids, d.pool.n));
}

at::Tensor multi_lora_shrink_segments_cpu(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks,
                                          const at::Tensor& seg_offsets, const at::Tensor& seg_adapters) {
  const ShrinkDims d = check_shrink_inputs(x, lora_a, ranks);
  check_segments(seg_offsets, seg_adapters, x, "x", d.M, d.pool);
  return shrink_groups(x, lora_a, ranks, d, groups_from_segments(seg_offsets, seg_adapters));
}

void multi_lora_expand_cpu(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b, const at::Tensor& ranks,
                           const at::Tensor& scales, const at::Tensor& adapter_ids,
                           at::OptionalIntArrayRef slice_offsets) {
  const ExpandDims d = check_expand_inputs(y, h, lora_b, ranks, scales, slice_offsets);
  check_adapter_ids(adapter_ids, y, "y", d.M, d.pool);
  expand_groups(y, h, lora_b, ranks, scales, d, groups_from_ids(adapter_ids, d.pool.n));
}

void multi_lora_expand_segments_cpu(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b,
                                    const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& seg_offsets,
                                    const at::Tensor& seg_adapters, at::OptionalIntArrayRef slice_offsets) {
  const ExpandDims d = check_expand_inputs(y, h, lora_b, ranks, scales, slice_offsets);
  check_segments(seg_offsets, seg_adapters, y, "y", d.M, d.pool);
  expand_groups(y, h, lora_b, ranks, scales, d, groups_from_segments(seg_offsets, seg_adapters));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cpu);
  m.impl("multi_lora_shrink_segments", &multi_lora_shrink_segments_cpu);
  m.impl("multi_lora_expand", &multi_lora_expand_cpu);
  m.impl("multi_lora_expand_segments", &multi_lora_expand_segments_cpu);
}

}  // namespace lrk
