// Multi-adapter LoRA on tensor cores for sorted tokens (prefill, SGMV), bf16/fp16.
//
// A block owns a tile of 64 consecutive tokens. It finds the segments that
// overlap its tile (binary search on seg_offsets) and makes one pass per
// segment, each with its own fp32 WMMA accumulators; a pass adds into the output
// only the rows of its own segment, so whatever it computes for the tile's other
// rows (NaN when its adapter holds Inf: 0 * Inf) never reaches them. Warps whose
// 16 rows miss the segment skip its MMAs. With segments longer than a tile almost
// every tile needs one pass, and the adapter's weights are read once per 64
// tokens instead of once per token. Passes skip adapters whose rank does not
// reach the block's rank tile (shrink) and stop the rank loop at r_j (expand):
// cost follows r_j, not r_max.
//
// Shrink: block = (64 tokens, K chunk, slice x rank tile of BR); K is split over
// the grid so that a few hundred blocks run, partial sums meet in the fp32 h
// (zeroed by the caller) through atomicAdd; in deterministic mode each K split
// adds into its own slice of a workspace, summed in a fixed order (common/split_reduce.h).
// Expand: block = (64 tokens, 64 columns, slice); the rank loop runs in steps of
// 32 up to r_j, h is rounded to the input dtype as it is staged and s_j applied
// to the fp32 result (only a factor |s_j| < 1 goes in before rounding): staging
// s_j * h would overflow fp16 (inf, NaN) for |h| > 65504 / s_j, where the row
// kernel and the reference, which keep h in fp32, stay finite.
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "multi_lora/multi_lora_cuda.cuh"
#include "common/dispatch.cuh"
#include "common/split_reduce.h"

namespace lrk::multi_lora {
namespace {

namespace wmma = nvcuda::wmma;
constexpr int kThreads = 128;  // 4 warps, warp w owns tile rows 16w..16w+15
constexpr int kRows = 64;      // tokens per tile

// Stages a ROWS x COLS tile of a row-major matrix (ld elements per row) into
// shared memory dst[ROWS][lds]: global rows row0 + t outside [row_lo, row_hi)
// and columns col0 + c at or beyond col_hi are zero. kVec: 16-byte loads
// (ld % 8 == 0, 16-byte aligned base, col0 % 8 == 0).
template <typename T, int ROWS, int COLS, bool kVec>
__device__ __forceinline__ void stage_tile(T* dst, int lds, const T* __restrict__ src, int64_t ld, int64_t row0,
                                           int64_t row_lo, int64_t row_hi, int64_t col0, int64_t col_hi) {
  static_assert(COLS % 8 == 0, "tile width must be a multiple of 8");
  constexpr int kChunks = COLS / 8;
  for (int slot = threadIdx.x; slot < ROWS * kChunks; slot += kThreads) {
    const int tr = slot / kChunks, tc = (slot % kChunks) * 8;
    const int64_t gr = row0 + tr, gc = col0 + tc;
    uint4 v = make_uint4(0, 0, 0, 0);  // +0 in bf16 and fp16
    if (gr >= row_lo && gr < row_hi && gc < col_hi) {
      const T* p = src + gr * ld + gc;
      if (kVec && gc + 8 <= col_hi) {
        v = __ldg(reinterpret_cast<const uint4*>(p));
      } else {
        T* e = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (gc + q < col_hi) e[q] = p[q];
        }
      }
    }
    *reinterpret_cast<uint4*>(dst + tr * lds + tc) = v;
  }
}

// Calls pass(lo, hi, j, r) for every segment that overlaps the tile [row0, row_end)
// and has an adapter j of rank r > 0, with [lo, hi) clipped to the tile. Every value
// is the same for all threads of the block: the passes and their barriers are uniform.
template <typename Pass>
__device__ __forceinline__ void for_each_tile_segment(const AdapterIndex& index, int64_t M, int64_t row0,
                                                      int64_t row_end, Pass&& pass) {
  int64_t seg_first, seg_last;
  index.segments_overlapping(row0, row_end, seg_first, seg_last);
  for (int64_t seg = seg_first; seg <= seg_last; ++seg) {
    int64_t lo, hi;
    index.segment_range(seg, M, lo, hi);
    lo = lo > row0 ? lo : row0;
    hi = hi < row_end ? hi : row_end;
    if (lo >= hi) continue;
    const int64_t j = index.segment_adapter(seg);
    if (j < 0) continue;
    const int64_t r = index.rank_of(j);
    if (r == 0) continue;
    pass(lo, hi, j, r);
  }
}

// Whether the 16 tile rows of `warp` meet tokens [lo, hi): other warps skip the
// pass's MMAs (warp-uniform, so the collective WMMA calls stay legal).
__device__ __forceinline__ bool warp_meets(int warp, int64_t row0, int64_t lo, int64_t hi) {
  const int64_t w0 = row0 + 16 * warp;
  return w0 < hi && w0 + 16 > lo;
}

using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc[q] += (this warp's 16 rows of `rows`) x (rows 16q..16q+15 of `cols`)^T over BK,
// both staged row-major in shared memory with lds elements per row. Fragments
// from column `live` on are skipped (past the adapter's rank or the output's
// edge: their operand is zero and they are never written).
template <typename T, int NQ, int BK>
__device__ __forceinline__ void mma_step(Accumulator (&acc)[NQ], const T* rows, const T* cols, int lds, int warp,
                                         int64_t live) {
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fr;
    wmma::load_matrix_sync(fr, rows + warp * 16 * lds + kk, lds);
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      if (q * 16 >= live) break;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fc;
      wmma::load_matrix_sync(fc, cols + q * 16 * lds + kk, lds);
      wmma::mma_sync(acc[q], fr, fc, acc[q]);
    }
  }
}

