#pragma once
// Emulated build: the parts of ATen's CUDA context that lrk's CUDA sources use.
// The "device" is the CPU; its properties are those of an 8-SM sm_80 part, so
// that grids sized from the SM count stay small enough to emulate.
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "emu/emu_runtime.h"

namespace at::cuda {

struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline EmulatedStream getCurrentCUDAStream(int = -1) { return {}; }

inline cudaDeviceProp* getDeviceProperties(int64_t = -1) {
  static cudaDeviceProp props = [] {
    cudaDeviceProp p{};
    std::strncpy(p.name, "lrk emulated sm_80", sizeof(p.name) - 1);
    p.major = 8;
    p.minor = 0;
    p.multiProcessorCount = 8;
    p.warpSize = 32;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiProcessor = 2048;
    p.sharedMemPerBlock = 48 * 1024;
    p.sharedMemPerBlockOptin = 163 * 1024;
    p.sharedMemPerMultiprocessor = 164 * 1024;
    p.regsPerBlock = 65536;
    return p;
  }();
  return &props;
}
inline cudaDeviceProp* getCurrentDeviceProperties() { return getDeviceProperties(); }

}  // namespace at::cuda
