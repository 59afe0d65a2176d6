#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
// A counter-based generator: the output is a pure function of (counter, key),
// which lets the backward pass regenerate a dropout mask instead of storing it.
// Host and device code share this header, so CPU and CUDA masks are identical.
//
// lrk's dropout convention (also written in python/lrk/reference.py):
//   element e (row-major logical index of the tensor) uses 32-bit word e % 4 of
//   philox(counter = {lo(e / 4), hi(e / 4), 0, 0}, key = {lo(seed), hi(seed)});
//   it is kept iff word >= threshold, threshold = min(floor(p * 2^32), 2^32 - 1),
//   and a kept element is scaled by 1 / (1 - p).
#include <cstdint>

#if defined(__CUDACC__)
#define LRK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LRK_HOST_DEVICE inline
#endif

namespace lrk {

struct Philox4 {
  uint32_t v[4];
};

LRK_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds on a 4-word counter and a 2-word key.
LRK_HOST_DEVICE Philox4 philox4x32_10_raw(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = ctr.v[0], c1 = ctr.v[1], c2 = ctr.v[2], c3 = ctr.v[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// lrk's counter layout: a 64-bit counter in the low words, the seed as key.
LRK_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  return philox4x32_10_raw(
      Philox4{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Threshold below which a word drops its element; p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  if (t <= 0.0) return 0u;
  if (t >= 4294967295.0) return 0xFFFFFFFFu;
  return static_cast<uint32_t>(t);
}

// Dropout parameters as passed to kernels.
struct DropoutParams {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // 0: no dropout
  double scale = 1.0;      // 1 / (1 - p)
  bool enabled() const { return threshold != 0; }
};

inline DropoutParams make_dropout_params(double p, int64_t seed) {
  DropoutParams d;
  d.seed = static_cast<uint64_t>(seed);
  d.threshold = dropout_threshold(p);
  d.scale = d.threshold == 0 ? 1.0 : 1.0 / (1.0 - p);
  return d;
}

// Keep flag of one element, computed alone (for scattered accesses).
LRK_HOST_DEVICE bool dropout_keep(uint64_t element, uint64_t seed, uint32_t threshold) {
  const Philox4 r = philox4x32_10(element >> 2, seed);
  return r.v[element & 3] >= threshold;
}

}  // namespace lrk
