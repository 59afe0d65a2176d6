#pragma once
// The CUDA execution model on the CPU, sized to what lrk's portable kernels use
// (see csrc/emu/README.md for what it shows and what it cannot).
//
// A launch runs its blocks one after another; every block runs with its real
// thread count, each CUDA thread a fiber (ucontext) with its own stack, so
// __syncthreads() and the warp-collective operations suspend a thread until
// every thread they wait for has arrived, as on a GPU. Between two barriers the
// threads of a block run one after another, in an order chosen per run
// (forward, reverse, or shuffled from a seed, also the block order): a kernel
// that races on shared memory gives different answers under different orders.
// Shared memory, static and dynamic, is allocated per block and filled with 0xFF
// bytes (NaN in every float type, -1 in every integer type), so a read of shared
// memory that no thread wrote shows up; each allocation is its own heap block, so
// AddressSanitizer reports out-of-bounds shared accesses.
//
// Errors (a deadlock, divergent warp-collective calls, a lane that exited before
// a collective that names it) abort the launch with an exception naming the
// kernel's block and thread.
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <vector_functions.h>
#include <vector_types.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LRK_EMU_ASAN 1
#endif

namespace lrk::emu {

// ------------------------------------------------------------------ schedule

enum class Order { kForward, kReverse, kShuffled };

struct Schedule {
  Order order = Order::kForward;
  uint64_t seed = 0;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

inline Order parse_order(const std::string& name) {
  if (name == "forward") return Order::kForward;
  if (name == "reverse") return Order::kReverse;
  if (name == "shuffled") return Order::kShuffled;
  throw std::invalid_argument("emulator thread order: expected forward, reverse or shuffled, got '" + name + "'");
}

// Number of launches and of fiber switches since start: the tests read them to
// show that a kernel really ran on the emulator.
struct Counters {
  uint64_t launches = 0;
  uint64_t blocks = 0;
  uint64_t switches = 0;
};
inline Counters& counters() {
  static Counters c;
  return c;
}

// ------------------------------------------------------------------ state

class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Block;

enum class Wait { kNone, kBlock, kWarp };

// Kinds of warp-collective call: all lanes that meet at one warp barrier must
// have made the same kind of call.
enum class WarpOp { kSyncwarp, kShuffle, kVote, kWmma };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShuffle: return "a warp shuffle";
    case WarpOp::kVote: return "a warp vote";
    case WarpOp::kWmma: return "a wmma operation";
  }
  return "?";
}

// A pending cp.async copy (performed when the thread waits for its group).
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero fill
  size_t bytes;
};

struct Thread {
  uint3 idx{0, 0, 0};
  int linear = 0;
  int lane = 0;
  int warp = 0;
  Block* block = nullptr;
  ucontext_t ctx{};
  unsigned char* stack = nullptr;  // kStackBytes, from stack_for()
  bool done = false;
  Wait wait = Wait::kNone;
  uint32_t warp_mask = 0;   // the mask of the warp barrier it waits at
  WarpOp warp_op = WarpOp::kSyncwarp;
  uint32_t exchanges = 0;  // value exchanges (shuffle, vote) so far: picks the scratch
  uint32_t mmas = 0;       // wmma mma_sync calls so far: picks the tile scratch
  std::vector<std::vector<AsyncCopy>> async_groups;  // committed groups, oldest first
  std::vector<AsyncCopy> async_open;                 // issued, not yet committed
#ifdef LRK_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  // Scratch for the collective operations: values of every lane, and the
  // 16x16 tiles of a wmma mma. Two of each, used alternately: a lane writes the
  // next call's scratch while slower lanes still read this call's, and cannot
  // get two calls ahead (the next call's barrier waits for them), so each
  // exchange needs one barrier, not two.
  uint64_t values[2][32][4];
  float tile_a[2][32][8];
  float tile_b[2][32][8];
};

// Shared allocations carry guard bytes on both sides: a write past either end
// that AddressSanitizer does not watch (the unsanitized build) still shows up
// when the block ends.
constexpr size_t kGuardBytes = 128;  // keeps the 128-byte alignment of the data
constexpr unsigned char kGuardByte = 0xA5;

