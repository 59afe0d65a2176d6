// WMMA kernels for skinny products (see skinny_gemm.h). Portable across sm_80+.
// Both kernels stream the long operand X once, tile by tile, through shared
// memory with a one-tile register prefetch, and split the reduction over the
// grid so that a few hundred blocks keep memory busy; partial sums meet in the
// fp32 output through atomicAdd, or, under torch.use_deterministic_algorithms, in
// per-split slices of a workspace summed in a fixed order (common/split_reduce.h).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/skinny_gemm.h"
#include "common/split_reduce.h"

namespace lrk {
namespace {

namespace wmma = nvcuda::wmma;
constexpr int kThreads = 128;  // 4 warps

struct DeviceDropout {
  uint64_t seed;
  uint32_t threshold;  // 0: off
};

// Loads a ROWS x COLS tile of a row-major [nrows, ncols] matrix into registers
// (8 elements per slot), zero-filling outside the matrix and zeroing the elements
// that dropout drops (by logical index); then stores it into shared memory
// [ROWS][ld]. The 1 / (1 - p) factor is applied to the fp32 result instead, so
// that kept elements enter the tensor cores unrounded.
// kVec: ncols % 8 == 0 and a 16-byte aligned base, so each slot is one 16-byte load.
template <typename T, int ROWS, int COLS, bool kVec>
struct TileLoader {
  static_assert(COLS % 8 == 0, "tile width must be a multiple of 8");
  static constexpr int kSlots = ROWS * COLS / 8;
  static constexpr int kPerThread = (kSlots + kThreads - 1) / kThreads;
  uint4 regs[kPerThread];

  __device__ __forceinline__ void load(const T* __restrict__ src, int64_t nrows, int64_t ncols, int64_t row0,
                                       int64_t col0, const DeviceDropout& drop) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int slot = threadIdx.x + i * kThreads;
      T* v = reinterpret_cast<T*>(&regs[i]);
      regs[i] = make_uint4(0, 0, 0, 0);
      if (kSlots % kThreads != 0 && slot >= kSlots) continue;
      const int64_t gr = row0 + slot / (COLS / 8);
      const int64_t gc = col0 + (slot % (COLS / 8)) * 8;
      if (gr >= nrows) continue;
      const int64_t e0 = gr * ncols + gc;  // logical index of the first element
      if constexpr (kVec) {
        if (gc >= ncols) continue;
        regs[i] = *reinterpret_cast<const uint4*>(src + e0);
        if (drop.threshold != 0) {
          const Philox4 lo = philox4x32_10(static_cast<uint64_t>(e0) >> 2, drop.seed);
          const Philox4 hi = philox4x32_10((static_cast<uint64_t>(e0) >> 2) + 1, drop.seed);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const uint32_t word = j < 4 ? lo.v[j] : hi.v[j - 4];
            if (word < drop.threshold) v[j] = cuda::from_float<T>(0.f);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (gc + j < ncols) {
            const bool keep = drop.threshold == 0 || dropout_keep(static_cast<uint64_t>(e0 + j), drop.seed, drop.threshold);
            v[j] = keep ? src[e0 + j] : cuda::from_float<T>(0.f);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* smem, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int slot = threadIdx.x + i * kThreads;
      if (kSlots % kThreads != 0 && slot >= kSlots) continue;
      *reinterpret_cast<uint4*>(smem + (slot / (COLS / 8)) * ld + (slot % (COLS / 8)) * 8) = regs[i];
    }
  }
};

__device__ __forceinline__ void accumulate(float* out, float v, bool atomic) {
  if (atomic) {
    atomicAdd(out, v);
  } else {
    *out += v;
  }
}

// out[M, R] += alpha * dropout(X)[M, K] @ Bop[R, K]^T. Block: 64 rows x BR ranks,
// a K range of k_chunk (a multiple of 32); warp w owns rows 16w..16w+15.
// split_stride 0: the K splits add into out atomically; else split y adds into
// out + y * split_stride alone (deterministic mode, see split_reduce.h).
template <typename T, int BR, bool kVec>
__global__ void __launch_bounds__(kThreads) skinny_rows_kernel(const T* __restrict__ X, const T* __restrict__ Bop,
                                                              float* __restrict__ out, int64_t M, int64_t K,
                                                              int64_t R, int64_t k_chunk, float alpha,
                                                              DeviceDropout drop, int64_t split_stride) {
  constexpr int BM = 64, BK = 32, LDS = BK + 8, LDC = BR + 4;
  LRK_SHARED(32, T, xs, [BM * LDS]);
  LRK_SHARED(32, T, bs, [BR * LDS]);
  LRK_SHARED(32, float, cs, [BM * LDC]);
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int64_t rank0 = int64_t(blockIdx.z) * BR;
  const int64_t kbeg = int64_t(blockIdx.y) * k_chunk;
  const int64_t kend = std::min<int64_t>(K, kbeg + k_chunk);
  const DeviceDropout no_drop{0, 0};

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BR / 16];
#pragma unroll
  for (int j = 0; j < BR / 16; ++j) wmma::fill_fragment(acc[j], 0.f);

