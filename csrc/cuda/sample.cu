// CUDA sampler (ALGORITHMS.md §4): one 256-thread block per output row, the algorithm of the
// Triton kernel (kernels/sample.py): max / normaliser / entropy passes, filters as the length
// of a prefix of the order "value descending, index ascending" with thresholds from a
// bit-by-bit search over the 32-bit order key of z (block-wide counts / masses per probe; no
// sort), then an inverse-CDF draw in vocabulary order with the row's Philox uniform
// (rlkern/philox.h, bit-identical to the CPU and Triton backends).
//
// Block reductions and the scan of the draw are written with warp shuffles and one small
// shared array (no CUB): the reduction order is fixed (so a row's result never depends on the
// grid or on the other rows) and the shared footprint is 64 bytes. __launch_bounds__(256, 2):
// with the block size alone ptxas aims at 64 registers (4 blocks/SM) and spills 8 bytes (an
// older CUB-based version spilled 28 on sm_90); asking for 2 resident blocks lets it use
// 83 (sm_80) / 90 (sm_90) registers with no spill — 16 warps per SM are plenty for a kernel
// whose passes stream a row from L2 (tests/test_cuda_compile.py asserts 0 spill bytes on
// sm_80 and sm_90). The same source runs on the CPU in the CUDA emulator
// (tests/test_sample_cuda_emulation.py).
//
// Declarations: csrc/include/rlkern/cuda_launchers.h; torch glue: csrc/cuda/sample_ops.cpp
// (registered as the CUDA implementation of rlkern::sample_out).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rlkern/cuda_dtype.h"
#include "rlkern/cuda_launchers.h"
#include "rlkern/philox.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFull = 0xffffffffu;
// Consecutive elements per thread in the draw: a chunk of kThreads · kItems tokens costs one
// block scan, so the draw needs V / 2048 scans instead of V / 256.
constexpr int kItems = 8;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Monotone map of a float to an integer order key in [0, 2^32): larger z ⇒ larger key.
__device__ __forceinline__ int64_t order_key(float z) {
  const int32_t b = __float_as_int(z);
  return int64_t(b ^ ((b >> 31) & 0x7FFFFFFF)) + 2147483648LL;
}

