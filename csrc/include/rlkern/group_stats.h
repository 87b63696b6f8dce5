// Group statistics and the per-response advantage formulas of ALGORITHMS.md §2, shared by the
// CPU and CUDA kernels (the Triton kernels mirror them; python/rlkern/reference states them in
// torch).
//
// A group is summarised by its moments (n, mean, M2 = Σ (x − mean)², min, max) in double.
// Three ways to build them, all giving the same numbers to double rounding:
//
//   * shifted sums (the CPU kernels, one pass): with K = the group's first value in row order,
//     accumulate d = x − K, Σd and Σd²; then mean = K + Σd/n and M2 = Σd² − (Σd)²/n. Because K
//     is a member of the group, Σd² ≤ (n + 1)·M2, so the cancellation in M2 costs at most
//     log2(n + 1) bits of the 53 — far below the float32 rounding of the outputs;
//   * two passes (the GPU kernels): mean = Σx/n, then M2 = Σ (x − mean)²;
//   * Welford updates and Chan's merge (streaming statistics, GroupStats, NGRPO's virtual
//     sample): Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for
//     computing sample variances".
//
// Row-order independence: a permutation of a group's rows changes only the order of double
// additions (and K), i.e. the moments by a few units of 2^-53 relative; the float32 outputs
// computed from them are therefore the same up to float32 rounding (in practice bitwise).
// A group whose values are all equal (min == max) gets mean = min and M2 = 0 exactly, so that
// x − mean is exactly 0 for each of its rows and zero-variance groups get A = 0 exactly on
// every backend.
//
// Torch-free, host + device.
#pragma once

#include <math.h>

#include "rlkern/host_device.h"

namespace rlkern {

struct GroupMoments {
  double n;     // number of valid (non-omitted) rows
  double mean;  // NaN when n == 0
  double m2;    // Σ (x − mean)²
  double min;
  double max;
};

RLKERN_HOST_DEVICE GroupMoments moments_empty() {
  return {0.0, 0.0, 0.0, static_cast<double>(INFINITY), -static_cast<double>(INFINITY)};
}

// Welford's update with one value.
RLKERN_HOST_DEVICE void moments_push(GroupMoments& m, double x) {
  m.n += 1.0;
  const double delta = x - m.mean;
  m.mean += delta / m.n;
  m.m2 += delta * (x - m.mean);
  m.min = x < m.min ? x : m.min;
  m.max = x > m.max ? x : m.max;
}

// Chan's parallel merge of two disjoint sets of rows. Equal means merge exactly (delta = 0).
RLKERN_HOST_DEVICE GroupMoments moments_merge(const GroupMoments& a, const GroupMoments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  GroupMoments r;
  r.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  r.mean = a.mean + delta * (b.n / r.n);
  r.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / r.n);
  r.min = a.min < b.min ? a.min : b.min;
  r.max = a.max > b.max ? a.max : b.max;
  if (r.min == r.max) {  // keep zero-variance groups exact
    r.mean = r.min;
    r.m2 = 0.0;
  }
  return r;
}

// One-pass accumulator: sums of d = x − shift, shift = the first value pushed.
struct ShiftedSums {
  double n, shift, s1, s2, min, max;
};

RLKERN_HOST_DEVICE ShiftedSums shifted_empty() {
  return {0.0, 0.0, 0.0, 0.0, static_cast<double>(INFINITY), -static_cast<double>(INFINITY)};
}

RLKERN_HOST_DEVICE void shifted_push(ShiftedSums& s, double x) {
  if (s.n == 0.0) s.shift = x;
  const double d = x - s.shift;
  s.n += 1.0;
  s.s1 += d;
  s.s2 += d * d;
  s.min = x < s.min ? x : s.min;
  s.max = x > s.max ? x : s.max;
}

