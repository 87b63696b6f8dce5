// The CUDA runtime-API subset of the emulator (cudaGetLastError, cudaDeviceGetAttribute, ...),
// the control functions Python calls through ctypes (cuda_emu_configure, cuda_emu_last_error,
// cuda_emu_counters), and the state they share with the scheduler (cuda_emu_runtime.h).
#include "cuda_emu_runtime.h"

#include <algorithm>
#include <cstdio>

namespace cuda_emu {
namespace runtime {

std::mutex g_settings_mutex;
Settings g_settings;
std::atomic<int> g_max_dynamic_shared{static_cast<int>(kStaticSharedLimit)};
std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_threads{0};

thread_local cudaError_t t_last_error = cudaSuccess;

namespace {
std::mutex g_message_mutex;
std::string g_last_message;  // why the latest launch failed ("" if it did not)
}  // namespace

void set_message(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_message_mutex);
  g_last_message = message;
}

std::string last_message() {
  std::lock_guard<std::mutex> lock(g_message_mutex);
  return g_last_message;
}

std::string vformat(const char* fmt, va_list args) {
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string out(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(&out[0], out.size() + 1, fmt, args);
  return out;
}

std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string out = vformat(fmt, args);
  va_end(args);
  return out;
}

}  // namespace runtime
}  // namespace cuda_emu

using namespace cuda_emu::runtime;

// ------------------------------------------------------------------------------------------
// Runtime API

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return t_last_error; }

// Both from CUDA_EMU_ERRORS (cuda_emu.h), the list that also defines cudaError_t.
const char* cudaGetErrorName(cudaError_t error) {
#define CUDA_EMU_NAME_CASE(name, value, text) \
  case name: return #name;
  switch (error) { CUDA_EMU_ERRORS(CUDA_EMU_NAME_CASE) }
#undef CUDA_EMU_NAME_CASE
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
#define CUDA_EMU_TEXT_CASE(name, value, text) \
  case name: return text;
  switch (error) { CUDA_EMU_ERRORS(CUDA_EMU_TEXT_CASE) }
#undef CUDA_EMU_TEXT_CASE
  return "unknown error";
}

cudaError_t cudaDeviceSynchronize() { return t_last_error; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return t_last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kStaticSharedLimit; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedLimit; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind,
                            cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cuda_emu_set_max_dynamic_shared(int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kSharedLimit) return cudaErrorInvalidValue;
  g_max_dynamic_shared = std::max(bytes, g_max_dynamic_shared.load());
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------
// Control from Python (ctypes)

extern "C" {

// order: 0 forward, 1 reverse, 2 random(seed); run_ahead: 0 round-robin, 1 run-ahead;
// workers: 0 = one per hardware thread; max_grid_*: clamp each grid dimension (0 = none).
void cuda_emu_configure(int order, uint64_t seed, int run_ahead, int workers,
                        unsigned max_grid_x, unsigned max_grid_y, unsigned max_grid_z) {
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_settings.order = order;
  g_settings.run_ahead = run_ahead != 0;
  g_settings.seed = seed;
  g_settings.workers = workers;
  g_settings.max_grid[0] = max_grid_x;
  g_settings.max_grid[1] = max_grid_y;
  g_settings.max_grid[2] = max_grid_z;
}

// Why the latest launch failed, "" if it succeeded. The pointer stays valid until the next
// launch.
const char* cuda_emu_last_error() {
  static thread_local std::string copy;
  copy = last_message();
  return copy.c_str();
}

// Launches, blocks and threads run since the library was loaded.
void cuda_emu_counters(uint64_t* out) {
  out[0] = g_launches;
  out[1] = g_blocks;
  out[2] = g_threads;
}

}  // extern "C"
