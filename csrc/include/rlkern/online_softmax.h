// Streaming softmax statistics of one row of logits, shared by the CPU and CUDA kernels.
//
// A row segment is summarised relative to its running maximum m of the *raw* logits x
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), with k = 1/T the
// temperature's scale applied after the shift, r = k (x − m) ≤ 0:
//
//   s    = Σ exp(r)                 normaliser
//   t    = Σ exp(r) · r             first moment, shifted by m so it never cancels
//   u    = Σ exp(2 r)               second moment of p (for Σ p²)
//   zsum = Σ (x − c)                plain sum (for self-certainty), relative to a constant c the
//                                   caller picks per row (its first logit, or 0 if that is not
//                                   finite), so that it neither overflows nor cancels
//
// From these:  lse = k m + log s,  entropy = log s − t / s,  Σ p² = u / s²,
//              self_certainty = lse − mean z = log s − k (zsum / V + c − m).
// Shifting before scaling is what keeps a finite row finite at any magnitude and temperature:
// r never overflows, and the differences of huge logits (or of logits over a tiny T) are not
// lost to the rounding of k x. Only lse itself can leave the float range.
// Two summaries of disjoint segments merge exactly (up to rounding) with `merge`, so the
// statistics can be built in any blocking and combined across threads, warps or ranks.
//
// x = −inf entries are legal (masked vocabulary): they contribute exp(−inf) = 0 to s, t, u (and
// make zsum −inf: self-certainty is +inf). NaN or +inf entries make s NaN, hence every result.
// Torch-free so nvcc and the host compiler both include it.
#pragma once

#include <cmath>
#include <limits>

#include "rlkern/host_device.h"

namespace rlkern {

template <typename acc_t>
struct SoftmaxStats {
  acc_t m;     // running max of the raw logits (−inf when empty or all −inf)
  acc_t s;     // Σ exp(k (x − m))
  acc_t t;     // Σ exp(k (x − m)) k (x − m)
  acc_t u;     // Σ exp(2 k (x − m))
  acc_t zsum;  // Σ (x − c), c fixed per row by the caller
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

// The shift of a summary: its max, or 0 while it has none (x − (−inf) would be NaN). Also the
// natural constant c of zsum: softmax_stats_ref(first logit) is it, or 0 when not finite.
template <typename acc_t>
RLKERN_HOST_DEVICE acc_t softmax_stats_ref(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Move a summary taken relative to `a.m` onto a new reference max `m >= a.m` (raw units).
// With δ = k (a.m − m) ≤ 0 and α = exp(δ):  s' = α s,  t' = α (t + δ s),  u' = α² u. An empty
// summary (s == 0) keeps s = t = u = 0, which also avoids (−inf) · 0; one that vanishes
// (α = 0) is dropped whole, so an infinite δ never meets 0 either. zsum does not move.
template <typename acc_t>
RLKERN_HOST_DEVICE void softmax_stats_rescale(SoftmaxStats<acc_t>& a, acc_t m, acc_t k) {
  if (a.s != acc_t(0)) {
    const acc_t d = (a.m - m) * k;
    const acc_t alpha = exp(d);
    a.t = alpha == acc_t(0) ? acc_t(0) : alpha * (a.t + d * a.s);
    a.s = alpha * a.s;
    a.u = alpha * alpha * a.u;
  }
  a.m = m;
}

// Exact merge of two disjoint segments (Chan-style parallel combination); k = 1/T.
template <typename acc_t>
RLKERN_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_merge(SoftmaxStats<acc_t> a,
                                                           SoftmaxStats<acc_t> b, acc_t k) {
  const acc_t m = a.m > b.m ? a.m : b.m;  // a NaN max (b.m) carries over: the row is NaN
  softmax_stats_rescale(a, m, k);
  softmax_stats_rescale(b, m, k);
  return {m, a.s + b.s, a.t + b.t, a.u + b.u, a.zsum + b.zsum};
}

// Per-row results derived from a complete summary.
template <typename acc_t>
struct RowResult {
  acc_t log_s;
  acc_t lse;
  acc_t entropy;
  acc_t self_certainty;
  acc_t sum_p_sq;
};

// An all −inf row (s = 0) gives lse = −inf and NaN elsewhere; a NaN row NaN everywhere. c is
// the constant of zsum.
template <typename acc_t>
RLKERN_HOST_DEVICE RowResult<acc_t> softmax_stats_finish(const SoftmaxStats<acc_t>& st,
                                                         long long vocab, acc_t k,
                                                         acc_t c = acc_t(0)) {
  RowResult<acc_t> r;
  const acc_t m = softmax_stats_ref(st.m);
  r.log_s = log(st.s);
  r.lse = m * k + r.log_s;
  r.entropy = r.log_s - st.t / st.s;
  r.self_certainty = r.log_s - k * (st.zsum / acc_t(vocab) + (c - m));
  r.sum_p_sq = st.u / (st.s * st.s);
  return r;
}

}  // namespace rlkern
