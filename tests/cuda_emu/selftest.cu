// Kernels that exercise the emulator itself (tests/test_cuda_emu_selftest.py): warp
// intrinsics, barriers, shared memory, atomics, half/bf16 conversions, and kernels with
// planted bugs that the emulator must report. Each launcher returns cudaGetLastError().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// out[lane] = the value lane `lane` receives from a shuffle of value 100 + lane.
__global__ void shuffle_kernel(int mode, int arg, int width, int* out) {
  const int lane = threadIdx.x % 32;
  const int v = 100 + lane;
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

// A butterfly sum of doubles (8-byte shuffles) and votes, per warp.
__global__ void warp_ops_kernel(const double* in, double* sums, unsigned* ballots, int* votes) {
  const int lane = threadIdx.x % 32;
  double v = in[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  sums[threadIdx.x] = v;
  const unsigned b = __ballot_sync(0xffffffffu, in[threadIdx.x] > 0.0);
  const int any = __any_sync(0xffffffffu, lane == 7);
  const int all = __all_sync(0xffffffffu, lane < 31);
  const unsigned total = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane));
  if (lane == 0) {
    ballots[threadIdx.x / 32] = b;
    votes[3 * (threadIdx.x / 32) + 0] = any;
    votes[3 * (threadIdx.x / 32) + 1] = all;
    votes[3 * (threadIdx.x / 32) + 2] = static_cast<int>(total);
  }
  __syncwarp();
}

// Block sum with a tree in dynamic shared memory; a static __shared__ counter and
// __syncthreads_count for the number of positive inputs. Grid-stride over blocks of rows.
__global__ void block_sum_kernel(const float* in, int rows, int n, float* sums, int* positives) {
  extern __shared__ float partial[];
  __shared__ int count;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    float acc = 0.f;
    int pos = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc += in[row * n + i];
      pos += in[row * n + i] > 0.f;
    }
    partial[threadIdx.x] = acc;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, pos);
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (static_cast<int>(threadIdx.x) < stride) {
        partial[threadIdx.x] += partial[threadIdx.x + stride];
      }
      __syncthreads();
    }
    const int counted = __syncthreads_count(pos > 0);
    if (threadIdx.x == 0) {
      sums[row] = partial[0];
      positives[row] = count;
      positives[rows + row] = counted;
    }
    __syncthreads();
  }
}

// Every thread of the grid applies each atomic once (blocks run on parallel worker threads):
// fsum += v / 2; ints: [0] += v, [1] -= v, [2] max, [3] min, [4] exchanged for the thread's
// index (the old values go to exch_old), [5] incremented by a compare-and-swap loop;
// bits: [0] &= ~(1 << lane), [1] |= 1 << (t % 32), [2] ^= v.
__global__ void atomics_kernel(const int* values, float* fsum, int* ints, unsigned* bits,
                               int* exch_old) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int v = values[t];
  atomicAdd(fsum, 0.5f * static_cast<float>(v));
  atomicAdd(&ints[0], v);
  atomicSub(&ints[1], v);
  atomicMax(&ints[2], v);
  atomicMin(&ints[3], v);
  exch_old[t] = atomicExch(&ints[4], t);
  int seen = atomicAdd(&ints[5], 0);
  for (;;) {
    const int old = atomicCAS(&ints[5], seen, seen + 1);
    if (old == seen) break;
    seen = old;
  }
  atomicAnd(&bits[0], ~(1u << (threadIdx.x % 32)));
  atomicOr(&bits[1], 1u << (t % 32));
  atomicXor(&bits[2], static_cast<unsigned>(v));
}

