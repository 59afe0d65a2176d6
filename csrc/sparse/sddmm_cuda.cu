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
// Unstructured mask (sddmm_csr): one CTA per (32-row x 128-column tile of the
// [N, K] grid, slice of tokens). The CTA collects the CSR entries that fall in its
// tile (ordered compaction, so any column order within a row is fine), stages the
// tile's dy and x panels through shared memory one slice of tokens at a time, and
// each thread accumulates up to 8 entries in registers (more entries: more passes).
// Tiles without entries exit at once.
//
// Bad coordinates never cause out-of-bounds accesses: a block outside the grid gets
// NaN; a CSR entry whose column is out of range, or that no row covers, stays NaN.
// (The CPU kernels raise instead; raising here would need a host synchronisation.)
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>
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

constexpr int kCsrThreads = 256;
constexpr int kCsrRows = 32;      // tile rows (features of grad_y)
constexpr int kCsrCols = 128;     // tile columns (features of x)
constexpr int kCsrSlots = 8;      // entries per thread and pass
constexpr int kCsrCap = kCsrThreads * kCsrSlots;

template <typename AccT>
struct CsrCfg {
  static constexpr int MC = sizeof(AccT) == 8 ? 16 : 32;  // tokens per stage (smem budget)
};

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) {
  return cuda::to_float(v);
}
__device__ __forceinline__ double to_acc(double v, double) { return v; }

