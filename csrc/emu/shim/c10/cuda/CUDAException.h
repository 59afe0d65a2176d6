#pragma once
// Emulated build: CUDA runtime calls go through lrk::cuda's facade, which returns
// cudaSuccess or throws; the checks stay so that the sources read as on a GPU.
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    const cudaError_t lrk_emu_status = (expr);                                \
    TORCH_CHECK(lrk_emu_status == cudaSuccess, "emulated CUDA call failed: ", \
                static_cast<int>(lrk_emu_status));                            \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
