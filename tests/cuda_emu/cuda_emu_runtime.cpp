// The emulator's scheduler: launches, the per-block fiber scheduler, barriers and warp
// exchanges, shared memory, in-kernel error reports (tests/cuda_emu/README.md). Compiled once
// into every emulated library, next to the rewritten .cu files and the other runtime files
// (cuda_emu_runtime.h).
#include "cuda_emu_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace cuda_emu {
using namespace runtime;
namespace {

using detail::BarrierOp;
using detail::WarpOp;

constexpr unsigned kMaxWorkers = 16;

// ------------------------------------------------------------------------------------------
// Messages

// "0-3,7,9-31" for the set bits of a lane mask.
std::string lane_list(unsigned mask) {
  std::string out;
  for (int l = 0; l < 32;) {
    if (!((mask >> l) & 1u)) {
      ++l;
      continue;
    }
    int end = l;
    while (end + 1 < 32 && ((mask >> (end + 1)) & 1u)) ++end;
    if (!out.empty()) out += ",";
    out += end == l ? std::to_string(l) : std::to_string(l) + "-" + std::to_string(end);
    l = end + 1;
  }
  return out.empty() ? "none" : out;
}

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShfl: return "a shuffle";
    case WarpOp::kVote: return "a vote (__ballot/__any/__all_sync)";
    case WarpOp::kReduce: return "a __reduce_*_sync";
    case WarpOp::kMatch: return "a __match_*_sync";
  }
  return "?";
}

const char* barrier_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::kSync: return "__syncthreads";
    case BarrierOp::kCount: return "__syncthreads_count";
    case BarrierOp::kAnd: return "__syncthreads_and";
    case BarrierOp::kOr: return "__syncthreads_or";
  }
  return "?";
}

// ------------------------------------------------------------------------------------------
// Launch, fibers, workers

struct Launch {
  const LaunchConfig* config = nullptr;
  KernelThunk thunk = nullptr;
  const void* closure = nullptr;
  Settings settings;
  dim3 grid, block;
  unsigned threads = 0;
  uint64_t blocks = 0;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> stop{false};
  std::mutex mutex;
  std::string error;  // first failure
  bool bounds_exceeded = false;
  unsigned bound = 0;

  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex);
    if (error.empty()) error = message;
    stop = true;
  }
};

enum class State : uint8_t { kReady, kBlocked, kDone, kAbandoned };
enum class Wait : uint8_t { kNone, kBarrier, kWarp };

struct WarpGroup {
  bool in_use = false;
  bool complete = false;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  unsigned arrived = 0;
  int readers = 0;  // lanes still to read the values after completion
  const char* file = nullptr;
  int line = 0;
  uint64_t values[32] = {};
};

struct WarpState {
  unsigned lanes = 0;   // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;  // lanes whose thread has returned
  std::vector<std::unique_ptr<WarpGroup>> groups;
};

struct Fiber {
  Context context;
  char* stack = nullptr;
  uint3 tid{};
  unsigned linear = 0, warp = 0, lane = 0;
  State state = State::kReady;
  Wait wait = Wait::kNone;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpGroup* group = nullptr;
  int barrier_result = 0;
};

struct Worker {
  Launch* launch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<unsigned> order;
  std::mt19937_64 rng;
  unsigned done = 0;
  bool failed = false;
  bool released = false;  // a barrier or warp operation completed (threads became runnable)
  Fiber* current = nullptr;
  Context scheduler;  // where the block's scheduler loop resumes
  // __syncthreads in progress
  unsigned barrier_arrived = 0;
  BarrierOp barrier_op = BarrierOp::kSync;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int barrier_acc = 0;
  // shared memory: [0, dynamic_bytes) dynamic, then the static variables as first used
  unsigned char* arena = nullptr;
  size_t dynamic_bytes = 0;
  size_t shared_used = 0;
  size_t shared_high = 0;
  std::vector<void*> shared_slots;