  TileLoader<T, BM, BK, kVec> xl;
  TileLoader<T, BR, BK, kVec> bl;
  if (kbeg < kend) {
    xl.load(X, M, K, row0, kbeg, drop);
    bl.load(Bop, R, K, rank0, kbeg, no_drop);
  }
  for (int64_t k = kbeg; k < kend; k += BK) {
    xl.store(xs, LDS);
    bl.store(bs, LDS);
    __syncthreads();
    if (k + BK < kend) {  // next tile in flight during the math
      xl.load(X, M, K, row0, k + BK, drop);
      bl.load(Bop, R, K, rank0, k + BK, no_drop);
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + warp * 16 * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < BR / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, bs + j * 16 * LDS + kk, LDS);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < BR / 16; ++j) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + j * 16, acc[j], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  const bool atomic = gridDim.y > 1 && split_stride == 0;
  out += blockIdx.y * split_stride;
  for (int i = threadIdx.x; i < BM * BR; i += kThreads) {
    const int64_t gr = row0 + i / BR, gc = rank0 + i % BR;
    if (gr < M && gc < R) accumulate(out + gr * R + gc, alpha * cs[(i / BR) * LDC + i % BR], atomic);
  }
}

// out[R, K] += alpha * D[M, R]^T @ dropout(X)[M, K]. Block: BR ranks x 128
// columns, an M range of m_chunk (a multiple of 32); warp w owns columns 32w..32w+31.
// kAlsoRows: the same pass over X also adds rows_out[M, R] += alpha * X @ Bop
// (Bop [K, R], the block's 128 rows of it held in shared memory), so that
// LoRA's backward gets dh = s*dy@B and dB^T = s*h^T@dy from one read of dy.
// split_stride: as in skinny_rows_kernel, for out's M splits (rows_out is always
// added atomically; deterministic mode does not use kAlsoRows).
//
// Ranks past 64 take one block per 64-rank tile (grid.y), each streaming the same
// X columns, so r = 128 streams dy twice and r = 256 four times. One block over all
// r ranks would stream it once, but costs more than it saves (bf16, M = 8192,
// K = 4096: dy is 64 MiB; benchmarks/RESULTS.md, 2026-12-07):
//  - out's accumulators live across the whole M loop: r x 128 fp32 per block, i.e.
//    128 (r = 128) or 256 (r = 256) registers per thread of 128 before any other
//    value: r = 256 is past the 255-register limit (spills); r = 128 allows at most 3
//    blocks per SM (65536 registers; 4 blocks would leave none for anything else).
//  - shared memory (ds, xs, Bop's 128 x (r+8) slice, ps; then cs, r x 132 fp32):
//    74.5 KiB (r = 128) or 148.5 KiB (r = 256) against 39.5 KiB at BR = 64, past the
//    48 KiB static limit; 2 (A100) or 3 (H100) blocks per SM at r = 128, 1 at r = 256.
//  - narrowing the 128 columns instead, so that the accumulators fit, multiplies the
//    traffic that scales with the column-block count K / 128: reading D
//    (K/128 * M * r * 2 B: 64 MiB at r = 128) and adding rows_out (K/128 * M * r * 4 B:
//    128 MiB). r = 128 with 64 columns saves one 64 MiB pass over dy and adds
//    64 + 128 MiB; r = 256 with 32 columns saves 192 MiB and adds 384 + 768 MiB.
// The rank-tile blocks of one (column block, M range) are launched K / 128 blocks
// apart, usually in the same wave, so their repeated dy reads can come from L2.
template <typename T, int BR, bool kVec, bool kAlsoRows>
__global__ void __launch_bounds__(kThreads) skinny_cols_kernel(const T* __restrict__ D, const T* __restrict__ X,
                                                              const T* __restrict__ Bop, float* __restrict__ out,
                                                              float* __restrict__ rows_out, int64_t M, int64_t K,
                                                              int64_t R, int64_t m_chunk, float alpha,
                                                              DeviceDropout drop, int64_t split_stride) {
  constexpr int BMc = 32, BKc = 128, LDX = BKc + 8, LDD = BR + 8, LDC = BKc + 4, LDB = BR + 8, LDP = BR + 4;
  // Shared memory: ds | xs | bs | ps while streaming; the final fp32 tile cs
  // reuses the space from xs on (every region is a multiple of 32 bytes).
  constexpr int kDsBytes = BMc * LDD * sizeof(T), kXsBytes = BMc * LDX * sizeof(T);
  constexpr int kBsBytes = kAlsoRows ? BKc * LDB * sizeof(T) : 0, kPsBytes = kAlsoRows ? BMc * LDP * 4 : 0;
  constexpr int kStreamBytes = kXsBytes + kBsBytes + kPsBytes, kCsBytes = BR * LDC * 4;
  LRK_SHARED(128, unsigned char, smem, [kDsBytes + (kStreamBytes > kCsBytes ? kStreamBytes : kCsBytes)]);
  T* ds = reinterpret_cast<T*>(smem);
  T* xs = reinterpret_cast<T*>(smem + kDsBytes);
  T* bs = reinterpret_cast<T*>(smem + kDsBytes + kXsBytes);
  float* ps = reinterpret_cast<float*>(smem + kDsBytes + kXsBytes + kBsBytes);
  float* cs = reinterpret_cast<float*>(smem + kDsBytes);

  const int warp = threadIdx.x / 32;
  const int64_t col0 = int64_t(blockIdx.x) * BKc;
  const int64_t rank0 = int64_t(blockIdx.y) * BR;
  const int64_t mbeg = int64_t(blockIdx.z) * m_chunk;
  const int64_t mend = std::min<int64_t>(M, mbeg + m_chunk);
  const DeviceDropout no_drop{0, 0};

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BR / 16][2];
#pragma unroll
  for (int i = 0; i < BR / 16; ++i) {
    wmma::fill_fragment(acc[i][0], 0.f);
    wmma::fill_fragment(acc[i][1], 0.f);
  }