RLKERN_HOST_DEVICE GroupMoments shifted_moments(const ShiftedSums& s) {
  GroupMoments m;
  m.n = s.n;
  m.min = s.min;
  m.max = s.max;
  if (s.n == 0.0) {
    m.mean = static_cast<double>(NAN);
    m.m2 = 0.0;
  } else if (s.min == s.max) {
    m.mean = s.min;
    m.m2 = 0.0;
  } else {
    m.mean = s.shift + s.s1 / s.n;
    const double m2 = s.s2 - s.s1 * (s.s1 / s.n);
    m.m2 = m2 > 0.0 ? m2 : 0.0;
  }
  return m;
}

// Standard deviation conventions (the `std` option).
enum StdMode : int {
  kStdUnbiased = 0,  // √(M2 / (n − 1)): torch.std, verl and TRL
  kStdBiased = 1,    // √(M2 / n)
  kStdNone = 2,      // no division by σ (Dr. GRPO style); reported σ is the unbiased one
};

// σ of a group as reported in `group_std`: NaN for an empty group, 0 for a singleton.
RLKERN_HOST_DEVICE double moments_std(const GroupMoments& m, int std_mode) {
  if (m.n == 0.0) return static_cast<double>(NAN);
  if (m.n < 2.0) return 0.0;
  const double denom = std_mode == kStdBiased ? m.n : m.n - 1.0;
  return sqrt(m.m2 / denom);
}

RLKERN_HOST_DEVICE bool moments_zero_variance(const GroupMoments& m) {
  return m.n >= 2.0 && m.min == m.max;
}

enum Estimator : int {
  kGrpo = 0,
  kDrGrpo = 1,
  kRloo = 2,
  kReinforcePPBaseline = 3,
  kOpo = 4,
  kGpg = 5,
  kGrpoPassk = 6,
  kNgrpo = 7,
  kUnlikely = 8,  // GRPO on the rank-shaped rewards r' (the kernels pass r' as x)
  kXrpo = 9,
};

// Per-group quantities some estimators need beyond the moments (two-pass: around the mean).
struct GroupExtras {
  double wsum;      // opo / reinforce_pp_baseline: Σ w       (w = response length)
  double wdev;      //                              Σ w (x − mean)
  double wdev2;     //                              Σ w (x − mean)²
  double aux_mean;  // xrpo: mean of the sequence log-likelihoods ŝ over the group
  double top1;      // grpo_passk: largest value, second largest (a tie gives top2 == top1)
  double top2;
  long long top_row;  // row holding top1 (the first such row)
};

// Batch-level constants, computed between the group pass and the row pass.
struct AdvantageParams {
  int estimator;
  int std_mode;
  bool batch_scope;     // σ_batch instead of σ_g (grpo-family only)
  bool singleton_verl;  // singleton groups: verl's μ = 0, σ = 1 instead of A = 0
  double eps;
  double r_max;       // ngrpo virtual sample
  double lam;         // xrpo λ
  double kappa;       // xrpo κ
  double batch_std;   // σ_batch (std_scope = batch)
  double gpg_alpha;   // N / max(#{s ≠ 0}, 1)
  double white_mean;  // reinforce_pp_baseline: weighted mean of the centred scores
  double white_rstd;  //                        rsqrt(var + 1e-8)
};

// Whether a group's valid rows get a nonzero advantage at all: empty groups never do, and
// singletons only under verl's convention.
RLKERN_HOST_DEVICE bool group_active(const GroupMoments& g, const AdvantageParams& p) {
  return g.n >= 2.0 || (g.n == 1.0 && p.singleton_verl);
}

// The baseline b_g a group's rows are centred on (x − b_g); verl's singleton convention is
// b = 0 (its μ = 0).
RLKERN_HOST_DEVICE double group_baseline(const GroupMoments& g, const GroupExtras* e,
                                         const AdvantageParams& p) {
  if (g.n < 2.0) return 0.0;  // only reached for singleton = "verl"
  if (p.estimator == kOpo) {
    // Length-weighted mean, as a correction of the plain mean so that equal scores give
    // exactly x − b = 0.
    return e->wsum > 0.0 ? g.mean + e->wdev / e->wsum : g.mean;
  }
  return g.mean;
}

