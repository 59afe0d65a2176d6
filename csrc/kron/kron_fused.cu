// The fused Kronecker adapter forward (see kron_fused.h). Portable across sm_80+:
// WMMA (mma.sync) tensor-core fragments and cp.async, no Hopper-only features.
//
// A persistent block keeps every term's factors in shared memory (u pre-scaled by
// coef_t and rounded to the input dtype, as the portable path does) and walks over
// rows of x. Per row m and term t:
//   stage 1: Z_t = X_m @ V_t^T   [n1, m2], fp32 accumulation, rounded into shared memory
//   stage 2: Y  += Uc_t @ Z_t    [m1, m2], fp32 accumulators held in registers over all terms
// then Y (+ bias) is written once. The next row's X is fetched with cp.async while
// the current one is computed. Shared memory for 64x64 ⊗ 64x64 with 4 terms is 107 KiB:
// two blocks per SM on H100/H200, one on A100. 8 warps; each owns up to 2 of the 16x16 fragments of
// Z_t and of Y, so Z_t and Y are at most 16 fragments (e.g. 64 x 64).
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string_view>
#include <utility>

#include "common/async_copy.cuh"
#include "common/cuda_utils.cuh"
#include "kron/kron_fused.h"
#include "common/dispatch.cuh"

namespace lrk {
namespace {

namespace wmma = nvcuda::wmma;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kFragsPerWarp = 2;
constexpr int kMaxFrags = kWarps * kFragsPerWarp;
constexpr int kPad = 8;  // 16-bit elements added to every shared row: spreads rows over banks

// Shared-memory plan, computed on the host and passed to the kernel by value.
struct FusedLayout {
  int ldu, ldv, ldx, ldz;                                    // leading dims (elements)
  int64_t u_off, v_off, x_off, z_off, scratch_off, total;    // byte offsets, 128-byte aligned
};

int64_t align128(int64_t b) { return (b + 127) / 128 * 128; }

FusedLayout fused_layout(const KronDims& d, int64_t elem) {
  FusedLayout L{};
  L.ldu = static_cast<int>(d.n1) + kPad;
  L.ldv = static_cast<int>(d.n2) + kPad;
  L.ldx = static_cast<int>(d.n2) + kPad;
  L.ldz = static_cast<int>(d.m2) + kPad;
  int64_t off = 0;
  L.u_off = off;
  off = align128(off + d.k * d.m1 * L.ldu * elem);
  L.v_off = off;
  off = align128(off + d.k * d.m2 * L.ldv * elem);
  L.x_off = off;
  off = align128(off + 2 * d.n1 * L.ldx * elem);  // two rows: current and prefetched
  // One Z_t buffer (a second one would save a barrier per term but cost the second
  // resident block per SM on H100 for the 64x64 ⊗ 64x64, 4-term case).
  L.z_off = off;
  off = align128(off + d.n1 * L.ldz * elem);
  L.scratch_off = off;
  off = align128(off + int64_t(kWarps) * 256 * int64_t(sizeof(float)));  // one 16x16 fp32 tile per warp
  L.total = off;
  return L;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) { cuda::cp_async_16(smem, gmem); }
using cuda::cp_async_commit;
// Waits until at most the newest committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_newest() { cuda::cp_async_wait<1>(); }
// Waits for every copy issued, committed or not.
__device__ __forceinline__ void cp_async_wait_all() {
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
}

// X_m [n1, n2] (one contiguous row of x) -> shared [n1][ldx], 16 bytes per copy.
template <typename T>
__device__ __forceinline__ void load_row_async(T* xs, const T* __restrict__ xrow, int n1, int n2, int ldx) {
  const int per_row = n2 / 8;
  const int chunks = n1 * per_row;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const int j1 = c / per_row, j2 = (c % per_row) * 8;
    cp_async16(xs + j1 * ldx + j2, xrow + j1 * n2 + j2);
  }
}

// A warp's 16x16 fp32 tile (in its scratch, row-major, ld 16) -> 8 values per lane,
// converted to T (plus bias) and stored with one 16-byte write at dst + r * ld + c.
template <typename T>
__device__ __forceinline__ void store_tile(const float* scratch, T* dst, int64_t ld, const T* bias_tile) {
  const int lane = threadIdx.x % 32;
  const int r = lane >> 1, c = (lane & 1) * 8;
  alignas(16) T vals[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float val = scratch[r * 16 + c + j];
    if (bias_tile != nullptr) val += cuda::to_float(bias_tile[r * ld + c + j]);
    vals[j] = cuda::from_float<T>(val);
  }
  *reinterpret_cast<uint4*>(dst + r * ld + c) = *reinterpret_cast<const uint4*>(vals);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_fused_fwd_kernel(const T* __restrict__ x, const T* __restrict__ u, const T* __restrict__ v,
                          const float* __restrict__ coef, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                          int k, int m1, int n1, int m2, int n2, FusedLayout L) {
  LRK_DYNAMIC_SHARED(128, unsigned char, smem);
  T* us = reinterpret_cast<T*>(smem + L.u_off);
  T* vs = reinterpret_cast<T*>(smem + L.v_off);
  T* xs = reinterpret_cast<T*>(smem + L.x_off);
  T* zs = reinterpret_cast<T*>(smem + L.z_off);
  const int warp = threadIdx.x / 32;
  float* scratch = reinterpret_cast<float*>(smem + L.scratch_off) + warp * 256;
  const int64_t K = int64_t(n1) * n2, N = int64_t(m1) * m2;

  // Factors, once per block: us[t][i1][j1] = coef_t * u[t][i1][j1], vs[t][i2][j2] = v[t][i2][j2].
  const int u_terms = m1 * n1, v_terms = m2 * n2;
  for (int e = threadIdx.x; e < k * u_terms; e += kThreads) {
    const int t = e / u_terms, i = (e % u_terms) / n1, j = e % n1;
    us[(t * m1 + i) * L.ldu + j] = cuda::from_float<T>(coef[t] * cuda::to_float(u[e]));
  }
  for (int e = threadIdx.x; e < k * v_terms; e += kThreads) {
    const int t = e / v_terms, i = (e % v_terms) / n2, j = e % n2;
    vs[(t * m2 + i) * L.ldv + j] = v[e];
  }

  const int tiles_m2 = m2 / 16;
  const int z_frags = (n1 / 16) * tiles_m2;  // Z_t [n1, m2]
  const int y_frags = (m1 / 16) * tiles_m2;  // Y [m1, m2]
  const int x_buf = n1 * L.ldx;

  int64_t row = blockIdx.x;
  if (row < M) load_row_async(xs, x + row * K, n1, n2, L.ldx);
  cp_async_commit();
  for (int it = 0; row < M; ++it, row += gridDim.x) {
    const T* xcur = xs + (it & 1) * x_buf;
    const int64_t next = row + gridDim.x;
    if (next < M) load_row_async(xs + ((it + 1) & 1) * x_buf, x + next * K, n1, n2, L.ldx);
    cp_async_commit();  // possibly empty: keeps one group per iteration
    cp_async_wait_all_but_newest();
    __syncthreads();  // this row's X (and, the first time, the factors) visible to every warp

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> yacc[kFragsPerWarp];
#pragma unroll
    for (int i = 0; i < kFragsPerWarp; ++i) wmma::fill_fragment(yacc[i], 0.f);

    for (int t = 0; t < k; ++t) {
      if (t > 0) __syncthreads();  // stage 2 of term t-1 has finished reading Z
      T* zt = zs;
      const T* vt = vs + t * m2 * L.ldv;
      const T* ut = us + t * m1 * L.ldu;
      // Stage 1: Z_t = X_m @ V_t^T; B[j2][i2] = V_t[i2][j2] is V_t read column-major.
#pragma unroll
      for (int i = 0; i < kFragsPerWarp; ++i) {
        const int f = warp + i * kWarps;
        if (f < z_frags) {  // warp-uniform
          const int a = f / tiles_m2, b = f % tiles_m2;
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> zacc;
          wmma::fill_fragment(zacc, 0.f);
          for (int kk = 0; kk < n2; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fa, xcur + a * 16 * L.ldx + kk, L.ldx);
            wmma::load_matrix_sync(fb, vt + b * 16 * L.ldv + kk, L.ldv);
            wmma::mma_sync(zacc, fa, fb, zacc);
          }
          wmma::store_matrix_sync(scratch, zacc, 16, wmma::mem_row_major);
          __syncwarp();
          store_tile<T>(scratch, zt + a * 16 * L.ldz + b * 16, L.ldz, nullptr);
          __syncwarp();  // scratch is reused
        }
      }
      __syncthreads();  // Z_t complete
      // Stage 2: Y += Uc_t @ Z_t.
#pragma unroll
      for (int i = 0; i < kFragsPerWarp; ++i) {
        const int f = warp + i * kWarps;
        if (f < y_frags) {
          const int a = f / tiles_m2, b = f % tiles_m2;
          for (int kk = 0; kk < n1; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fa, ut + a * 16 * L.ldu + kk, L.ldu);
            wmma::load_matrix_sync(fb, zt + kk * L.ldz + b * 16, L.ldz);
            wmma::mma_sync(yacc[i], fa, fb, yacc[i]);
          }
        }
      }
    }
    // Epilogue: y[row] = Y (+ bias), Y[i1][i2] at i1 * m2 + i2.
#pragma unroll
    for (int i = 0; i < kFragsPerWarp; ++i) {
      const int f = warp + i * kWarps;
      if (f < y_frags) {
        const int a = f / tiles_m2, b = f % tiles_m2;
        const int64_t off = int64_t(a) * 16 * m2 + b * 16;
        wmma::store_matrix_sync(scratch, yacc[i], 16, wmma::mem_row_major);
        __syncwarp();
        store_tile<T>(scratch, y + row * N + off, m2, bias != nullptr ? bias + off : nullptr);
        __syncwarp();
      }
    }
    __syncthreads();  // every read of this row's X and Z done before they are overwritten
  }
  cp_async_wait_all();
}