// Writes this CTA's entries of split blockIdx.y into out[split * nnz + j]; out is
// pre-filled with NaN by the host, so entries nobody owns stay NaN.
template <typename T, typename AccT>
__global__ void __launch_bounds__(kCsrThreads)
    sddmm_csr_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ crow,
                     const int64_t* __restrict__ col, AccT* __restrict__ out, int64_t M, int64_t N, int64_t K,
                     int64_t nnz, int64_t n_col_tiles, int64_t m_chunk) {
  constexpr int MC = CsrCfg<AccT>::MC;
  LRK_SHARED(alignof(int64_t), int64_t, rp, [kCsrRows + 1]);
  LRK_SHARED(alignof(int64_t), int64_t, list_j, [kCsrCap]);
  LRK_SHARED(alignof(uint16_t), uint16_t, list_rc, [kCsrCap]);
  LRK_SHARED(alignof(int), int, warp_counts, [kCsrThreads / 32]);
  LRK_SHARED(alignof(int64_t), int64_t, s_total, );
  LRK_SHARED(alignof(AccT), AccT, dys, [MC][kCsrRows]);
  LRK_SHARED(alignof(AccT), AccT, xs, [MC][kCsrCols]);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tile = blockIdx.x;
  const int64_t n0 = (tile / n_col_tiles) * kCsrRows, c0 = (tile % n_col_tiles) * kCsrCols;
  const int64_t mbeg = int64_t(blockIdx.y) * m_chunk;
  const int64_t mend = mbeg + m_chunk < M ? mbeg + m_chunk : M;
  AccT* dst = out + int64_t(blockIdx.y) * nnz;

  // Row pointers of the tile's rows, clamped into [0, nnz] and made monotone, so
  // that a malformed crow_indices can only leave entries unwritten.
  if (tid <= kCsrRows) {
    const int64_t row = n0 + tid < N ? n0 + tid : N;
    const int64_t v = crow[row];
    rp[tid] = v < 0 ? 0 : (v > nnz ? nnz : v);
  }
  __syncthreads();
  if (tid == 0) {
    for (int r = 1; r <= kCsrRows; ++r) rp[r] = rp[r] > rp[r - 1] ? rp[r] : rp[r - 1];
  }
  __syncthreads();
  const int64_t beg = rp[0], end = rp[kCsrRows];

  for (int64_t pass = 0;; ++pass) {
    // Ordered compaction of the entries whose column falls in this tile: entry e of
    // the pass is the (pass * kCsrCap + e)-th such entry in index order.
    if (tid == 0) s_total = 0;
    __syncthreads();
    for (int64_t base = beg; base < end; base += kCsrThreads) {
      const int64_t j = base + tid;
      bool pred = false;
      int lr = 0, lc = 0;
      if (j < end) {
        const int64_t c = col[j];
        if (c >= c0 && c < c0 + kCsrCols && c < K) {
          pred = true;
          lc = static_cast<int>(c - c0);
          int lo = 0, hi = kCsrRows - 1;  // the last row r with rp[r] <= j
          while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (rp[mid] <= j) lo = mid; else hi = mid - 1;
          }
          lr = lo;
        }
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, pred);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      int64_t rank = s_total + __popc(ballot & ((1u << lane) - 1u));
      for (int w = 0; w < warp; ++w) rank += warp_counts[w];
      const int64_t slot = rank - pass * kCsrCap;
      if (pred && slot >= 0 && slot < kCsrCap) {
        list_j[slot] = j;
        list_rc[slot] = static_cast<uint16_t>(lr * kCsrCols + lc);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t s = 0;
        for (int w = 0; w < kCsrThreads / 32; ++w) s += warp_counts[w];
        s_total += s;
      }
      __syncthreads();
    }
    const int64_t total = s_total;
    const int64_t count = total - pass * kCsrCap < kCsrCap ? total - pass * kCsrCap : kCsrCap;
    if (count <= 0) return;  // uniform: every thread read the same s_total

    int sr[kCsrSlots], sc[kCsrSlots];
    AccT acc[kCsrSlots];
#pragma unroll
    for (int i = 0; i < kCsrSlots; ++i) {
      const int e = tid + i * kCsrThreads;
      const int rc = e < count ? list_rc[e] : 0;
      sr[i] = rc / kCsrCols;
      sc[i] = rc % kCsrCols;
      acc[i] = AccT(0);
    }
    for (int64_t m0 = mbeg; m0 < mend; m0 += MC) {
      for (int e = tid; e < MC * kCsrRows; e += kCsrThreads) {
        const int mm = e / kCsrRows, r = e % kCsrRows;
        const int64_t gm = m0 + mm;
        dys[mm][r] = (gm < mend && n0 + r < N) ? to_acc(dy[gm * N + n0 + r], AccT(0)) : AccT(0);
      }
      for (int e = tid; e < MC * kCsrCols; e += kCsrThreads) {
        const int mm = e / kCsrCols, c = e % kCsrCols;
        const int64_t gm = m0 + mm;
        xs[mm][c] = (gm < mend && c0 + c < K) ? to_acc(x[gm * K + c0 + c], AccT(0)) : AccT(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kCsrSlots; ++i) {
        if (tid + i * kCsrThreads < count) {
#pragma unroll 8
          for (int mm = 0; mm < MC; ++mm) acc[i] = fma(dys[mm][sr[i]], xs[mm][sc[i]], acc[i]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kCsrSlots; ++i) {
      const int e = tid + i * kCsrThreads;
      if (e < count) dst[list_j[e]] = acc[i];
    }
    if ((pass + 1) * kCsrCap >= total) return;
    __syncthreads();  // the list is rebuilt by the next pass
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
  const at::Tensor crow = crow_indices.to(at::kLong).contiguous();
  const at::Tensor col = col_indices.to(at::kLong).contiguous();
  const int64_t n_row_tiles = cuda::ceil_div(std::max<int64_t>(d.N, 1), kCsrRows);
  const int64_t n_col_tiles = cuda::ceil_div(std::max<int64_t>(d.K, 1), kCsrCols);
  const int64_t tiles = n_row_tiles * n_col_tiles;
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "grad_y, x: too many 32 x 128 tiles (", tiles,
              ") for one launch");
  int splits = 1;
  const int64_t step = acc == at::kDouble ? CsrCfg<double>::MC : CsrCfg<float>::MC;
  const int64_t chunk =
      token_chunk(d.M, tiles, step, nnz * static_cast<int64_t>(at::elementSize(acc)), &splits);
  const bool direct = splits == 1 && d.out_dtype == acc;
  // Entries that no tile owns (malformed pattern) keep this NaN.
  at::Tensor buf = direct ? at::full({nnz}, NAN, out_opts)
                          : at::full({splits, nnz}, NAN, grad_y.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "sddmm_csr_cuda", [&] {
    using T = cuda::native_t<scalar_t>;
    using AccT = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::launch(sddmm_csr_kernel<T, AccT>, grid, kCsrThreads, 0, stream,
        reinterpret_cast<const T*>(dy.const_data_ptr()), reinterpret_cast<const T*>(xx.const_data_ptr()),
        crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), buf.mutable_data_ptr<AccT>(), d.M, d.N, d.K,
        nnz, n_col_tiles, chunk);
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