  if constexpr (kAlsoRows) {  // Bop rows col0..col0+127, ranks rank0..rank0+BR-1: loaded once
    TileLoader<T, BKc, BR, false> bl;
    bl.load(Bop, K, R, col0, rank0, no_drop);
    bl.store(bs, LDB);
  }
  TileLoader<T, BMc, BR, false> dl;  // rank count is arbitrary: element loads
  TileLoader<T, BMc, BKc, kVec> xl;
  if (mbeg < mend) {
    dl.load(D, M, R, mbeg, rank0, no_drop);
    xl.load(X, M, K, mbeg, col0, drop);
  }
  for (int64_t m = mbeg; m < mend; m += BMc) {
    dl.store(ds, LDD);
    xl.store(xs, LDX);
    __syncthreads();
    if (m + BMc < mend) {
      dl.load(D, M, R, m + BMc, rank0, no_drop);
      xl.load(X, M, K, m + BMc, col0, drop);
    }
#pragma unroll
    for (int mm = 0; mm < BMc; mm += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
      wmma::load_matrix_sync(b[0], xs + mm * LDX + warp * 32, LDX);
      wmma::load_matrix_sync(b[1], xs + mm * LDX + warp * 32 + 16, LDX);
#pragma unroll
      for (int i = 0; i < BR / 16; ++i) {
        // D^T tile (ranks x rows) read column-major straight from the [rows][ranks] smem tile.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
        wmma::load_matrix_sync(a, ds + mm * LDD + i * 16, LDD);
        wmma::mma_sync(acc[i][0], a, b[0], acc[i][0]);
        wmma::mma_sync(acc[i][1], a, b[1], acc[i][1]);
      }
    }
    if constexpr (kAlsoRows) {
      // rows_out tile [32 rows x BR ranks] = xs [32 x 128] @ bs [128 x BR]: 2 x BR/16
      // fragments shared out over the warps, staged in ps, added to global memory.
      constexpr int kFragments = 2 * (BR / 16);
      for (int f = warp; f < kFragments; f += kThreads / 32) {
        const int fr = f % 2, fc = f / 2;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
        wmma::fill_fragment(part, 0.f);
#pragma unroll
        for (int kk = 0; kk < BKc; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> xa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bb;
          wmma::load_matrix_sync(xa, xs + fr * 16 * LDX + kk, LDX);
          wmma::load_matrix_sync(bb, bs + kk * LDB + fc * 16, LDB);
          wmma::mma_sync(part, xa, bb, part);
        }
        wmma::store_matrix_sync(ps + fr * 16 * LDP + fc * 16, part, LDP, wmma::mem_row_major);
      }
      __syncthreads();
      const bool atomic_rows = gridDim.x > 1;  // column blocks each add their share
      for (int i = threadIdx.x; i < BMc * BR; i += kThreads) {
        const int64_t gr = m + i / BR, gc = rank0 + i % BR;
        if (gr < mend && gc < R) accumulate(rows_out + gr * R + gc, alpha * ps[(i / BR) * LDP + i % BR], atomic_rows);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < BR / 16; ++i) {
    wmma::store_matrix_sync(cs + i * 16 * LDC + warp * 32, acc[i][0], LDC, wmma::mem_row_major);
    wmma::store_matrix_sync(cs + i * 16 * LDC + warp * 32 + 16, acc[i][1], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  const bool atomic = gridDim.z > 1 && split_stride == 0;
  out += blockIdx.z * split_stride;
  for (int i = threadIdx.x; i < BR * BKc; i += kThreads) {
    const int64_t gr = rank0 + i / BKc, gc = col0 + i % BKc;
    if (gr < R && gc < K) accumulate(out + gr * K + gc, alpha * cs[(i / BKc) * LDC + i % BKc], atomic);
  }
}

// out[M, K] = alpha * dropout(D[M, R] @ Bop[R, K]), written once in T (LoRA's
// backward term dropout_bwd(dh @ A) with the mask regenerated per output
// element). Block: 64 rows x 64 columns, the rank in steps of 32; warp w owns
// rows 16w..16w+15. The fp32 tile is staged in shared memory so that the mask,
// the scale and the rounding are applied once per element on the way out.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) skinny_expand_kernel(const T* __restrict__ D, const T* __restrict__ Bop,
                                                                T* __restrict__ out, int64_t M, int64_t K,
                                                                int64_t R, float alpha, DeviceDropout drop) {
  constexpr int BM = 64, BN = 64, BR = 32, LDD = BR + 8, LDB = BN + 8, LDC = BN + 4;
  LRK_SHARED(32, T, ds, [BM * LDD]);
  LRK_SHARED(32, T, bs, [BR * LDB]);
  LRK_SHARED(32, float, cs, [BM * LDC]);
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int64_t col0 = int64_t(blockIdx.y) * BN;
  const DeviceDropout no_drop{0, 0};

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
  TileLoader<T, BM, BR, false> dl;  // rank count is arbitrary: element loads
  TileLoader<T, BR, BN, kVec> bl;
  for (int64_t r0 = 0; r0 < R; r0 += BR) {
    dl.load(D, M, R, row0, r0, no_drop);
    bl.load(Bop, R, K, r0, col0, no_drop);
    dl.store(ds, LDD);
    bl.store(bs, LDB);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BR; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, ds + warp * 16 * LDD + kk, LDD);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, bs + kk * LDB + j * 16, LDB);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + j * 16, acc[j], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  // Each thread writes runs of 8 consecutive elements of a row.
  for (int slot = threadIdx.x; slot < BM * BN / 8; slot += kThreads) {
    const int lr = slot / (BN / 8), lc = (slot % (BN / 8)) * 8;
    const int64_t gr = row0 + lr, gc = col0 + lc;
    if (gr >= M || gc >= K) continue;
    const int64_t e0 = gr * K + gc;  // logical index of the run's first element
    uint32_t words[8] = {};
    if (drop.threshold != 0 && kVec) {  // e0 % 8 == 0: two Philox blocks cover the run
      const Philox4 lo = philox4x32_10(static_cast<uint64_t>(e0) >> 2, drop.seed);
      const Philox4 hi = philox4x32_10((static_cast<uint64_t>(e0) >> 2) + 1, drop.seed);
#pragma unroll
      for (int j = 0; j < 8; ++j) words[j] = j < 4 ? lo.v[j] : hi.v[j - 4];
    }
    T v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      bool keep = true;
      if (drop.threshold != 0) {
        keep = kVec ? words[j] >= drop.threshold
                    : dropout_keep(static_cast<uint64_t>(e0 + j), drop.seed, drop.threshold);
      }
      v[j] = cuda::from_float<T>(keep ? alpha * cs[lr * LDC + lc + j] : 0.f);
    }
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(out + e0) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (gc + j < K) out[e0 + j] = v[j];
      }
    }
  }
}

