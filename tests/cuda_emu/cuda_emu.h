// CPU emulation of the CUDA C++ features used by csrc/cuda/*.cu, for tests on machines without
// a GPU (tests/cuda_emu/README.md). Force-included (g++ -include cuda_emu.h) into a .cu file
// that build.py has rewritten in three places only: kernel<<<...>>>(...) launches,
// __shared__ declarations and __launch_bounds__ checks. Everything else compiles verbatim.
//
// Execution model: every CUDA thread of a block is a fiber (a user-level thread with its own
// stack) and all fibers of a block run on one OS thread, one at a time; a fiber runs until it
// reaches a __syncthreads / warp-synchronous intrinsic (shuffle, vote, __syncwarp), or exits.
// Blocks run on a few OS worker threads. Which fiber runs next is a knob (thread order
// forward, reverse or seeded random; round-robin or run-ahead) so that a missing barrier
// changes the result.
// Misuse that is undefined on a GPU (divergent barriers, shuffles whose lanes are missing,
// exited threads waited for, misaligned vector accesses, out-of-bounds fixed-size arrays) stops
// the launch with a message: the launch reports cudaErrorLaunchFailure and
// cuda_emu_last_error() says what happened and where.
//
// Host-only: no __CUDA_ARCH__ is defined, so `#ifdef __CUDA_ARCH__` device paths are not taken.
#pragma once

#define CUDA_EMU 1  // lets a .cu file offer a portable path in place of inline PTX
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define CUDART_VERSION 12040
#define __CUDACC_VER_MAJOR__ 12
#define __CUDACC_VER_MINOR__ 4

#include <math.h>  // the float overloads (expf, exp(float), ...) in the global namespace, as CUDA

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------
// Execution-space and declaration qualifiers

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __align__(n) alignas(n)
// (__noinline__ is not defined: libstdc++ spells its own attribute __attribute__((__noinline__)).)
// __launch_bounds__ is checked at launch: build.py inserts a launch_bounds_exceeded() test at
// the top of each kernel that declares it. Here it only has to vanish.
#define __launch_bounds__(...)
// build.py rewrites every __shared__ declaration of the .cu file it builds. One left over (in
// a header, or a form build.py does not know) fails to compile with this name in the error.
#define __shared__ cuda_emu_unsupported___shared___declaration

// ------------------------------------------------------------------------------------------
// Built-in vector types (CUDA's sizes and alignments)

#define CUDA_EMU_VEC1(T, N, A) \
  struct alignas(A) N##1 { T x; };
#define CUDA_EMU_VEC2(T, N, A) \
  struct alignas(A) N##2 { T x, y; };
#define CUDA_EMU_VEC3(T, N) \
  struct N##3 { T x, y, z; };
#define CUDA_EMU_VEC4(T, N, A) \
  struct alignas(A) N##4 { T x, y, z, w; };
#define CUDA_EMU_VEC_ALL(T, N, A1, A2, A4) \
  CUDA_EMU_VEC1(T, N, A1) CUDA_EMU_VEC2(T, N, A2) CUDA_EMU_VEC3(T, N) CUDA_EMU_VEC4(T, N, A4)

CUDA_EMU_VEC_ALL(signed char, char, 1, 2, 4)
CUDA_EMU_VEC_ALL(unsigned char, uchar, 1, 2, 4)
CUDA_EMU_VEC_ALL(short, short, 2, 4, 8)
CUDA_EMU_VEC_ALL(unsigned short, ushort, 2, 4, 8)
CUDA_EMU_VEC_ALL(int, int, 4, 8, 16)
CUDA_EMU_VEC_ALL(unsigned int, uint, 4, 8, 16)
CUDA_EMU_VEC_ALL(float, float, 4, 8, 16)
CUDA_EMU_VEC_ALL(long long, longlong, 8, 16, 16)
CUDA_EMU_VEC_ALL(unsigned long long, ulonglong, 8, 16, 16)
CUDA_EMU_VEC_ALL(double, double, 8, 16, 16)

#undef CUDA_EMU_VEC1
#undef CUDA_EMU_VEC2
#undef CUDA_EMU_VEC3
#undef CUDA_EMU_VEC4
#undef CUDA_EMU_VEC_ALL

#define CUDA_EMU_MAKE(N, T)                                                           \
  inline N##1 make_##N##1(T x) { return {x}; }                                        \
  inline N##2 make_##N##2(T x, T y) { return {x, y}; }                                \
  inline N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }                        \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }

