// CUDA kernels of the masked-gradient SDDMM, dDelta[mask] = (grad_y^T @ x)[mask].
//
// Block mask (sddmm_block): one CTA per (kept block, slice of tokens). Each kept
// b x b block is a small GEMM C = dy[:, rows]^T @ x[:, cols] whose reduction runs
// over the M tokens, so it streams two [M, b] panels and does 2*b flops per byte
// pair: memory-bound (b = 64: 32 flop/B). bf16/fp16 go through tensor cores (WMMA,
// fp32 accumulation) fed by a multi-stage cp.async pipeline; fp32/fp64 through a
// SIMT FMA kernel (no TF32: fp32 inputs keep fp32 accuracy).
//
// Schedule (why it is fast): grid.x walks the kept blocks in the order given, and
// CUDA launches CTAs in grid order. With block_indices sorted row-major (what
// nonzero() of a block mask and lrk's mask builders produce), the CTAs resident at
// the same time cover a few consecutive block rows: all kept blocks of one block row
// read the same dy panel, and they start together and advance through the tokens at
// the same pace, so each slice of that panel is fetched from DRAM once and served to
// the others from L2; the x panels of a wave are shared the same way by the block
// rows in flight. When there are too few kept blocks to fill the GPU (1% masks), the
// tokens are split too (grid.y, the slow grid dimension): every CTA in flight then
// works on the same slice of tokens, whose dy and x rows stay in L2 while all
// blocks use them. Split partials go to a float32 workspace and are summed in a
// fixed order (deterministic, no atomics).
//
// Unstructured mask (sddmm_csr): a per-call pass buckets the CSR entries by
// 512 x 512 tile of the [N, K] grid; one CTA per (non-empty tile or slice of at most
// 4096 of its entries, slice of tokens) stages the tile's dy and x panels once per
// token stage, token-contiguous in the inputs' dtype, and each thread accumulates up
// to 16 entries in registers. Empty tiles launch nothing; the token split counts
// work items only. The arithmetic behind the tile size is at sddmm_csr_kernel.
//
// Bad coordinates never cause out-of-bounds accesses: a block outside the grid gets
// NaN; a CSR entry whose column is out of range, or that no row covers, stays NaN.
// (The CPU kernels raise instead; raising here would need a host synchronisation.)
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "common/async_copy.cuh"
#include "common/cuda_utils.cuh"
#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

namespace wmma = nvcuda::wmma;

using cuda::cp_async_16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;

template <typename T>
__device__ __forceinline__ T nan_value() {
  return cuda::from_float<T>(__int_as_float(0x7fc00000));
}
template <>
__device__ __forceinline__ double nan_value<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

template <typename T>
__device__ __forceinline__ T convert_out(float v) {
  return cuda::from_float<T>(v);
}

// ----------------------------------------------------------------------------- block SDDMM, tensor cores

// Per block size: a WR x WC grid of warps over the output tile, KS groups of warps
// splitting each stage's k-steps (b = 16 has one 16x16 fragment: four warps take one
// k-step each), BM tokens per pipeline stage, STAGES stages in flight.
template <int BS>
struct WmmaCfg;
template <>
struct WmmaCfg<16> {
  static constexpr int WR = 1, WC = 1, KS = 4, BM = 64, STAGES = 4;
};
template <>
struct WmmaCfg<32> {
  static constexpr int WR = 2, WC = 2, KS = 1, BM = 32, STAGES = 4;
};
template <>
struct WmmaCfg<64> {
  static constexpr int WR = 2, WC = 2, KS = 1, BM = 32, STAGES = 4;
};
template <>
struct WmmaCfg<128> {
  static constexpr int WR = 2, WC = 4, KS = 1, BM = 32, STAGES = 3;
};

template <int BS>
struct WmmaLayout {
  using C = WmmaCfg<BS>;
  static constexpr int kWarps = C::WR * C::WC * C::KS;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int FR = BS / C::WR / 16;  // fragments per warp, rows
  static constexpr int FC = BS / C::WC / 16;  // fragments per warp, cols
  static constexpr int LDS = BS + 8;          // smem row pitch: 16-byte rows, fewer bank conflicts
  static constexpr int kChunks = C::BM * BS / 8;  // 16-byte chunks per operand tile
  static_assert(kChunks % kThreads == 0, "every thread loads the same number of chunks");
  static_assert((C::BM / 16) % C::KS == 0, "k-steps split evenly over the warp groups");
  template <typename T>
  static constexpr size_t smem_bytes() {
    const size_t stages = size_t(C::STAGES) * 2 * C::BM * LDS * sizeof(T);
    const size_t scratch = size_t(kWarps) * 256 * sizeof(float);
    return stages > scratch ? stages : scratch;
  }
};