struct SharedAlloc {
  void* ptr;  // kGuardBytes past the start of the allocation
  size_t bytes;
};

inline void* alloc_shared(size_t bytes) {
  const size_t total = (kGuardBytes + bytes + kGuardBytes + 127) / 128 * 128;
  auto* base = static_cast<unsigned char*>(std::aligned_alloc(128, total));
  std::memset(base, kGuardByte, kGuardBytes);
  std::memset(base + kGuardBytes, 0xFF, bytes);  // poison: NaN in every float type
  std::memset(base + kGuardBytes + bytes, kGuardByte, kGuardBytes);
  return base + kGuardBytes;
}

inline bool guards_intact(const void* p, size_t bytes) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < kGuardBytes; ++i)
    if (q[-1 - static_cast<ptrdiff_t>(i)] != kGuardByte || q[bytes + i] != kGuardByte) return false;
  return true;
}

inline void free_shared(void* p) { std::free(static_cast<unsigned char*>(p) - kGuardBytes); }

struct Block {
  uint3 idx{0, 0, 0};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::map<const void*, SharedAlloc> shared;  // static __shared__ variables, by declaration
  void* dynamic_shared = nullptr;
  size_t dynamic_shared_bytes = 0;
  ~Block() {
    for (auto& kv : shared) free_shared(kv.second.ptr);
    if (dynamic_shared) free_shared(dynamic_shared);
  }
  // Names the first shared allocation written past its ends, or "".
  std::string overrun() const {
    int n = 0;
    for (auto& kv : shared) {
      ++n;
      if (!guards_intact(kv.second.ptr, kv.second.bytes))
        return "static shared variable #" + std::to_string(n) + " (" + std::to_string(kv.second.bytes) + " bytes)";
    }
    if (dynamic_shared && !guards_intact(dynamic_shared, dynamic_shared_bytes))
      return "dynamic shared memory (" + std::to_string(dynamic_shared_bytes) + " bytes)";
    return "";
  }
};