CUDA_EMU_MAKE(char, signed char)
CUDA_EMU_MAKE(uchar, unsigned char)
CUDA_EMU_MAKE(short, short)
CUDA_EMU_MAKE(ushort, unsigned short)
CUDA_EMU_MAKE(int, int)
CUDA_EMU_MAKE(uint, unsigned int)
CUDA_EMU_MAKE(float, float)
CUDA_EMU_MAKE(longlong, long long)
CUDA_EMU_MAKE(ulonglong, unsigned long long)
CUDA_EMU_MAKE(double, double)
#undef CUDA_EMU_MAKE

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

// Built-in variables: per fiber (threadIdx is switched with the fiber), per block, per launch.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------
// Runtime API subset

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

// The error codes the emulator can report: X(name, CUDA's value, cudaGetErrorString's text).
// The enum here and cudaGetErrorName / cudaGetErrorString in cuda_emu_api.cpp are all made
// from this one list.
#define CUDA_EMU_ERRORS(X)                                                           \
  X(cudaSuccess, 0, "no error")                                                      \
  X(cudaErrorInvalidValue, 1, "invalid argument")                                    \
  X(cudaErrorMemoryAllocation, 2, "out of memory")                                   \
  X(cudaErrorInvalidConfiguration, 9, "invalid configuration argument")              \
  X(cudaErrorInvalidDeviceFunction, 98, "invalid device function")                   \
  X(cudaErrorLaunchOutOfResources, 701, "too many resources requested for launch")   \
  X(cudaErrorLaunchFailure, 719, "unspecified launch failure")

#define CUDA_EMU_ERROR_ENUM(name, value, text) name = value,
enum cudaError_t { CUDA_EMU_ERRORS(CUDA_EMU_ERROR_ENUM) };
#undef CUDA_EMU_ERROR_ENUM
typedef cudaError_t cudaError;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
// Raises the dynamic shared-memory limit of every kernel (CUDA: of `func` only).
cudaError_t cuda_emu_set_max_dynamic_shared(int bytes);
template <typename F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute attr, int value) {
  return attr == cudaFuncAttributeMaxDynamicSharedMemorySize
             ? cuda_emu_set_max_dynamic_shared(value)
             : cudaSuccess;
}
template <typename T>
cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                               cudaMemcpyKind = cudaMemcpyHostToDevice) {
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, count);
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------
// Emulator entry points (implemented in cuda_emu_runtime.cpp)

namespace cuda_emu {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
  const char* kernel;    // the kernel expression as written at the launch site
  const char* function;  // __PRETTY_FUNCTION__ of the launching function
  const char* file;
  int line;
};

using KernelThunk = void (*)(const void* closure);
void run_launch(const LaunchConfig& config, KernelThunk thunk, const void* closure);

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes
// launch(config, [&](auto&&... a) { kernel(a...); }, args...): the arguments are evaluated
// and copied once, as by a launch, and every emulated thread calls the kernel with its own
// by-value copies of them.
template <typename F, typename... Args>
void launch(const LaunchConfig& config, F&& body, Args&&... args) {
  const std::tuple<std::decay_t<Args>...> packed(std::forward<Args>(args)...);
  auto run = [&]() { std::apply(body, packed); };
  run_launch(config, [](const void* c) { (*static_cast<const decltype(run)*>(c))(); }, &run);
}

// Called by every thread at the top of a kernel with __launch_bounds__(max_threads): true if
// the block is larger (CUDA refuses such a launch with cudaErrorLaunchOutOfResources).
bool launch_bounds_exceeded(unsigned max_threads);

