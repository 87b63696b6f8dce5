// CUDA kernels for group advantages (ALGORITHMS.md §2) and discounted returns (§2.1).
//
// Torch-free (DESIGN.md style rule 1): the launchers at the bottom take raw pointers, sizes and
// a cudaStream_t and return an error code; csrc/cuda/advantages_ops.cpp adapts tensors.
// Declarations and the contract: csrc/include/rlkern/cuda_launchers.h. The Python layer sorts
// the rows by group once (python/rlkern/ops/advantages_segmented.py); then:
//
//   segment_stats_kernel  one warp per group: the moments (n, mean, M2, min, max) of the valid
//                         scores by two passes in double (sum, then Σ (x − mean)²), a group of
//                         equal values getting mean = that value and M2 = 0 exactly; unlikely's
//                         rank-shaped r' (rows arrive sorted by log-likelihood; a row's rank is
//                         a ballot/popcount prefix); the extras (length-weighted sums, mean
//                         log-likelihood, top two scores and the top row).
//   rows_finish_kernel    one thread per row: the shared formula of rlkern/group_stats.h
//                         (group_affine, passk_top_advantage, xrpo_sharpen), the options
//                         decoded from the ops' flags and params (advantage_params).
//   moments_merge_kernel  one thread per group: Chan's merge of two moments tables
//                         (GroupStats).
//   discounted_returns_kernel
//                         one warp per row, back to front in chunks of 32: a warp scan of the
//                         affine maps G ↦ r + a·G, applied to the carry of the later chunk.
//   gae_kernel            one thread per row: the reverse scan of gae_step (rlkern/group_stats.h)
//                         with verl's carry over masked tokens, in double.
//
// Reductions are shuffle trees of fixed shape, so results do not depend on scheduling.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "rlkern/cuda_launchers.h"
#include "rlkern/group_stats.h"