// out[(split * n_blocks + blk)] (a BS x BS tile, row-major) = the block's partial
// product over the split's tokens. kVec: N % 8 == 0, K % 8 == 0 and 16-byte aligned
// bases, so each 16-byte chunk is one cp.async, entirely inside or outside the matrix.
template <typename T, int BS, typename OutT, bool kVec>
__global__ void __launch_bounds__(WmmaLayout<BS>::kThreads)
    sddmm_block_wmma_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ idx,
                            OutT* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t n_blocks,
                            int64_t m_chunk) {
  using C = WmmaCfg<BS>;
  using L = WmmaLayout<BS>;
  constexpr int BM = C::BM, LDS = L::LDS, STAGES = C::STAGES;
  LRK_DYNAMIC_SHARED(128, unsigned char, smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t blk = blockIdx.x;
  OutT* dst = out + (int64_t(blockIdx.y) * n_blocks + blk) * BS * BS;

  const int64_t br = idx[2 * blk], bc = idx[2 * blk + 1];
  // Compared against block counts, not br * BS: a huge int64 index would overflow the product.
  if (br < 0 || br >= (N + BS - 1) / BS || bc < 0 || bc >= (K + BS - 1) / BS) {  // outside the grid of blocks
    for (int i = tid; i < BS * BS; i += L::kThreads) dst[i] = nan_value<OutT>();
    return;
  }
  const int64_t n0 = br * BS, k0 = bc * BS;
  const int64_t mbeg = int64_t(blockIdx.y) * m_chunk;
  const int64_t mend = mbeg + m_chunk < M ? mbeg + m_chunk : M;
  const int64_t ntiles = mend > mbeg ? (mend - mbeg + BM - 1) / BM : 0;

  auto load_tile = [&](int64_t t, int stage) {
    T* dys = smem + stage * 2 * BM * LDS;
    T* xs = dys + BM * LDS;
    const int64_t m0 = mbeg + t * BM;
#pragma unroll
    for (int i = 0; i < 2 * L::kChunks / L::kThreads; ++i) {
      const int c = tid + i * L::kThreads;
      const bool is_x = c >= L::kChunks;  // uniform per i: kChunks is a multiple of kThreads
      const int cc = is_x ? c - L::kChunks : c;
      const int row = cc / (BS / 8), col8 = (cc % (BS / 8)) * 8;
      const int64_t gm = m0 + row;
      const T* src = is_x ? x : dy;
      const int64_t ld = is_x ? K : N;
      const int64_t gc = (is_x ? k0 : n0) + col8;
      T* s = (is_x ? xs : dys) + row * LDS + col8;
      if constexpr (kVec) {
        const bool ok = gm < mend && gc < ld;
        cp_async_16(s, ok ? src + gm * ld + gc : src, ok);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          s[j] = (gm < mend && gc + j < ld) ? src[gm * ld + gc + j] : cuda::from_float<T>(0.f);
        }
      }
    }
  };

  const int kgrp = warp / (C::WR * C::WC);
  const int wpos = warp % (C::WR * C::WC);
  const int wr = wpos / C::WC, wc = wpos % C::WC;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[L::FR][L::FC];
#pragma unroll
  for (int i = 0; i < L::FR; ++i)
#pragma unroll
    for (int j = 0; j < L::FC; ++j) wmma::fill_fragment(acc[i][j], 0.f);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    cp_async_wait<STAGES - 2>();  // tile t has landed
    __syncthreads();              // ... for every thread, and tile t-1's buffer is free
    if (t + STAGES - 1 < ntiles) load_tile(t + STAGES - 1, static_cast<int>((t + STAGES - 1) % STAGES));
    cp_async_commit();
    const T* dys = smem + (t % STAGES) * 2 * BM * LDS;
    const T* xs = dys + BM * LDS;
#pragma unroll
    for (int kk = kgrp * 16; kk < BM; kk += 16 * C::KS) {
      // A = dy^T tile (rows: features n, cols: tokens) read column-major from [tokens][n].
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[L::FR];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[L::FC];
#pragma unroll
      for (int i = 0; i < L::FR; ++i) wmma::load_matrix_sync(a[i], dys + kk * LDS + (wr * L::FR + i) * 16, LDS);
#pragma unroll
      for (int j = 0; j < L::FC; ++j) wmma::load_matrix_sync(b[j], xs + kk * LDS + (wc * L::FC + j) * 16, LDS);
#pragma unroll
      for (int i = 0; i < L::FR; ++i)
#pragma unroll
        for (int j = 0; j < L::FC; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages' memory becomes the epilogue's scratch

  float* scratch = reinterpret_cast<float*>(smem_raw);
  if constexpr (C::KS == 1) {
    float* ws = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < L::FR; ++i) {
#pragma unroll
      for (int j = 0; j < L::FC; ++j) {
        wmma::store_matrix_sync(ws, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        const int r0 = (wr * L::FR + i) * 16, c0 = (wc * L::FC + j) * 16;
        for (int e = lane; e < 256; e += 32) dst[(r0 + e / 16) * BS + c0 + e % 16] = convert_out<OutT>(ws[e]);
        __syncwarp();
      }
    }
  } else {  // BS == 16: the KS warps hold partials of the one fragment; sum them in order
    wmma::store_matrix_sync(scratch + warp * 256, acc[0][0], 16, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < 256; e += L::kThreads) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < C::KS; ++w) s += scratch[w * 256 + e];
      dst[e] = convert_out<OutT>(s);
    }
  }
}

