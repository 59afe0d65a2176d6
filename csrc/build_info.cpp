// What this library was built for, read by lrk.build_info() through ctypes (a
// plain C symbol: no op schema, nothing to dispatch). The strings come from CMake
// as definitions of this file alone, so changing them recompiles only this file.
#ifndef LRK_BUILD_CUDA_ARCH_LIST
#define LRK_BUILD_CUDA_ARCH_LIST ""
#endif
#ifndef LRK_BUILD_DEFAULT_CUDA_ARCH_LIST
#define LRK_BUILD_DEFAULT_CUDA_ARCH_LIST ""
#endif
#ifndef LRK_BUILD_NVCC_VERSION
#define LRK_BUILD_NVCC_VERSION ""
#endif

#define LRK_EXPORT extern "C" __attribute__((visibility("default")))

// LRK_CUDA_ARCH_LIST as built, comma-separated ("8.0+PTX,9.0a"); "" for a CPU-only library.
LRK_EXPORT const char* lrk_build_cuda_arch_list() { return LRK_BUILD_CUDA_ARCH_LIST; }
// The default list of this source tree, to tell a default build from a custom one.
LRK_EXPORT const char* lrk_build_default_cuda_arch_list() { return LRK_BUILD_DEFAULT_CUDA_ARCH_LIST; }
LRK_EXPORT const char* lrk_build_nvcc_version() { return LRK_BUILD_NVCC_VERSION; }