  Worker() {
    void* p = nullptr;
    if (posix_memalign(&p, 256, kSharedLimit) != 0) std::abort();
    arena = static_cast<unsigned char*>(p);
  }
  ~Worker() {
    for (Fiber& f : fibers) release_stack(f.stack);
    std::free(arena);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
};

thread_local Worker* t_worker = nullptr;

std::string where(const Worker& w, const Fiber* f) {
  const LaunchConfig& c = *w.launch->config;
  std::string s = format("kernel %s launched at %s:%d, block (%u,%u,%u)", c.kernel, c.file,
                         c.line, blockIdx.x, blockIdx.y, blockIdx.z);
  if (f) s += format(" thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
  return s;
}

void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
  threadIdx = f.tid;
  switch_context(w.scheduler, f.context);
  w.current = nullptr;
}

void switch_to_scheduler(Worker& w, Fiber& f) { switch_context(f.context, w.scheduler); }

// Stop the block: record the error and never resume the calling fiber.
[[noreturn]] void abandon(Worker& w, Fiber& f, const std::string& message) {
  w.launch->fail(where(w, &f) + ": " + message);
  w.failed = true;
  f.state = State::kAbandoned;
  switch_to_scheduler(w, f);
  std::abort();  // not reached: an abandoned fiber is never resumed
}

void on_thread_exit(Worker& w, Fiber& f);

void fiber_main() {
  Worker& w = *t_worker;
  Fiber& f = *w.current;
  w.launch->thunk(w.launch->closure);
  on_thread_exit(w, f);
  switch_to_scheduler(w, f);
  std::abort();  // not reached: a finished fiber is never resumed
}

void start_fiber(Fiber& f) { start_context(f.context, f.stack, fiber_main); }

std::string deadlock_message(const Worker& w) {
  std::string s = "deadlock: no thread can proceed;";
  if (w.barrier_arrived > 0) {
    s += format(" %u of %zu threads wait at %s (%s:%d);", w.barrier_arrived, w.fibers.size(),
                barrier_name(w.barrier_op), w.barrier_file, w.barrier_line);
  }
  int shown = 0;
  for (size_t wi = 0; wi < w.warps.size() && shown < 4; ++wi) {
    const WarpState& ws = w.warps[wi];
    for (const auto& g : ws.groups) {
      if (!g->in_use || g->complete || shown >= 4) continue;
      ++shown;
      const unsigned missing = g->mask & ~g->arrived;
      unsigned at_barrier = 0;
      for (unsigned l = 0; l < 32; ++l) {
        const size_t t = wi * 32 + l;
        if (((missing >> l) & 1u) && t < w.fibers.size() && w.fibers[t].wait == Wait::kBarrier) {
          at_barrier |= 1u << l;
        }
      }
      s += format(" warp %zu: lanes %s wait at %s with mask 0x%08x (%s:%d) for lanes %s", wi,
                  lane_list(g->arrived).c_str(), warp_op_name(g->op), g->mask, g->file, g->line,
                  lane_list(missing).c_str());
      if (missing & ws.exited) s += format(" (exited: %s)", lane_list(missing & ws.exited).c_str());
      if (at_barrier) s += format(" (at __syncthreads: %s)", lane_list(at_barrier).c_str());
      s += ";";
    }
  }
  return s;
}

void run_block(Worker& w, uint64_t index) {
  Launch& L = *w.launch;
  const uint64_t gx = L.grid.x, gy = L.grid.y;
  blockIdx = {static_cast<unsigned>(index % gx), static_cast<unsigned>((index / gx) % gy),
              static_cast<unsigned>(index / (gx * gy))};
  blockDim = L.block;
  gridDim = L.grid;

  const unsigned n = L.threads;
  while (w.fibers.size() < n) {
    w.fibers.emplace_back();
    w.fibers.back().stack = acquire_stack();
  }
  while (w.fibers.size() > n) {
    release_stack(w.fibers.back().stack);
    w.fibers.pop_back();
  }
  const unsigned nwarps = (n + 31) / 32;
  w.warps.resize(nwarps);
  for (unsigned i = 0; i < nwarps; ++i) {
    const unsigned lanes = std::min(32u, n - 32 * i);
    w.warps[i].lanes = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    w.warps[i].exited = 0;
    for (auto& g : w.warps[i].groups) g->in_use = false;
  }
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.tid = {i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::kReady;
    f.wait = Wait::kNone;
    f.group = nullptr;
    start_fiber(f);
  }
  w.done = 0;
  w.failed = false;
  w.barrier_arrived = 0;
  std::memset(w.arena, 0xff, std::max(w.shared_high, L.config->shared_bytes));
  w.dynamic_bytes = (L.config->shared_bytes + 15) & ~size_t(15);
  w.shared_used = w.dynamic_bytes;
  w.shared_high = std::max(w.shared_high, w.shared_used);
  w.shared_slots.clear();

  // The threads' priority order, then one of two policies (both are schedules a GPU may
  // choose): round-robin runs every runnable thread once per round, so all threads advance
  // together; run-ahead always resumes the first runnable thread in the order, so it (and
  // its warp) gets as far ahead of the others as the barriers allow.
  w.order.resize(n);
  for (unsigned i = 0; i < n; ++i) w.order[i] = L.settings.order == 1 ? n - 1 - i : i;
  const bool random = L.settings.order == 2;
  if (random) {
    w.rng.seed(L.settings.seed * 0x9e3779b97f4a7c15ull + index);
    std::shuffle(w.order.begin(), w.order.end(), w.rng);
  }
  if (L.settings.run_ahead) {
    // No thread before `pos` in the order is runnable, unless something was released.
    size_t pos = 0;
    while (w.done < n && !w.failed && pos < n) {
      Fiber& f = w.fibers[w.order[pos]];
      if (f.state != State::kReady) {
        ++pos;
        continue;
      }
      w.released = false;
      switch_to_fiber(w, f);
      if (w.released) pos = 0;
    }
  } else {
    while (w.done < n && !w.failed) {
      if (random) std::shuffle(w.order.begin(), w.order.end(), w.rng);
      bool ran = false;
      for (unsigned i : w.order) {
        Fiber& f = w.fibers[i];
        if (f.state != State::kReady) continue;
        switch_to_fiber(w, f);
        ran = true;
        if (w.failed) break;
      }
      if (!ran) break;
    }
  }
  if (!w.failed && w.done < n) {
    L.fail(where(w, nullptr) + ": " + deadlock_message(w));
    w.failed = true;
  }
}

void work(Launch& L) {
  Worker w;
  w.launch = &L;
  Worker* const outer = t_worker;
  t_worker = &w;
  uint64_t blocks = 0;
  for (;;) {
    if (L.stop) break;
    const uint64_t i = L.next_block.fetch_add(1);
    if (i >= L.blocks) break;
    run_block(w, i);
    ++blocks;
  }
  t_worker = outer;
  g_blocks += blocks;
  g_threads += blocks * L.threads;
}

Worker& kernel_worker(const char* what, const char* file, int line) {
  Worker* w = t_worker;
  if (w == nullptr || w->current == nullptr) {
    std::fprintf(stderr, "cuda_emu: %s:%d: %s called outside a kernel\n", file, line, what);
    std::abort();
  }
  return *w;
}

void on_thread_exit(Worker& w, Fiber& f) {
  f.state = State::kDone;
  ++w.done;
  WarpState& ws = w.warps[f.warp];
  ws.exited |= 1u << f.lane;
  if (w.barrier_arrived > 0) {
    abandon(w, f,
            format("exited while %u other threads wait at %s (%s:%d): every thread of the "
                   "block must reach it (undefined behaviour on a GPU)",
                   w.barrier_arrived, barrier_name(w.barrier_op), w.barrier_file,
                   w.barrier_line));
  }
  for (const auto& g : ws.groups) {
    if (g->in_use && !g->complete && ((g->mask >> f.lane) & 1u)) {
      abandon(w, f,
              format("exited while lanes %s of its warp wait for it at %s with mask 0x%08x "
                     "(%s:%d)",
                     lane_list(g->arrived).c_str(), warp_op_name(g->op), g->mask, g->file,
                     g->line));
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// In-kernel services (declared in cuda_emu.h)

void kernel_error(const char* file, int line, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  const std::string message = format("%s:%d: ", file, line) + vformat(fmt, args);
  va_end(args);
  Worker* w = t_worker;
  if (w != nullptr && w->current != nullptr) abandon(*w, *w->current, message);
  // Outside a kernel (launcher code): the next cudaGetLastError() reports it.
  t_last_error = cudaErrorLaunchFailure;
  set_message("host code: " + message);
}

bool launch_bounds_exceeded(unsigned max_threads) {
  Worker* w = t_worker;
  if (w == nullptr || w->current == nullptr) return false;
  Launch& L = *w->launch;
  if (L.threads <= max_threads) return false;
  {
    std::lock_guard<std::mutex> lock(L.mutex);
    L.bounds_exceeded = true;
    L.bound = max_threads;
  }
  L.stop = true;
  return true;
}

namespace detail {

void* shared_slot(unsigned id, size_t size, size_t align, const char* name) {
  Worker* w = t_worker;
  if (w == nullptr || w->current == nullptr) {
    std::fprintf(stderr,
                 "cuda_emu: __shared__ variable '%s' used outside a kernel (namespace-scope "
                 "__shared__ variables are not supported)\n", name);
    std::abort();
  }
  if (id >= w->shared_slots.size()) w->shared_slots.resize(id + 1, nullptr);
  void*& slot = w->shared_slots[id];
  if (slot == nullptr) {
    const size_t offset = (w->shared_used + align - 1) / align * align;
    if (offset + size - w->dynamic_bytes > kStaticSharedLimit || offset + size > kSharedLimit) {
      abandon(*w, *w->current,
              format("__shared__ variable '%s' (%zu bytes) exceeds the shared memory of a "
                     "block (48 KiB static, 227 KiB with dynamic)", name, size));
    }
    slot = w->arena + offset;
    w->shared_used = offset + size;
    w->shared_high = std::max(w->shared_high, w->shared_used);
  }
  return slot;
}

void* dynamic_shared(size_t) {
  Worker& w = kernel_worker("extern __shared__", "?", 0);
  return w.arena;  // 256-byte aligned
}

int block_barrier(BarrierOp op, int predicate, const char* file, int line) {
  Worker& w = kernel_worker(barrier_name(op), file, line);
  Fiber& f = *w.current;
  if (w.done > 0) {
    const Fiber* gone = nullptr;
    for (const Fiber& g : w.fibers) {
      if (g.state == State::kDone) {
        gone = &g;
        break;
      }
    }
    abandon(w, f,
            format("%s at %s:%d after thread (%u,%u,%u) exited: every thread of the block must "
                   "reach it (undefined behaviour on a GPU)",
                   barrier_name(op), file, line, gone->tid.x, gone->tid.y, gone->tid.z));
  }
  if (w.barrier_arrived == 0) {
    w.barrier_op = op;
    w.barrier_file = file;
    w.barrier_line = line;
    w.barrier_acc = op == BarrierOp::kAnd ? 1 : 0;
  } else if (w.barrier_op != op || w.barrier_line != line ||
             std::strcmp(w.barrier_file, file) != 0) {
    abandon(w, f,
            format("divergent barriers: this thread reached %s at %s:%d while %u threads wait "
                   "at %s at %s:%d",
                   barrier_name(op), file, line, w.barrier_arrived, barrier_name(w.barrier_op),
                   w.barrier_file, w.barrier_line));
  }
  const int p = predicate != 0;
  switch (op) {
    case BarrierOp::kSync: break;
    case BarrierOp::kCount: w.barrier_acc += p; break;
    case BarrierOp::kAnd: w.barrier_acc &= p; break;
    case BarrierOp::kOr: w.barrier_acc |= p; break;
  }
  ++w.barrier_arrived;
  f.state = State::kBlocked;
  f.wait = Wait::kBarrier;
  f.file = file;
  f.line = line;
  if (w.barrier_arrived == w.fibers.size()) {
    for (Fiber& g : w.fibers) {
      if (g.wait == Wait::kBarrier) {
        g.wait = Wait::kNone;
        g.state = State::kReady;
        g.barrier_result = w.barrier_acc;
      }
    }
    w.barrier_arrived = 0;
    w.released = true;
  }
  switch_to_scheduler(w, f);  // resumed once every thread has arrived
  return f.barrier_result;
}

WarpExchange warp_exchange(WarpOp op, unsigned mask, uint64_t value, const char* file,
                           int line) {
  Worker& w = kernel_worker(warp_op_name(op), file, line);
  Fiber& f = *w.current;
  WarpState& ws = w.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  if (!(mask & bit)) {
    abandon(w, f, format("%s:%d: %s with mask 0x%08x that does not name the calling lane %u",
                         file, line, warp_op_name(op), mask, f.lane));
  }
  if (mask & ~ws.lanes) {
    abandon(w, f, format("%s:%d: %s with mask 0x%08x names lanes %s, which do not exist in "
                         "this warp", file, line, warp_op_name(op), mask,
                         lane_list(mask & ~ws.lanes).c_str()));
  }
  if (mask & ws.exited) {
    abandon(w, f, format("%s:%d: %s with mask 0x%08x waits for lanes %s, which have exited",
                         file, line, warp_op_name(op), mask,
                         lane_list(mask & ws.exited).c_str()));
  }
  WarpGroup* group = nullptr;
  WarpGroup* spare = nullptr;
  for (const auto& g : ws.groups) {
    if (!g->in_use) {
      if (!spare) spare = g.get();
      continue;
    }
    if (g->complete) continue;
    if (g->mask == mask) {
      group = g.get();
    } else if (g->mask & mask) {
      abandon(w, f, format("%s:%d: %s with mask 0x%08x while lanes %s wait at %s with mask "
                           "0x%08x (%s:%d): the masks of one warp-synchronous operation must "
                           "agree", file, line, warp_op_name(op), mask,
                           lane_list(g->arrived).c_str(), warp_op_name(g->op), g->mask,
                           g->file, g->line));
    }
  }
  if (group == nullptr) {
    if (spare == nullptr) {
      ws.groups.push_back(std::make_unique<WarpGroup>());
      spare = ws.groups.back().get();
    }
    group = spare;
    group->in_use = true;
    group->complete = false;
    group->op = op;
    group->mask = mask;
    group->arrived = 0;
    group->file = file;
    group->line = line;
  } else if (group->op != op) {
    abandon(w, f, format("%s:%d: lanes of a warp met at different warp-synchronous operations: "
                         "%s here, %s at %s:%d (lanes %s)", file, line, warp_op_name(op),
                         warp_op_name(group->op), group->file, group->line,
                         lane_list(group->arrived).c_str()));
  }
  group->values[f.lane] = value;
  group->arrived |= bit;
  f.state = State::kBlocked;
  f.wait = Wait::kWarp;
  f.group = group;
  f.file = file;
  f.line = line;
  if (group->arrived == group->mask) {
    group->complete = true;
    group->readers = __builtin_popcount(mask);
    for (unsigned l = 0; l < 32; ++l) {
      if ((mask >> l) & 1u) {
        Fiber& g = w.fibers[f.warp * 32 + l];
        g.state = State::kReady;
        g.wait = Wait::kNone;
      }
    }
    w.released = true;
  }
  switch_to_scheduler(w, f);  // resumed once every lane of the mask has arrived
  f.group = nullptr;
  return {mask, f.lane, group->values, group};
}

void warp_done(const WarpExchange& x) {
  auto* g = static_cast<WarpGroup*>(x.group);
  if (--g->readers == 0) g->in_use = false;
}

unsigned active_lanes() {
  Worker& w = kernel_worker("__activemask", "?", 0);
  const WarpState& ws = w.warps[w.current->warp];
  return ws.lanes & ~ws.exited;
}

}  // namespace detail

int shfl_source(ShflMode mode, unsigned lane, int arg, int width, const char* what,
                const char* file, int line) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    kernel_error(file, line, "%s: width %d is not a power of two in [1, 32]", what, width);
  }
  const int l = static_cast<int>(lane);
  const int first = l & ~(width - 1), last = first + width - 1;
  int src = l;
  switch (mode) {
    case ShflMode::kIdx: src = first + (arg & (width - 1)); break;
    case ShflMode::kUp: src = l - arg >= first ? l - arg : l; break;
    case ShflMode::kDown: src = l + arg <= last ? l + arg : l; break;
    case ShflMode::kXor: src = (l ^ arg) <= last ? (l ^ arg) : l; break;  // PTX shfl.bfly
  }
  if (src < 0 || src > 31) src = l;
  return src;
}

// ------------------------------------------------------------------------------------------
// Launch

void run_launch(const LaunchConfig& config, KernelThunk thunk, const void* closure) {
  const dim3 g = config.grid, b = config.block;
  const std::string site = format("kernel %s launched at %s:%d", config.kernel, config.file,
                                  config.line);
  if (t_worker != nullptr && t_worker->current != nullptr) {
    kernel_error(config.file, config.line, "a kernel launch from a kernel is not supported");
  }
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0 || b.x > 1024 ||
      b.y > 1024 || b.z > 64 || threads > 1024 || g.x > 2147483647u || g.y > 65535 ||
      g.z > 65535) {
    t_last_error = cudaErrorInvalidConfiguration;
    set_message(format("%s: invalid configuration grid (%u,%u,%u) block (%u,%u,%u)",
                       site.c_str(), g.x, g.y, g.z, b.x, b.y, b.z));
    return;
  }
  if (config.shared_bytes > static_cast<size_t>(g_max_dynamic_shared.load())) {
    t_last_error = cudaErrorInvalidValue;
    set_message(format("%s: %zu bytes of dynamic shared memory exceed the limit of %d",
                       site.c_str(), config.shared_bytes, g_max_dynamic_shared.load()));
    return;
  }

  Launch L;
  L.config = &config;
  L.thunk = thunk;
  L.closure = closure;
  {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    L.settings = g_settings;
  }
  L.block = b;
  L.grid = g;
  unsigned* dims[3] = {&L.grid.x, &L.grid.y, &L.grid.z};
  for (int i = 0; i < 3; ++i) {
    if (L.settings.max_grid[i] > 0) *dims[i] = std::min(*dims[i], L.settings.max_grid[i]);
  }
  L.threads = static_cast<unsigned>(threads);
  L.blocks = uint64_t(L.grid.x) * L.grid.y * L.grid.z;
  ++g_launches;

  unsigned workers = L.settings.workers > 0 ? static_cast<unsigned>(L.settings.workers)
                                            : std::max(1u, std::thread::hardware_concurrency());
  workers = static_cast<unsigned>(std::min<uint64_t>({workers, kMaxWorkers, L.blocks}));
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < workers; ++i) pool.emplace_back([&L] { work(L); });
  work(L);
  for (std::thread& t : pool) t.join();

  if (!L.error.empty()) {
    t_last_error = cudaErrorLaunchFailure;
    set_message(L.error);
  } else if (L.bounds_exceeded) {
    t_last_error = cudaErrorLaunchOutOfResources;
    set_message(format("%s: block of %u threads exceeds the kernel's __launch_bounds__(%u)",
                       site.c_str(), L.threads, L.bound));
  } else {
    set_message("");
  }
}

}  // namespace cuda_emu