DeviceDropout to_device(const DropoutParams& d) { return DeviceDropout{d.seed, d.threshold}; }

// Splits a reduction of `length` (in steps of `step`) so that about four blocks
// per multiprocessor run; returns the chunk length (a multiple of step).
int64_t reduction_chunk(int64_t length, int64_t step, int64_t other_blocks) {
  const int64_t target = 4LL * cuda::sm_count();
  const int64_t steps = cuda::ceil_div(length, step);
  const int64_t splits = std::clamp<int64_t>(cuda::ceil_div(target, std::max<int64_t>(other_blocks, 1)), 1, steps);
  return cuda::ceil_div(steps, splits) * step;
}

void check_skinny_args(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const at::Tensor& out) {
  TORCH_CHECK(cuda::on_kernel_device(a) && cuda::on_kernel_device(b) && cuda::on_kernel_device(out), "skinny gemm: CUDA tensors expected");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "skinny gemm: ", a_name, " and ", b_name, " must both be bfloat16 or float16");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "skinny gemm: contiguous operands and a float32 output expected");
}

}  // namespace

void skinny_rows_gemm_cuda(const at::Tensor& X, const at::Tensor& Bop, at::Tensor& out, double alpha,
                           const DropoutParams& drop) {
  check_skinny_args(X, "X", Bop, "Bop", out);
  const int64_t M = X.size(0), K = X.size(1), R = Bop.size(0);
  TORCH_CHECK(Bop.size(1) == K && out.size(0) == M && out.size(1) == R, "skinny_rows_gemm: shape mismatch");
  if (M == 0 || R == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(X.device());
  const bool vec = K % 8 == 0 && cuda::aligned16(X.const_data_ptr()) && cuda::aligned16(Bop.const_data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(X.scalar_type(), "skinny gemm", [&](auto tag) {
    using T = decltype(tag);
    cuda::with_rank_tile(R, [&](auto br) {
      constexpr int BR = decltype(br)::value;
      cuda::with_bool(vec, [&](auto v) {
        const int64_t gx = cuda::ceil_div(M, 64), gz = cuda::ceil_div(R, BR);
        const int64_t chunk = reduction_chunk(K, 32, gx * gz);
        const int64_t splits = cuda::ceil_div(K, chunk);
        const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits), static_cast<unsigned>(gz));
        reduce_splits_into(out, splits, [&](float* dst, int64_t split_stride) {
          cuda::launch(skinny_rows_kernel<T, BR, decltype(v)::value>, grid, kThreads, 0, stream,
              reinterpret_cast<const T*>(X.const_data_ptr()), reinterpret_cast<const T*>(Bop.const_data_ptr()),
              dst, M, K, R, chunk, static_cast<float>(alpha * drop.scale), to_device(drop), split_stride);
        });
      });
    });
  });
}

