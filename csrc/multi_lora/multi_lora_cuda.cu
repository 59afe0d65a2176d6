// CUDA entry points of the multi-adapter LoRA ops: validation (dtypes, devices,
// shapes; never the device values, see multi_lora_checks.h), then the launch.
//
// Kernel choice depends on shapes only, so it is the same at every replay of a
// CUDA graph and under torch.compile:
//   per-token ids                          -> one token per block (multi_lora_rows.cu)
//   segments, bf16/fp16, >= 16 tokens per
//   segment on average                     -> 64-token tensor-core tiles (multi_lora_tiles.cu)
//   other segments                         -> one token per block, segment found by binary search
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "multi_lora/multi_lora_checks.h"
#include "multi_lora/multi_lora_cuda.cuh"

namespace lrk {
namespace {

using multi_lora::AdapterIndex;
using multi_lora::kMaxSlices;

// Average segment length from which the tile kernels beat one token per block.
constexpr int64_t kTileMinTokensPerSegment = 16;

struct IndexTensors {
  at::Tensor ranks, ids, seg_offsets, seg_adapters;  // contiguous copies, alive until the launches are queued
  AdapterIndex index;
};

IndexTensors per_token_index(const at::Tensor& ranks, const at::Tensor& adapter_ids, const MultiLoraPool& pool) {
  IndexTensors t;
  t.ranks = ranks.contiguous();
  t.ids = adapter_ids.contiguous();
  t.index.ranks = t.ranks.const_data_ptr();
  t.index.ranks64 = t.ranks.scalar_type() == at::kLong;
  t.index.ids = t.ids.const_data_ptr();
  t.index.ids64 = t.ids.scalar_type() == at::kLong;
  t.index.num_segments = -1;
  t.index.n = pool.n;
  t.index.r_max = pool.r_max;
  return t;
}

IndexTensors segment_index(const at::Tensor& ranks, const at::Tensor& seg_offsets, const at::Tensor& seg_adapters,
                           const MultiLoraPool& pool) {
  IndexTensors t;
  t.ranks = ranks.contiguous();
  t.seg_offsets = seg_offsets.contiguous();
  t.seg_adapters = seg_adapters.contiguous();
  t.index.ranks = t.ranks.const_data_ptr();
  t.index.ranks64 = t.ranks.scalar_type() == at::kLong;
  t.index.seg_offsets = t.seg_offsets.const_data_ptr();
  t.index.offsets64 = t.seg_offsets.scalar_type() == at::kLong;
  t.index.seg_adapters = t.seg_adapters.const_data_ptr();
  t.index.seg_adapters64 = t.seg_adapters.scalar_type() == at::kLong;
  t.index.num_segments = seg_adapters.size(0);
  t.index.n = pool.n;
  t.index.r_max = pool.r_max;
  return t;
}

bool use_tiles(at::ScalarType dtype, int64_t M, int64_t num_segments) {
  return is_half_precision(dtype) && M >= kTileMinTokensPerSegment * num_segments;
}

at::Tensor shrink_cuda(const at::Tensor& x, at::TensorList lora_a, const ShrinkDims& d, const IndexTensors& idx,
                       bool tiles) {
  const auto acc = multi_lora_acc_dtype(x.scalar_type());
  // The row kernels write every element of h; the tile kernels add into it.
  at::Tensor h = tiles ? at::zeros({d.slices, d.M, d.pool.r_max}, x.options().dtype(acc))
                       : at::empty({d.slices, d.M, d.pool.r_max}, x.options().dtype(acc));
  if (d.M == 0) return h;
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  for (int64_t s0 = 0; s0 < d.slices; s0 += kMaxSlices) {
    multi_lora::ShrinkLaunch p{};
    p.x = x2.const_data_ptr();
    p.h = h.select(0, s0).data_ptr();
    p.num_slices = static_cast<int>(std::min<int64_t>(kMaxSlices, d.slices - s0));
    for (int s = 0; s < p.num_slices; ++s) p.pools[s] = lora_a[s0 + s].const_data_ptr();
    p.M = d.M;
    p.K = d.K;
    p.index = idx.index;
    if (tiles) {
      multi_lora::launch_shrink_tiles(p, x.scalar_type());
    } else {
      multi_lora::launch_shrink_rows(p, x.scalar_type());
    }
  }
  return h;
}

void expand_cuda(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b, const at::Tensor& scales,
                 const ExpandDims& d, const IndexTensors& idx, bool tiles) {
  if (d.M == 0) return;
  const at::Tensor hc = h.contiguous();
  const at::Tensor sc = scales.contiguous();
  const int64_t S = static_cast<int64_t>(lora_b.size());
  for (int64_t s0 = 0; s0 < S; s0 += kMaxSlices) {
    multi_lora::ExpandLaunch p{};
    p.y = y.data_ptr();
    p.ld_y = d.ld_y;
    p.h = hc.select(0, s0).const_data_ptr();
    p.num_slices = static_cast<int>(std::min<int64_t>(kMaxSlices, S - s0));
    for (int s = 0; s < p.num_slices; ++s) {
      p.pools[s] = lora_b[s0 + s].const_data_ptr();
      p.n_out[s] = d.n_out[s0 + s];
      p.col_off[s] = d.col_off[s0 + s];
    }
    p.scales = sc.const_data_ptr<float>();
    p.M = d.M;
    p.index = idx.index;
    if (tiles) {
      multi_lora::launch_expand_tiles(p, y.scalar_type());
    } else {
      multi_lora::launch_expand_rows(p, y.scalar_type());
    }
  }
}

at::Tensor multi_lora_shrink_cuda(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks,
                                  const at::Tensor& adapter_ids) {
  const ShrinkDims d = check_shrink_inputs(x, lora_a, ranks);
  check_adapter_ids(adapter_ids, x, "x", d.M, d.pool);
  const c10::cuda::CUDAGuard guard(x.device());
  return shrink_cuda(x, lora_a, d, per_token_index(ranks, adapter_ids, d.pool), false);
}

at::Tensor multi_lora_shrink_segments_cuda(const at::Tensor& x, at::TensorList lora_a, const at::Tensor& ranks,
                                           const at::Tensor& seg_offsets, const at::Tensor& seg_adapters) {
  const ShrinkDims d = check_shrink_inputs(x, lora_a, ranks);
  check_segments(seg_offsets, seg_adapters, x, "x", d.M, d.pool);
  const c10::cuda::CUDAGuard guard(x.device());
  return shrink_cuda(x, lora_a, d, segment_index(ranks, seg_offsets, seg_adapters, d.pool),
                     use_tiles(x.scalar_type(), d.M, seg_adapters.size(0)));
}

void multi_lora_expand_cuda(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b, const at::Tensor& ranks,
                            const at::Tensor& scales, const at::Tensor& adapter_ids,
                            at::OptionalIntArrayRef slice_offsets) {
  const ExpandDims d = check_expand_inputs(y, h, lora_b, ranks, scales, slice_offsets);
  check_adapter_ids(adapter_ids, y, "y", d.M, d.pool);
  const c10::cuda::CUDAGuard guard(y.device());
  expand_cuda(y, h, lora_b, scales, d, per_token_index(ranks, adapter_ids, d.pool), false);
}

void multi_lora_expand_segments_cuda(at::Tensor& y, const at::Tensor& h, at::TensorList lora_b,
                                     const at::Tensor& ranks, const at::Tensor& scales,
                                     const at::Tensor& seg_offsets, const at::Tensor& seg_adapters,
                                     at::OptionalIntArrayRef slice_offsets) {
  const ExpandDims d = check_expand_inputs(y, h, lora_b, ranks, scales, slice_offsets);
  check_segments(seg_offsets, seg_adapters, y, "y", d.M, d.pool);
  const c10::cuda::CUDAGuard guard(y.device());
  expand_cuda(y, h, lora_b, scales, d, segment_index(ranks, seg_offsets, seg_adapters, d.pool),
              use_tiles(y.scalar_type(), d.M, seg_adapters.size(0)));
}

}  // namespace

LRK_CUDA_KERNELS(m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cuda);
  m.impl("multi_lora_shrink_segments", &multi_lora_shrink_segments_cuda);
  m.impl("multi_lora_expand", &multi_lora_expand_cuda);
  m.impl("multi_lora_expand_segments", &multi_lora_expand_segments_cuda);
}

}  // namespace lrk
