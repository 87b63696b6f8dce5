// The emulator's runtime, internal: what its files share (tests/cuda_emu/README.md).
//   cuda_emu_runtime.cpp  launches, the per-block fiber scheduler, barriers, warp exchanges,
//                         shared memory;
//   cuda_emu_fiber.cpp    fiber stacks and context switches (cuda_emu_fiber.h);
//   cuda_emu_api.cpp      the CUDA runtime-API subset, the control functions Python calls,
//                         and the state below (settings, counters, the last error);
//   cuda_emu_ubsan.cpp    the undefined-behaviour reports of the kernels' sanitizer checks.
// Compiled once, without the sanitizer, and linked into every emulated library; kernels see
// only cuda_emu.h.
#pragma once

#include "cuda_emu.h"
#include "cuda_emu_fiber.h"

#include <atomic>
#include <cstdarg>
#include <mutex>
#include <string>

namespace cuda_emu {
// Hidden: every emulated library carries its own copy of the runtime.
namespace __attribute__((visibility("hidden"))) runtime {

constexpr size_t kStaticSharedLimit = 48 * 1024;   // CUDA: static __shared__ per block
constexpr size_t kSharedLimit = 227 * 1024;        // sm_90: static + dynamic per block
constexpr int kMultiProcessors = 4;                // what cudaDeviceGetAttribute reports

struct Settings {
  int order = 0;  // priority of a block's threads: 0 index order, 1 reverse, 2 seeded random
  bool run_ahead = false;  // false: round-robin; true: always the first runnable in `order`
  uint64_t seed = 0;
  int workers = 0;   // OS threads running blocks; 0: one per hardware thread
  unsigned max_grid[3] = {0, 0, 0};  // clamp the grid (0: no clamp): exercises grid-stride loops
};

// How the next launches run (cuda_emu_configure); a launch copies it when it starts.
extern std::mutex g_settings_mutex;
extern Settings g_settings;
// The dynamic shared-memory limit of every kernel (cudaFuncSetAttribute raises it).
extern std::atomic<int> g_max_dynamic_shared;
// Launches, blocks and threads run since the library was loaded (cuda_emu_counters).
extern std::atomic<uint64_t> g_launches, g_blocks, g_threads;

// What cudaGetLastError() returns next, per host thread.
extern thread_local cudaError_t t_last_error;
// Why the latest launch failed ("" if it did not), for cuda_emu_last_error().
void set_message(const std::string& message);
std::string last_message();

std::string vformat(const char* fmt, va_list args);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace runtime
}  // namespace cuda_emu