struct Launch {
  dim3 grid, block_dim;
  size_t dynamic_smem = 0;
  Block* block = nullptr;
  Thread* current = nullptr;
  ucontext_t scheduler{};
  std::exception_ptr error;
  std::function<void()> body;  // runs the kernel with this launch's arguments
#ifdef LRK_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

inline Launch*& current_launch() {
  static thread_local Launch* l = nullptr;
  return l;
}

inline Thread& this_thread() {
  Launch* l = current_launch();
  if (l == nullptr || l->current == nullptr) throw KernelError("CUDA device code called outside an emulated kernel");
  return *l->current;
}

inline std::string where(const Thread& t) {
  std::ostringstream s;
  s << "block (" << t.block->idx.x << "," << t.block->idx.y << "," << t.block->idx.z << ") thread (" << t.idx.x
    << "," << t.idx.y << "," << t.idx.z << ")";
  return s.str();
}

[[noreturn]] inline void fail(const std::string& what) {
  throw KernelError("emulated CUDA kernel: " + what);
}

// ------------------------------------------------------------------ fibers

constexpr size_t kStackBytes =
#ifdef LRK_EMU_ASAN
    64 * 1024;  // ASan clears the shadow of the whole stack at every switch
#else
    128 * 1024;
#endif

// Fiber stacks, kept for the next launches: allocating (and, under ASan,
// poisoning) megabytes per launch would cost more than the kernels.
inline unsigned char* stack_for(size_t thread) {
  static thread_local std::vector<std::unique_ptr<unsigned char[]>> pool;
  while (pool.size() <= thread) pool.emplace_back(new unsigned char[kStackBytes]);
  unsigned char* s = pool[thread].get();
#ifdef LRK_EMU_ASAN
  // A fiber that ended by switching away leaves its frames' redzones poisoned.
  __asan_unpoison_memory_region(s, kStackBytes);
#endif
  return s;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
inline void yield_to_scheduler() {
  Launch* l = current_launch();
  Thread* t = l->current;
  ++counters().switches;
#ifdef LRK_EMU_ASAN
  __sanitizer_start_switch_fiber(&t->fake_stack, l->scheduler_stack_bottom, l->scheduler_stack_size);
#endif
  swapcontext(&t->ctx, &l->scheduler);
#ifdef LRK_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
}

inline void thread_entry() {
  Launch* l = current_launch();
#ifdef LRK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l->scheduler_stack_bottom, &l->scheduler_stack_size);
#endif
  try {
    l->body();
  } catch (...) {
    if (!l->error) l->error = std::current_exception();
  }
  Thread* t = l->current;
  t->done = true;
  if (!t->async_open.empty() || !t->async_groups.empty()) {
    // Copies still in flight when the thread ends land anyway on a GPU.
    for (auto& g : t->async_groups)
      for (auto& c : g) c.src ? std::memcpy(c.dst, c.src, c.bytes) : std::memset(c.dst, 0, c.bytes);
    for (auto& c : t->async_open) c.src ? std::memcpy(c.dst, c.src, c.bytes) : std::memset(c.dst, 0, c.bytes);
  }
#ifdef LRK_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, l->scheduler_stack_bottom, l->scheduler_stack_size);
#endif
  setcontext(&l->scheduler);
}

// ------------------------------------------------------------------ barriers

// Releases the threads of a barrier once every thread it waits for has arrived.
inline void release_if_complete(Block& b) {
  // Block barrier: every thread that has not exited waits at __syncthreads.
  bool any_waiting = false, all_block = true;
  for (auto& t : b.threads) {
    if (t.done) continue;
    if (t.wait == Wait::kBlock) {
      any_waiting = true;
    } else {
      all_block = false;
    }
  }
  if (any_waiting && all_block) {
    for (auto& t : b.threads) t.wait = Wait::kNone;
  }
}

inline void release_warp_if_complete(Block& b, int warp) {
  const int first = warp * 32;
  const int count = std::min<int>(32, static_cast<int>(b.threads.size()) - first);
  // Any waiting lane's mask says whom it waits for; all waiting lanes must agree.
  const Thread* lead = nullptr;
  for (int i = 0; i < count; ++i) {
    const Thread& t = b.threads[first + i];
    if (t.wait == Wait::kWarp) {
      lead = &t;
      break;
    }
  }
  if (lead == nullptr) return;
  const uint32_t mask = lead->warp_mask;
  for (int i = 0; i < count; ++i) {
    const Thread& t = b.threads[first + i];
    if (!(mask >> i & 1u)) {
      if (t.wait == Wait::kWarp)
        fail(where(t) + ": lane " + std::to_string(i) + " waits at " + warp_op_name(t.warp_op) +
             " but is not in the mask of its warp's other lanes");
      continue;
    }
    if (t.done)
      fail(where(*lead) + ": " + warp_op_name(lead->warp_op) + " names lane " + std::to_string(i) +
           ", which has exited");
    if (t.wait != Wait::kWarp) return;  // not yet arrived
    if (t.warp_mask != mask)
      fail(where(t) + ": lanes of one warp meet at " + warp_op_name(t.warp_op) + " with different masks");
    if (t.warp_op != lead->warp_op)
      fail(where(t) + ": divergent warp-collective calls: " + warp_op_name(t.warp_op) + " and " +
           warp_op_name(lead->warp_op));
  }
  for (int i = 0; i < count; ++i) {
    if (mask >> i & 1u) b.threads[first + i].wait = Wait::kNone;
  }
}

inline void syncthreads() {
  Thread& t = this_thread();
  t.wait = Wait::kBlock;
  release_if_complete(*t.block);
  while (t.wait != Wait::kNone) yield_to_scheduler();
}

// Suspends until the lanes in `mask` have all arrived at a warp barrier of kind op.
inline void warp_barrier(uint32_t mask, WarpOp op) {
  Thread& t = this_thread();
  if (!(mask >> t.lane & 1u)) fail(where(t) + ": " + warp_op_name(op) + " with a mask that excludes the calling lane");
  const int warp_size = std::min<int>(32, static_cast<int>(t.block->threads.size()) - t.warp * 32);
  if (warp_size < 32 && (mask >> warp_size) != 0)
    fail(where(t) + ": " + warp_op_name(op) + " mask names lanes past the block's last thread");
  t.wait = Wait::kWarp;
  t.warp_mask = mask;
  t.warp_op = op;
  release_warp_if_complete(*t.block, t.warp);
  while (t.wait != Wait::kNone) yield_to_scheduler();
}

// ------------------------------------------------------------------ scheduling

inline std::vector<int> thread_order(int n, uint64_t salt) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const Schedule& s = schedule();
  if (s.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (s.order == Order::kShuffled) {
    std::mt19937_64 rng(s.seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

inline void run_block(Launch& l, Block& b, uint64_t salt) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.block = &b;
    t.stack = stack_for(static_cast<size_t>(i));
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, &thread_entry, 0);
  }
  uint64_t round = 0;
  for (;;) {
    bool progressed = false, all_done = true;
    for (int i : thread_order(n, salt * 1000003ull + round++)) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.wait != Wait::kNone) continue;
      progressed = true;
      l.current = &t;
#ifdef LRK_EMU_ASAN
      __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, t.stack, kStackBytes);
#endif
      swapcontext(&l.scheduler, &t.ctx);
#ifdef LRK_EMU_ASAN
      __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
#endif
      l.current = nullptr;
      if (l.error) return;
      if (t.done) {
        // An exited thread no longer holds back __syncthreads; a warp barrier that
        // names it is an error (reported when the barrier is checked).
        release_if_complete(b);
        try {
          release_warp_if_complete(b, t.warp);
        } catch (...) {
          l.error = std::current_exception();
          return;
        }
      }
    }
    if (all_done) return;
    if (!progressed) {
      std::ostringstream s;
      s << "deadlock in block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << "):";
      int shown = 0;
      for (auto& t : b.threads) {
        if (t.done || shown >= 8) continue;
        ++shown;
        s << " thread " << t.linear << " waits at "
          << (t.wait == Wait::kBlock ? "__syncthreads" : warp_op_name(t.warp_op)) << ";";
      }
      l.error = std::make_exception_ptr(KernelError("emulated CUDA kernel: " + s.str()));
      return;
    }
  }
}

