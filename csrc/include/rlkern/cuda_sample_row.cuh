// The CUDA sampler's per-row device code (ALGORITHMS.md §4), shared by the sampler
// (csrc/cuda/sample.cu) and the truncated token log-probs (csrc/cuda/truncated_logprobs.cu), so
// that both compute the same kept set and the same kept mass, summed in the same order, and a
// truncated log-prob equals the sampler's processed log-prob of the same token bit for bit.
//
// One 256-thread block per row. Block reductions are written with warp shuffles and one small
// shared array (`part`, kWarps doubles, owned by the kernel): the reduction order is fixed, so
// a row's result never depends on the grid or on the other rows. Filters are lengths of a
// prefix of the order "value descending, index ascending", with thresholds from a bit-by-bit
// search over the 32-bit order key of z (block-wide counts / masses per probe; no sort).
//
// CUDA only (included by .cu files; the CUDA emulator of tests/cuda_emu runs it on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rlkern/kept_key.h"
#include "rlkern/philox.h"

namespace rlkern::cuda_sampler {

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

// The order key of z (rlkern/kept_key.h), widened to the int64 the block scans compare.
__device__ __forceinline__ int64_t order_key(float z) {
  return int64_t(rlkern::sample::order_key(z));
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
  __device__ __forceinline__ bool has(float z, int64_t v) const {
    const int64_t k = order_key(z);
    return !(k < tkey || (k == tkey && v >= tie_cut));
  }
  // exp(z − m) inside the kept set, 0 outside.
  __device__ __forceinline__ double w(float z, int64_t v, float m) const {
    if (!has(z, v)) return 0.0;
    return double(__expf(z - m));
  }
};

// A filtered row: the row, its statistics and the kept set (the same values in every thread).
template <typename T>
struct Filtered {
  Row<T> row;
  float xmax;     // max of the raw logits (fmax skips NaN)
  double s;       // S = Σ exp(z − m), m = max z = 0
  double t;       // Σ w (z − m) (the whole row's entropy: log S − t / S)
  double log_s;   // log S (valid when ok)
  Kept kept;
  double s_kept;  // Σ_K exp(z − m), summed in the order every user of the kept set relies on
  bool ok;        // false: NaN or +inf logits (S NaN), or all −inf (S = 0); nothing else set
};

// The max z; every filtered row has m = 0 (z is shifted by the raw max).
constexpr float kZMax = 0.f;

// Row `x` of V logits with temperature T and the filters (k ≥ V, p ≥ 1, min_p ≤ 0: off; a
// null pointer in the caller becomes the off value): max / normaliser / entropy passes, then
// the length M of the kept prefix (value descending, index ascending) and its threshold, then
// the kept mass. Every thread of the block must call it (block reductions).
template <typename T>
__device__ __forceinline__ Filtered<T> filter_row(const T* x, int64_t V, double temperature,
                                                  int64_t top_k, double top_p, double min_p,
                                                  bool joint, double* part) {
  Filtered<T> f;
  // The shift: the max of the raw logits (fmax skips NaN; S below does not), 0 for a row
  // without a finite one (so that z is −inf, not −inf − (−inf)).
  double xm = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) xm = fmax(xm, double(to_f(x[v])));
  f.xmax = float(block_max(xm, part));
  const float k = fminf(fmaxf(float(1.0 / temperature), 1.17549435e-38f), 3.40282347e38f);
  f.row = Row<T>{x, V, k, f.xmax == -INFINITY ? 0.f : f.xmax};
  const Row<T>& row = f.row;

  // m = max z = 0; S = Σ exp(z − m); entropy = log S − Σ w (z − m) / S.
  const float m = kZMax;
  double s = 0.0, t = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float d = row.z(v) - m;
    const float w = __expf(d);
    s += w;
    if (w > 0.0f) t += double(w) * double(d);  // w = 0 (z = −inf) adds nothing, not NaN
  }
  f.s = block_sum(s, part);
  f.t = block_sum(t, part);
  // A NaN (fmax skips it, S does not) or +inf (then z = inf − inf) poisons S; an all −inf
  // row has S = 0.
  f.ok = !(isnan(f.s) || !(f.s > 0.0) || isinf(f.xmax));
  if (!f.ok) return f;  // uniform across the block
  f.log_s = log(f.s);

  // Filters → the length M of the kept prefix (value descending, index ascending).
  int64_t M = V;
  if (top_k < V) M = top_k < 1 ? 1 : top_k;
  if (top_p < 1.0) {
    // The kept set must not depend on the kernel this code is inlined into: the products
    // below are rounded on their own (__dmul_rn / __dadd_rn are never contracted into an
    // FMA, which the compiler could otherwise decide differently per kernel).
    double base = f.s;
    if (!joint && M < V) {
      const Sel a = select_key(row, m, double(M), false, part);
      base = __dadd_rn(a.mass_gt, __dmul_rn(double(M - a.count_gt), a.w_eq));
    }
    const double target = __dmul_rn(top_p, base);
    const Sel a = select_key(row, m, target, true, part);
    // Ties at the threshold are taken in index order while the mass before them is < target.
    int64_t take = a.w_eq > 0.0 ? int64_t(ceil((target - a.mass_gt) / a.w_eq)) : a.count_eq;
    take = take < 1 ? 1 : (take > a.count_eq ? a.count_eq : take);
    if (a.count_gt + take < M) M = a.count_gt + take;
  }
  if (min_p > 0.0) {
    // p_v ≥ min_p · max p  ⇔  exp(z_v − m) ≥ min_p (renormalising does not change it).
    const float mp = float(min_p);
    double cnt = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) cnt += __expf(row.z(v) - m) >= mp;
    const int64_t c = int64_t(block_sum(cnt, part));
    if ((c < 1 ? 1 : c) < M) M = c < 1 ? 1 : c;
  }
  f.kept = Kept{0, V};
  if (M < V) {
    const Sel a = select_key(row, m, double(M), false, part);
    f.kept.tkey = a.key;
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
      f.kept.tie_cut = hi;
    }
  }
  double sk = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) sk += f.kept.w(row.z(v), v, m);
  f.s_kept = block_sum(sk, part);
  return f;
}

// log q_v = log(exp(z_v − m) / S_kept) of a token v (−inf for one outside the kept set): the
// sampler's processed log-prob and the truncated token log-prob, one expression for both (the
// fp32 result is rounded once, from double). A kept token whose weight underflowed to 0 stays
// finite (rlkern/kept_key.h, as the CPU's kept_logprob).
template <typename T>
__device__ __forceinline__ float kept_logprob(const Filtered<T>& f, int64_t v) {
  const float z = f.row.z(v);
  if (!f.kept.has(z, v)) return -INFINITY;
  const float d = z - kZMax;
  return float(rlkern::sample::kept_log_weight(__expf(d), d) - log(f.s_kept));
}

}  // namespace rlkern::cuda_sampler
