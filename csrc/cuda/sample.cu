// CUDA sampler (ALGORITHMS.md §4): one 256-thread block per output row, the algorithm of the
// Triton kernel (kernels/sample.py): max / normaliser / entropy passes, filters as the length
// of a prefix of the order "value descending, index ascending" with thresholds from a
// bit-by-bit search over the 32-bit order key of z (block-wide counts / masses per probe; no
// sort), then an inverse-CDF draw in vocabulary order with the row's Philox uniform
// (rlkern/philox.h, bit-identical to the CPU and Triton backends).
//
// Declarations: csrc/include/rlkern/cuda_launchers.h. Compiled by tests/test_cuda_compile.py;
// the torch glue (cuda_ops.cpp) is not written yet, so this kernel is not reachable from Python.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "rlkern/cuda_launchers.h"
#include "rlkern/philox.h"

namespace {

constexpr int kThreads = 256;
using Reduce = cub::BlockReduce<double, kThreads>;
using Scan = cub::BlockScan<double, kThreads>;

__device__ __forceinline__ float load_f(const void* p, int dtype, int64_t i) {
  if (dtype == RLKERN_DTYPE_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == RLKERN_DTYPE_FP16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ int64_t order_key(float z) {
  const int32_t b = __float_as_int(z);
  return int64_t(b ^ ((b >> 31) & 0x7FFFFFFF)) + 2147483648LL;
}

struct MaxOp {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};

struct Smem {
  union {
    Reduce::TempStorage reduce;
    Scan::TempStorage scan;
  };
  double bcast;
};

// Block-wide sum (every thread gets it).
__device__ double block_sum(double v, Smem& sm) {
  const double s = Reduce(sm.reduce).Sum(v);
  if (threadIdx.x == 0) sm.bcast = s;
  __syncthreads();
  const double out = sm.bcast;
  __syncthreads();
  return out;
}

__device__ double block_max(double v, Smem& sm) {
  const double s = Reduce(sm.reduce).Reduce(v, MaxOp());
  if (threadIdx.x == 0) sm.bcast = s;
  __syncthreads();
  const double out = sm.bcast;
  __syncthreads();
  return out;
}

struct Sel {
  int64_t key, count_gt, count_eq;
  double mass_gt, w_eq;
};

// Largest key t with measure(key ≥ t) ≥ target (count, or Σ exp(z − m) when by_mass).
__device__ Sel select_key(const void* row, int dtype, int64_t V, float inv_t, float m,
                          double target, bool by_mass, Smem& sm) {
  int64_t res = 0;
  for (int b = 31; b >= 0; --b) {
    const int64_t cand = res | (int64_t(1) << b);
    double acc = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float z = load_f(row, dtype, v) * inv_t;
      if (order_key(z) >= cand) acc += by_mass ? double(__expf(z - m)) : 1.0;
    }
    if (block_sum(acc, sm) >= target) res = cand;
  }
  double cg = 0.0, mg = 0.0, ce = 0.0, we = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float z = load_f(row, dtype, v) * inv_t;
    const int64_t k = order_key(z);
    const double w = __expf(z - m);
    if (k > res) {
      cg += 1.0;
      mg += w;
    } else if (k == res) {
      ce += 1.0;
      we = w;
    }
  }
  Sel s;
  s.key = res;
  s.count_gt = int64_t(block_sum(cg, sm));
  s.mass_gt = block_sum(mg, sm);
  s.count_eq = int64_t(block_sum(ce, sm));
  s.w_eq = block_max(we, sm);
  return s;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(
    const void* __restrict__ logits, int dtype, int64_t V, int64_t stride_row,
    const int64_t* __restrict__ indices, const double* __restrict__ temperature,
    const int64_t* __restrict__ top_k, const double* __restrict__ top_p,
    const double* __restrict__ min_p, const int64_t* __restrict__ seeds,
    const int64_t* __restrict__ steps, int joint, int raw_temperature,
    int64_t* __restrict__ tokens, float* __restrict__ raw, float* __restrict__ proc,
    float* __restrict__ entropy, float* __restrict__ lse) {
  __shared__ Smem sm;
  const int64_t i = blockIdx.x;
  const int64_t r = indices ? indices[i] : i;
  const size_t esize = dtype == RLKERN_DTYPE_FP32 ? 4 : 2;
  const void* row = static_cast<const char*>(logits) + size_t(r * stride_row) * esize;
  const float inv_t = float(1.0 / temperature[i]);

  double mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += kThreads)
    mx = fmax(mx, double(load_f(row, dtype, v) * inv_t));
  const float m = float(block_max(mx, sm));
  double s = 0.0, t = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float z = load_f(row, dtype, v) * inv_t;
    const float w = __expf(z - m);
    s += w;
    if (w > 0.0f) t += double(w) * double(z - m);
  }
  s = block_sum(s, sm);
  t = block_sum(t, sm);
  const double log_s = log(s);
  if (threadIdx.x == 0) {
    lse[i] = float(double(m) + log_s);
    if (entropy) entropy[i] = float(log_s - t / s);
  }