// ----------------------------------------------------------------------------- block SDDMM, SIMT (fp32, fp64)

// 256 threads as a 16 x 16 grid; thread (tr, tc) owns rows tr + 16i and columns
// tc + 16j of the tile (strided, so a warp's shared-memory reads are conflict-free).
template <typename T, int BS>
__global__ void __launch_bounds__(256)
    sddmm_block_simt_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ idx,
                            T* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t n_blocks, int64_t m_chunk) {
  constexpr int BMs = 16, TM = BS / 16;
  LRK_SHARED(alignof(T), T, dys, [BMs][BS]);
  LRK_SHARED(alignof(T), T, xs, [BMs][BS]);
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  const int64_t blk = blockIdx.x;
  T* dst = out + (int64_t(blockIdx.y) * n_blocks + blk) * BS * BS;
  const int64_t br = idx[2 * blk], bc = idx[2 * blk + 1];
  if (br < 0 || br >= (N + BS - 1) / BS || bc < 0 || bc >= (K + BS - 1) / BS) {  // see the WMMA kernel
    for (int i = tid; i < BS * BS; i += 256) dst[i] = nan_value<T>();
    return;
  }
  const int64_t n0 = br * BS, k0 = bc * BS;
  const int64_t mbeg = int64_t(blockIdx.y) * m_chunk;
  const int64_t mend = mbeg + m_chunk < M ? mbeg + m_chunk : M;
  T acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = T(0);
  for (int64_t m0 = mbeg; m0 < mend; m0 += BMs) {
    for (int e = tid; e < BMs * BS; e += 256) {
      const int row = e / BS, col = e % BS;
      const int64_t gm = m0 + row;
      dys[row][col] = (gm < mend && n0 + col < N) ? dy[gm * N + n0 + col] : T(0);
      xs[row][col] = (gm < mend && k0 + col < K) ? x[gm * K + k0 + col] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < BMs; ++mm) {
      T a[TM], b[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = dys[mm][tr + 16 * i];
#pragma unroll
      for (int j = 0; j < TM; ++j) b[j] = xs[mm][tc + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) dst[(tr + 16 * i) * BS + tc + 16 * j] = acc[i][j];
}

// ----------------------------------------------------------------------------- split reduction

// out[i] = sum over splits of ws[s][i], in split order (deterministic).
template <typename AccT, typename OutT>
__global__ void reduce_splits_kernel(const AccT* __restrict__ ws, OutT* __restrict__ out, int64_t n, int splits) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    AccT s = AccT(0);
    for (int p = 0; p < splits; ++p) s += ws[int64_t(p) * n + i];
    if constexpr (std::is_same_v<AccT, double>) {
      out[i] = static_cast<OutT>(s);
    } else {
      out[i] = convert_out<OutT>(s);
    }
  }
}

template <typename AccT, typename OutT>
void launch_reduce(const AccT* ws, OutT* out, int64_t n, int splits, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(n, 256), 8LL * cuda::sm_count());
  cuda::launch(reduce_splits_kernel<AccT, OutT>, static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0, stream,
      ws, out, n, splits);
}

// ----------------------------------------------------------------------------- unstructured (CSR) SDDMM