// The same tree without the barrier between the partial sums being written and read: its
// result depends on the order in which threads run.
__global__ void racy_sum_kernel(const float* in, float* out) {
  __shared__ float partial[64];
  partial[threadIdx.x] = in[threadIdx.x];
  // missing: __syncthreads();
  for (unsigned stride = 32; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = partial[0];
}

__global__ void convert_kernel(const float* in, int n, uint16_t* half_bits, uint16_t* bf16_bits,
                               float* half_back, float* bf16_back) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const __half h = __float2half_rn(in[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
    half_bits[i] = __half_as_ushort(h);
    bf16_bits[i] = __bfloat16_as_ushort(b);
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
}

// ---- planted bugs: each must fail the launch with a message

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_barrier_kernel(int n, int* out) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_shuffle_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lane 0 waits at the barrier for lanes 1-31, which wait at a shuffle for lane 0.
__global__ void shuffle_barrier_deadlock_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x == 0) __syncthreads();
  v = __shfl_down_sync(0xffffffffu, v, 1);
  if (threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const float4 v = reinterpret_cast<const float4*>(in + 1)[threadIdx.x];
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void misaligned_ldg_kernel(const float* in, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(in + 2) + threadIdx.x);
  out[threadIdx.x] = v.x;
}

__global__ void local_array_oob_kernel(int index, float* out) {
  float a[4] = {1.f, 2.f, 3.f, 4.f};
  out[threadIdx.x] = a[index];
}

__global__ void shared_array_oob_kernel(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.f;  // launched with 64 threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

}  // namespace

extern "C" {

int selftest_shuffle(int mode, int arg, int width, int* out) {
  shuffle_kernel<<<1, 32>>>(mode, arg, width, out);
  return static_cast<int>(cudaGetLastError());
}

int selftest_warp_ops(const double* in, int warps, double* sums, unsigned* ballots, int* votes) {
  warp_ops_kernel<<<1, 32 * warps, 0, nullptr>>>(in, sums, ballots, votes);
  return static_cast<int>(cudaGetLastError());
}

int selftest_block_sum(const float* in, int rows, int n, int threads, int blocks, float* sums,
                       int* positives) {
  block_sum_kernel<<<blocks, threads, threads * sizeof(float), nullptr>>>(in, rows, n, sums,
                                                                          positives);
  return static_cast<int>(cudaGetLastError());
}

int selftest_atomics(const int* values, int blocks, int threads, float* fsum, int* ints,
                     unsigned* bits, int* exch_old) {
  atomics_kernel<<<blocks, threads>>>(values, fsum, ints, bits, exch_old);
  return static_cast<int>(cudaGetLastError());
}

int selftest_racy_sum(const float* in, float* out) {
  racy_sum_kernel<<<1, 64>>>(in, out);
  return static_cast<int>(cudaGetLastError());
}

int selftest_convert(const float* in, int n, uint16_t* half_bits, uint16_t* bf16_bits,
                     float* half_back, float* bf16_back) {
  convert_kernel<<<1, 64>>>(in, n, half_bits, bf16_bits, half_back, bf16_back);
  return static_cast<int>(cudaGetLastError());
}

// Planted bugs by number (see selftest_bug_names); `buffer` holds at least 1024 floats.
int selftest_bug(int which, float* buffer) {
  int* ints = reinterpret_cast<int*>(buffer);
  switch (which) {
    case 0: divergent_barrier_kernel<<<1, 32>>>(ints); break;
    case 1: early_exit_barrier_kernel<<<2, 64>>>(40, ints); break;
    case 2: partial_shuffle_kernel<<<1, 64>>>(ints); break;
    case 3: shuffle_barrier_deadlock_kernel<<<1, 32>>>(ints); break;
    case 4: misaligned_vector_kernel<<<1, 32>>>(buffer, buffer + 512); break;
    case 5: misaligned_ldg_kernel<<<1, 32>>>(buffer, buffer + 512); break;
    case 6: local_array_oob_kernel<<<1, 32>>>(4, buffer); break;
    case 7: shared_array_oob_kernel<<<1, 64>>>(buffer); break;
    case 8: bounded_kernel<<<1, 128>>>(ints); break;
    case 9: bounded_kernel<<<1, dim3(2048)>>>(ints); break;
    case 10: block_sum_kernel<<<1, 32, 64 * 1024>>>(buffer, 1, 1, buffer, ints); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
