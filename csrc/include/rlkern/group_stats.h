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
#include <stddef.h>

#include <initializer_list>

#include "rlkern/host_device.h"
#include "rlkern/layout.h"

namespace rlkern {

// ------------------------------------------------------------------------------------------
// Layout of the advantages family (rlkern/layout.h): every code and packed array the Python
// layer, the Triton launchers and the C++ kernels exchange, defined once here and exported
// through rlkern._C.LAYOUTS["advantages"] (python/rlkern/config/layout.py reads it).

// The options of python/rlkern/config/advantages.py's AdvantageConfig, one code table each.
#define RLKERN_ADV_ESTIMATORS(X)                                                 \
  X(kGrpo, "grpo") X(kDrGrpo, "dr_grpo") X(kRloo, "rloo")                         \
  X(kReinforcePPBaseline, "reinforce_pp_baseline") X(kOpo, "opo") X(kGpg, "gpg") \
  X(kGrpoPassk, "grpo_passk") X(kNgrpo, "ngrpo")                                  \
  X(kUnlikely, "unlikely") /* GRPO on the rank-shaped rewards r' (kernels pass r' as x) */ \
  X(kXrpo, "xrpo")
// Standard deviation conventions: √(M2 / (n − 1)) (torch.std, verl, TRL), √(M2 / n), or no
// division by σ (Dr. GRPO style; the reported σ is then the unbiased one).
#define RLKERN_ADV_STD_MODES(X) \
  X(kStdUnbiased, "unbiased") X(kStdBiased, "biased") X(kStdNone, "none")
#define RLKERN_ADV_STD_SCOPES(X) X(kScopeGroup, "group") X(kScopeBatch, "batch")
// Singleton groups: A = 0, or verl's μ = 0, σ = 1.
#define RLKERN_ADV_SINGLETONS(X) X(kSingletonZero, "zero") X(kSingletonVerl, "verl")
#define RLKERN_ADV_NAN_POLICIES(X) X(kNanRaise, "raise") X(kNanOmit, "omit")
// GiGPO's two levels: mean-centred, or also divided by σ.
#define RLKERN_ADV_GIGPO_MODES(X) X(kGigpoMeanNorm, "mean_norm") X(kGigpoStdNorm, "std_norm")

// `int[] flags` of the ops: one code per option, each named after its code table.
#define RLKERN_ADV_FLAGS(X)                                                    \
  X(kFlagEstimator, "estimator") X(kFlagStd, "std") X(kFlagStdScope, "std_scope") \
  X(kFlagSingleton, "singleton") X(kFlagNanPolicy, "nan_policy")
// `float[] hparams` of the ops (the config's floats), and the float64 `params` the GPU passes
// read by pointer: the hparams followed by the batch-level constants computed between the
// group pass and the row pass.
#define RLKERN_ADV_HPARAMS(X) \
  X(kParamEps, "eps") X(kParamRMax, "r_max") X(kParamLam, "lam") X(kParamKappa, "kappa")
#define RLKERN_ADV_PARAMS(X)                                                            \
  RLKERN_ADV_HPARAMS(X)                                                                 \
  X(kParamBatchStd, "batch_std") X(kParamGpgAlpha, "gpg_alpha")                         \
  X(kParamWhiteMean, "white_mean") X(kParamWhiteRstd, "white_rstd")
// Columns of a (K, kNumMoments) moments table (the fields of struct GroupMoments) and of a
// (K, kNumExtras) extras table (struct GroupExtras, the top row stored as a double).
#define RLKERN_ADV_MOMENTS(X) \
  X(kMomCount, "count") X(kMomMean, "mean") X(kMomM2, "m2") X(kMomMin, "min") X(kMomMax, "max")
#define RLKERN_ADV_EXTRAS(X)                                                     \
  X(kExtWsum, "wsum") X(kExtWdev, "wdev") X(kExtWdev2, "wdev2")                  \
  X(kExtLoglikMean, "loglik_mean") X(kExtTop1, "top1") X(kExtTop2, "top2") X(kExtTopRow, "top_row")

enum Estimator : int { RLKERN_ADV_ESTIMATORS(RLKERN_LAYOUT_ENUM) kNumEstimators };
enum StdMode : int { RLKERN_ADV_STD_MODES(RLKERN_LAYOUT_ENUM) kNumStdModes };
enum StdScope : int { RLKERN_ADV_STD_SCOPES(RLKERN_LAYOUT_ENUM) kNumStdScopes };
enum Singleton : int { RLKERN_ADV_SINGLETONS(RLKERN_LAYOUT_ENUM) kNumSingletons };
enum NanPolicy : int { RLKERN_ADV_NAN_POLICIES(RLKERN_LAYOUT_ENUM) kNumNanPolicies };
enum GigpoMode : int { RLKERN_ADV_GIGPO_MODES(RLKERN_LAYOUT_ENUM) kNumGigpoModes };
enum Flag : int { RLKERN_ADV_FLAGS(RLKERN_LAYOUT_ENUM) kNumFlags };
enum Param : int { RLKERN_ADV_PARAMS(RLKERN_LAYOUT_ENUM) kNumParams };
enum MomentColumn : int { RLKERN_ADV_MOMENTS(RLKERN_LAYOUT_ENUM) kNumMoments };
enum ExtraColumn : int { RLKERN_ADV_EXTRAS(RLKERN_LAYOUT_ENUM) kNumExtras };
// The hparams are the prefix of the params before the batch-level constants.
inline constexpr int kNumHParams = kParamBatchStd;

// Number of codes of flag `f` (0 for an index outside enum Flag).
RLKERN_HOST_DEVICE constexpr int flag_code_count(int f) {
  switch (f) {
    case kFlagEstimator: return kNumEstimators;
    case kFlagStd: return kNumStdModes;
    case kFlagStdScope: return kNumStdScopes;
    case kFlagSingleton: return kNumSingletons;
    case kFlagNanPolicy: return kNumNanPolicies;
    default: return 0;
  }
}

namespace advantages {

RLKERN_LAYOUT_NAMES(kEstimatorNames, RLKERN_ADV_ESTIMATORS);
RLKERN_LAYOUT_NAMES(kStdNames, RLKERN_ADV_STD_MODES);
RLKERN_LAYOUT_NAMES(kStdScopeNames, RLKERN_ADV_STD_SCOPES);
RLKERN_LAYOUT_NAMES(kSingletonNames, RLKERN_ADV_SINGLETONS);
RLKERN_LAYOUT_NAMES(kNanPolicyNames, RLKERN_ADV_NAN_POLICIES);
RLKERN_LAYOUT_NAMES(kGigpoModeNames, RLKERN_ADV_GIGPO_MODES);
RLKERN_LAYOUT_NAMES(kFlagNames, RLKERN_ADV_FLAGS);
RLKERN_LAYOUT_NAMES(kHParamNames, RLKERN_ADV_HPARAMS);
RLKERN_LAYOUT_NAMES(kParamNames, RLKERN_ADV_PARAMS);
RLKERN_LAYOUT_NAMES(kMomentNames, RLKERN_ADV_MOMENTS);
RLKERN_LAYOUT_NAMES(kExtraNames, RLKERN_ADV_EXTRAS);

// The code table of each flag, in enum Flag order (checked below: a flag and its table share
// their name, and flag_code_count its size).
inline constexpr LayoutTable kFlagTables[] = {
    layout_table("estimator", kEstimatorNames), layout_table("std", kStdNames),
    layout_table("std_scope", kStdScopeNames), layout_table("singleton", kSingletonNames),
    layout_table("nan_policy", kNanPolicyNames)};

constexpr bool same_text(const char* a, const char* b) {
  return *a == *b && (*a == '\0' || same_text(a + 1, b + 1));
}

constexpr bool flag_tables_in_order() {
  for (int f = 0; f < kNumFlags; ++f)
    if (!same_text(kFlagTables[f].table, kFlagNames[f]) ||
        kFlagTables[f].size != flag_code_count(f))
      return false;
  return sizeof(kFlagTables) / sizeof(kFlagTables[0]) == kNumFlags;
}
static_assert(flag_tables_in_order(), "kFlagTables must list the code table of each flag, in "
                                      "enum Flag order");

// Every table of the family, exported by csrc/module.cpp.
inline constexpr std::initializer_list<LayoutTable> kLayout = {
    kFlagTables[0], kFlagTables[1], kFlagTables[2], kFlagTables[3], kFlagTables[4],
    layout_table("gigpo_mode", kGigpoModeNames), layout_table("flags", kFlagNames),
    layout_table("hparams", kHParamNames), layout_table("params", kParamNames),
    layout_table("moments", kMomentNames), layout_table("extras", kExtraNames)};

}  // namespace advantages

// The first flag whose code is outside its table, or -1 when every code is valid.
template <typename I>
RLKERN_HOST_DEVICE int first_invalid_flag(const I* flags) {
  for (int f = 0; f < kNumFlags; ++f)
    if (flags[f] < 0 || flags[f] >= flag_code_count(f)) return f;
  return -1;
}

// ------------------------------------------------------------------------------------------
// Group statistics

struct GroupMoments {
  double n;     // number of valid (non-omitted) rows
  double mean;  // NaN when n == 0
  double m2;    // Σ (x − mean)²
  double min;
  double max;
};

// A (K, kNumMoments) float64 table is an array of GroupMoments.
static_assert(sizeof(GroupMoments) == kNumMoments * sizeof(double) &&
                  offsetof(GroupMoments, n) == kMomCount * sizeof(double) &&
                  offsetof(GroupMoments, mean) == kMomMean * sizeof(double) &&
                  offsetof(GroupMoments, m2) == kMomM2 * sizeof(double) &&
                  offsetof(GroupMoments, min) == kMomMin * sizeof(double) &&
                  offsetof(GroupMoments, max) == kMomMax * sizeof(double),
              "struct GroupMoments must follow RLKERN_ADV_MOMENTS");

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

// reinforce_pp_baseline's whitening: (c − mean c) · rsqrt(var c + kWhitenEps), verl's
// masked_whiten (python/rlkern/config/advantages.py: WHITEN_EPS).
inline constexpr double kWhitenEps = 1e-8;

// The options of one call, decoded from `flags` and `params` (advantage_params), and the
// batch-level constants computed between the group pass and the row pass.
struct AdvantageParams {
  int estimator;        // enum Estimator
  int std_mode;         // enum StdMode
  bool batch_scope;     // σ_batch instead of σ_g (grpo-family only)
  bool singleton_verl;  // singleton groups: verl's μ = 0, σ = 1 instead of A = 0
  bool nan_omit;        // non-finite scores are left out (else they are an error)
  double eps;
  double r_max;       // ngrpo virtual sample
  double lam;         // unlikely / xrpo λ
  double kappa;       // xrpo κ
  double batch_std;   // σ_batch (std_scope = batch)
  double gpg_alpha;   // N / max(#{s ≠ 0}, 1)
  double white_mean;  // reinforce_pp_baseline: weighted mean of the centred scores
  double white_rstd;  //                        rsqrt(var + 1e-8)
};

// AdvantageParams from `flags` (enum Flag order, codes already checked: first_invalid_flag)
// and the first `n_params` of `params` (enum Param order: kNumHParams for the ops' hparams,
// kNumParams for the GPU passes' params); the constants not given are 0 (each is read only
// by the estimator or option that computes it).
template <typename I>
RLKERN_HOST_DEVICE AdvantageParams advantage_params(const I* flags, const double* params,
                                                    int n_params) {
  AdvantageParams p{};
  p.estimator = static_cast<int>(flags[kFlagEstimator]);
  p.std_mode = static_cast<int>(flags[kFlagStd]);
  p.batch_scope = flags[kFlagStdScope] == kScopeBatch;
  p.singleton_verl = flags[kFlagSingleton] == kSingletonVerl;
  p.nan_omit = flags[kFlagNanPolicy] == kNanOmit;
  double v[kNumParams] = {};
  for (int i = 0; i < n_params && i < kNumParams; ++i) v[i] = params[i];
  p.eps = v[kParamEps];
  p.r_max = v[kParamRMax];
  p.lam = v[kParamLam];
  p.kappa = v[kParamKappa];
  p.batch_std = v[kParamBatchStd];
  p.gpg_alpha = v[kParamGpgAlpha];
  p.white_mean = v[kParamWhiteMean];
  p.white_rstd = v[kParamWhiteRstd];
  return p;
}

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

// 1 / (σ + eps), the scale of the estimators that divide by a spread, or 0 where σ + eps = 0.
// σ = 0 means every valid value of the group (of the batch, for σ_batch) equals its mean
// exactly (see above), so x − center = 0 for each row and A = 0: with eps = 0 a plain division
// would give 0·(1/0) = NaN instead.
RLKERN_HOST_DEVICE double inverse_spread(double sigma, double eps) {
  const double d = sigma + eps;
  return d != 0.0 ? 1.0 / d : 0.0;
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
      if (p.std_mode != kStdNone) f.scale = inverse_spread(moments_std(v, p.std_mode), p.eps);
      break;
    }
    default: {  // kGrpo, kUnlikely, kXrpo
      if (p.std_mode != kStdNone) {
        const double sigma = p.batch_scope ? p.batch_std
                             : singleton   ? 1.0
                                           : moments_std(g, p.std_mode);
        f.scale = inverse_spread(sigma, p.eps);
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
  const double spread = moments_std(g, p.std_mode) + p.eps;
  return spread != 0.0 ? gap / spread : 0.0;  // σ = 0: top1 == top2, A = 0 (inverse_spread)
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

// ------------------------------------------------------------------------------------------
// Discounted returns (ALGORITHMS.md §2.1): G[t] = r[t] + a[t]·G[t + 1], a[t] = γ, or 0 where
// reset[t]. The CPU kernel scans a row; the GPU kernels scan the affine maps G ↦ r + a·G.

// a·g where a zero factor gives exactly 0 whatever the other one is: a = 0 (a reset, or γ = 0)
// drops the carry, so no return flows across it even when the carry is ±inf or NaN (IEEE's
// 0·inf = NaN would leak into the segment before); the scans compose factors and carries
// with it too, so that they give what the sequential recurrence gives.
RLKERN_HOST_DEVICE double discount_product(double a, double g) {
  return (a == 0.0 || g == 0.0) ? 0.0 : a * g;
}

// ------------------------------------------------------------------------------------------
// Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) with verl's carry
// over masked tokens (observation spans of multi-turn rollouts, padding): one step of the
// reverse scan at position t, given the carries (next_value, last_gae) of the later positions:
//   δ = r_t + γ·next_value − V_t,   g = δ + γλ·last_gae,
//   valid: next_value ← V_t, last_gae ← g;   masked: both carried over unchanged.
// The advantage of t is last_gae after the step (a masked t carries the later value); the
// return is advantage + V_t. With V = 0 and λ = 1 it is REINFORCE++'s masked discounted return;
// with γ = λ = 1 too, ReMax's reverse cumulative sum of the valid rewards. A zero factor
// drops its carry (discount_product), as in the discounted returns.
struct GaeCarry {
  double next_value;
  double last_gae;
};

// Returns the advantage of position t and advances the carry.
RLKERN_HOST_DEVICE double gae_step(double r, double v, bool valid, double gamma, double gamma_lam,
                                   GaeCarry* c) {
  if (valid) {
    c->last_gae = (r + discount_product(gamma, c->next_value) - v) +
                  discount_product(gamma_lam, c->last_gae);
    c->next_value = v;
  }
  return c->last_gae;
}

}  // namespace rlkern
