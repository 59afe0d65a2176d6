// Tiled products with a 4-bit weight (quant4_cuda.h), portable across sm_80+.
// W is dequantized tile by tile into shared memory as the tile is loaded: the
// full dequantized weight never exists. Per reduction chunk a block
//   1. copies its tile of the activations into shared memory and stages the
//      absmax values the W tile needs (the 16-entry code table is staged once),
//   2. dequantizes its W tile into shared memory (zeros past every edge),
//   3. multiplies: WMMA 16x16x16 fragments with fp32 accumulation for bf16/fp16,
//      or a 4x4 register tile per thread (fp32, or fp64 for float64) otherwise.
// The W tile is stored in W's own [row][col] orientation for both products; the
// forward reads it as a column-major B (B[k][n] = W[n][k]), grad_input as a
// row-major one (B[n][k] = W[n][k]).
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include "common/dispatch.cuh"
#include "quant/quant4_cuda.h"
#include "quant/quant4_device.cuh"

namespace lrk {
namespace {

namespace wmma = nvcuda::wmma;
using quant4::acc_t;
using quant4::narrow;
using quant4::widen;

// Absmax blocks that `span` consecutive flat elements can touch (blocksize >= 32).
constexpr int blocks_touched(int span) { return (span + 30) / 32 + 1; }

// Tile geometry: BM rows of act and BN output columns per block, BK reduction
// elements per chunk. The W tile is WR x WC in W's orientation: BN x BK for the
// forward (W rows = outputs), BK x BN for grad_input (W rows = reduction).
template <int BM_, int BN_, int BK_, int Threads_, int Pad_, bool Transposed>
struct TileShape {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kThreads = Threads_;
  static constexpr int WR = Transposed ? BK : BN;
  static constexpr int WC = Transposed ? BN : BK;
  static constexpr int lda = BK + Pad_;  // As [BM][lda]
  static constexpr int ldw = WC + Pad_;  // Ws [WR][ldw]
  static constexpr int kSpan = blocks_touched(WC);
};

// act tile [BM][BK] at (m0, r0) of act [M, R] -> As (converted to S, zeros past the edges).
template <typename S, typename Shape, typename T>
__device__ __forceinline__ void load_act_tile(S* As, const T* __restrict__ act, int64_t M, int64_t R, int64_t m0,
                                              int64_t r0) {
  for (int e = threadIdx.x; e < Shape::BM * Shape::BK; e += Shape::kThreads) {
    const int r = e / Shape::BK, c = e % Shape::BK;
    const int64_t gm = m0 + r, gk = r0 + c;
    S v;
    if constexpr (std::is_same_v<S, T>) {
      v = (gm < M && gk < R) ? act[gm * R + gk] : narrow<T>(acc_t<T>(0));
    } else {
      v = (gm < M && gk < R) ? widen<S>(act[gm * R + gk]) : S(0);
    }
    As[r * Shape::lda + c] = v;
  }
}

// The absmax values of W tile rows [wr0, wr0 + WR) x cols [wc0, wc0 + WC): per tile row,
// the kSpan blocks from the one holding its first element. A block may begin in
// the previous row (the flat index runs across row ends), which this handles.
template <typename Shape>
__device__ __forceinline__ void stage_absmax(float* abs_s, const float* __restrict__ absmax, int64_t rows,
                                             int64_t cols, int64_t blocks, int shift, int64_t wr0, int64_t wc0) {
  for (int e = threadIdx.x; e < Shape::WR * Shape::kSpan; e += Shape::kThreads) {
    const int r = e / Shape::kSpan, j = e % Shape::kSpan;
    const int64_t row = wr0 + r;
    float v = 0.f;
    if (row < rows) {
      const int64_t b = ((row * cols + wc0) >> shift) + j;
      if (b < blocks) v = absmax[b];
    }
    abs_s[e] = v;
  }
}

// W tile rows [wr0, wr0 + WR) x cols [wc0, wc0 + WC) dequantized into Ws [WR][ldw] as S.
template <typename S, typename Shape>
__device__ __forceinline__ void dequantize_w_tile(S* Ws, const uint8_t* __restrict__ packed, const float* abs_s,
                                                  const float* code_s, int64_t rows, int64_t cols, int shift,
                                                  int64_t wr0, int64_t wc0) {
  for (int e = threadIdx.x; e < Shape::WR * Shape::WC; e += Shape::kThreads) {
    const int r = e / Shape::WC, c = e % Shape::WC;
    const int64_t row = wr0 + r, col = wc0 + c;
    float v = 0.f;
    if (row < rows && col < cols) {
      const int64_t i = row * cols + col;
      const int64_t first = (row * cols + wc0) >> shift;
      v = code_s[quant4::nibble_at(packed, i)] * abs_s[r * Shape::kSpan + ((i >> shift) - first)];
    }
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      Ws[r * Shape::ldw + c] = static_cast<S>(v);
    } else {
      Ws[r * Shape::ldw + c] = cuda::from_float<S>(v);
    }
  }
}

// ---- bf16 / fp16: WMMA ---------------------------------------------------------------

constexpr int kWmmaWarps = 4;  // 2 x 2 warps, each a 32 x 32 output tile (2 x 2 fragments)
template <bool Transposed>
using WmmaShape = TileShape<64, 64, 32, kWmmaWarps * 32, 8, Transposed>;

template <typename T, bool Transposed>
__global__ void __launch_bounds__(kWmmaWarps * 32)
    quant4_wmma_kernel(const T* __restrict__ act, const uint8_t* __restrict__ packed,
                       const float* __restrict__ absmax, const float* __restrict__ code, T* __restrict__ out,
                       int64_t M, int64_t rows, int64_t cols, int64_t blocks, int shift) {
  using Shape = WmmaShape<Transposed>;
  LRK_SHARED(32, T, As, [Shape::BM * Shape::lda]);
  LRK_SHARED(32, T, Ws, [Shape::WR * Shape::ldw]);
  LRK_SHARED(32, float, Cs, [kWmmaWarps][256]);
  LRK_SHARED(16, float, abs_s, [Shape::WR * Shape::kSpan]);
  LRK_SHARED(16, float, code_s, [16]);
  const int64_t R = Transposed ? rows : cols;  // reduction length
  const int64_t C = Transposed ? cols : rows;  // output columns
  const int64_t m0 = int64_t(blockIdx.x) * Shape::BM, c0 = int64_t(blockIdx.y) * Shape::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

  quant4::stage_code_table(code_s, code);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  using BLayout = std::conditional_t<Transposed, wmma::row_major, wmma::col_major>;
  for (int64_t r0 = 0; r0 < R; r0 += Shape::BK) {
    const int64_t wr0 = Transposed ? r0 : c0, wc0 = Transposed ? c0 : r0;
    __syncthreads();  // the previous chunk's fragments are loaded: As, Ws, abs_s are free
    load_act_tile<T, Shape>(As, act, M, R, m0, r0);
    stage_absmax<Shape>(abs_s, absmax, rows, cols, blocks, shift, wr0, wc0);
    __syncthreads();  // abs_s (and the code table) visible
    dequantize_w_tile<T, Shape>(Ws, packed, abs_s, code_s, rows, cols, shift, wr0, wc0);
    __syncthreads();  // the dequantized W tile visible to every warp before the MMA reads it
#pragma unroll
    for (int kk = 0; kk < Shape::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm + 16 * i) * Shape::lda + kk, Shape::lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn + 16 * j;
        // forward: B[k][n] = Ws[n][k] (column-major); grad_input: B[k][n] = Ws[k][n].
        const T* b = Transposed ? Ws + kk * Shape::ldw + n : Ws + n * Shape::ldw + kk;
        wmma::load_matrix_sync(fb[j], b, Shape::ldw);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Epilogue: each fragment through the warp's fp32 scratch, rounded, tails masked.
  float* scratch = Cs[warp];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t gm = m0 + wm + 16 * i + e / 16, gc = c0 + wn + 16 * j + e % 16;
        if (gm < M && gc < C) out[gm * C + gc] = cuda::from_float<T>(scratch[e]);
      }
      __syncwarp();  // scratch is reused by the next fragment
    }
}