// Every estimator except grpo_passk is affine in the row's value within a group:
//   A = (x − center) · scale               (xrpo then adds a per-row bonus where A > 0).
// Written as a difference first so that x == center gives exactly 0 (zero-variance groups),
// and so that a stored scale may be rounded (to float32) without a cancellation behind it.
struct RowAffine {
  double center, scale;
};

RLKERN_HOST_DEVICE RowAffine group_affine(const GroupMoments& g, const GroupExtras* e,
                                          const AdvantageParams& p) {
  RowAffine f{0.0, 0.0};  // A = 0: empty group, singleton under "zero", passk
  if (!group_active(g, p) || p.estimator == kGrpoPassk) return f;
  const bool singleton = g.n < 2.0;
  f.center = group_baseline(g, e, p);
  f.scale = 1.0;
  switch (p.estimator) {
    case kDrGrpo:
    case kOpo:
      break;
    case kRloo:  // s − mean of the others = (s − μ)·n/(n − 1); verl leaves singletons as s
      if (!singleton) f.scale = g.n / (g.n - 1.0);
      break;
    case kGpg:
      f.scale = p.gpg_alpha;
      break;
    case kReinforcePPBaseline:  // whiten the centred score c = x − b: (c − mean c)·rstd
      f.center += p.white_mean;
      f.scale = p.white_rstd;
      break;
    case kNgrpo: {  // append the virtual sample r_max (one Welford step), then normalise
      GroupMoments v = g;
      moments_push(v, p.r_max);
      f.center = v.mean;
      if (p.std_mode != kStdNone) f.scale = 1.0 / (moments_std(v, p.std_mode) + p.eps);
      break;
    }
    default: {  // kGrpo, kUnlikely, kXrpo
      if (p.std_mode != kStdNone) {
        const double sigma = p.batch_scope ? p.batch_std
                             : singleton   ? 1.0
                                           : moments_std(g, p.std_mode);
        f.scale = 1.0 / (sigma + p.eps);
      }
    }
  }
  return f;
}

// grpo_passk: the advantage of the group's top row (every other row gets 0).
RLKERN_HOST_DEVICE double passk_top_advantage(const GroupMoments& g, const GroupExtras* e,
                                              const AdvantageParams& p) {
  if (!group_active(g, p)) return 0.0;
  const double gap = e->top1 - e->top2;
  if (p.std_mode == kStdNone) return gap;
  return gap / (moments_std(g, p.std_mode) + p.eps);
}

// XRPO's novelty-aware sharpening of a positive advantage a: with η = exp(ŝ − mean_g ŝ),
// a + min(max(λ(1 − η), 0), κ|a|).
RLKERN_HOST_DEVICE double xrpo_sharpen(double a, double loglik, double loglik_mean,
                                       const AdvantageParams& p) {
  if (!(a > 0.0)) return a;
  const double eta = exp(loglik - loglik_mean);
  double bonus = p.lam * (1.0 - eta);
  bonus = bonus > 0.0 ? bonus : 0.0;
  const double cap = p.kappa * a;
  return a + (bonus < cap ? bonus : cap);
}

// Advantage of one valid row with value x (row index `row`, sequence log-likelihood `loglik`)
// in a group with moments g. Invalid rows (NaN / ±inf under nan_policy = "omit") get 0 and are
// not passed here. Kernels precompute group_affine once per group; this is the composition.
RLKERN_HOST_DEVICE double row_advantage(double x, long long row, double loglik,
                                        const GroupMoments& g, const GroupExtras* e,
                                        const AdvantageParams& p) {
  if (p.estimator == kGrpoPassk) return row == e->top_row ? passk_top_advantage(g, e, p) : 0.0;
  const RowAffine f = group_affine(g, e, p);
  const double a = (x - f.center) * f.scale;
  return p.estimator == kXrpo && group_active(g, p) ? xrpo_sharpen(a, loglik, e->aux_mean, p) : a;
}

// Whether x counts as a score: NaN and ±inf are invalid (nan_policy decides what happens).
RLKERN_HOST_DEVICE bool score_is_valid(double x) { return x - x == 0.0; }

}  // namespace rlkern