// Shared-memory row pitch (floats) of a pass's kRows x (16 * NQ) result.
template <int NQ>
constexpr int result_ld() {
  return 16 * NQ + 4;
}

// Ends a pass over segment [lo, hi): the accumulators go to shared memory cs
// (kRows x result_ld<NQ>() floats), then write(row, col, value) is called for
// the tokens in [lo, hi) and columns below `cols` only. The pass also computed
// rows of other segments (0 * Inf = NaN when its adapter holds Inf); those are
// dropped here, never added, so one adapter's values cannot reach another's tokens.
template <int NQ, typename Write>
__device__ __forceinline__ void write_segment_rows(float* cs, Accumulator (&acc)[NQ], int64_t row0, int64_t lo,
                                                   int64_t hi, int cols, Write&& write) {
  constexpr int W = 16 * NQ, LDC = result_ld<NQ>();
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + q * 16, acc[q], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  const int first = static_cast<int>(lo - row0), count = static_cast<int>(hi - lo);
  for (int e = threadIdx.x; e < count * W; e += kThreads) {
    const int tr = first + e / W, tc = e % W;
    if (tc < cols) write(row0 + tr, tc, cs[tr * LDC + tc]);
  }
  __syncthreads();  // the next pass overwrites cs
}

template <typename T, int BR, bool kVec>
__global__ void __launch_bounds__(kThreads)
    shrink_tiles_kernel(const T* __restrict__ x, SlicePack<T> a, float* __restrict__ h, int64_t M, int64_t K,
                        int64_t k_chunk, int rank_tiles, AdapterIndex index, int64_t split_stride) {
  constexpr int BK = 32, LDS = BK + 8, NQ = BR / 16;
  LRK_SHARED(32, T, xs, [kRows * LDS]);
  LRK_SHARED(32, T, as, [BR * LDS]);
  LRK_SHARED(32, float, cs, [kRows * result_ld<NQ>()]);
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row_end = M < row0 + kRows ? M : row0 + kRows;
  const int s = blockIdx.z / rank_tiles;
  const int64_t rank0 = int64_t(blockIdx.z % rank_tiles) * BR;
  const int64_t kbeg = int64_t(blockIdx.y) * k_chunk;
  const int64_t kend = K < kbeg + k_chunk ? K : kbeg + k_chunk;
  const int64_t r_max = index.r_max;
  // K-split partials meet in h through atomicAdd, or each adds into its own slice.
  const bool split = gridDim.y > 1 && split_stride == 0;
  float* hs = h + blockIdx.y * split_stride + int64_t(s) * M * r_max;

  for_each_tile_segment(index, M, row0, row_end, [&](int64_t lo, int64_t hi, int64_t j, int64_t r) {
    if (r <= rank0) return;  // this rank tile is past the adapter's rank: h stays 0
    Accumulator acc[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) wmma::fill_fragment(acc[q], 0.f);
    const bool active = warp_meets(warp, row0, lo, hi);
    const T* aj = a.pool[s] + j * r_max * K;
    for (int64_t k = kbeg; k < kend; k += BK) {
      stage_tile<T, kRows, BK, kVec>(xs, LDS, x, K, row0, lo, hi, k, K);
      stage_tile<T, BR, BK, kVec>(as, LDS, aj, K, rank0, 0, r, k, K);
      __syncthreads();
      if (active) mma_step<T, NQ, BK>(acc, xs, as, LDS, warp, r - rank0);
      __syncthreads();
    }
    // Columns at or past r stay 0 in h, as in the reference.
    const int cols = static_cast<int>(r - rank0 < BR ? r - rank0 : BR);
    write_segment_rows<NQ>(cs, acc, row0, lo, hi, cols, [&](int64_t gr, int tc, float v) {
      float* p = hs + gr * r_max + rank0 + tc;
      if (split) {
        atomicAdd(p, v);
      } else {
        *p += v;
      }
    });
  });
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    expand_tiles_kernel(T* __restrict__ y, int64_t ld_y, const float* __restrict__ h, SlicePack<T> b,
                        const float* __restrict__ scales, int64_t M, AdapterIndex index) {
  constexpr int BN = 64, BKr = 32, LDS = BKr + 8, NQ = BN / 16;
  LRK_SHARED(32, T, hsm, [kRows * LDS]);
  LRK_SHARED(32, T, bs, [BN * LDS]);
  LRK_SHARED(32, float, cs, [kRows * result_ld<NQ>()]);
  const int warp = threadIdx.x / 32;
  const int s = blockIdx.z;
  const int64_t N = b.n_out[s];
  const int64_t col0 = int64_t(blockIdx.y) * BN;
  if (col0 >= N) return;  // block-uniform, before any barrier
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row_end = M < row0 + kRows ? M : row0 + kRows;
  const int64_t r_max = index.r_max;
  const float* hsl = h + int64_t(s) * M * r_max;
  T* ys = y + b.col_off[s] + col0;
  const int cols = static_cast<int>(N - col0 < BN ? N - col0 : BN);

  for_each_tile_segment(index, M, row0, row_end, [&](int64_t lo, int64_t hi, int64_t j, int64_t r) {
    Accumulator acc[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) wmma::fill_fragment(acc[q], 0.f);
    const bool active = warp_meets(warp, row0, lo, hi);
    // s_j = staged * applied: the staged values never exceed |h| nor |s_j * h|.
    const float scale = scales[j];
    const bool shrinks = fabsf(scale) < 1.f;
    const float staged = shrinks ? scale : 1.f, applied = shrinks ? 1.f : scale;
    const T* bj = b.pool[s] + j * N * r_max;
    for (int64_t k0 = 0; k0 < r; k0 += BKr) {
      // staged * h rounded to T; zero outside the segment and past r.
      for (int e = threadIdx.x; e < kRows * BKr; e += kThreads) {
        const int tr = e / BKr, tc = e % BKr;
        const int64_t gr = row0 + tr, gk = k0 + tc;
        const float v = (gr >= lo && gr < hi && gk < r) ? staged * hsl[gr * r_max + gk] : 0.f;
        hsm[tr * LDS + tc] = cuda::from_float<T>(v);
      }
      stage_tile<T, BN, BKr, kVec>(bs, LDS, bj, r_max, col0, 0, N, k0, r);
      __syncthreads();
      if (active) mma_step<T, NQ, BKr>(acc, hsm, bs, LDS, warp, cols);
      __syncthreads();
    }
    // One writer per element of y: the block owns these columns and each token is in one segment.
    write_segment_rows<NQ>(cs, acc, row0, lo, hi, cols, [&](int64_t gr, int tc, float v) {
      T* p = ys + gr * ld_y + tc;
      *p = cuda::from_float<T>(cuda::to_float(*p) + applied * v);
    });
  });
}

unsigned grid_dim(int64_t v, int64_t limit, const char* what) {
  TORCH_CHECK(v <= limit, "multi_lora: ", what, " (", v, ") exceeds the CUDA grid limit ", limit);
  return static_cast<unsigned>(v);
}

}  // namespace