// Stops the launch with an error (abandons the calling thread when called in a kernel).
void kernel_error(const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

namespace detail {
void* shared_slot(unsigned id, size_t size, size_t align, const char* name);
void* dynamic_shared(size_t align);

enum class BarrierOp : int { kSync = 0, kCount = 1, kAnd = 2, kOr = 3 };
int block_barrier(BarrierOp op, int predicate, const char* file, int line);

enum class WarpOp : int { kSync = 0, kShfl = 1, kVote = 2, kReduce = 3, kMatch = 4 };
struct WarpExchange {
  unsigned mask;             // lanes that took part
  unsigned lane;             // the calling lane
  const uint64_t* values;    // values[l]: what lane l contributed
  void* group;               // released by warp_done
};
WarpExchange warp_exchange(WarpOp op, unsigned mask, uint64_t value, const char* file, int line);
void warp_done(const WarpExchange& x);
unsigned active_lanes();
}  // namespace detail

// __shared__ T name[dims]; becomes auto& name = block_shared<T[dims], align>(id, "name");
// Storage is per block, shared by its threads, filled with 0xff bytes when a block starts
// (NaN floats, -1 integers) so that reading shared memory before writing it shows.
template <typename T, size_t Align = 0>
inline T& block_shared(unsigned id, const char* name) {
  constexpr size_t kAlign = Align > alignof(T) ? Align : alignof(T);
  return *reinterpret_cast<T*>(detail::shared_slot(id, sizeof(T), kAlign, name));
}

// extern __shared__ T name[]; becomes T* const name = dynamic_shared<T>();
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::dynamic_shared(alignof(T) > 16 ? alignof(T) : 16));
}

template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp intrinsics take values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The lane a shuffle reads, with PTX shfl.sync semantics for a width-wide segment; a lane
// whose source falls outside the allowed range gets its own value.
enum class ShflMode { kIdx, kUp, kDown, kXor };
int shfl_source(ShflMode mode, unsigned lane, int arg, int width, const char* what,
                const char* file, int line);

template <typename T>
inline T shfl(ShflMode mode, const char* what, unsigned mask, T var, int arg, int width,
              const char* file, int line) {
  const detail::WarpExchange x =
      detail::warp_exchange(detail::WarpOp::kShfl, mask, to_bits(var), file, line);
  const int src = shfl_source(mode, x.lane, arg, width, what, file, line);
  if (((x.mask >> src) & 1u) == 0) {
    kernel_error(file, line,
                 "%s: lane %u reads lane %d, which is not in the mask 0x%08x (undefined value)",
                 what, x.lane, src, x.mask);
  }
  const T result = from_bits<T>(x.values[src]);
  detail::warp_done(x);
  return result;
}

}  // namespace cuda_emu

// ------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics. The trailing file/line parameters default to the call
// site, for the error messages.