// Work items: the [N, K] grid is cut into kCsrTile x kCsrTile tiles; a per-call
// pass (csr_bucket_kernel, twice: count, then scatter) buckets the CSR entries by
// tile, so every column index is read twice there and each entry once by the SDDMM
// kernel. A work item is one non-empty tile, or a slice of at most kCsrCap of its
// entries; empty tiles get no item and no CTA. The CTA of an item stages the
// tile's dy and x panels once per token stage and computes all of its entries
// from shared memory, so each panel is read once per item.
//
// Arithmetic, not measured (N = K = 16384, M = 4096, bf16, H200: 4.3 TB/s,
// ~750 TFLOP/s bf16 tensor cores, 132 SMs at ~1.98 GHz, 128 B/clk of shared
// memory per SM). The dense product dy^T @ x is 2.2e12 flop = 2.9 ms.
// SDDMM flops are 2 M nnz = 2.2e9 / 2.2e10 / 2.2e11 at 0.1% / 1% / 10%.
//   Before (32 x 128 tiles, one CTA per tile): every tile is non-empty, each stages
//   M (32 + 128) bf16 = 1.3 MB of panels: 86 GB per call at every density (20 ms
//   if it came from DRAM); each tile rescans its 32 rows' column indices, 128
//   times per index: 0.27 / 2.7 / 27 GB; fp32 operands from shared memory
//   (8 B per FMA) cap the FMAs at 0.26 / 2.6 / 26 ms.
//   Now (512 x 512 items, <= 4096 entries): 1024 items of 262 / 2621 / 26214
//   entries (1 / 1 / 7 slices); panels M (512 + 512) bf16 = 8.4 MB per slice:
//   8.6 / 8.6 / 60 GB from L2 (2.0 / 2.0 / 14 ms if all came from DRAM; the CTAs
//   in flight walk the same tokens, so DRAM sees about x once per wave of ~8
//   row tiles plus dy once: ~0.7 GB); indices ~40 B per entry: 0.01 / 0.1 /
//   1.1 GB; token-contiguous operands in the input dtype (4 B per FMA from
//   shared memory) cap the FMAs at 0.13 / 1.3 / 13 ms.
//   Tensor cores on the non-empty 16 x 16 tiles instead (sddmm_block's path): a
//   random pattern leaves 23% / 92% / 100% of them non-empty, 0.66 / 2.7 / 2.9 ms
//   of MMAs, and each stages M x 32 bf16 (262 KB): 62 / 254 / 275 GB. No gain on
//   random patterns; it pays only for clustered ones, which block masks serve.
// So: about 1.5-2 ms at 0.1% and 1% against 2.9 ms dense, and at 10% the dense
// product on tensor cores stays faster (SIMT FMAs on 10% of the products cost
// more than tensor cores on all of them). The bucketing costs one host
// synchronisation per call (the grid has one CTA per work item).

constexpr int kCsrThreads = 256;
constexpr int kCsrTile = 512;   // rows (features of grad_y) = columns (features of x) of a tile
constexpr int kCsrSlots = 16;   // entries per thread
constexpr int kCsrCap = kCsrThreads * kCsrSlots;  // entries per work item
constexpr int kCsrRowBytes = 32;  // one staged panel row: 32 bytes of consecutive tokens
constexpr int kCsrPitchBytes = kCsrRowBytes + 8;  // padding: the stores of a warp hit distinct banks