namespace rlkern {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kStatsWarpsPerBlock = 4;
constexpr int kFinishThreads = 256;
constexpr int kReturnsWarpsPerBlock = 4;
constexpr int kGaeThreads = 128;
constexpr int kMergeThreads = 128;
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // blocks; beyond, the kernels stride

// Butterfly all-reduce of v over the warp with `op` (every lane gets the result).
template <typename Op>
__device__ __forceinline__ double warp_all(double v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

struct Add {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return fmin(a, b); }
};
struct Max {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <typename T>
__device__ __forceinline__ double load_score(const T* scores, int64_t row) {
  return static_cast<double>(scores[row]);
}

// The top-two state of grpo_passk: top1 (first row holding it: top_row), top2.
struct Top2 {
  double top1, top2;
  long long top_row;
};

// Merge of two disjoint sets: the winner has the larger top1 (ties: the smaller row); the
// runner-up is the larger of the winner's top2 and the loser's top1 (a tie makes top2 = top1).
// (Selects on values, not references: a reference to one of two locals would put both in
// local memory.)
__device__ __forceinline__ Top2 top2_merge(Top2 a, Top2 b) {
  const bool a_wins = a.top1 > b.top1 || (a.top1 == b.top1 && a.top_row < b.top_row);
  const double w_top2 = a_wins ? a.top2 : b.top2;
  const double l_top1 = a_wins ? b.top1 : a.top1;
  return {a_wins ? a.top1 : b.top1, fmax(w_top2, l_top1), a_wins ? a.top_row : b.top_row};
}

struct StatsArgs {
  const int64_t* perm;     // null: contiguous groups of group_size
  const int64_t* offsets;  // K + 1
  int64_t group_size;
  int64_t num_groups;
  const double* weights;  // nullable
  const double* loglik;   // nullable
  const double* params;   // PARAM_FIELDS (λ at [2])
  bool unlikely, weighted, with_loglik, top;
  double* ms;
  double* mx;
  double* ext;
  double* xr;
};

__device__ __forceinline__ void store_moments(double* out, double n, double mean, double m2,
                                              double lo, double hi) {
  const bool equal = lo == hi;
  out[kMomCount] = n;
  out[kMomMean] = equal ? lo : mean;
  out[kMomM2] = equal ? 0.0 : m2;
  out[kMomMin] = lo;
  out[kMomMax] = hi;
}

// One group, by one warp (lane = this thread's lane).
template <typename T>
__device__ __forceinline__ void segment_stats_group(const T* __restrict__ scores,
                                                    const StatsArgs& a, int64_t g, int lane) {
  const int64_t start = a.perm ? a.offsets[g] : g * a.group_size;
  const int64_t count = a.perm ? a.offsets[g + 1] - start : a.group_size;
  auto row_of = [&](int64_t k) { return a.perm ? a.perm[start + k] : start + k; };
  const double inf = static_cast<double>(INFINITY);

  // Pass 1: count, sum, min, max of the valid scores.
  double n = 0.0, sum = 0.0, lo = inf, hi = -inf;
  for (int64_t k = lane; k < count; k += kWarp) {
    const double x = load_score(scores, row_of(k));
    if (score_is_valid(x)) {
      n += 1.0;
      sum += x;
      lo = fmin(lo, x);
      hi = fmax(hi, x);
    }
  }
  n = warp_all(n, Add{});
  sum = warp_all(sum, Add{});
  lo = warp_all(lo, Min{});
  hi = warp_all(hi, Max{});
  const double mean = sum / n;  // NaN for an empty group
  // Pass 2: M2 about the mean.
  double m2 = 0.0;
  for (int64_t k = lane; k < count; k += kWarp) {
    const double x = load_score(scores, row_of(k));
    if (score_is_valid(x)) m2 += (x - mean) * (x - mean);
  }
  m2 = warp_all(m2, Add{});
  if (lane == 0) store_moments(a.ms + g * kNumMoments, n, mean, m2, lo, hi);
  double xmean = lo == hi ? lo : mean;

  if (a.unlikely) {
    // Rows come sorted by (log-likelihood, row): a valid row's rank is the number of valid rows
    // before it. The warp walks the group in chunks of 32 so that the prefix is a popcount.
    const double lam = a.params[kParamLam];
    double xsum = 0.0, xlo = inf, xhi = -inf, before = 0.0;
    for (int64_t k0 = 0; k0 < count; k0 += kWarp) {
      const int64_t k = k0 + lane;
      const int64_t row = k < count ? row_of(k) : 0;
      const double x = k < count ? load_score(scores, row) : 0.0;
      const bool valid = k < count && score_is_valid(x);
      const unsigned ballot = __ballot_sync(kFull, valid);
      const double rank = before + __popc(ballot & ((1u << lane) - 1u));
      const double xr = valid ? x * (1.0 - lam * (rank / n)) : x;
      if (k < count) a.xr[row] = xr;
      if (valid) {
        xsum += xr;
        xlo = fmin(xlo, xr);
        xhi = fmax(xhi, xr);
      }
      before += __popc(ballot);
    }
    xsum = warp_all(xsum, Add{});
    xlo = warp_all(xlo, Min{});
    xhi = warp_all(xhi, Max{});
    const double xm = xsum / n;
    __syncwarp();  // the r' written above are read back below by other lanes
    double xm2 = 0.0;
    for (int64_t k = lane; k < count; k += kWarp) {
      const int64_t row = row_of(k);
      const double xr = a.xr[row];
      if (score_is_valid(load_score(scores, row))) xm2 += (xr - xm) * (xr - xm);
    }
    xm2 = warp_all(xm2, Add{});
    if (lane == 0) store_moments(a.mx + g * kNumMoments, n, xm, xm2, xlo, xhi);
    xmean = xlo == xhi ? xlo : xm;
  }

  if (a.weighted || a.with_loglik || a.top) {
    double wsum = 0.0, wdev = 0.0, wdev2 = 0.0, aux = 0.0;
    Top2 best{-inf, -inf, LLONG_MAX};  // LLONG_MAX: no row yet (never wins a tie)
    for (int64_t k = lane; k < count; k += kWarp) {
      const int64_t row = row_of(k);
      const double s = load_score(scores, row);
      if (!score_is_valid(s)) continue;
      const double x = a.unlikely ? a.xr[row] : s;
      if (a.weighted) {
        const double w = a.weights ? a.weights[row] : 1.0;
        const double d = x - xmean;
        wsum += w;
        wdev += w * d;
        wdev2 += w * d * d;
      }
      if (a.with_loglik) aux += a.loglik[row];
      if (a.top) best = top2_merge(best, Top2{x, -inf, row});
    }
    wsum = warp_all(wsum, Add{});
    wdev = warp_all(wdev, Add{});
    wdev2 = warp_all(wdev2, Add{});
    aux = warp_all(aux, Add{});
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const Top2 other{__shfl_xor_sync(kFull, best.top1, o), __shfl_xor_sync(kFull, best.top2, o),
                       __shfl_xor_sync(kFull, best.top_row, o)};
      best = top2_merge(best, other);
    }
    if (lane == 0) {
      double* e = a.ext + g * kNumExtras;
      e[kExtWsum] = wsum;
      e[kExtWdev] = wdev;
      e[kExtWdev2] = wdev2;
      e[kExtLoglikMean] = n > 0.0 ? aux / n : 0.0;
      e[kExtTop1] = best.top1;
      e[kExtTop2] = best.top2;
      e[kExtTopRow] = best.top_row == LLONG_MAX ? -1.0 : static_cast<double>(best.top_row);
    }
  }
}

// ≥ 4 resident blocks per SM (≤ 128 registers): without the second bound ptxas caps the
// kernel at 64 registers and spills the top-two state. Warps stride over the groups, so any
// grid size works (whole warps take the same groups: the shuffles always see 32 lanes).
template <typename T>
__global__ void __launch_bounds__(kStatsWarpsPerBlock * kWarp, 4)
    segment_stats_kernel(const T* __restrict__ scores, StatsArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kStatsWarpsPerBlock;
  for (int64_t g = int64_t(blockIdx.x) * kStatsWarpsPerBlock + threadIdx.x / kWarp;
       g < a.num_groups; g += warps)
    segment_stats_group(scores, a, g, lane);
}

struct FinishArgs {
  const double* xr;        // nullable (unlikely)
  const double* loglik;    // nullable (xrpo)
  const int64_t* row_group;  // null: contiguous groups of group_size
  int64_t group_size;
  int64_t n;
  const double* ms;
  const double* mx;
  const double* ext;  // nullable
  const double* params;
  int32_t flags[kNumFlags];  // enum Flag order
  uint8_t* zv;
};

__device__ __forceinline__ GroupMoments load_moments(const double* p) {
  return {p[kMomCount], p[kMomMean], p[kMomM2], p[kMomMin], p[kMomMax]};
}

template <typename T, typename O>
__global__ void __launch_bounds__(kFinishThreads)
    rows_finish_kernel(const T* __restrict__ scores, O* __restrict__ adv, O* __restrict__ mean,
                       O* __restrict__ sd, FinishArgs a) {
  const AdvantageParams p = advantage_params(a.flags, a.params, kNumParams);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n; i += stride) {
    const int64_t g = a.row_group ? a.row_group[i] : i / a.group_size;
    const GroupMoments ms = load_moments(a.ms + g * kNumMoments);
    const GroupMoments mx = load_moments(a.mx + g * kNumMoments);
    const double s = load_score(scores, i);
    double out = 0.0;
    if (score_is_valid(s) && group_active(mx, p)) {
      const double* q = a.ext ? a.ext + g * kNumExtras : nullptr;
      const GroupExtras e = q ? GroupExtras{q[kExtWsum], q[kExtWdev], q[kExtWdev2],
                                            q[kExtLoglikMean], q[kExtTop1], q[kExtTop2],
                                            static_cast<long long>(q[kExtTopRow])}
                              : GroupExtras{0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1};
      const double x = a.xr ? a.xr[i] : s;
      out = row_advantage(x, i, a.loglik ? a.loglik[i] : 0.0, mx, &e, p);
    }
    adv[i] = static_cast<O>(out);
    mean[i] = static_cast<O>(ms.mean);
    sd[i] = static_cast<O>(moments_std(ms, p.std_mode));
    a.zv[i] = moments_zero_variance(ms) ? 1 : 0;
  }
}