void launch_shrink_tiles(const ShrinkLaunch& p, at::ScalarType dtype) {
  if (p.M == 0 || p.K == 0 || p.num_slices == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(dtype, "multi_lora tiles", [&](auto tag) {
    using T = decltype(tag);
    SlicePack<T> pack{};
    bool vec = p.K % 8 == 0 && cuda::aligned16(p.x);
    for (int s = 0; s < p.num_slices; ++s) {
      pack.pool[s] = static_cast<const T*>(p.pools[s]);
      vec = vec && cuda::aligned16(p.pools[s]);
    }
    cuda::with_rank_tile(p.index.r_max, [&](auto br) {
      constexpr int BR = decltype(br)::value;
      const int64_t row_tiles = cuda::ceil_div(p.M, kRows);
      const int64_t rank_tiles = cuda::ceil_div(p.index.r_max, BR);
      const int64_t gz = rank_tiles * p.num_slices;
      // Split K so that about four blocks per multiprocessor run.
      const int64_t steps = cuda::ceil_div(p.K, 32);
      const int64_t splits =
          std::clamp<int64_t>(cuda::ceil_div(4LL * cuda::sm_count(), row_tiles * gz), 1, std::min<int64_t>(steps, 65535));
      const int64_t chunk = cuda::ceil_div(steps, splits) * 32;
      const dim3 grid(grid_dim(row_tiles, 0x7fffffff, "token tiles"),
                      grid_dim(cuda::ceil_div(p.K, chunk), 65535, "K splits"), grid_dim(gz, 65535, "slices x rank tiles"));
      // This pack's slices of h: [num_slices, M, r_max] float32, contiguous.
      const at::Tensor h = at::from_blob(p.h, {int64_t(p.num_slices) * p.M * p.index.r_max},
                                         at::TensorOptions().dtype(at::kFloat).device(cuda::kernel_device()));
      cuda::with_bool(vec, [&](auto v) {
        reduce_splits_into(h, grid.y, [&](float* dst, int64_t split_stride) {
          cuda::launch(shrink_tiles_kernel<T, BR, decltype(v)::value>, grid, kThreads, 0, stream,
              static_cast<const T*>(p.x), pack, dst, p.M, p.K, chunk, static_cast<int>(rank_tiles), p.index,
              split_stride);
        });
      });
    });
  });
}

void launch_expand_tiles(const ExpandLaunch& p, at::ScalarType dtype) {
  if (p.M == 0 || p.num_slices == 0) return;
  int64_t n_max = 0;
  for (int s = 0; s < p.num_slices; ++s) n_max = std::max(n_max, p.n_out[s]);
  if (n_max == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(dtype, "multi_lora tiles", [&](auto tag) {
    using T = decltype(tag);
    SlicePack<T> pack{};
    bool vec = p.index.r_max % 8 == 0;
    for (int s = 0; s < p.num_slices; ++s) {
      pack.pool[s] = static_cast<const T*>(p.pools[s]);
      pack.n_out[s] = p.n_out[s];
      pack.col_off[s] = p.col_off[s];
      vec = vec && cuda::aligned16(p.pools[s]);
    }
    const dim3 grid(grid_dim(cuda::ceil_div(p.M, kRows), 0x7fffffff, "token tiles"),
                    grid_dim(cuda::ceil_div(n_max, 64), 65535, "out_features / 64"),
                    static_cast<unsigned>(p.num_slices));
    cuda::with_bool(vec, [&](auto v) {
      cuda::launch(expand_tiles_kernel<T, decltype(v)::value>, grid, kThreads, 0, stream,
          static_cast<T*>(p.y), p.ld_y, static_cast<const float*>(p.h), pack, p.scales, p.M, p.index);
    });
  });
}

}  // namespace lrk::multi_lora