// ---- float32 / float64: SIMT -----------------------------------------------------------

constexpr int kSimtThreads = 256;  // 16 x 16 threads, each a 4 x 4 register tile of a 64 x 64 output tile
template <bool Transposed>
using SimtShape = TileShape<64, 64, 16, kSimtThreads, 1, Transposed>;

template <typename T, bool Transposed>
__global__ void __launch_bounds__(kSimtThreads)
    quant4_simt_kernel(const T* __restrict__ act, const uint8_t* __restrict__ packed,
                       const float* __restrict__ absmax, const float* __restrict__ code, T* __restrict__ out,
                       int64_t M, int64_t rows, int64_t cols, int64_t blocks, int shift) {
  using Shape = SimtShape<Transposed>;
  using A = acc_t<T>;
  LRK_SHARED(16, A, As, [Shape::BM * Shape::lda]);
  LRK_SHARED(16, A, Ws, [Shape::WR * Shape::ldw]);
  LRK_SHARED(16, float, abs_s, [Shape::WR * Shape::kSpan]);
  LRK_SHARED(16, float, code_s, [16]);
  const int64_t R = Transposed ? rows : cols;
  const int64_t C = Transposed ? cols : rows;
  const int64_t m0 = int64_t(blockIdx.x) * Shape::BM, c0 = int64_t(blockIdx.y) * Shape::BN;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  quant4::stage_code_table(code_s, code);
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  for (int64_t r0 = 0; r0 < R; r0 += Shape::BK) {
    const int64_t wr0 = Transposed ? r0 : c0, wc0 = Transposed ? c0 : r0;
    __syncthreads();  // the previous chunk's reads of As, Ws, abs_s are done
    load_act_tile<A, Shape>(As, act, M, R, m0, r0);
    stage_absmax<Shape>(abs_s, absmax, rows, cols, blocks, shift, wr0, wc0);
    __syncthreads();  // abs_s (and the code table) visible
    dequantize_w_tile<A, Shape>(Ws, packed, abs_s, code_s, rows, cols, shift, wr0, wc0);
    __syncthreads();  // the dequantized W tile visible before it is multiplied
#pragma unroll 4
    for (int kk = 0; kk < Shape::BK; ++kk) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * Shape::lda + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tx + 16 * j;
        b[j] = Transposed ? Ws[kk * Shape::ldw + n] : Ws[n * Shape::ldw + kk];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gm = m0 + ty + 16 * i, gc = c0 + tx + 16 * j;
      if (gm < M && gc < C) out[gm * C + gc] = narrow<T>(acc[i][j]);
    }
}