// Chan's merge of two moments tables row by row (moments_merge of rlkern/group_stats.h).
__global__ void __launch_bounds__(kMergeThreads)
    moments_merge_kernel(const double* __restrict__ a, const double* __restrict__ b,
                         double* __restrict__ out, int64_t k) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < k; g += stride) {
    const GroupMoments m = moments_merge(load_moments(a + g * kNumMoments),
                                         load_moments(b + g * kNumMoments));
    double* o = out + g * kNumMoments;
    o[kMomCount] = m.n;
    o[kMomMean] = m.mean;
    o[kMomM2] = m.m2;
    o[kMomMin] = m.min;
    o[kMomMax] = m.max;
  }
}

template <typename T>
__device__ __forceinline__ void returns_row(const T* __restrict__ rewards,
                                            const uint8_t* __restrict__ reset, T* __restrict__ out,
                                            int64_t row, int64_t t_len, double gamma, int lane) {
  const T* r = rewards + row * t_len;
  T* o = out + row * t_len;
  double carry = 0.0;
  for (int64_t k0 = 0; k0 < t_len; k0 += kWarp) {
    const int64_t t = t_len - 1 - (k0 + lane);  // lane 0 holds the latest position
    const bool ok = t >= 0;
    double b = ok ? static_cast<double>(r[t]) : 0.0;
    double m = (ok && reset && reset[row * t_len + t]) ? 0.0 : gamma;
    // Inclusive scan of f_k(G) = b_k + m_k·G over the lanes: lane k gets f_k ∘ … ∘ f_0.
#pragma unroll
    for (int d = 1; d < kWarp; d <<= 1) {
      const double pm = __shfl_up_sync(kFull, m, d);
      const double pb = __shfl_up_sync(kFull, b, d);
      if (lane >= d) {
        b = b + discount_product(m, pb);
        m = discount_product(m, pm);
      }
    }
    const double g = b + discount_product(m, carry);
    if (ok) o[t] = static_cast<T>(g);
    carry = __shfl_sync(kFull, g, kWarp - 1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kReturnsWarpsPerBlock * kWarp)
    discounted_returns_kernel(const T* __restrict__ rewards, const uint8_t* __restrict__ reset,
                              T* __restrict__ out, int64_t n, int64_t t_len, double gamma) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kReturnsWarpsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kReturnsWarpsPerBlock + threadIdx.x / kWarp; row < n;
       row += warps)
    returns_row(rewards, reset, out, row, t_len, gamma, lane);
}

