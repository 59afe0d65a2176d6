#pragma once
// nvcuda::wmma for the emulated build: the fragment API that lrk's kernels use
// (16x16x16, half/bfloat16 inputs, float accumulators), executed by the warp
// collectively. Each lane holds 8 of a fragment's 256 elements (element p of
// the row-major 16x16 tile lives in lane p % 32, slot p / 32). A GPU's mapping
// is unspecified and differs; kernels may only rely on element-wise use of x[].
// mma_sync is a warp barrier (all 32 lanes must call it, as on a GPU): it
// gathers the operands of all lanes and accumulates in float32, in ascending k.
// Loads, stores and fills touch only the calling lane's elements and run
// without a barrier (a barrier each would double the emulation time; lanes
// that skip them still meet at the next mma_sync or fail there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "emu/emu_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}
// Row and column in the 16x16 tile of this lane's slot i.
inline int row_of(int lane, int i) { return (i * 32 + lane) / 16; }
inline int col_of(int lane, int i) { return (i * 32 + lane) % 16; }

inline ::lrk::emu::Thread& lane_thread() { return ::lrk::emu::this_thread(); }
inline void warp_sync() { ::lrk::emu::warp_barrier(0xffffffffu, ::lrk::emu::WarpOp::kWmma); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the 16x16x16 wmma shape");

 public:
  using element_type = T;
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
  for (auto& e : f.x) e = v;
}

// A tile stored with leading dimension ldm: row-major (r, c) at p[r * ldm + c],
// column-major at p[c * ldm + r].
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load needs a layout argument");
  const int lane = detail::lane_thread().lane;
  constexpr bool kRow = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(lane, i), c = detail::col_of(lane, i);
    f.x[i] = kRow ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  const int lane = detail::lane_thread().lane;
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(lane, i), c = detail::col_of(lane, i);
    f.x[i] = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
  }
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t layout) {
  const int lane = detail::lane_thread().lane;
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(lane, i), c = detail::col_of(lane, i);
    (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[i];
  }
}

// d = a @ b + c over the warp's 16x16 tiles.
template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  auto& t = detail::lane_thread();
  auto& w = t.block->warps[t.warp];
  const int buf = t.mmas++ & 1;
  auto& tile_a = w.tile_a[buf];
  auto& tile_b = w.tile_b[buf];
  for (int i = 0; i < 8; ++i) {
    tile_a[t.lane][i] = detail::to_f(a.x[i]);
    tile_b[t.lane][i] = detail::to_f(b.x[i]);
  }
  detail::warp_sync();
  // Element (r, c) of a tile lives in lane (r*16+c) % 32, slot (r*16+c) / 32.
  auto at = [](float (&tile)[32][8], int r, int c) { return tile[(r * 16 + c) % 32][(r * 16 + c) / 32]; };
  TC out[8];
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(t.lane, i), col = detail::col_of(t.lane, i);
    float acc = detail::to_f(c.x[i]);
    for (int k = 0; k < 16; ++k) acc += at(tile_a, r, k) * at(tile_b, k, col);
    out[i] = detail::from_f<TC>(acc);
  }
  for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}

}  // namespace nvcuda::wmma