// Runs fn(args...) as a kernel over grid x block threads; `dynamic_smem` bytes of
// dynamic shared memory per block.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block_dim, size_t dynamic_smem, A&&... args) {
  const uint64_t nthreads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (nthreads == 0 || nthreads > 1024)
    fail("launch with " + std::to_string(nthreads) + " threads per block (1 to 1024 allowed)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch with an empty grid");
  if (grid.y > 65535 || grid.z > 65535) fail("launch with grid.y or grid.z above 65535");
  if (current_launch() != nullptr) fail("a kernel launched from inside a kernel");
  Launch l;
  l.grid = grid;
  l.block_dim = block_dim;
  l.dynamic_smem = dynamic_smem;
  // Kernel parameters are copied once, converted to the parameter types as a
  // launch converts them, and every thread reads its own copy.
  std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...> params(std::forward<A>(args)...);
  l.body = [&]() {
    auto copy = params;
    std::apply(kernel, copy);
  };
  current_launch() = &l;
  ++counters().launches;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<int64_t> block_ids(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) block_ids[i] = static_cast<int64_t>(i);
  if (schedule().order == Order::kReverse) std::reverse(block_ids.begin(), block_ids.end());
  if (schedule().order == Order::kShuffled) {
    std::mt19937_64 rng(schedule().seed ^ 0xB10C5EEDull);
    std::shuffle(block_ids.begin(), block_ids.end(), rng);
  }
  for (int64_t id : block_ids) {
    auto b = std::make_unique<Block>();
    b->idx = make_uint3(static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                        static_cast<unsigned>(id / (uint64_t(grid.x) * grid.y)));
    b->threads.resize(nthreads);
    b->warps.resize((nthreads + 31) / 32);
    for (uint64_t i = 0; i < nthreads; ++i) {
      Thread& t = b->threads[i];
      t.linear = static_cast<int>(i);
      t.idx = make_uint3(static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>(i / block_dim.x % block_dim.y),
                         static_cast<unsigned>(i / (uint64_t(block_dim.x) * block_dim.y)));
      t.lane = static_cast<int>(i % 32);
      t.warp = static_cast<int>(i / 32);
    }
    if (dynamic_smem > 0) {
      b->dynamic_shared = alloc_shared(dynamic_smem);
      b->dynamic_shared_bytes = dynamic_smem;
    }
    l.block = b.get();
    ++counters().blocks;
    run_block(l, *b, static_cast<uint64_t>(id));
    l.block = nullptr;
    if (!l.error) {
      const std::string bad = b->overrun();
      if (!bad.empty()) {
        std::ostringstream msg;
        msg << "emulated CUDA kernel: block (" << b->idx.x << "," << b->idx.y << "," << b->idx.z
            << ") wrote outside " << bad;
        l.error = std::make_exception_ptr(KernelError(msg.str()));
      }
    }
    if (l.error) break;
  }
  current_launch() = nullptr;
  if (l.error) std::rethrow_exception(l.error);
}