struct SumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Block-wide reduction, returned to every thread. Fixed order: butterfly inside each warp, then
// the kWarps partials in warp order. `part` (kWarps doubles of shared memory) is free again
// when this returns (the trailing barrier orders the reads before the next reduction's writes).
template <class Op>
__device__ __forceinline__ double block_reduce(double v, double* part, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = v;
  __syncthreads();
  double r = part[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, part[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ double block_sum(double v, double* part) {
  return block_reduce(v, part, SumOp());
}
__device__ __forceinline__ double block_max(double v, double* part) {
  return block_reduce(v, part, MaxOp());
}

// Block-wide inclusive prefix sum over threads (thread order); *total gets the block's sum,
// computed in the same order as the last thread's prefix, so prefixes are ≤ *total
// (floating-point addition is monotone and the values are ≥ 0).
__device__ __forceinline__ double block_inclusive_sum(double v, double* part, double* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const double n = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += n;
  }
  if (lane == kWarp - 1) part[warp] = v;
  __syncthreads();
  double before = 0.0, tot = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = tot;
    tot += part[w];
  }
  __syncthreads();
  *total = tot;
  return before + v;
}

// One logits row, shifted by its max and temperature-scaled: z_v = (x_v − shift) · inv_t (fp32,
// as every backend forms it). The shift comes first, so huge logits or a tiny T neither
// overflow nor lose their differences; inv_t is kept normal and finite (T = 1e300 would make
// it 0, and −inf · 0 is NaN).
template <typename T>
struct Row {
  const T* x;
  int64_t V;
  float inv_t;
  float shift;
  __device__ __forceinline__ float z(int64_t v) const { return (to_f(x[v]) - shift) * inv_t; }
};

struct Sel {
  int64_t key;       // the threshold key (of the last kept token)
  int64_t count_gt;  // tokens with a larger key
  int64_t count_eq;  // tokens with this key
  double mass_gt;    // Σ exp(z − m) over the larger keys
  double w_eq;       // exp(z − m) of one token with this key
};

// Largest key t with measure(key ≥ t) ≥ target (count, or Σ exp(z − m) when by_mass): a
// bit-by-bit search, one block-wide count/mass per bit (32 passes over the row, no sort).
template <typename T>
__device__ __forceinline__ Sel select_key(const Row<T>& row, float m, double target, bool by_mass,
                          double* part) {
  int64_t res = 0;
  for (int b = 31; b >= 0; --b) {
    const int64_t cand = res | (int64_t(1) << b);
    double acc = 0.0;
    for (int64_t v = threadIdx.x; v < row.V; v += kThreads) {
      const float z = row.z(v);
      if (order_key(z) >= cand) acc += by_mass ? double(__expf(z - m)) : 1.0;
    }
    if (block_sum(acc, part) >= target) res = cand;
  }
  double cg = 0.0, mg = 0.0, ce = 0.0, we = 0.0;
  for (int64_t v = threadIdx.x; v < row.V; v += kThreads) {
    const float z = row.z(v);
    const int64_t k = order_key(z);
    if (k > res) {
      cg += 1.0;
      mg += double(__expf(z - m));
    } else if (k == res) {
      ce += 1.0;
      we = double(__expf(z - m));
    }
  }
  Sel s;
  s.key = res;
  s.count_gt = int64_t(block_sum(cg, part));
  s.mass_gt = block_sum(mg, part);
  s.count_eq = int64_t(block_sum(ce, part));
  s.w_eq = block_max(we, part);
  return s;
}

// The kept set: key > tkey, or key == tkey and index < tie_cut.
struct Kept {
  int64_t tkey, tie_cut;
  __device__ __forceinline__ double w(float z, int64_t v, float m) const {
    const int64_t k = order_key(z);
    if (k < tkey || (k == tkey && v >= tie_cut)) return 0.0;
    return double(__expf(z - m));
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(
    const T* __restrict__ logits, int64_t V, int64_t stride_row,
    const int64_t* __restrict__ indices, const double* __restrict__ temperature,
    const int64_t* __restrict__ top_k, const double* __restrict__ top_p,
    const double* __restrict__ min_p, const int64_t* __restrict__ seeds,
    const int64_t* __restrict__ steps, int joint, int raw_temperature,
    int64_t* __restrict__ tokens, float* __restrict__ raw, float* __restrict__ proc,
    float* __restrict__ entropy, float* __restrict__ lse) {
  __shared__ double part[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t r = indices ? indices[i] : i;
  const T* x = logits + r * stride_row;
  // The shift: the max of the raw logits (fmax skips NaN; S below does not), 0 for a row
  // without a finite one (so that z is −inf, not −inf − (−inf)).
  double xm = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) xm = fmax(xm, double(to_f(x[v])));
  const float xmax = float(block_max(xm, part));
  const float k = fminf(fmaxf(float(1.0 / temperature[i]), 1.17549435e-38f), 3.40282347e38f);
  const Row<T> row{x, V, k, xmax == -INFINITY ? 0.f : xmax};

  // m = max z = 0; S = Σ exp(z − m); entropy = log S − Σ w (z − m) / S.
  const float m = 0.f;
  double s = 0.0, t = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float d = row.z(v) - m;
    const float w = __expf(d);
    s += w;
    if (w > 0.0f) t += double(w) * double(d);  // w = 0 (z = −inf) adds nothing, not NaN
  }
  s = block_sum(s, part);
  t = block_sum(t, part);
  // A NaN (fmax skips it, S does not) or +inf (then z = inf − inf) poisons S; an all −inf
  // row has S = 0. Both are flagged through token −1 and lse, as the CPU kernel does (the
  // Python layer raises on them).
  if (isnan(s) || !(s > 0.0) || isinf(xmax)) {
    if (threadIdx.x == 0) {
      const float nan = __int_as_float(0x7fc00000);
      tokens[i] = -1;
      raw[i] = proc[i] = nan;
      if (entropy) entropy[i] = nan;
      lse[i] = (s == 0.0) ? -INFINITY : nan;
    }
    return;  // uniform across the block: no barrier is left waiting
  }
  const double log_s = log(s);
  if (threadIdx.x == 0) {
    lse[i] = float(double(xmax) / temperature[i] + log_s);
    if (entropy) entropy[i] = float(log_s - t / s);
  }

  // Filters → the length M of the kept prefix (value descending, index ascending).
  int64_t M = V;
  if (top_k && top_k[i] < V) M = top_k[i] < 1 ? 1 : top_k[i];
  if (top_p && top_p[i] < 1.0) {
    double base = s;
    if (!joint && M < V) {
      const Sel a = select_key(row, m, double(M), false, part);
      base = a.mass_gt + double(M - a.count_gt) * a.w_eq;
    }
    const double target = top_p[i] * base;
    const Sel a = select_key(row, m, target, true, part);
    // Ties at the threshold are taken in index order while the mass before them is < target.
    int64_t take = a.w_eq > 0.0 ? int64_t(ceil((target - a.mass_gt) / a.w_eq)) : a.count_eq;
    take = take < 1 ? 1 : (take > a.count_eq ? a.count_eq : take);
    if (a.count_gt + take < M) M = a.count_gt + take;
  }
  if (min_p && min_p[i] > 0.0) {
    // p_v ≥ min_p · max p  ⇔  exp(z_v − m) ≥ min_p (renormalising does not change it).
    const float mp = float(min_p[i]);
    double cnt = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) cnt += __expf(row.z(v) - m) >= mp;
    const int64_t c = int64_t(block_sum(cnt, part));
    if ((c < 1 ? 1 : c) < M) M = c < 1 ? 1 : c;
  }
  Kept kept{0, V};
  if (M < V) {
    const Sel a = select_key(row, m, double(M), false, part);
    kept.tkey = a.key;
    const int64_t ties_keep = M - a.count_gt;
    if (ties_keep < a.count_eq) {
      // Smallest cut c with #(ties at index < c) ≥ ties_keep: a search over the index.
      int64_t lo = 0, hi = V;
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        double c = 0.0;
        for (int64_t v = threadIdx.x; v < mid; v += kThreads)
          c += order_key(row.z(v)) == a.key ? 1.0 : 0.0;
        if (block_sum(c, part) >= double(ties_keep)) hi = mid; else lo = mid;
      }
      kept.tie_cut = hi;
    }
  }
  double sk = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) sk += kept.w(row.z(v), v, m);
  const double s_kept = block_sum(sk, part);

  // Inverse-CDF draw in vocabulary order: the first kept token whose cumulative weight exceeds
  // u · S_kept. Thread j of a chunk owns tokens [base + j·kItems, base + (j + 1)·kItems).
  const double target = rlkern::philox_uniform(seeds[i], steps[i], 0u) * s_kept;
  double acc = 0.0;  // kept mass before the chunk (same value in every thread)
  int64_t tok = V, limit = V;  // limit: the fallback below looks at tokens before it
  for (int64_t base = 0; base < V; base += int64_t(kThreads) * kItems) {
    const int64_t v0 = base + int64_t(threadIdx.x) * kItems;
    double mine = 0.0;
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (v0 + k < V) mine += kept.w(row.z(v0 + k), v0 + k, m);
    double total;
    const double incl = block_inclusive_sum(mine, part, &total);
    if (acc + total > target) {  // the token is in this chunk (a uniform branch)
      // The owner is the first thread whose prefix crosses the target and that holds kept
      // mass (a thread with none has the same prefix as the one before it). It walks its
      // tokens; if rounding keeps its walk from crossing, its last kept token is the answer.
      int64_t hit = V;
      if (mine > 0.0 && acc + incl > target) {
        double c = acc + (incl - mine);
        for (int k = 0; k < kItems && v0 + k < V; ++k) {
          const double w = kept.w(row.z(v0 + k), v0 + k, m);
          if (w <= 0.0) continue;
          c += w;
          hit = v0 + k;
          if (c > target) break;
        }
      }
      tok = int64_t(-block_max(-double(hit), part));  // the smallest owner's token
      limit = base + int64_t(kThreads) * kItems < V ? base + int64_t(kThreads) * kItems : V;
      break;
    }
    acc += total;
  }
  if (tok >= V) {
    // No owner: rounding left u · S_kept at or above every prefix (of the row, or of the
    // chunk whose total crossed it, when the scan's prefixes round below its total). The last
    // kept token before `limit` is the answer, as on the CPU.
    double last = -1.0;
    for (int64_t v = threadIdx.x; v < limit; v += kThreads)
      if (kept.w(row.z(v), v, m) > 0.0) last = fmax(last, double(v));
    tok = int64_t(block_max(last, part));
  }
  if (threadIdx.x == 0) {
    tokens[i] = tok;
    const float d = row.z(tok) - m;
    proc[i] = float(log(double(__expf(d))) - log(s_kept));
    if (raw_temperature) raw[i] = float(double(d) - log_s);
  }
  if (!raw_temperature) {  // vLLM-style raw logprobs of the untempered logits: two more passes
    double mr = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) mr = fmax(mr, double(to_f(row.x[v])));
    const float mrf = float(block_max(mr, part));
    double sr = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) sr += __expf(to_f(row.x[v]) - mrf);
    sr = block_sum(sr, part);
    if (threadIdx.x == 0) raw[i] = float(double(to_f(row.x[tok]) - mrf) - log(sr));
  }
}