// Count (kScatter false: counts[tile] += 1 per entry) or scatter (kScatter true:
// entry j goes to a free position of its tile's range [ent_end[t] - n_t,
// ent_end[t]), counting counts[t] back down to 0) the valid entries; one warp per
// row. Entries whose column is out of range are skipped (their output stays NaN).
// crow is clamped to [0, nnz] and non-decreasing, so no entry has two rows.
template <bool kScatter>
__global__ void __launch_bounds__(256)
    csr_bucket_kernel(const int64_t* __restrict__ crow, const int64_t* __restrict__ col, int64_t N, int64_t K,
                      int64_t n_col_tiles, int* __restrict__ counts, const int64_t* __restrict__ ent_end,
                      int64_t* __restrict__ ent_j, int* __restrict__ ent_rc) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; n < N; n += warps) {
    const int64_t beg = crow[n], end = crow[n + 1];
    const int64_t rt = n / kCsrTile;
    const int lr = static_cast<int>(n % kCsrTile);
    for (int64_t j = beg + lane; j < end; j += 32) {
      const int64_t c = col[j];
      if (c < 0 || c >= K) continue;
      const int64_t t = rt * n_col_tiles + c / kCsrTile;
      if constexpr (kScatter) {
        const int64_t pos = ent_end[t] - atomicSub(&counts[t], 1);
        ent_j[pos] = j;
        ent_rc[pos] = lr * kCsrTile + static_cast<int>(c % kCsrTile);
      } else {
        atomicAdd(&counts[t], 1);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) {
  return cuda::to_float(v);
}
__device__ __forceinline__ double to_acc(double v, double) { return v; }

// One CTA per (work item, slice of tokens); items[w] = (tile, first entry), the
// item's entries are ent_*[first, min(first + kCsrCap, ent_end[tile])). Writes
// out[split * nnz + j] for its entries j; the host pre-fills out with NaN.
// Shared memory holds both panels transposed, token-contiguous: row r < kCsrTile
// is dy[m0 .. m0 + MC, n0 + r], row kCsrTile + c is x[m0 .. m0 + MC, c0 + c], so a
// thread reads 8 bytes of consecutive tokens of its entry's row and column per
// load and its dot product runs over the tokens in order (deterministic).
// kVec: N and K multiples of 16 / sizeof(T) and 16-byte aligned bases (one
// 16-byte load per staged chunk).
template <typename T, typename AccT, bool kVec>
__global__ void __launch_bounds__(kCsrThreads, 2)
    sddmm_csr_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ items,
                     const int64_t* __restrict__ ent_end, const int64_t* __restrict__ ent_j,
                     const int* __restrict__ ent_rc, AccT* __restrict__ out, int64_t M, int64_t N, int64_t K,
                     int64_t nnz, int64_t n_col_tiles, int64_t m_chunk) {
  constexpr int MC = kCsrRowBytes / sizeof(T);   // tokens per stage
  constexpr int P = kCsrPitchBytes / sizeof(T);  // row pitch, elements
  constexpr int V = 16 / sizeof(T);              // elements per staged chunk (8 consecutive features for bf16)
  constexpr int E8 = 8 / sizeof(T);              // elements per 8-byte shared-memory load
  static_assert(MC % E8 == 0, "whole 8-byte loads per row");
  LRK_SHARED(16, T, panel, [2 * kCsrTile * P]);

  const int tid = threadIdx.x;
  const int64_t w = blockIdx.x;
  const int64_t tile = items[2 * w], first = items[2 * w + 1];
  const int64_t last = ent_end[tile];
  const int count = static_cast<int>(last - first < kCsrCap ? last - first : kCsrCap);
  const int64_t n0 = (tile / n_col_tiles) * kCsrTile, c0 = (tile % n_col_tiles) * kCsrTile;
  const int nr = static_cast<int>(N - n0 < kCsrTile ? N - n0 : kCsrTile);
  const int nc = static_cast<int>(K - c0 < kCsrTile ? K - c0 : kCsrTile);
  const int64_t mbeg = int64_t(blockIdx.y) * m_chunk;
  const int64_t mend = mbeg + m_chunk < M ? mbeg + m_chunk : M;

  int rc[kCsrSlots];
  AccT acc[kCsrSlots];
#pragma unroll
  for (int i = 0; i < kCsrSlots; ++i) {
    const int e = tid + i * kCsrThreads;
    rc[i] = e < count ? ent_rc[first + e] : -1;
    acc[i] = AccT(0);
  }

  // Staging: a unit is V consecutive features of one token (a 16-byte chunk of a
  // dy or x row); consecutive threads take consecutive tokens of the same chunk
  // column, so the transposed stores of a warp fill whole panel rows.
  const int gdy = (nr + V - 1) / V, gx = (nc + V - 1) / V;
  const int units = (gdy + gx) * MC;
  for (int64_t m0 = mbeg; m0 < mend; m0 += MC) {
    for (int u = tid; u < units; u += kCsrThreads) {
      const int mm = u % MC;
      int g = u / MC;
      const bool is_x = g >= gdy;
      if (is_x) g -= gdy;
      const T* src = is_x ? x : dy;
      const int64_t ld = is_x ? K : N;
      const int lim = is_x ? nc : nr;
      const int64_t gc = (is_x ? c0 : n0) + int64_t(g) * V;
      const int64_t gm = m0 + mm;
      T v[V];
      if constexpr (kVec) {  // lim is a multiple of V: the chunk is inside the matrix
        const uint4 q = gm < mend ? *reinterpret_cast<const uint4*>(src + gm * ld + gc) : make_uint4(0, 0, 0, 0);
        memcpy(v, &q, sizeof(q));
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = (gm < mend && g * V + i < lim) ? src[gm * ld + gc + i] : T{};
      }
      T* dst = panel + ((is_x ? kCsrTile : 0) + g * V) * P + mm;
#pragma unroll
      for (int i = 0; i < V; ++i) dst[i * P] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kCsrSlots; ++i) {
      if (rc[i] >= 0) {
        const T* a = panel + (rc[i] / kCsrTile) * P;
        const T* b = panel + (kCsrTile + rc[i] % kCsrTile) * P;
        AccT s = acc[i];
#pragma unroll
        for (int q = 0; q < MC; q += E8) {
          const uint2 ua = *reinterpret_cast<const uint2*>(a + q);
          const uint2 ub = *reinterpret_cast<const uint2*>(b + q);
          T ta[E8], tb[E8];
          memcpy(ta, &ua, sizeof(ua));
          memcpy(tb, &ub, sizeof(ub));
#pragma unroll
          for (int k = 0; k < E8; ++k) s = fma(to_acc(ta[k], AccT(0)), to_acc(tb[k], AccT(0)), s);
        }
        acc[i] = s;
      }
    }
    __syncthreads();
  }
  AccT* dst = out + int64_t(blockIdx.y) * nnz;
#pragma unroll
  for (int i = 0; i < kCsrSlots; ++i) {
    if (rc[i] >= 0) dst[ent_j[first + tid + i * kCsrThreads]] = acc[i];
  }
}

// ----------------------------------------------------------------------------- host side

constexpr int64_t kMinTokensPerSplit = 512;
constexpr int64_t kMaxWorkspaceBytes = int64_t(256) << 20;

// Token slices: enough CTAs for about four per multiprocessor, at least
// kMinTokensPerSplit tokens each, partials within kMaxWorkspaceBytes. Returns the
// slice length (a multiple of step) and sets *splits.
int64_t token_chunk(int64_t M, int64_t ctas, int64_t step, int64_t partial_bytes, int* splits) {
  const int64_t target = 4LL * cuda::sm_count();
  int64_t s = std::clamp<int64_t>(cuda::ceil_div(target, std::max<int64_t>(ctas, 1)), 1,
                                  std::max<int64_t>(1, M / kMinTokensPerSplit));
  s = std::min<int64_t>(s, std::max<int64_t>(1, kMaxWorkspaceBytes / std::max<int64_t>(partial_bytes, 1)));
  s = std::min<int64_t>(s, 65535);
  const int64_t chunk = cuda::ceil_div(cuda::ceil_div(M, s), step) * step;
  *splits = static_cast<int>(cuda::ceil_div(M, chunk));
  return chunk;
}

template <typename F>
void with_block_size(int64_t b, F&& f) {
  switch (b) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;
  }
}