template <typename T>
__global__ void __launch_bounds__(kGaeThreads)
    gae_kernel(const T* __restrict__ rewards, const T* __restrict__ values,
               const uint8_t* __restrict__ valid, T* __restrict__ advantages,
               T* __restrict__ returns, int64_t n, int64_t t_len, double gamma, double gamma_lam) {
  // One thread per row, back to front: the carry (next value, last GAE) is sequential in t.
  // Neighbouring threads read rows t_len apart (uncoalesced), a fair price for an op that
  // reads each element once; the rows of a batch keep every thread busy.
  const int64_t stride = int64_t(gridDim.x) * kGaeThreads;
  for (int64_t row = int64_t(blockIdx.x) * kGaeThreads + threadIdx.x; row < n; row += stride) {
    const int64_t base = row * t_len;
    GaeCarry c{0.0, 0.0};
    for (int64_t t = t_len - 1; t >= 0; --t) {
      const double v = values ? static_cast<double>(values[base + t]) : 0.0;
      const double a = gae_step(static_cast<double>(rewards[base + t]), v, valid[base + t] != 0,
                                gamma, gamma_lam, &c);
      advantages[base + t] = static_cast<T>(a);
      returns[base + t] = static_cast<T>(a + v);
    }
  }
}

// Blocks for `units` work items of `per_block` each; the kernels stride, so the grid is capped.
unsigned grid_for(int64_t units, int per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  return unsigned(blocks < kMaxGrid ? blocks : kMaxGrid);
}

int launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? RLKERN_CUDA_OK : static_cast<int>(err);
}

}  // namespace
}  // namespace rlkern

using rlkern::kFinishThreads;
using rlkern::kGaeThreads;
using rlkern::kMergeThreads;
using rlkern::kReturnsWarpsPerBlock;
using rlkern::kStatsWarpsPerBlock;
using rlkern::kWarp;

extern "C" int rlkern_group_segment_stats_cuda(
    const void* scores, int scores_f64, const int64_t* perm, const int64_t* offsets,
    int64_t group_size, int64_t num_groups, const double* weights, const double* loglik,
    const double* params, int unlikely, int weighted, int with_loglik, int top, double* ms,
    double* mx, double* ext, double* xr, cudaStream_t stream) {
  if (num_groups < 0 || group_size < 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (num_groups == 0) return RLKERN_CUDA_OK;
  if (!scores || !params || !ms || (perm && !offsets) || (!perm && group_size == 0) ||
      (unlikely && (!mx || !xr)) || ((weighted || with_loglik || top) && !ext) ||
      (with_loglik && !loglik))
    return RLKERN_CUDA_ERR_NULL_POINTER;
  const unsigned grid = rlkern::grid_for(num_groups, kStatsWarpsPerBlock);
  rlkern::StatsArgs a{perm, offsets, group_size, num_groups, weights, loglik, params,
                      unlikely != 0, weighted != 0, with_loglik != 0, top != 0, ms, mx, ext, xr};
  const dim3 block(kStatsWarpsPerBlock * kWarp);
  if (scores_f64) {
    rlkern::segment_stats_kernel<double><<<grid, block, 0, stream>>>(
        static_cast<const double*>(scores), a);
  } else {
    rlkern::segment_stats_kernel<float><<<grid, block, 0, stream>>>(
        static_cast<const float*>(scores), a);
  }
  return rlkern::launch_status();
}

extern "C" int rlkern_group_rows_finish_cuda(
    const void* scores, int scores_f64, const double* xr, const double* loglik,
    const int64_t* row_group, int64_t group_size, int64_t n, const double* ms, const double* mx,
    const double* ext, const double* params, const int32_t* flags, void* advantages,
    void* group_mean, void* group_std, uint8_t* zero_variance, int out_f64,
    cudaStream_t stream) {
  if (!flags) return RLKERN_CUDA_ERR_NULL_POINTER;
  if (n < 0 || group_size < 0 || rlkern::first_invalid_flag(flags) >= 0)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (n == 0) return RLKERN_CUDA_OK;
  const int estimator = flags[rlkern::kFlagEstimator];
  const bool needs_ext = estimator == rlkern::kOpo || estimator == rlkern::kGrpoPassk ||
                         estimator == rlkern::kXrpo;
  if (!scores || !ms || !mx || !params || !advantages || !group_mean || !group_std ||
      !zero_variance || (!row_group && group_size == 0) || (needs_ext && !ext) ||
      (estimator == rlkern::kXrpo && !loglik) || (estimator == rlkern::kUnlikely && !xr))
    return RLKERN_CUDA_ERR_NULL_POINTER;
  const unsigned grid = rlkern::grid_for(n, kFinishThreads);
  rlkern::FinishArgs a{xr, loglik, row_group, group_size, n, ms, mx, ext, params, {},
                       zero_variance};
  for (int f = 0; f < rlkern::kNumFlags; ++f) a.flags[f] = flags[f];
  const dim3 block(kFinishThreads);
#define RLKERN_FINISH(T, O)                                                              \
  rlkern::rows_finish_kernel<T, O><<<grid, block, 0, stream>>>(                \
      static_cast<const T*>(scores), static_cast<O*>(advantages), static_cast<O*>(group_mean), \
      static_cast<O*>(group_std), a)
  if (scores_f64) {
    if (out_f64) RLKERN_FINISH(double, double);
    else RLKERN_FINISH(double, float);
  } else {
    if (out_f64) RLKERN_FINISH(float, double);
    else RLKERN_FINISH(float, float);
  }
#undef RLKERN_FINISH
  return rlkern::launch_status();
}

extern "C" int rlkern_group_moments_merge_cuda(const double* a, const double* b, double* out,
                                               int64_t k, cudaStream_t stream) {
  if (k < 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (k == 0) return RLKERN_CUDA_OK;
  if (!a || !b || !out) return RLKERN_CUDA_ERR_NULL_POINTER;
  rlkern::moments_merge_kernel<<<rlkern::grid_for(k, kMergeThreads), kMergeThreads, 0, stream>>>(
      a, b, out, k);
  return rlkern::launch_status();
}

extern "C" int rlkern_discounted_returns_cuda(const void* rewards, int f64, int64_t n,
                                              int64_t t_len, const uint8_t* reset, double gamma,
                                              void* out, cudaStream_t stream) {
  if (n < 0 || t_len < 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (n == 0 || t_len == 0) return RLKERN_CUDA_OK;
  if (!rewards || !out) return RLKERN_CUDA_ERR_NULL_POINTER;
  const unsigned grid = rlkern::grid_for(n, kReturnsWarpsPerBlock);
  const dim3 block(kReturnsWarpsPerBlock * kWarp);
  if (f64) {
    rlkern::discounted_returns_kernel<double><<<grid, block, 0, stream>>>(
        static_cast<const double*>(rewards), reset, static_cast<double*>(out), n, t_len, gamma);
  } else {
    rlkern::discounted_returns_kernel<float><<<grid, block, 0, stream>>>(
        static_cast<const float*>(rewards), reset, static_cast<float*>(out), n, t_len, gamma);
  }
  return rlkern::launch_status();
}

extern "C" int rlkern_gae_cuda(const void* rewards, const void* values, int f64, int64_t n,
                               int64_t t_len, const uint8_t* valid, double gamma, double lam,
                               void* advantages, void* returns, cudaStream_t stream) {
  if (n < 0 || t_len < 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (n == 0 || t_len == 0) return RLKERN_CUDA_OK;
  if (!rewards || !valid || !advantages || !returns) return RLKERN_CUDA_ERR_NULL_POINTER;
  const unsigned grid = rlkern::grid_for(n, kGaeThreads);
  if (f64) {
    rlkern::gae_kernel<double><<<grid, kGaeThreads, 0, stream>>>(
        static_cast<const double*>(rewards), static_cast<const double*>(values), valid,
        static_cast<double*>(advantages), static_cast<double*>(returns), n, t_len, gamma,
        gamma * lam);
  } else {
    rlkern::gae_kernel<float><<<grid, kGaeThreads, 0, stream>>>(
        static_cast<const float*>(rewards), static_cast<const float*>(values), valid,
        static_cast<float*>(advantages), static_cast<float*>(returns), n, t_len, gamma,
        gamma * lam);
  }
  return rlkern::launch_status();
}
