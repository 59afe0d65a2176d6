#pragma once
// How lrk's CUDA sources launch kernels, declare shared memory, ask the CUDA
// runtime for kernel attributes and register their ops, so that one source
// builds two ways:
//   - with nvcc: a plain <<<grid, block, smem, stream>>> launch followed by the
//     launch check; nothing else is added to device code or to the launch path;
//   - as C++ against the CPU emulator of the CUDA execution model (LRK_EMULATED,
//     csrc/emu): the launch runs every block and thread on fibers, shared memory
//     is allocated per block and poisoned, and the ops register in the lrk_emu
//     namespace for CPU tensors.
// Kernels use LRK_SHARED / LRK_DYNAMIC_SHARED instead of raw __shared__ (a
// raw declaration fails to compile in the emulated build).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstddef>
#include <utility>

#ifndef LRK_EMULATED
#include <c10/cuda/CUDAFunctions.h>
#else
#include <ATen/cuda/CUDAContext.h>

#include "emu/emu_runtime.h"
#endif

namespace lrk::cuda {

// Whether t lives where this build's kernels run: a CUDA device, or the CPU in
// the emulated build.
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef LRK_EMULATED
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// The device the kernels run on (the current CUDA device; the CPU when emulated).
inline at::Device kernel_device() {
#ifdef LRK_EMULATED
  return at::Device(at::kCPU);
#else
  return at::Device(at::kCUDA, c10::cuda::current_device());
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch check.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
#ifdef LRK_EMULATED
  (void)stream;
  emu::launch(kernel, grid, block, smem, std::forward<A>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Lets `kernel` use up to `bytes` of dynamic shared memory (above the 48 KB default).
template <typename... P>
inline void set_max_dynamic_shared_memory(void (*kernel)(P...), size_t bytes) {
#ifdef LRK_EMULATED
  (void)kernel;
  TORCH_CHECK(bytes <= static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin),
              "dynamic shared memory of ", bytes, " bytes exceeds the device's per-block limit");
#else
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#endif
}

// Resident blocks of `kernel` per SM at this block size and dynamic shared memory.
template <typename... P>
inline int max_active_blocks_per_sm(void (*kernel)(P...), int threads, size_t smem) {
#ifdef LRK_EMULATED
  (void)kernel, (void)threads, (void)smem;
  return 1;
#else
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks;
#endif
}

}  // namespace lrk::cuda

#ifdef LRK_EMULATED
// One allocation per block for each declaration, keyed by a static object of its own.
#define LRK_SHARED(align, type, name, dims)                 \
  static const char lrk_shared_key_##name = 0;              \
  auto& name = ::lrk::emu::block_shared<type dims>(&lrk_shared_key_##name)
#define LRK_DYNAMIC_SHARED(align, type, name) type* name = ::lrk::emu::dynamic_shared<type>()
// CUDA kernels of lrk op `name` register for CPU tensors in the lrk_emu namespace.
#define LRK_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(lrk_emu, CPU, m)
#else
// __shared__ __align__(align) type name dims;  e.g. LRK_SHARED(16, float, tile, [64][65])
#define LRK_SHARED(align, type, name, dims) __shared__ __align__(align) type name dims
// extern __shared__ __align__(align) type name[];  (sized by the launch)
#define LRK_DYNAMIC_SHARED(align, type, name) extern __shared__ __align__(align) type name[]
#define LRK_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(lrk, CUDA, m)
#endif