template <typename T, int BS, typename OutT>
void launch_wmma(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& idx, OutT* out, int64_t M, int64_t N,
                 int64_t K, int64_t nb, int64_t chunk, int splits, bool vec, cudaStream_t stream) {
  using L = WmmaLayout<BS>;
  const size_t smem = L::template smem_bytes<T>();
  const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(splits));
  auto go = [&](auto kernel) {
    cuda::set_max_dynamic_shared_memory(kernel, smem);
    cuda::launch(kernel, grid, L::kThreads, smem, stream, reinterpret_cast<const T*>(dy.const_data_ptr()),
                                                reinterpret_cast<const T*>(x.const_data_ptr()),
                                                idx.const_data_ptr<int64_t>(), out, M, N, K, nb, chunk);
  };
  if (vec) {
    go(sddmm_block_wmma_kernel<T, BS, OutT, true>);
  } else {
    go(sddmm_block_wmma_kernel<T, BS, OutT, false>);
  }
}

at::Tensor sddmm_block_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& block_indices,
                            int64_t block_size, std::optional<at::ScalarType> out_dtype) {
  const SddmmDims d = check_sddmm_operands(grad_y, x, out_dtype);
  check_block_size(block_size);
  const int64_t nb = check_block_indices_shape(block_indices, grad_y);
  TORCH_CHECK(cuda::on_kernel_device(grad_y), "grad_y: expected a CUDA tensor, got one on ", grad_y.device());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t b = block_size;
  const auto out_opts = grad_y.options().dtype(d.out_dtype);
  if (nb == 0) return at::empty({0, b, b}, out_opts);
  if (d.M == 0) return at::zeros({nb, b, b}, out_opts);
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), "block_indices: at most 2^31 - 1 blocks per call, got ", nb);
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor xx = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor idx = block_indices.to(at::kLong).contiguous();
  const auto acc = sddmm_acc_dtype(grad_y.scalar_type());
  const int64_t tile_bytes = b * b * static_cast<int64_t>(at::elementSize(acc));
  at::Tensor out = at::empty({nb, b, b}, out_opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool half_type = is_half_precision(grad_y.scalar_type());

  with_block_size(b, [&](auto bs_tag) {
    constexpr int BS = decltype(bs_tag)::value;
    const int64_t step = half_type ? WmmaCfg<BS>::BM : 16;
    int splits = 1;
    const int64_t chunk = token_chunk(d.M, nb, step, nb * tile_bytes, &splits);
    // Partials of a split launch go to an fp32 (fp64) workspace, reduced afterwards.
    at::Tensor ws = splits > 1 ? at::empty({splits, nb, b, b}, grad_y.options().dtype(acc)) : at::Tensor();
    if (half_type) {
      const bool vec = d.N % 8 == 0 && d.K % 8 == 0 && cuda::aligned16(dy.const_data_ptr()) &&
                       cuda::aligned16(xx.const_data_ptr());
      auto run = [&](auto t_tag) {
        using T = decltype(t_tag);
        if (splits > 1) {
          launch_wmma<T, BS, float>(dy, xx, idx, ws.mutable_data_ptr<float>(), d.M, d.N, d.K, nb, chunk, splits, vec,
                                    stream);
          if (d.out_dtype == at::kFloat) {
            launch_reduce(ws.const_data_ptr<float>(), out.mutable_data_ptr<float>(), nb * b * b, splits, stream);
          } else {
            launch_reduce(ws.const_data_ptr<float>(), reinterpret_cast<T*>(out.mutable_data_ptr()), nb * b * b, splits,
                          stream);
          }
        } else if (d.out_dtype == at::kFloat) {
          launch_wmma<T, BS, float>(dy, xx, idx, out.mutable_data_ptr<float>(), d.M, d.N, d.K, nb, chunk, 1, vec,
                                    stream);
        } else {
          launch_wmma<T, BS, T>(dy, xx, idx, reinterpret_cast<T*>(out.mutable_data_ptr()), d.M, d.N, d.K, nb, chunk,
                                1, vec, stream);
        }
      };
      if (grad_y.scalar_type() == at::kBFloat16) {
        run(__nv_bfloat16{});
      } else {
        run(__half{});
      }
    } else {
      AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "sddmm_block_simt", [&] {
        // float32 / float64 inputs: out_dtype is the input dtype (= the accumulator).
        scalar_t* dst = splits > 1 ? ws.mutable_data_ptr<scalar_t>() : out.mutable_data_ptr<scalar_t>();
        const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(splits));
        cuda::launch(sddmm_block_simt_kernel<scalar_t, BS>, grid, 256, 0, stream,
            dy.const_data_ptr<scalar_t>(), xx.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), dst, d.M,
            d.N, d.K, nb, chunk);
        if (splits > 1) {
          launch_reduce(ws.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nb * b * b, splits, stream);
        }
      });
    }
  });
  return out;
}