bool fused_enabled() {
  const char* env = std::getenv("LRK_KRON_FUSED");
  return env == nullptr || std::string_view(env) != "0";
}

bool shapes_fit(const KronDims& d) {
  if (d.m1 % 16 || d.n1 % 16 || d.m2 % 16 || d.n2 % 16) return false;
  return (d.m1 / 16) * (d.m2 / 16) <= kMaxFrags && (d.n1 / 16) * (d.m2 / 16) <= kMaxFrags;
}

// Blocks per SM of kron_fused_fwd_kernel<T> with smem bytes of dynamic shared
// memory on device, after allowing that much. cudaFuncSetAttribute and the
// occupancy query are driver calls that depend only on (device, kernel, smem), so
// they run once per such configuration, not per forward. The allowance only ever
// grows per (device, kernel): a launch with less shared memory than an earlier one
// stays within it (setting it down again would make a cached larger size fail).
template <typename T>
int fused_blocks_per_sm(int device, int64_t smem) {
  static std::mutex mutex;
  static std::map<int, int64_t> allowed;                    // device -> attribute value set
  static std::map<std::pair<int, int64_t>, int> occupancy;  // (device, smem) -> blocks per SM
  const std::lock_guard<std::mutex> lock(mutex);
  const auto hit = occupancy.find({device, smem});
  if (hit != occupancy.end()) return hit->second;
  auto kernel = kron_fused_fwd_kernel<T>;
  int64_t& limit = allowed[device];
  if (smem > limit) {
    cuda::set_max_dynamic_shared_memory(kernel, static_cast<size_t>(smem));
    limit = smem;
  }
  const int per_sm = cuda::max_active_blocks_per_sm(kernel, kThreads, static_cast<size_t>(smem));
  occupancy.emplace(std::make_pair(device, smem), per_sm);
  return per_sm;
}

}  // namespace