namespace {

// Launches skinny_cols_kernel; Bop and rows_out only when kAlsoRows.
template <bool kAlsoRows>
void launch_cols_kernel(const at::Tensor& D, const at::Tensor& X, const at::Tensor* Bop, at::Tensor& out,
                        at::Tensor* rows_out, double alpha, const DropoutParams& drop) {
  const int64_t M = X.size(0), K = X.size(1), R = D.size(1);
  if (M == 0 || R == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(X.device());
  const bool vec = K % 8 == 0 && cuda::aligned16(X.const_data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(X.scalar_type(), "skinny gemm", [&](auto tag) {
    using T = decltype(tag);
    cuda::with_rank_tile(R, [&](auto br) {
      constexpr int BR = decltype(br)::value;
      cuda::with_bool(vec, [&](auto v) {
        const int64_t gx = cuda::ceil_div(K, 128), gy = cuda::ceil_div(R, BR);
        const int64_t chunk = reduction_chunk(M, 32, gx * gy);
        const int64_t splits = cuda::ceil_div(M, chunk);
        const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
        reduce_splits_into(out, kAlsoRows ? 1 : splits, [&](float* dst, int64_t split_stride) {
          cuda::launch(skinny_cols_kernel<T, BR, decltype(v)::value, kAlsoRows>, grid, kThreads, 0, stream,
              reinterpret_cast<const T*>(D.const_data_ptr()), reinterpret_cast<const T*>(X.const_data_ptr()),
              kAlsoRows ? reinterpret_cast<const T*>(Bop->const_data_ptr()) : nullptr, dst,
              kAlsoRows ? rows_out->mutable_data_ptr<float>() : nullptr, M, K, R, chunk,
              static_cast<float>(alpha * drop.scale), to_device(drop), split_stride);
        });
      });
    });
  });
}

}  // namespace

void skinny_cols_gemm_cuda(const at::Tensor& D, const at::Tensor& X, at::Tensor& out, double alpha,
                           const DropoutParams& drop) {
  check_skinny_args(D, "D", X, "X", out);
  const int64_t M = X.size(0), K = X.size(1), R = D.size(1);
  TORCH_CHECK(D.size(0) == M && out.size(0) == R && out.size(1) == K, "skinny_cols_gemm: shape mismatch");
  launch_cols_kernel<false>(D, X, nullptr, out, nullptr, alpha, drop);
}

void skinny_rows_cols_gemm_cuda(const at::Tensor& X, const at::Tensor& Bop, const at::Tensor& D,
                                at::Tensor& rows_out, at::Tensor& cols_out, double alpha) {
  check_skinny_args(D, "D", X, "X", cols_out);
  check_skinny_args(Bop, "Bop", X, "X", rows_out);
  const int64_t M = X.size(0), K = X.size(1), R = D.size(1);
  TORCH_CHECK(D.size(0) == M && Bop.size(0) == K && Bop.size(1) == R && rows_out.size(0) == M &&
                  rows_out.size(1) == R && cols_out.size(0) == R && cols_out.size(1) == K,
              "skinny_rows_cols_gemm: shape mismatch");
  if (deterministic_mode()) {
    // The fused kernel adds rows_out from every 128-column block of X; per-block
    // slices would take ceil(K / 128) * M * R * 4 bytes of workspace, R / 64 times
    // the size of X itself (bf16). Reading X twice costs one more pass over it and a
    // workspace of at most a few splits of [M, R] (few when M is large).
    skinny_rows_gemm_cuda(X, Bop.t().contiguous(), rows_out, alpha, DropoutParams{});
    launch_cols_kernel<false>(D, X, nullptr, cols_out, nullptr, alpha, DropoutParams{});
    return;
  }
  launch_cols_kernel<true>(D, X, &Bop, cols_out, &rows_out, alpha, DropoutParams{});
}

void skinny_expand_gemm_cuda(const at::Tensor& D, const at::Tensor& Bop, at::Tensor& out, double alpha,
                             const DropoutParams& drop) {
  TORCH_CHECK(cuda::on_kernel_device(D) && cuda::on_kernel_device(Bop) && cuda::on_kernel_device(out), "skinny expand: CUDA tensors expected");
  TORCH_CHECK(D.scalar_type() == Bop.scalar_type() && out.scalar_type() == D.scalar_type() &&
                  is_half_precision(D.scalar_type()),
              "skinny expand: D, Bop and out must all be bfloat16 or all float16");
  TORCH_CHECK(D.is_contiguous() && Bop.is_contiguous() && out.is_contiguous(), "skinny expand: contiguous operands expected");
  const int64_t M = D.size(0), R = D.size(1), K = Bop.size(1);
  TORCH_CHECK(Bop.size(0) == R && out.size(0) == M && out.size(1) == K, "skinny_expand_gemm: shape mismatch");
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(D.device());
  const bool vec = K % 8 == 0 && cuda::aligned16(Bop.const_data_ptr()) && cuda::aligned16(out.const_data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(D.scalar_type(), "skinny expand", [&](auto tag) {
    using T = decltype(tag);
    cuda::with_bool(vec, [&](auto v) {
      const int64_t row_blocks = cuda::ceil_div(M, 64), col_blocks = cuda::ceil_div(K, 64);
      TORCH_CHECK(row_blocks <= 0x7fffffff && col_blocks <= 65535, "skinny expand: [", M, ", ", K,
                  "] is beyond the grid's reach");
      const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
      cuda::launch(skinny_expand_kernel<T, decltype(v)::value>, grid, kThreads, 0, stream,
          reinterpret_cast<const T*>(D.const_data_ptr()), reinterpret_cast<const T*>(Bop.const_data_ptr()),
          reinterpret_cast<T*>(out.mutable_data_ptr()), M, K, R, static_cast<float>(alpha * drop.scale),
          to_device(drop));
    });
  });
}

}  // namespace lrk
