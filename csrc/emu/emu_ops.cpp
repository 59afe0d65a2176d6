// Control of the emulator from Python (emulated build only): the thread and
// block order of the following launches, and counters that show kernels ran.
#include <torch/library.h>

#include <string>
#include <vector>

#include "emu/emu_runtime.h"

namespace lrk::emu {
namespace {

void set_schedule(const std::string& order, int64_t seed) {
  schedule() = Schedule{parse_order(order), static_cast<uint64_t>(seed)};
}

// [launches, blocks, fiber switches] since the library was loaded.
std::vector<int64_t> read_counters() {
  const Counters& c = counters();
  return {static_cast<int64_t>(c.launches), static_cast<int64_t>(c.blocks), static_cast<int64_t>(c.switches)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrk_emu, m) {
  m.def("emu_set_schedule(str order, int seed) -> ()", &set_schedule);
  m.def("emu_counters() -> int[]", &read_counters);
}

}  // namespace lrk::emu