#define CUDA_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(CUDA_EMU_SITE) {
  cuda_emu::detail::block_barrier(cuda_emu::detail::BarrierOp::kSync, 0, file, line);
}
inline int __syncthreads_count(int predicate, CUDA_EMU_SITE) {
  return cuda_emu::detail::block_barrier(cuda_emu::detail::BarrierOp::kCount, predicate, file,
                                         line);
}
inline int __syncthreads_and(int predicate, CUDA_EMU_SITE) {
  return cuda_emu::detail::block_barrier(cuda_emu::detail::BarrierOp::kAnd, predicate, file,
                                         line);
}
inline int __syncthreads_or(int predicate, CUDA_EMU_SITE) {
  return cuda_emu::detail::block_barrier(cuda_emu::detail::BarrierOp::kOr, predicate, file,
                                         line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, CUDA_EMU_SITE) {
  const auto x = cuda_emu::detail::warp_exchange(cuda_emu::detail::WarpOp::kSync, mask, 0,
                                                 file, line);
  cuda_emu::detail::warp_done(x);
}

// The lanes of the caller's warp that have not exited (a GPU reports the converged lanes,
// which depends on scheduling; code that needs this is rarely right).
inline unsigned __activemask() { return cuda_emu::detail::active_lanes(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, CUDA_EMU_SITE) {
  return cuda_emu::shfl(cuda_emu::ShflMode::kIdx, "__shfl_sync", mask, var, src_lane, width,
                        file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        CUDA_EMU_SITE) {
  return cuda_emu::shfl(cuda_emu::ShflMode::kUp, "__shfl_up_sync", mask, var,
                        static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          CUDA_EMU_SITE) {
  return cuda_emu::shfl(cuda_emu::ShflMode::kDown, "__shfl_down_sync", mask, var,
                        static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         CUDA_EMU_SITE) {
  return cuda_emu::shfl(cuda_emu::ShflMode::kXor, "__shfl_xor_sync", mask, var, lane_mask,
                        width, file, line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, CUDA_EMU_SITE) {
  const auto x = cuda_emu::detail::warp_exchange(cuda_emu::detail::WarpOp::kVote, mask,
                                                 predicate != 0, file, line);
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (((x.mask >> l) & 1u) && x.values[l]) ballot |= 1u << l;
  }
  cuda_emu::detail::warp_done(x);
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate, CUDA_EMU_SITE) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, CUDA_EMU_SITE) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}

namespace cuda_emu {
template <typename T, typename Op>
inline T warp_reduce(unsigned mask, T value, Op op, const char* file, int line) {
  const auto x =
      detail::warp_exchange(detail::WarpOp::kReduce, mask, to_bits(value), file, line);
  bool first = true;
  T acc{};
  for (unsigned l = 0; l < 32; ++l) {
    if ((x.mask >> l) & 1u) {
      const T v = from_bits<T>(x.values[l]);
      acc = first ? v : op(acc, v);
      first = false;
    }
  }
  detail::warp_done(x);
  return acc;
}
}  // namespace cuda_emu

#define CUDA_EMU_REDUCE(NAME, EXPR)                                                         \
  inline unsigned NAME(unsigned mask, unsigned value, CUDA_EMU_SITE) {                      \
    return cuda_emu::warp_reduce(                                                           \
        mask, value, [](unsigned a, unsigned b) { return EXPR; }, file, line);              \
  }                                                                                         \
  inline int NAME(unsigned mask, int value, CUDA_EMU_SITE) {                                \
    return cuda_emu::warp_reduce(                                                           \
        mask, value, [](int a, int b) { return EXPR; }, file, line);                        \
  }
CUDA_EMU_REDUCE(__reduce_add_sync, a + b)
CUDA_EMU_REDUCE(__reduce_min_sync, a < b ? a : b)
CUDA_EMU_REDUCE(__reduce_max_sync, a > b ? a : b)
#undef CUDA_EMU_REDUCE

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline void __trap(CUDA_EMU_SITE) { cuda_emu::kernel_error(file, line, "__trap() called"); }

// ------------------------------------------------------------------------------------------
// Atomics (blocks run in parallel on worker threads, so these are real atomics)

namespace cuda_emu {
// *address = update(*address) as one atomic step, for the operations without a builtin of
// their own (floating-point add, min, max): retry a compare-and-swap until no other thread
// wrote in between. Returns the old value, as CUDA's atomics do.
template <typename T, typename F>
inline T atomic_update(T* address, F update) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired = update(old);
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
    desired = update(old);
  }
  return old;
}
}  // namespace cuda_emu

template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    return cuda_emu::atomic_update(address, [value](T old) { return old + value; });
  }
}
template <typename T>
inline T atomicMax(T* address, T value) {
  return cuda_emu::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
inline T atomicMin(T* address, T value) {
  return cuda_emu::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
inline T atomicExch(T* address, T value) {
  T old;
  __atomic_exchange(address, &value, &old, __ATOMIC_RELAXED);
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange(address, &compare, &value, false, __ATOMIC_RELAXED,
                            __ATOMIC_RELAXED);
  return compare;  // the old value, whether or not the exchange happened
}
// The integer operations with a builtin of their own.
#define CUDA_EMU_FETCH_ATOMIC(NAME, BUILTIN)                                               \
  template <typename T>                                                                    \
  inline T NAME(T* address, T value) {                                                     \
    return BUILTIN(address, value, __ATOMIC_RELAXED);                                      \
  }
CUDA_EMU_FETCH_ATOMIC(atomicSub, __atomic_fetch_sub)
CUDA_EMU_FETCH_ATOMIC(atomicAnd, __atomic_fetch_and)
CUDA_EMU_FETCH_ATOMIC(atomicOr, __atomic_fetch_or)
CUDA_EMU_FETCH_ATOMIC(atomicXor, __atomic_fetch_xor)
#undef CUDA_EMU_FETCH_ATOMIC

// ------------------------------------------------------------------------------------------
// Loads and stores with cache hints: plain accesses, with the alignment a GPU requires.

namespace cuda_emu {
template <typename T>
inline void check_aligned(const void* p, const char* what, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    kernel_error(file, line, "%s: misaligned address %p for a %zu-byte type (needs %zu-byte "
                 "alignment; a GPU raises cudaErrorMisalignedAddress)",
                 what, p, sizeof(T), alignof(T));
  }
}
}  // namespace cuda_emu

#define CUDA_EMU_LOAD(NAME)                                         \
  template <typename T>                                             \
  inline T NAME(const T* p, CUDA_EMU_SITE) {                        \
    cuda_emu::check_aligned<T>(p, #NAME, file, line);               \
    return *p;                                                      \
  }
#define CUDA_EMU_STORE(NAME)                                        \
  template <typename T>                                             \
  inline void NAME(T* p, T value, CUDA_EMU_SITE) {                  \
    cuda_emu::check_aligned<T>(p, #NAME, file, line);               \
    *p = value;                                                     \
  }
CUDA_EMU_LOAD(__ldg)
CUDA_EMU_LOAD(__ldcg)
CUDA_EMU_LOAD(__ldca)
CUDA_EMU_LOAD(__ldcs)
CUDA_EMU_LOAD(__ldlu)
CUDA_EMU_LOAD(__ldcv)
CUDA_EMU_STORE(__stwb)
CUDA_EMU_STORE(__stcg)
CUDA_EMU_STORE(__stcs)
CUDA_EMU_STORE(__stwt)
#undef CUDA_EMU_LOAD
#undef CUDA_EMU_STORE

// ------------------------------------------------------------------------------------------
// Math. Standard functions (expf, logf, fmaf, ...) are the host's; CUDA's are within a few
// ulp of them. The fast intrinsics are modelled on how the GPU computes them: __expf(x) is
// ex2.approx(x · log2 e) with the product rounded to float, so its error grows with |x| like
// the GPU's; ex2.approx's own error (≤ 2 ulp) is not modelled — the emulation's exp2f is
// correctly rounded — so results can differ from a GPU's in the last bits.

namespace cuda_emu {
constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog10_2 = 0.3010299956639812f;
}  // namespace cuda_emu

inline float __expf(float x) { return exp2f(x * cuda_emu::kLog2E); }
inline float __exp10f(float x) { return exp2f(x * 3.3219280948873623f); }
inline float __logf(float x) { return log2f(x) * cuda_emu::kLn2; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * cuda_emu::kLog10_2; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

inline float __int_as_float(int v) { return cuda_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(cuda_emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return cuda_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(cuda_emu::to_bits(v)); }
inline double __longlong_as_double(long long v) {
  return cuda_emu::from_bits<double>(static_cast<uint64_t>(v));
}
inline long long __double_as_longlong(double v) {
  return static_cast<long long>(cuda_emu::to_bits(v));
}

inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// CUDA's device-side min/max accept any pair of arithmetic types.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with CUDA's round-to-nearest-even conversions
// (written out bitwise, so they do not depend on the host compiler's _Float16 support).
// Arithmetic on them rounds each result to the type, like the GPU's half instructions.

namespace cuda_emu {

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant · 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return from_bits<float>(to_bits(v) | sign);
  }
  if (exp == 31) return from_bits<float>(sign | 0x7f800000u | (mant << 13));
  return from_bits<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_half_bits_rn(float f) {
  const uint32_t bits = static_cast<uint32_t>(to_bits(f));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7fffu;                   // NaN (CUDA's canonical NaN)
  if (abs >= 0x477ff000u) return sign | 0x7c00u;           // ≥ 65520 rounds to infinity
  if (abs < 0x38800000u) {                                 // below 2^-14: subnormal or zero
    const float scaled = from_bits<float>(abs) * 16777216.0f;  // exact: · 2^24
    return sign | static_cast<uint16_t>(nearbyintf(scaled));   // ties to even
  }
  uint32_t h = ((abs >> 23) - 112u) << 10 | ((abs >> 13) & 0x3ffu);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_bits_to_float(uint16_t b) {
  return from_bits<float>(static_cast<uint32_t>(b) << 16);
}

inline uint16_t float_to_bf16_bits_rn(float f) {
  const uint32_t bits = static_cast<uint32_t>(to_bits(f));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN (CUDA's canonical NaN)
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace cuda_emu

// A 16-bit storage type H with its raw-bits struct R, converted from float by
// cuda_emu::FROM_FLOAT (round to nearest even) and to float by cuda_emu::TO_FLOAT (exact).
#define CUDA_EMU_16BIT_TYPE(H, R, FROM_FLOAT, TO_FLOAT)                                 \
  struct R {                                                                          \
    unsigned short x;                                                                 \
  };                                                                                  \
  struct H {                                                                          \
    unsigned short __x;                                                               \
    H() = default;                                                                    \
    constexpr H(R r) : __x(r.x) {}                                                    \
    H(float f) : __x(cuda_emu::FROM_FLOAT(f)) {}                                      \
    H(double f) : H(static_cast<float>(f)) {}                                         \
    H(int v) : H(static_cast<float>(v)) {}                                            \
    operator float() const { return cuda_emu::TO_FLOAT(__x); }                        \
    operator R() const { return {__x}; }                                              \
  };
CUDA_EMU_16BIT_TYPE(__half, __half_raw, float_to_half_bits_rn, half_bits_to_float)
CUDA_EMU_16BIT_TYPE(__nv_bfloat16, __nv_bfloat16_raw, float_to_bf16_bits_rn, bf16_bits_to_float)
#undef CUDA_EMU_16BIT_TYPE

struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

#define CUDA_EMU_HALF_OPS(H)                                                          \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }                    \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }                    \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }                    \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }                    \
  inline H operator-(H a) { return H(-float(a)); }                                    \
  inline H& operator+=(H& a, H b) { return a = a + b; }                               \
  inline H& operator-=(H& a, H b) { return a = a - b; }                               \
  inline H& operator*=(H& a, H b) { return a = a * b; }                               \
  inline H& operator/=(H& a, H b) { return a = a / b; }                               \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                   \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                   \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                     \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                   \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                     \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }                   \
  inline H __hadd(H a, H b) { return a + b; }                                         \
  inline H __hsub(H a, H b) { return a - b; }                                         \
  inline H __hmul(H a, H b) { return a * b; }                                         \
  inline H __hdiv(H a, H b) { return a / b; }                                         \
  inline H __hneg(H a) { return -a; }                                                 \
  inline H __hfma(H a, H b, H c) { return H(fmaf(float(a), float(b), float(c))); }    \
  inline H __hmax(H a, H b) { return H(fmaxf(float(a), float(b))); }                  \
  inline H __hmin(H a, H b) { return H(fminf(float(a), float(b))); }                  \
  inline bool __hisnan(H a) { return std::isnan(float(a)); }                          \
  inline int __hisinf(H a) { return std::isinf(float(a)) ? (float(a) > 0 ? 1 : -1) : 0; }
CUDA_EMU_HALF_OPS(__half)
CUDA_EMU_HALF_OPS(__nv_bfloat16)
#undef CUDA_EMU_HALF_OPS
// (The half product a·b and sum a+b are exact in float, so rounding once to the half type
// gives the correctly rounded result; only fma and division can round twice.)

// CUDA's conversions of a 16-bit type T and its pair T2, whose names are built from N and N2:
// __float2half / __float2bfloat16, __halves2half2 / __halves2bfloat162, ...
#define CUDA_EMU_16BIT_API(T, T2, N, N2)                                                     \
  inline T __float2##N(float f) { return T(f); }                                            \
  inline T __float2##N##_rn(float f) { return T(f); }                                       \
  inline float __##N##2float(T h) { return float(h); }                                      \
  inline T __ushort_as_##N(unsigned short v) { return T##_raw{v}; }                         \
  inline unsigned short __##N##_as_ushort(T h) { return h.__x; }                            \
  inline T2 __halves2##N2(T a, T b) { return {a, b}; }                                      \
  inline T2 __##N##2##N2(T a) { return {a, a}; }                                            \
  inline T2 __floats2##N2##_rn(float a, float b) { return {T(a), T(b)}; }                   \
  inline T2 __float22##N2##_rn(float2 f) { return {T(f.x), T(f.y)}; }                       \
  inline T2 __float2##N2##_rn(float f) { return {T(f), T(f)}; }                             \
  inline float2 __##N2##2float2(T2 h) { return {float(h.x), float(h.y)}; }                  \
  inline T __low2##N(T2 h) { return h.x; }                                                  \
  inline T __high2##N(T2 h) { return h.y; }                                                 \
  inline float __low2float(T2 h) { return float(h.x); }                                     \
  inline float __high2float(T2 h) { return float(h.y); }                                    \
  inline T2 __hadd2(T2 a, T2 b) { return {a.x + b.x, a.y + b.y}; }                          \
  inline T2 __hmul2(T2 a, T2 b) { return {a.x * b.x, a.y * b.y}; }
CUDA_EMU_16BIT_API(__half, __half2, half, half2)
CUDA_EMU_16BIT_API(__nv_bfloat16, __nv_bfloat162, bfloat16, bfloat162)
#undef CUDA_EMU_16BIT_API

#undef CUDA_EMU_SITE
