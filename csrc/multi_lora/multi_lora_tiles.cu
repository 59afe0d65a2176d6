// Multi-adapter LoRA on tensor cores for sorted tokens (prefill, SGMV), bf16/fp16.
//
// A block owns a tile of 64 consecutive tokens. It finds the segments that
// overlap its tile (binary search on seg_offsets) and makes one pass per
// segment: the operand rows outside that segment are loaded as zeros, so every
// pass adds into the same fp32 WMMA accumulators and the output tile is written
// once at the end. With segments longer than a tile almost every tile needs one
// pass, and the adapter's weights are read once per 64 tokens instead of once
// per token. Passes skip adapters whose rank does not reach the block's rank
// tile (shrink) and stop the rank loop at r_j (expand): cost follows r_j, not r_max.
//
// Shrink: block = (64 tokens, K chunk, slice x rank tile of BR); K is split over
// the grid so that a few hundred blocks run, partial sums meet in the fp32 h
// (zeroed by the caller) through atomicAdd.
// Expand: block = (64 tokens, 64 columns, slice); the rank loop runs in steps of
// 32 up to r_j, h is scaled by s_j and rounded to the input dtype as it is staged.
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "multi_lora/multi_lora_cuda.cuh"
#include "common/dispatch.cuh"

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

template <typename T, int BR, bool kVec>
__global__ void __launch_bounds__(kThreads)
    shrink_tiles_kernel(const T* __restrict__ x, SlicePack<T> a, float* __restrict__ h, int64_t M, int64_t K,
                        int64_t k_chunk, int rank_tiles, AdapterIndex index) {
  constexpr int BK = 32, LDS = BK + 8, LDC = BR + 4;
  __shared__ __align__(32) T xs[kRows * LDS];
  __shared__ __align__(32) T as[BR * LDS];
  __shared__ __align__(32) float cs[kRows * LDC];
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row_end = M < row0 + kRows ? M : row0 + kRows;
  const int s = blockIdx.z / rank_tiles;
  const int64_t rank0 = int64_t(blockIdx.z % rank_tiles) * BR;
  const int64_t kbeg = int64_t(blockIdx.y) * k_chunk;
  const int64_t kend = K < kbeg + k_chunk ? K : kbeg + k_chunk;
  const int64_t r_max = index.r_max;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BR / 16];
#pragma unroll
  for (int q = 0; q < BR / 16; ++q) wmma::fill_fragment(acc[q], 0.f);

  // Every value below is the same for all threads: the loops and barriers are uniform.
  bool any = false;
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
    if (r <= rank0) continue;  // this rank tile is past the adapter's rank
    any = true;
    const T* aj = a.pool[s] + j * r_max * K;
    for (int64_t k = kbeg; k < kend; k += BK) {
      stage_tile<T, kRows, BK, kVec>(xs, LDS, x, K, row0, lo, hi, k, K);
      stage_tile<T, BR, BK, kVec>(as, LDS, aj, K, rank0, 0, r, k, K);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fx;
        wmma::load_matrix_sync(fx, xs + warp * 16 * LDS + kk, LDS);
#pragma unroll
        for (int q = 0; q < BR / 16; ++q) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fa;  // A^T: [k][rank]
          wmma::load_matrix_sync(fa, as + q * 16 * LDS + kk, LDS);
          wmma::mma_sync(acc[q], fx, fa, acc[q]);
        }
      }
      __syncthreads();
    }
  }
  if (!any) return;  // h is already zero here
#pragma unroll
  for (int q = 0; q < BR / 16; ++q) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + q * 16, acc[q], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  const bool split = gridDim.y > 1;
  float* hs = h + int64_t(s) * M * r_max;
  for (int e = threadIdx.x; e < kRows * BR; e += kThreads) {
    const int64_t gr = row0 + e / BR, gk = rank0 + e % BR;
    if (gr >= row_end || gk >= r_max) continue;
    const float v = cs[(e / BR) * LDC + e % BR];
    if (split) {
      atomicAdd(hs + gr * r_max + gk, v);
    } else {
      hs[gr * r_max + gk] += v;
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    expand_tiles_kernel(T* __restrict__ y, int64_t ld_y, const float* __restrict__ h, SlicePack<T> b,
                        const float* __restrict__ scales, int64_t M, AdapterIndex index) {
  constexpr int BN = 64, BKr = 32, LDS = BKr + 8, LDC = BN + 4;
  __shared__ __align__(32) T hs[kRows * LDS];
  __shared__ __align__(32) T bs[BN * LDS];
  __shared__ __align__(32) float cs[kRows * LDC];
  const int warp = threadIdx.x / 32;
  const int s = blockIdx.z;
  const int64_t N = b.n_out[s];
  const int64_t col0 = int64_t(blockIdx.y) * BN;
  if (col0 >= N) return;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row_end = M < row0 + kRows ? M : row0 + kRows;
  const int64_t r_max = index.r_max;
  const float* hsl = h + int64_t(s) * M * r_max;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
  for (int q = 0; q < BN / 16; ++q) wmma::fill_fragment(acc[q], 0.f);

  bool any = false;
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
    any = true;
    const float scale = scales[j];
    const T* bj = b.pool[s] + j * N * r_max;
    for (int64_t k0 = 0; k0 < r; k0 += BKr) {
      for (int e = threadIdx.x; e < kRows * BKr; e += kThreads) {
        const int tr = e / BKr, tc = e % BKr;
        const int64_t gr = row0 + tr, gk = k0 + tc;
        const float v = (gr >= lo && gr < hi && gk < r) ? scale * hsl[gr * r_max + gk] : 0.f;
        hs[tr * LDS + tc] = cuda::from_float<T>(v);
      }
      stage_tile<T, BN, BKr, kVec>(bs, LDS, bj, r_max, col0, 0, N, k0, r);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BKr; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fh;
        wmma::load_matrix_sync(fh, hs + warp * 16 * LDS + kk, LDS);
#pragma unroll
        for (int q = 0; q < BN / 16; ++q) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B_j^T: [rank][col]
          wmma::load_matrix_sync(fb, bs + q * 16 * LDS + kk, LDS);
          wmma::mma_sync(acc[q], fh, fb, acc[q]);
        }
      }
      __syncthreads();
    }
  }
  if (!any) return;  // y unchanged
#pragma unroll
  for (int q = 0; q < BN / 16; ++q) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + q * 16, acc[q], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  T* ys = y + b.col_off[s];
  for (int e = threadIdx.x; e < kRows * BN; e += kThreads) {
    const int64_t gr = row0 + e / BN, gc = col0 + e % BN;
    if (gr >= row_end || gc >= N) continue;
    T* p = ys + gr * ld_y + gc;
    *p = cuda::from_float<T>(cuda::to_float(*p) + cs[(e / BN) * LDC + e % BN]);
  }
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
      cuda::with_bool(vec, [&](auto v) {
        shrink_tiles_kernel<T, BR, decltype(v)::value><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(p.x), pack, static_cast<float*>(p.h), p.M, p.K, chunk,
            static_cast<int>(rank_tiles), p.index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      expand_tiles_kernel<T, decltype(v)::value><<<grid, kThreads, 0, stream>>>(
          static_cast<T*>(p.y), p.ld_y, static_cast<const float*>(p.h), pack, p.scales, p.M, p.index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace lrk::multi_lora
