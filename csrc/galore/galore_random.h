#pragma once
// Gaussian samples from lrk's Philox generator, shared by host and device code so
// that CPU and CUDA draw the same matrix for a seed (rsvd's Omega, the random
// projector). Convention (also in python/lrk/reference_galore.py):
//   element e (row-major) takes the words (w[2p], w[2p+1]), p = (e % 4) / 2, of
//   philox(counter = {lo(e / 4), hi(e / 4), kGaussianStream, 0}, key = seed) and
//   applies Box-Muller in float64: u1 = (w[2p] + 1) / 2^32 in (0, 1],
//   u2 = w[2p+1] / 2^32, radius = sqrt(-2 ln u1), value = radius * cos(2 pi u2)
//   for even e, radius * sin(2 pi u2) for odd e.
// The stream word keeps these draws apart from dropout masks with the same seed.
// The uniform words are identical everywhere; the Gaussian values agree to a few
// ulp in float64 (CUDA's log/sin/cos may differ from the host libm in the last
// bits), which is why tests compare them with a tolerance, not bit for bit.
#include <cmath>

#include "common/philox.h"

namespace lrk {

constexpr uint32_t kGaussianStream = 0x6A1043u;

LRK_HOST_DEVICE Philox4 philox_gaussian_words(uint64_t group, uint64_t seed) {
  return philox4x32_10_raw(
      Philox4{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), kGaussianStream, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The two samples that one pair of words gives (elements 2p and 2p+1 of a group).
LRK_HOST_DEVICE void box_muller(uint32_t w_radius, uint32_t w_angle, double& even, double& odd) {
  constexpr double kInv32 = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double u1 = (static_cast<double>(w_radius) + 1.0) * kInv32;
  const double u2 = static_cast<double>(w_angle) * kInv32;
  const double radius = sqrt(-2.0 * log(u1));
  const double angle = kTwoPi * u2;
  even = radius * cos(angle);
  odd = radius * sin(angle);
}

}  // namespace lrk