template <typename T>
int launch(const void* logits, int64_t V, int64_t stride_row, int64_t N, const int64_t* indices,
           const double* temperature, const int64_t* top_k, const double* top_p,
           const double* min_p, const int64_t* seeds, const int64_t* steps, int joint,
           int raw_temperature, int64_t* tokens, float* raw, float* proc, float* entropy,
           float* lse, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N));
  sample_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(logits), V, stride_row, indices, temperature, top_k, top_p, min_p,
      seeds, steps, joint, raw_temperature, tokens, raw, proc, entropy, lse);
  return int(cudaGetLastError());
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
  if (!rlkern::valid_dtype(dtype)) return RLKERN_CUDA_ERR_DTYPE;
  // One block per output row: gridDim.x ≤ 2^31 − 1.
  if (N < 0 || V < 0 || R < 0 || (N > 0 && V == 0) || N > 2147483647LL || stride_row < 0)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (indices == nullptr && N > R) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (N == 0) return RLKERN_CUDA_OK;
  if (!logits || !temperature || !seeds || !steps || !tokens || !raw_logprobs ||
      !processed_logprobs || !lse)
    return RLKERN_CUDA_ERR_NULL_POINTER;
  return rlkern::dispatch_dtype(dtype, [&](auto t) {
    return launch<typename decltype(t)::type>(logits, V, stride_row, N, indices, temperature,
                                              top_k, top_p, min_p, seeds, steps, joint,
                                              raw_temperature, tokens, raw_logprobs,
                                              processed_logprobs, entropy, lse, stream);
  });
}