// ------------------------------------------------------------------ shared memory

// The block's copy of the static __shared__ variable declared at `key`,
// allocated (and poisoned) by the first thread that reaches the declaration.
template <typename T>
T& block_shared(const void* key) {
  Block& b = *this_thread().block;
  auto it = b.shared.find(key);
  if (it == b.shared.end()) {
    it = b.shared.emplace(key, SharedAlloc{alloc_shared(sizeof(T)), sizeof(T)}).first;
  }
  return *static_cast<T*>(it->second.ptr);
}

template <typename T>
T* dynamic_shared() {
  Block& b = *this_thread().block;
  if (b.dynamic_shared == nullptr) fail(where(this_thread()) + ": dynamic shared memory used by a launch that asked for none");
  return static_cast<T*>(b.dynamic_shared);
}

// ------------------------------------------------------------------ warp collectives

template <typename T>
T shuffle(uint32_t mask, T value, int (*source)(int lane, int arg), int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) * 4, "shuffle of a value wider than 32 bytes");
  Thread& t = this_thread();
  Warp& w = t.block->warps[t.warp];
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail(where(t) + ": shuffle width must be a power of 2 <= 32");
  auto& values = w.values[t.exchanges++ & 1];
  std::memcpy(values[t.lane], &value, sizeof(T));
  warp_barrier(mask, WarpOp::kShuffle);
  const int base = t.lane & ~(width - 1);
  int src = source(t.lane & (width - 1), arg);
  T out = value;
  if (src >= 0 && src < width) {
    src += base;
    if (!(mask >> src & 1u)) fail(where(t) + ": shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
    std::memcpy(&out, values[src], sizeof(T));
  }
  return out;
}

inline uint32_t ballot(uint32_t mask, bool pred) {
  Thread& t = this_thread();
  Warp& w = t.block->warps[t.warp];
  auto& values = w.values[t.exchanges++ & 1];
  values[t.lane][0] = pred ? 1 : 0;
  warp_barrier(mask, WarpOp::kVote);
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i)
    if ((mask >> i & 1u) && values[i][0]) bits |= 1u << i;
  return bits;
}

// ------------------------------------------------------------------ async copies

// cp.async: the copy happens when the thread waits for its group, so a read of
// the destination before the wait sees the poison, as it may on a GPU.
inline void async_copy(void* dst, const void* src, size_t bytes) {
  this_thread().async_open.push_back(AsyncCopy{dst, src, bytes});
}

inline void async_commit() {
  Thread& t = this_thread();
  t.async_groups.push_back(std::move(t.async_open));
  t.async_open.clear();
}

// Completes all but the newest `pending` committed groups (and, as on a GPU,
// leaves uncommitted copies in flight).
inline void async_wait(int pending) {
  Thread& t = this_thread();
  while (static_cast<int>(t.async_groups.size()) > pending) {
    for (auto& c : t.async_groups.front()) {
      if (c.src) {
        std::memcpy(c.dst, c.src, c.bytes);
      } else {
        std::memset(c.dst, 0, c.bytes);
      }
    }
    t.async_groups.erase(t.async_groups.begin());
  }
}

}  // namespace lrk::emu
