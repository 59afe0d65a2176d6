#pragma once
// cp.async (sm_80+): 16-byte global -> shared copies that complete in groups.
// In the emulated build (LRK_EMULATED) a copy lands only when its thread waits
// for its group, so a read of the destination before the wait sees poison.
#include <cstdint>

#ifdef LRK_EMULATED
#include "emu/emu_runtime.h"
#endif

namespace lrk::cuda {

// Copies 16 bytes from gmem to smem, or writes 16 zero bytes when !pred (gmem
// is not read then).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred = true) {
#if defined(LRK_EMULATED)
  emu::async_copy(smem, pred ? gmem : nullptr, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#else
  *reinterpret_cast<uint4*>(smem) = pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(LRK_EMULATED)
  emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of the committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LRK_EMULATED)
  emu::async_wait(kPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace lrk::cuda
