// CUDA radix select: the exact k-th largest (smallest) |x|, no sort, no host
// synchronisation. Per digit of the order-preserving key (select_keys.h): a
// histogram pass over x (shared-memory counters per CTA, then one 64-bit atomic per
// non-empty bin), counting only elements whose higher digits match the prefix
// chosen so far; then a one-CTA kernel scans the bins from the top and extends the
// prefix. The state (prefix, fixed bits, remaining rank) stays on the device between
// passes. Integer counts: the result is deterministic.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "sparse/select_keys.h"

namespace lrk {
namespace {

using u64 = unsigned long long;

struct SelectState {
  u64 prefix;     // key bits chosen so far
  u64 fixed;      // which bits those are
  u64 remaining;  // rank (from the top) within the elements matching the prefix
};

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static __device__ __forceinline__ type abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }
  static __device__ __forceinline__ float value(u64 k) { return __uint_as_float(static_cast<uint32_t>(k)); }
};
template <>
struct KeyOf<double> {
  using type = u64;
  static __device__ __forceinline__ type abs_key(double v) {
    return static_cast<u64>(__double_as_longlong(v)) & 0x7fffffffffffffffULL;
  }
  static __device__ __forceinline__ double value(u64 k) { return __longlong_as_double(static_cast<long long>(k)); }
};
template <>
struct KeyOf<__half> {
  using type = uint16_t;
  static __device__ __forceinline__ type abs_key(__half v) { return __half_as_ushort(v) & 0x7fffu; }
  static __device__ __forceinline__ __half value(u64 k) { return __ushort_as_half(static_cast<unsigned short>(k)); }
};
template <>
struct KeyOf<__nv_bfloat16> {
  using type = uint16_t;
  static __device__ __forceinline__ type abs_key(__nv_bfloat16 v) { return __bfloat16_as_ushort(v) & 0x7fffu; }
  static __device__ __forceinline__ __nv_bfloat16 value(u64 k) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(k));
  }
};

constexpr int kThreads = 256;
constexpr int kMaxBins = 2048;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(const T* __restrict__ x, int64_t n, const SelectState* __restrict__ state,
                      u64* __restrict__ hist, int shift, int width, bool first) {
  using Key = KeyOf<T>;
  LRK_SHARED(alignof(unsigned), unsigned, counts, [kMaxBins]);
  const int bins = 1 << width;
  for (int i = threadIdx.x; i < bins; i += kThreads) counts[i] = 0;
  __syncthreads();
  const u64 prefix = first ? 0 : state->prefix;
  const u64 fixed = first ? 0 : state->fixed;
  const u64 digit_mask = static_cast<u64>(bins - 1);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const u64 key = Key::abs_key(x[i]);
    if ((key & fixed) == prefix) atomicAdd(&counts[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += kThreads) {
    if (counts[i] != 0) atomicAdd(&hist[i], static_cast<u64>(counts[i]));
  }
}

// One CTA: thread t owns the bins_per_thread digits starting bins-1 - t*bins_per_thread
// and going down; an exclusive scan over threads gives the count above each chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    radix_select_kernel(const u64* __restrict__ hist, SelectState* __restrict__ state, int shift, int width,
                        bool first, u64 rank, T* __restrict__ out, bool last) {
  using Scan = cub::BlockScan<u64, kThreads>;
  LRK_SHARED(alignof(typename Scan::TempStorage), typename Scan::TempStorage, scan_storage, );
  const int bins = 1 << width;
  const int per = bins / kThreads;  // bins are 256 .. 2048
  const u64 prefix = first ? 0 : state->prefix;
  const u64 fixed = first ? 0 : state->fixed;
  const u64 remaining = first ? rank : state->remaining;
  const int top = bins - 1 - static_cast<int>(threadIdx.x) * per;
  u64 mine = 0;
  for (int q = 0; q < per; ++q) mine += hist[top - q];
  u64 above = 0;
  Scan(scan_storage).ExclusiveSum(mine, above);  // synchronises: every thread has read state
  if (above < remaining && above + mine >= remaining) {
    for (int q = 0; q < per; ++q) {
      const u64 c = hist[top - q];
      if (above + c >= remaining) {
        const u64 digit = static_cast<u64>(top - q);
        const u64 new_prefix = prefix | (digit << shift);
        state->prefix = new_prefix;
        state->fixed = fixed | (static_cast<u64>(bins - 1) << shift);
        state->remaining = remaining - above;
        if (last) *out = KeyOf<T>::value(new_prefix);
        break;
      }
      above += c;
    }
  }
}

template <typename T>
void run_select(const at::Tensor& xc, int64_t rank, at::Tensor& out) {
  using Key = typename KeyOf<T>::type;
  constexpr int kBits = 8 * sizeof(Key);
  constexpr int kPasses = radix_passes(kBits);
  const int64_t n = xc.numel();
  // [state (3 words) | one histogram per pass], zeroed in one memset.
  at::Tensor ws = at::zeros({3 + int64_t(kPasses) * kMaxBins}, xc.options().dtype(at::kLong));
  auto* words = reinterpret_cast<u64*>(ws.mutable_data_ptr<int64_t>());
  auto* state = reinterpret_cast<SelectState*>(words);
  const int64_t grid = std::clamp<int64_t>(cuda::ceil_div(n, int64_t(kThreads) * 16), 1, 8LL * cuda::sm_count());
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = reinterpret_cast<const T*>(xc.const_data_ptr());
  T* o = reinterpret_cast<T*>(out.mutable_data_ptr());
  for (int p = 0; p < kPasses; ++p) {
    const RadixDigit dg = radix_digit(kBits, p);
    u64* hist = words + 3 + int64_t(p) * kMaxBins;
    cuda::launch(radix_hist_kernel<T>, static_cast<unsigned>(grid), kThreads, 0, stream, x, n, state, hist, dg.shift, dg.width,
                                                                                p == 0);
    cuda::launch(radix_select_kernel<T>, 1, kThreads, 0, stream, hist, state, dg.shift, dg.width, p == 0,
                                                       static_cast<u64>(rank), o, p == kPasses - 1);
  }
}

at::Tensor abs_kth_value_cuda(const at::Tensor& x, int64_t k, bool largest) {
  check_kth_args(x, k);
  TORCH_CHECK(cuda::on_kernel_device(x), "x: expected a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t rank = rank_from_top(xc.numel(), k, largest);
  at::Tensor out = at::full({}, NAN, x.options());  // overwritten by the last select pass
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "abs_kth_value_cuda", [&] {
    run_select<cuda::native_t<scalar_t>>(xc, rank, out);
  });
  return out;
}

}  // namespace

LRK_CUDA_KERNELS(m) { m.impl("abs_kth_value", &abs_kth_value_cuda); }

}  // namespace lrk