at::Tensor sddmm_csr_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& crow_indices,
                          const at::Tensor& col_indices, std::optional<at::ScalarType> out_dtype) {
  const SddmmDims d = check_sddmm_operands(grad_y, x, out_dtype);
  const int64_t nnz = check_csr_shape(crow_indices, col_indices, d.N, grad_y);
  TORCH_CHECK(cuda::on_kernel_device(grad_y), "grad_y: expected a CUDA tensor, got one on ", grad_y.device());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto acc = sddmm_acc_dtype(grad_y.scalar_type());
  const auto out_opts = grad_y.options().dtype(d.out_dtype);
  if (nnz == 0) return at::empty({0}, out_opts);
  if (d.M == 0) return at::zeros({nnz}, out_opts);
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor xx = x.reshape({d.M, d.K}).contiguous();
  // Row pointers clamped into [0, nnz] and made non-decreasing: a malformed
  // crow_indices can only leave entries unwritten (NaN), never give one two rows.
  const at::Tensor crow = std::get<0>(at::cummax(crow_indices.to(at::kLong).clamp(0, nnz), 0)).contiguous();
  const at::Tensor col = col_indices.to(at::kLong).contiguous();
  const int64_t n_col_tiles = cuda::ceil_div(std::max<int64_t>(d.K, 1), kCsrTile);
  const int64_t tiles = cuda::ceil_div(std::max<int64_t>(d.N, 1), kCsrTile) * n_col_tiles;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto long_opts = crow.options();

  // Bucket the entries by tile: count, then scatter into per-tile ranges.
  at::Tensor counts = at::zeros({tiles}, long_opts.dtype(at::kInt));
  const unsigned bucket_ctas =
      static_cast<unsigned>(std::clamp<int64_t>(cuda::ceil_div(d.N, 8), 1, 32LL * cuda::sm_count()));
  cuda::launch(csr_bucket_kernel<false>, bucket_ctas, 256, 0, stream, crow.const_data_ptr<int64_t>(),
                                                            col.const_data_ptr<int64_t>(), d.N, d.K, n_col_tiles,
                                                            counts.mutable_data_ptr<int>(), nullptr, nullptr, nullptr);
  const at::Tensor n_ent = counts.to(at::kLong);
  const at::Tensor ent_end = n_ent.cumsum(0);
  const at::Tensor slices = n_ent.add(kCsrCap - 1).div(kCsrCap, "floor");  // work items per tile
  const at::Tensor item_end = slices.cumsum(0);
  // The one host synchronisation: the grid has exactly one CTA per work item.
  const int64_t n_items = item_end[-1].item<int64_t>();
  TORCH_CHECK(n_items <= std::numeric_limits<int32_t>::max(), "col_indices: too many work items (", n_items,
              ") for one launch");

  int splits = 1;
  const int64_t step = kCsrRowBytes / static_cast<int64_t>(grad_y.element_size());
  const int64_t chunk =
      token_chunk(d.M, n_items, step, nnz * static_cast<int64_t>(at::elementSize(acc)), &splits);
  const bool direct = splits == 1 && d.out_dtype == acc;
  // Entries that no item owns (malformed pattern) keep this NaN.
  at::Tensor buf = direct ? at::full({nnz}, NAN, out_opts)
                          : at::full({splits, nnz}, NAN, grad_y.options().dtype(acc));
  if (n_items == 0) return direct ? buf : buf[0].to(d.out_dtype);

  at::Tensor ent_j = at::empty({nnz}, long_opts);
  at::Tensor ent_rc = at::empty({nnz}, long_opts.dtype(at::kInt));
  cuda::launch(csr_bucket_kernel<true>, bucket_ctas, 256, 0, stream,
      crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), d.N, d.K, n_col_tiles,
      counts.mutable_data_ptr<int>(), ent_end.const_data_ptr<int64_t>(), ent_j.mutable_data_ptr<int64_t>(),
      ent_rc.mutable_data_ptr<int>());
  // items[w] = (tile, first entry): tile t owns items [item_end[t] - slices[t], item_end[t]).
  const at::Tensor item_tile = at::repeat_interleave(at::arange(tiles, long_opts), slices, 0, n_items);
  const at::Tensor within = at::arange(n_items, long_opts) - (item_end - slices).index_select(0, item_tile);
  const at::Tensor first = (ent_end - n_ent).index_select(0, item_tile) + within * kCsrCap;
  const at::Tensor items = at::stack({item_tile, first}, 1).contiguous();

  const dim3 grid(static_cast<unsigned>(n_items), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "sddmm_csr_cuda", [&] {
    using T = cuda::native_t<scalar_t>;
    using AccT = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t V = 16 / sizeof(T);
    const bool vec = d.N % V == 0 && d.K % V == 0 && cuda::aligned16(dy.const_data_ptr()) &&
                     cuda::aligned16(xx.const_data_ptr());
    auto go = [&](auto kernel) {
      cuda::launch(kernel, grid, kCsrThreads, 0, stream,
          reinterpret_cast<const T*>(dy.const_data_ptr()), reinterpret_cast<const T*>(xx.const_data_ptr()),
          items.const_data_ptr<int64_t>(), ent_end.const_data_ptr<int64_t>(), ent_j.const_data_ptr<int64_t>(),
          ent_rc.const_data_ptr<int>(), buf.mutable_data_ptr<AccT>(), d.M, d.N, d.K, nnz, n_col_tiles, chunk);
    };
    if (vec) {
      go(sddmm_csr_kernel<T, AccT, true>);
    } else {
      go(sddmm_csr_kernel<T, AccT, false>);
    }
    if (!direct) {
      at::Tensor out = at::empty({nnz}, out_opts);
      if (d.out_dtype == acc) {
        launch_reduce(buf.const_data_ptr<AccT>(), out.mutable_data_ptr<AccT>(), nnz, splits, stream);
      } else {
        launch_reduce(buf.const_data_ptr<AccT>(), reinterpret_cast<T*>(out.mutable_data_ptr()), nnz, splits, stream);
      }
      buf = out;
    }
  });
  return buf;
}

}  // namespace

LRK_CUDA_KERNELS(m) {
  m.impl("sddmm_block", &sddmm_block_cuda);
  m.impl("sddmm_csr", &sddmm_csr_cuda);
}

}  // namespace lrk