template <typename T, int BM, int BN, typename... P>
void launch_tiled(void (*kernel)(P...), int threads, Quant4Product& p) {
  const int64_t M = p.M();
  const int64_t C = p.transposed ? p.cols : p.rows;
  const int64_t grid_m = cuda::ceil_div(M, BM), grid_c = cuda::ceil_div(C, BN);
  TORCH_CHECK(grid_m <= int64_t(INT32_MAX) && grid_c <= 65535, "linear_4bit: ", M, " x ", C,
              " outputs exceed the tiled kernel's grid");
  cuda::launch(kernel, dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_c)), threads, 0,
               at::cuda::getCurrentCUDAStream(), reinterpret_cast<const T*>(p.act.const_data_ptr()),
               p.packed.const_data_ptr<uint8_t>(), p.absmax.const_data_ptr<float>(),
               p.code.const_data_ptr<float>(), reinterpret_cast<T*>(p.out.mutable_data_ptr()), M, p.rows, p.cols,
               p.blocks, p.shift);
}

}  // namespace

void quant4_tiled_cuda(Quant4Product& p) {
  cuda::with_float_type(p.act.scalar_type(), "linear_4bit", [&](auto tag) {
    using T = decltype(tag);
    cuda::with_bool(p.transposed, [&](auto transposed) {
      constexpr bool kT = decltype(transposed)::value;
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        launch_tiled<T, SimtShape<kT>::BM, SimtShape<kT>::BN>(quant4_simt_kernel<T, kT>, kSimtThreads, p);
      } else {
        launch_tiled<T, WmmaShape<kT>::BM, WmmaShape<kT>::BN>(quant4_wmma_kernel<T, kT>, kWmmaWarps * 32, p);
      }
    });
  });
}

}  // namespace lrk
