#pragma once
// Emulated build: cub::BlockScan's exclusive sum over a 1-D block, with the
// barriers CUB's own implementation implies (before the result is read, and
// before TempStorage may be reused).
#include "emu/emu_runtime.h"

namespace cub {

template <typename T, int kBlockThreads>
class BlockScan {
 public:
  struct TempStorage {
    T values[kBlockThreads];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output) {
    auto& t = ::lrk::emu::this_thread();
    if (t.block->threads.size() != static_cast<size_t>(kBlockThreads))
      ::lrk::emu::fail("cub::BlockScan<" + std::to_string(kBlockThreads) + "> in a block of " +
                       std::to_string(t.block->threads.size()) + " threads");
    storage_.values[t.linear] = input;
    ::lrk::emu::syncthreads();
    T sum{};
    for (int i = 0; i < t.linear; ++i) sum += storage_.values[i];
    output = sum;
    ::lrk::emu::syncthreads();
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
