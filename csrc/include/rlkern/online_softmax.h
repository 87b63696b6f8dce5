// Streaming softmax statistics of one row of logits, shared by the CPU and CUDA kernels.
//
// A row segment is summarised relative to its running maximum m (Milakov & Gimelshein 2018,
// "Online normalizer calculation for softmax"):
//
//   s    = Σ exp(z − m)                 normaliser
//   t    = Σ exp(z − m) · (z − m)       first moment, shifted by m so it never cancels
//   u    = Σ exp(2 (z − m))             second moment of p (for Σ p²)
//   zsum = Σ z                          plain sum (for self-certainty)
//
// From these:  lse = m + log s,  entropy = log s − t / s,  Σ p² = u / s²,
//              self_certainty = lse − zsum / V.
// Two summaries of disjoint segments merge exactly (up to rounding) with `merge`, so the
// statistics can be built in any blocking and combined across threads, warps or ranks.
//
// z = −inf entries are legal (masked vocabulary): they contribute exp(−inf) = 0 to s, t, u.
// Torch-free so nvcc and the host compiler both include it.
#pragma once

#include <cmath>
#include <limits>

#include "rlkern/host_device.h"

namespace rlkern {

template <typename acc_t>
struct SoftmaxStats {
  acc_t m;     // running max of z (−inf when empty)
  acc_t s;     // Σ exp(z − m)
  acc_t t;     // Σ exp(z − m)(z − m)
  acc_t u;     // Σ exp(2(z − m))
  acc_t zsum;  // Σ z
};

// −inf of acc_t, usable in host and device code alike: std::numeric_limits<>::infinity() is a
// constexpr __host__ function, which nvcc rejects in device code (warning 20013) unless built
// with --expt-relaxed-constexpr. INFINITY is a plain constant expression in both compilers.
template <typename acc_t>
RLKERN_HOST_DEVICE acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
RLKERN_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_empty() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Rescale a summary taken relative to `a.m` onto a new reference max `m >= a.m`.
// With a shift d = a.m − m ≤ 0 and α = exp(d):  s' = α s,  t' = α (t + d s),  u' = α² u.
// An empty summary (s == 0) stays empty, which also avoids (−inf) · 0 when a.m = −inf.
template <typename acc_t>
RLKERN_HOST_DEVICE void softmax_stats_rescale(SoftmaxStats<acc_t>& a, acc_t m) {
  if (a.s == acc_t(0)) {
    a.m = m;
    return;
  }
  const acc_t d = a.m - m;
  const acc_t alpha = exp(d);
  a.t = alpha * (a.t + d * a.s);
  a.s = alpha * a.s;
  a.u = alpha * alpha * a.u;
  a.m = m;
}

// Exact merge of two disjoint segments (Chan-style parallel combination).
template <typename acc_t>
RLKERN_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_merge(SoftmaxStats<acc_t> a,
                                                           SoftmaxStats<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) {
    a.zsum += b.zsum;
    return a;
  }
  softmax_stats_rescale(a, m);
  softmax_stats_rescale(b, m);
  return {m, a.s + b.s, a.t + b.t, a.u + b.u, a.zsum + b.zsum};
}

// Per-row results derived from a complete summary.
template <typename acc_t>
struct RowResult {
  acc_t lse;
  acc_t entropy;
  acc_t self_certainty;
  acc_t sum_p_sq;
};

template <typename acc_t>
RLKERN_HOST_DEVICE RowResult<acc_t> softmax_stats_finish(const SoftmaxStats<acc_t>& st,
                                                         long long vocab) {
  const acc_t log_s = log(st.s);
  RowResult<acc_t> r;
  r.lse = st.m + log_s;
  r.entropy = log_s - st.t / st.s;
  r.self_certainty = r.lse - st.zsum / acc_t(vocab);
  r.sum_p_sq = st.u / (st.s * st.s);
  return r;
}

// Gradient of (g_lp · logp + g_ent · entropy) wrt one logit x_v, with z_v = x_v / T:
//   ∂/∂x_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) ] / T,
//   p_v = exp(z_v − lse),  E_p[z] = lse − entropy.
// Written as p_v · (c0 − g_ent z_v) + (v == y ? g_lp : 0), all times 1/T, where
// c0 = g_ent E_p[z] − g_lp is per-row. A −inf logit gives p_v = 0 and contributes 0
// (the limit of p z as z → −inf), so z_v is clamped to the lowest finite value first.
template <typename acc_t>
RLKERN_HOST_DEVICE acc_t logprobs_grad_row_const(acc_t g_lp, acc_t g_ent, acc_t lse,
                                                 acc_t entropy) {
  return g_ent * (lse - entropy) - g_lp;
}

}  // namespace rlkern
