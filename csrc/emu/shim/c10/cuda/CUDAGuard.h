#pragma once
// Emulated build: there is one device (the CPU), so a device guard does nothing.
#include <c10/core/Device.h>

#include "c10/cuda/CUDAException.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace c10::cuda