  int64_t M = V;
  if (top_k && top_k[i] < V) M = top_k[i] < 1 ? 1 : top_k[i];
  if (top_p && top_p[i] < 1.0) {
    double base = s;
    if (!joint && M < V) {
      const Sel a = select_key(row, dtype, V, inv_t, m, double(M), false, sm);
      base = a.mass_gt + double(M - a.count_gt) * a.w_eq;
    }
    const double target = top_p[i] * base;
    const Sel a = select_key(row, dtype, V, inv_t, m, target, true, sm);
    int64_t take = a.w_eq > 0.0 ? int64_t(ceil((target - a.mass_gt) / a.w_eq)) : a.count_eq;
    take = take < 1 ? 1 : (take > a.count_eq ? a.count_eq : take);
    if (a.count_gt + take < M) M = a.count_gt + take;
  }
  if (min_p && min_p[i] > 0.0) {
    const float mp = float(min_p[i]);
    double cnt = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads)
      cnt += __expf(load_f(row, dtype, v) * inv_t - m) >= mp ? 1.0 : 0.0;
    const int64_t c = int64_t(block_sum(cnt, sm));
    if ((c < 1 ? 1 : c) < M) M = c < 1 ? 1 : c;
  }
  int64_t tkey = 0, tie_cut = V;  // keep key > tkey, or key == tkey with index < tie_cut
  if (M < V) {
    const Sel a = select_key(row, dtype, V, inv_t, m, double(M), false, sm);
    tkey = a.key;
    const int64_t ties_keep = M - a.count_gt;
    if (ties_keep < a.count_eq) {
      // Smallest cut c with #(ties at index < c) ≥ ties_keep: a search over the index.
      int64_t lo = 0, hi = V;
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        double c = 0.0;
        for (int64_t v = threadIdx.x; v < mid; v += kThreads)
          c += order_key(load_f(row, dtype, v) * inv_t) == tkey ? 1.0 : 0.0;
        if (block_sum(c, sm) >= double(ties_keep)) hi = mid; else lo = mid;
      }
      tie_cut = hi;
    }
  }
  auto kept_w = [&](int64_t v) -> double {
    if (v >= V) return 0.0;
    const float z = load_f(row, dtype, v) * inv_t;
    const int64_t k = order_key(z);
    if (k < tkey || (k == tkey && v >= tie_cut)) return 0.0;
    return double(__expf(z - m));
  };
  double sk = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) sk += kept_w(v);
  const double s_kept = block_sum(sk, sm);

  const double u = rlkern::philox_uniform(seeds[i], steps[i], 0u);
  const double target = u * s_kept;
  double acc = 0.0;
  int64_t tok = -1, last = -1;
  for (int64_t base = 0; base < V && tok < 0; base += kThreads) {
    const int64_t v = base + threadIdx.x;
    const double w = kept_w(v);
    double incl;
    Scan(sm.scan).InclusiveSum(w, incl);
    __syncthreads();
    const bool hit = w > 0.0 && acc + incl > target;
    const double first = block_max(hit ? -double(v) : -double(V), sm);  // min index of a hit
    const double lastk = block_max(w > 0.0 ? double(v) : -1.0, sm);
    if (lastk >= 0.0) last = int64_t(lastk);
    if (-first < double(V)) tok = int64_t(-first);
    acc += block_sum(w, sm);
  }
  if (tok < 0) tok = last;
  if (threadIdx.x == 0) {
    tokens[i] = tok;
    const float z = load_f(row, dtype, tok) * inv_t;
    proc[i] = float(log(double(__expf(z - m))) - log(s_kept));
    if (raw_temperature) {
      raw[i] = float(double(z - m) - log_s);
    }
  }
  if (!raw_temperature) {
    double mr = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) mr = fmax(mr, double(load_f(row, dtype, v)));
    const float mrf = float(block_max(mr, sm));
    double sr = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) sr += __expf(load_f(row, dtype, v) - mrf);
    sr = block_sum(sr, sm);
    if (threadIdx.x == 0) raw[i] = float(double(load_f(row, dtype, tok) - mrf) - log(sr));
  }
}

}  // namespace

extern "C" int rlkern_sample_cuda(const void* logits, int dtype, int64_t R, int64_t V,
                                  int64_t stride_row, int64_t N, const int64_t* indices,
                                  const double* temperature, const int64_t* top_k,
                                  const double* top_p, const double* min_p, const int64_t* seeds,
                                  const int64_t* steps, int joint, int raw_temperature,
                                  int64_t* tokens, float* raw_logprobs,
                                  float* processed_logprobs, float* entropy, float* lse,
                                  cudaStream_t stream) {
  if (dtype != RLKERN_DTYPE_FP32 && dtype != RLKERN_DTYPE_FP16 && dtype != RLKERN_DTYPE_BF16)
    return RLKERN_CUDA_ERR_DTYPE;
  if (N < 0 || V < 0 || R < 0 || (N > 0 && V == 0)) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (N == 0) return RLKERN_CUDA_OK;
  if (!logits || !temperature || !seeds || !steps || !tokens || !raw_logprobs ||
      !processed_logprobs || !lse)
    return RLKERN_CUDA_ERR_NULL_POINTER;
  sample_kernel<<<dim3(unsigned(N)), kThreads, 0, stream>>>(
      logits, dtype, V, stride_row, indices, temperature, top_k, top_p, min_p, seeds, steps,
      joint, raw_temperature, tokens, raw_logprobs, processed_logprobs, entropy, lse);
  return int(cudaGetLastError());
}