bool kron_fused_supported(const at::Tensor& x2, const KronDims& d) {
  if (!fused_enabled() || !is_half_precision(x2.scalar_type()) || d.M == 0 || !shapes_fit(d)) return false;
  if (!x2.is_contiguous() || !cuda::aligned16(x2.const_data_ptr())) return false;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  if (props->major < 8) return false;
  return fused_layout(d, 2).total <= static_cast<int64_t>(props->sharedMemPerBlockOptin);
}

void kron_fused_forward_cuda(const at::Tensor& x2, const at::Tensor& u, const at::Tensor& v, const at::Tensor& coef,
                             const std::optional<at::Tensor>& bias, at::Tensor& y2, const KronDims& d) {
  TORCH_CHECK(kron_fused_supported(x2, d), "kron_fused_forward_cuda: unsupported inputs");
  TORCH_CHECK(u.is_contiguous() && v.is_contiguous() && y2.is_contiguous() && coef.is_contiguous() &&
                  coef.scalar_type() == at::kFloat,
              "kron_fused_forward_cuda: contiguous factors and output, float32 coefficients expected");
  const c10::cuda::CUDAGuard guard(x2.device());
  const at::Tensor b = has_tensor(bias) ? bias->contiguous() : at::Tensor();
  const FusedLayout L = fused_layout(d, 2);
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(x2.scalar_type(), "kron_linear fused", [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_fused_fwd_kernel<T>;
    const int per_sm = fused_blocks_per_sm<T>(x2.get_device(), L.total);
    const int64_t blocks = std::min<int64_t>(d.M, int64_t(std::max(per_sm, 1)) * cuda::sm_count());
    cuda::launch(kernel, static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(L.total), stream,
        reinterpret_cast<const T*>(x2.const_data_ptr()), reinterpret_cast<const T*>(u.const_data_ptr()),
        reinterpret_cast<const T*>(v.const_data_ptr()), coef.const_data_ptr<float>(),
        b.defined() ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr,
        reinterpret_cast<T*>(y2.mutable_data_ptr()), d.M, static_cast<int>(d.k), static_cast<int>(d.m1),
        static_cast<int>(d.n1), static_cast<int>(d.m2), static_cast<int>(d.n2), L);
  });
}

}  // namespace lrk
