// Per-token formulas of the policy-loss family (ALGORITHMS.md §3), shared by the CPU and CUDA
// kernels; kernels/policy_loss.py mirrors them in Triton and python/rlkern/reference states
// them in torch. Torch-free, host + device.
//
// Layout of the computation (the kernels, one row = one sequence of T tokens):
//
//   forward   per row: a few per-sequence sums (length, Σ m·Δ, rollout log-ratio sum, ...)
//             then one pass over the tokens giving the row's partial sums of the loss terms
//             and of the metrics: `row_stats[RowStat][row]` (float64).
//   backward  per row: the gradient of Σ_row g[row]·row_stats[row][kPgSum..kLpSum] wrt the
//             log-probabilities (and the entropy), i.e. every aggregation mode reduces to
//             four per-row coefficients that the Python layer obtains by autograd through
//             its (tiny, O(B)) aggregation code.
//
// Values at masked tokens are never read into a result. Per token, with Δ = logp − old:
//   token ratio      r = clamp(Δ, ±log_ratio_clamp),                ρ = exp(r)
//   sequence ratio   r = min(Σ_t m·Δ / max(len, 1), seq_log_ratio_max) for every token of
//                    the row; its gradient is either the GSPO-token straight-through one
//                    (kRatioSeqDetached: ∂r/∂logp_t = 1, Zheng et al. 2025, "Group Sequence
//                    Policy Optimization", eq. 11) or the exact one of the mean
//                    (kRatioSeqFull: ∂r/∂logp_t = m_t / len, TRL's importance_sampling_level
//                    = "sequence").
// Gradients follow torch's conventions so that parity with the trainers is exact: clamp
// passes the gradient on the closed interval, max/min split it evenly on ties.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <initializer_list>
#include <type_traits>

#include "rlkern/host_device.h"
#include "rlkern/layout.h"

namespace rlkern {
namespace policy_loss {

// --------------------------------------------------------------------------------------------
// Layout of the ops' arguments: every code, field, slot and row below is defined once, in an
// X-macro list (rlkern/layout.h). The enums, the structs, the names exported through rlkern._C
// (kLayout, read by python/rlkern/config/layout.py and handed to the Triton launchers) and the
// glue's loops over the optional inputs all expand these lists: adding an entry is one line.

// Loss kinds (flags[loss_kind]).
#define RLKERN_PL_LOSS_KINDS(X)                                                                  \
  X(kPpo, "ppo")     /* clipped surrogate (+ dual clip c, two-sided δ); also GSPO (ratio_mode) */ \
  X(kCispo, "cispo") /* −sg[clip(ρ)]·A·logp (MiniMax-M1, 2025) */                                 \
  X(kSapo, "sapo")   /* −σ(τ(ρ − 1))·(4/τ)·A (soft adaptive gate, Qwen 2025) */                   \
  X(kReinforce, "reinforce") /* −A·logp (GPG / bypass) */                                         \
  X(kGmpo, "gmpo")   /* per sequence: −Ā·exp(Σ m Δc / len) (Zhao et al. 2025, GMPO) */            \
  X(kGvpo, "gvpo")   /* group-centred MSE on β·Σ m (logp − old) (Zhang et al. 2025, GVPO) */ \
  X(kVespo, "vespo") /* −sg[φ(w_i)]·A·logp, φ a gamma weight of the sequence ratio (VESPO) */ \
  X(kDro, "dro")     /* −(A·logp − ½β·Δ²) (verl's DRO: quadratic log-ratio penalty) */           \
  X(kDppoTv, "dppo_tv") /* −A·sg[min(ρ, c)]·logp·1[p − p_old in the TV region] (DPPO) */         \
  X(kDppoKl, "dppo_kl") /* ... 1[binary KL(p_old ‖ p) in the region] (DPPO-Binary-KL) */  \
  X(kClipCov, "clip_cov") /* PPO's clipped term × (1 − s), s = cov_select (Clip-Cov) */          \
  X(kKlCov, "kl_cov")     /* −A·ρ + s·k·|Δ|, s = cov_select (KL-Cov) */

// Importance ratios (flags[ratio_mode]): per token, or the sequence ratio with GSPO-token's
// straight-through gradient / the exact gradient of the mean (see the top of this file).
#define RLKERN_PL_RATIO_MODES(X) \
  X(kRatioToken, "token") X(kRatioSeqDetached, "seq_detached") X(kRatioSeqFull, "seq_full")

// KL estimators (flags[kl_kind]; kKlNone: no reference log-probabilities).
#define RLKERN_PL_KL_KINDS(X) \
  X(kKlNone, "none") X(kKlK1, "k1") X(kKlK2, "k2") X(kKlK3, "k3") X(kKlAbs, "abs")

// Aggregation modes of a loss term: verl's loss_agg_mode names with '_' for '-' (sum and
// token-sum are one weighting). Read by the CPU's fused linear aggregate
// (cpu/policy_loss_linear.cpp); the two-pass path aggregates in Python
// (ops/policy_loss/aggregate.py) by the same names.
#define RLKERN_PL_AGG_MODES(X)                                                      \
  X(kAggTokenMean, "token_mean") X(kAggSeqMeanTokenMean, "seq_mean_token_mean")     \
  X(kAggSeqMeanTokenSum, "seq_mean_token_sum")                                      \
  X(kAggSeqMeanTokenSumNorm, "seq_mean_token_sum_norm") X(kAggSum, "sum")           \
  X(kAggTokenSum, "token_sum")

// Rollout (behaviour-policy) correction (flags[rollout_level]).
#define RLKERN_PL_ROLLOUT_LEVELS(X) \
  X(kRolloutNone, "none") X(kRolloutToken, "token") X(kRolloutSeq, "sequence")

// Structural choices: the `int[] flags` of the ops (struct Flags), one int32 per field.
#define RLKERN_PL_FLAGS(X)                                                                   \
  X(kFlagLossKind, loss_kind)                   /* LossKind */                              \
  X(kFlagRatioMode, ratio_mode)                 /* RatioMode */                             \
  X(kFlagKlKind, kl_kind)                       /* KlKind */                                \
  X(kFlagKlStraightThrough, kl_straight_through) /* 1: value of kl_kind, gradient of k2 */  \
  X(kFlagKlBiasCorrection, kl_bias_correction)  /* 1: KL term × ρ (TRL bias correction) */  \
  X(kFlagRolloutLevel, rollout_level)           /* RolloutLevel */                          \
  X(kFlagRolloutMask, rollout_mask)             /* 1: weights outside [min, max] → 0 */

// Float hyperparameters: the `float[] hparams` of the ops (struct HParams). ±inf disables a
// clamp or bound. Runtime values everywhere: no kernel is specialised on them.
#define RLKERN_PL_HPARAMS(X)                                                                  \
  X(kHpClipLo, clip_lo)          /* ratio bounds (ppo/gspo/cispo); log-ratio bounds (gmpo) */ \
  X(kHpClipHi, clip_hi)                                                                       \
  X(kHpDualClipC, dual_clip_c)   /* dual clip for A < 0 (inf: off) */                         \
  X(kHpDelta, delta)             /* two-sided clip of the unclipped term (inf: off) */        \
  X(kHpLogRatioClamp, log_ratio_clamp)     /* |Δ| clamp before exp, token ratios */           \
  X(kHpSeqLogRatioMax, seq_log_ratio_max)  /* upper clamp of the sequence log-ratio */        \
  X(kHpSapoTauPos, sapo_tau_pos)                                                              \
  X(kHpSapoTauNeg, sapo_tau_neg)                                                              \
  X(kHpKlLogClamp, kl_log_clamp)           /* k3: |ref − logp| clamp before exp */            \
  X(kHpKlValueClamp, kl_value_clamp)       /* k3: |k3| clamp */                               \
  X(kHpRolloutLogClamp, rollout_log_clamp) /* |old − rollout| (or its row sum) clamp */       \
  X(kHpRolloutMin, rollout_min)            /* rollout weight bounds (−inf / inf: off) */      \
  X(kHpRolloutMax, rollout_max)                                                               \
  X(kHpVespoKPos, vespo_k_pos)             /* vespo's gamma shape k and rate λ for A ≥ 0 */    \
  X(kHpVespoLambdaPos, vespo_lambda_pos)                                                      \
  X(kHpVespoKNeg, vespo_k_neg)             /* ... and for A < 0 */                            \
  X(kHpVespoLambdaNeg, vespo_lambda_neg)                                                     \
  X(kHpDroBeta, dro_beta)                  /* dro's β of ½β·Δ² */                            \
  X(kHpCovKlCoef, cov_kl_coef)             /* kl_cov's k of s·k·|Δ| */

// The optional inputs: the `Tensor?[] inputs` of the ops, by slot. Shape kRows: (B, T) like
// logprobs (unit stride along T); kOne: a single value.
#define RLKERN_PL_INPUTS(X)                                                                    \
  X(kInRef, "ref_logprobs", kRows)         /* reference policy (KL term) */                   \
  X(kInRollout, "rollout_logprobs", kRows) /* rollout engine (rollout correction) */          \
  X(kInEntropy, "entropy", kRows)          /* per-token entropy (bonus, entropy mask) */      \
  X(kInTokenWeights, "token_weights", kRows) /* multipliers of the policy term */             \
  X(kInEntropyThreshold, "entropy_threshold", kOne) /* the entropy mask's threshold */          \
  X(kInCovSelect, "cov_select", kRows) /* clip_cov / kl_cov: 1 at the selected tokens, else 0 */

// Per-row partial sums written by the forward (`row_stats`, (kNumRowStats, B) float64,
// statistic-major so that each statistic is a contiguous (B,) vector). Sums are over the
// row's valid tokens (m = 1).
#define RLKERN_PL_ROW_STATS(X)                                                                  \
  X(kLen, "len")                     /* Σ m */                                                  \
  X(kPgSum, "pg_sum")                /* Σ m·mult·ℓ (gmpo: the sequence loss ℓ_i·w_i; gvpo: 0) */ \
  X(kKlSum, "kl_sum")                /* Σ m·kl (× ρ with bias correction) */                     \
  X(kEntSum, "ent_sum")              /* Σ m·em·H (em: entropy-quantile mask, 1 without) */      \
  X(kLpSum, "lp_sum")                /* Σ m·(logp − old), unclamped */                          \
  X(kEntCount, "ent_count")          /* Σ m·em */                                               \
  X(kSeqLogRatio, "seq_log_ratio")   /* the row's sequence log-ratio r (seq modes); gmpo:      \
                                        Σ m Δc / len; vespo: its log-weight log w */            \
  X(kSeqWeight, "seq_weight")        /* sequence rollout weight (gmpo: geometric mean of the   \
                                        token weights) */                                       \
  X(kAdvSum, "adv_sum")              /* Σ m·A */                                                \
  X(kClip, "clip")                   /* Σ m·[clipped branch chosen] */                          \
  X(kClipLow, "clip_low")            /* Σ m·[ρ < lo and A < 0] (ppo: min(ρ, δ); gmpo: clipped   \
                                        and A < 0) */                                           \
  X(kClipHigh, "clip_high")          /* Σ m·[ρ > hi and A > 0] (likewise) */                    \
  X(kDualClip, "dual_clip")          /* Σ m·[dual clip active] */                               \
  X(kNegLogRatio, "neg_log_ratio")   /* Σ m·(−clamp(Δ)) (approx_kl) */                          \
  X(kRatioSum, "ratio_sum")          /* Σ m·ρ */                                                \
  X(kRatioMin, "ratio_min")          /* min over valid tokens of ρ (+inf if none) */            \
  X(kRatioMax, "ratio_max")          /* max (−inf if none) */                                   \
  X(kEntropyValid, "entropy_valid")  /* Σ m·H */                                                \
  X(kRolloutWSum, "rollout_w_sum")   /* Σ m·w (rollout weight) */                               \
  X(kNonFinite, "non_finite")        /* 1 if the row's input sums are not finite (a NaN / ±inf  \
                                        input at a valid token; NaN policy), else 0 */          \
  X(kPhiSum, "phi_sum")              /* vespo: Σ m·φ (the gamma weight of each token's sign    \
                                        of A); 0 for the other kinds */

// The differentiable statistics, in the order of the backward's `grad_rows` ((kNumRowGrads, B)
// float64: one coefficient per row and statistic). Named like their row_stats rows; they are
// rows kRowGradFirst .. kRowGradFirst + kNumRowGrads − 1 there (checked below), so the ops
// return them as one slice.
#define RLKERN_PL_ROW_GRADS(X) \
  X(kGradPg, "pg_sum") X(kGradKl, "kl_sum") X(kGradEnt, "ent_sum") X(kGradLp, "lp_sum")

#define RLKERN_PL_ID3(id, text, shape) id,
#define RLKERN_PL_TEXT3(id, text, shape) text,
#define RLKERN_PL_FIELD_ID(id, field) id,
#define RLKERN_PL_FIELD_TEXT(id, field) #field,

enum LossKind : int { RLKERN_PL_LOSS_KINDS(RLKERN_LAYOUT_ENUM) kNumLossKinds };
enum RatioMode : int { RLKERN_PL_RATIO_MODES(RLKERN_LAYOUT_ENUM) kNumRatioModes };
enum KlKind : int { RLKERN_PL_KL_KINDS(RLKERN_LAYOUT_ENUM) kNumKlKinds };
enum AggMode : int { RLKERN_PL_AGG_MODES(RLKERN_LAYOUT_ENUM) kNumAggModes };
enum RolloutLevel : int { RLKERN_PL_ROLLOUT_LEVELS(RLKERN_LAYOUT_ENUM) kNumRolloutLevels };
enum FlagField : int { RLKERN_PL_FLAGS(RLKERN_PL_FIELD_ID) kNumFlags };
enum HParamField : int { RLKERN_PL_HPARAMS(RLKERN_PL_FIELD_ID) kNumHParams };
enum InputShape : int { kRows, kOne };
enum Input : int { RLKERN_PL_INPUTS(RLKERN_PL_ID3) kNumInputs };
enum RowStat : int { RLKERN_PL_ROW_STATS(RLKERN_LAYOUT_ENUM) kNumRowStats };
enum RowGrad : int { RLKERN_PL_ROW_GRADS(RLKERN_LAYOUT_ENUM) kNumRowGrads };

RLKERN_LAYOUT_NAMES(kLossKindNames, RLKERN_PL_LOSS_KINDS);
RLKERN_LAYOUT_NAMES(kRatioModeNames, RLKERN_PL_RATIO_MODES);
RLKERN_LAYOUT_NAMES(kKlKindNames, RLKERN_PL_KL_KINDS);
RLKERN_LAYOUT_NAMES(kAggModeNames, RLKERN_PL_AGG_MODES);
RLKERN_LAYOUT_NAMES(kRolloutLevelNames, RLKERN_PL_ROLLOUT_LEVELS);
RLKERN_LAYOUT_NAMES(kRowStatNames, RLKERN_PL_ROW_STATS);
RLKERN_LAYOUT_NAMES(kRowGradNames, RLKERN_PL_ROW_GRADS);
inline constexpr const char* kFlagNames[] = {RLKERN_PL_FLAGS(RLKERN_PL_FIELD_TEXT)};
inline constexpr const char* kHParamNames[] = {RLKERN_PL_HPARAMS(RLKERN_PL_FIELD_TEXT)};
inline constexpr const char* kInputNames[] = {RLKERN_PL_INPUTS(RLKERN_PL_TEXT3)};
// The shape of slot k's input (a function, not an array: device code reads it too).
RLKERN_HOST_DEVICE constexpr InputShape input_shape(int k) {
#define RLKERN_PL_SHAPE_OF(id, text, shape) \
  if (k == id) return shape;
  RLKERN_PL_INPUTS(RLKERN_PL_SHAPE_OF)
#undef RLKERN_PL_SHAPE_OF
  return kRows;
}

// The row_stats row of each RowGrad: one slice of row_stats, in RowGrad order.
inline constexpr RowStat kRowGradFirst = kPgSum;
static_assert(kPgSum == kRowGradFirst + kGradPg && kKlSum == kRowGradFirst + kGradKl &&
                  kEntSum == kRowGradFirst + kGradEnt && kLpSum == kRowGradFirst + kGradLp,
              "the differentiable row statistics must be consecutive rows, in RowGrad order");

// Exported through rlkern._C (csrc/module.cpp): {table name: entry names in code order}.
inline constexpr std::initializer_list<LayoutTable> kLayout = {
    layout_table("flags", kFlagNames),
    layout_table("hparams", kHParamNames),
    layout_table("inputs", kInputNames),
    layout_table("row_stats", kRowStatNames),
    layout_table("row_grads", kRowGradNames),
    layout_table("loss_kinds", kLossKindNames),
    layout_table("ratio_modes", kRatioModeNames),
    layout_table("kl_kinds", kKlKindNames),
    layout_table("agg_modes", kAggModeNames),
    layout_table("rollout_levels", kRolloutLevelNames),
};

#define RLKERN_PL_INT_FIELD(id, field) int32_t field;
#define RLKERN_PL_DOUBLE_FIELD(id, field) double field;
struct Flags {
  RLKERN_PL_FLAGS(RLKERN_PL_INT_FIELD)
};
struct HParams {
  RLKERN_PL_HPARAMS(RLKERN_PL_DOUBLE_FIELD)
};
#undef RLKERN_PL_INT_FIELD
#undef RLKERN_PL_DOUBLE_FIELD
// The launchers take `flags` / `hparams` as int32 / double arrays in field order: the same bytes.
static_assert(sizeof(Flags) == kNumFlags * sizeof(int32_t), "Flags must be int32[kNumFlags]");
static_assert(sizeof(HParams) == kNumHParams * sizeof(double), "HParams must be double[...]");

// Flags or HParams (S) from values in field order (any arithmetic type V).
template <typename S, typename V>
RLKERN_HOST_DEVICE S from_fields(const V* v) {
#define RLKERN_PL_SET_FIELD(id, field) s.field = static_cast<decltype(s.field)>(v[id]);
  S s;
  if constexpr (std::is_same_v<S, Flags>) {
    RLKERN_PL_FLAGS(RLKERN_PL_SET_FIELD)
  } else {
    RLKERN_PL_HPARAMS(RLKERN_PL_SET_FIELD)
  }
#undef RLKERN_PL_SET_FIELD
  return s;
}

// A (B, T) array of the compute dtype: unit stride along T, `stride` elements between rows
// (`p == nullptr`: absent). For a kOne input, p points at its one value.
struct RowArray {
  const void* p;
  int64_t stride;
};

// The tensors of one forward / backward call, torch-free (the CPU kernels' and the CUDA
// launchers' common argument). Float inputs have the compute dtype (float32, or float64 when
// f64; the CUDA kernels take float32 only).
struct Inputs {
  int64_t B, T;
  int32_t f64;            // 1: float64 inputs and gradients
  int32_t adv_per_token;  // 1: adv is (B, T); 0: (B,) (adv.stride = 1: row b's value at p + b)
  RowArray logp, old, adv;
  RowArray mask;          // bool bytes
  RowArray opt[kNumInputs];  // the optional inputs, by Input slot
};

// One forward / backward call of the CPU or CUDA kernels: inputs, codes, outputs.
struct Args {
  Inputs in;
  Flags flags;
  HParams hp;
  double* row_stats;        // (kNumRowStats, B) contiguous: forward output, backward input
  const double* grad_rows;  // backward (and CPU's fused forward, optional): (kNumRowGrads, B)
  void* grad_logp;          // backward: (B, T) contiguous, compute dtype
  void* grad_entropy;       // backward: (B, T) contiguous, nullable
  // CPU's fused path (policy_loss_fused_ok): (B, T) contiguous, compute dtype; the forward
  // writes ∂pg_sum/∂logp per token to token_grad (and ∂kl_sum/∂logp to token_grad_kl, with a
  // KL term), the backward scales them in place into the gradient (in token_grad); with
  // grad_rows set, the forward writes that gradient itself (token_grad_kl nullptr). nullptr
  // otherwise.
  void* token_grad;
  void* token_grad_kl;
};

// One call of the elementwise KL estimator (kl_term) over n contiguous values of the compute
// dtype: the value, or grad · ∂value/∂logp when `grad` is given.
struct KlArgs {
  int64_t n;
  int32_t f64;
  const void* logp;
  const void* ref;
  const void* grad;  // nullable
  int32_t kind;      // KlKind (not kKlNone)
  int32_t straight_through;
  double log_clamp, value_clamp;
  void* out;
};

// What is wrong with a call's codes or inputs: nullptr when nothing, else the message (the
// glue raises it; the CUDA launchers return `missing` ? NULL_POINTER : INVALID_ARGUMENT).
struct Problem {
  const char* what;
  bool missing;  // a required input is absent
};

inline Problem check_call(const Flags& f, const Inputs& in) {
  if (f.loss_kind < 0 || f.loss_kind >= kNumLossKinds) return {"flags: unknown loss kind", false};
  if (f.ratio_mode < 0 || f.ratio_mode >= kNumRatioModes)
    return {"flags: unknown ratio mode", false};
  if (f.kl_kind < 0 || f.kl_kind >= kNumKlKinds) return {"flags: unknown KL kind", false};
  if (f.rollout_level < 0 || f.rollout_level >= kNumRolloutLevels)
    return {"flags: unknown rollout level", false};
  if (f.kl_kind != kKlNone && !in.opt[kInRef].p)
    return {"ref_logprobs: required for the KL term", true};
  if (f.rollout_level != kRolloutNone && !in.opt[kInRollout].p)
    return {"rollout_logprobs: required for the rollout correction", true};
  if (in.opt[kInEntropyThreshold].p && !in.opt[kInEntropy].p)
    return {"entropy: required with entropy_threshold", false};
  if ((f.loss_kind == kClipCov || f.loss_kind == kKlCov) && !in.opt[kInCovSelect].p)
    return {"cov_select: required for clip_cov / kl_cov (the selected tokens)", true};
  if (f.loss_kind == kVespo && (f.ratio_mode != kRatioToken || f.rollout_level == kRolloutSeq))
    return {"flags: vespo forms its own sequence weight: token ratio mode and token-level "
            "rollout weights only", false};
  return {nullptr, false};
}

// Whether CPU's fused path (Args::token_grad) applies: every token's gradient is then a row
// coefficient times a factor the forward forms (token ratio mode; not gmpo, whose factor needs
// its row's loss, nor vespo, whose needs its row's φ).
inline bool fused_ok(const Flags& f) {
  return f.ratio_mode == kRatioToken && f.loss_kind != kGmpo && f.loss_kind != kVespo;
}

// --------------------------------------------------------------------------------------------
// Helpers. The per-token functions below are templates over a value type T: float or double
// (one token), or, on the CPU, a SIMD vector of floats (csrc/cpu/policy_loss_simd.h provides
// its arithmetic, comparisons returning lane masks, `sel` and `expv`, found by ADL). They are
// therefore written without `?:` on T-valued conditions: `sel(c, a, b)` selects per lane.
//
// exp(): accurate in double; in float, expf on the GPU and, on the host, a branch-free
// polynomial (exp_host_f32; the SIMD type has the same polynomial lane-wise).

RLKERN_HOST_DEVICE float sel(bool c, float a, float b) { return c ? a : b; }
RLKERN_HOST_DEVICE double sel(bool c, double a, double b) { return c ? a : b; }

// sel(c, x, 0) and sel(c, 0, x). The AVX2 lane policy (csrc/cpu/policy_loss_simd.h)
// overloads them as one AND / AND NOT of its all-ones-or-zeros lane mask, where GCC compiles a
// blend against a +0 into a sign test and an AND: two instructions, often in a token loop.
template <typename M, typename T>
RLKERN_HOST_DEVICE T keep(M c, T x) {
  return sel(c, x, T(0));
}
template <typename M, typename T>
RLKERN_HOST_DEVICE T drop(M c, T x) {
  return sel(c, T(0), x);
}

template <typename T>
RLKERN_HOST_DEVICE T clampv(T x, T lo, T hi) {
  return sel(x < lo, lo, sel(x > hi, hi, x));  // NaN stays NaN, like torch.clamp
}

template <typename T>
RLKERN_HOST_DEVICE auto in_closed(T x, T lo, T hi) {
  return (x >= lo) && (x <= hi);  // where torch.clamp passes the gradient
}

#if !defined(__CUDA_ARCH__)
// exp(x) in float: x = n·ln2 + r (Cody–Waite, |r| ≤ ln2/2), e^r by a degree-7 Taylor
// polynomial (truncation (ln2/2)^8/8! ≈ 5e-9), 2^n as two exponent-field factors so that
// n down to −150 underflows gracefully. ±inf and NaN handled.
// The polynomial is 1 + r·(1 + r·q) with q = 1/2! + r/3! + … + r^5/7! formed by Estrin's
// scheme (r², r⁴ and three pairs: 12 cycles of dependent FMA latency on a CPU where Horner's
// rule over the same terms takes 20; the policy loss's token loops wait on this chain). The
// outer two steps stay Horner's, so the result keeps Horner's accuracy: within 0.95 ulp of
// e^x on every third float of |x| ≤ 87 (0.94 with Horner's rule throughout, which Estrin's
// scheme over all eight terms would have made 1.77).
// Its constants, shared with the SIMD versions (csrc/cpu/policy_loss_simd.h): the range ends,
// log2(e), ln 2 as hi + lo, the Taylor coefficients 1/7!, 1/6!, …, 1/1!, 1/0!.
namespace exp_f32 {
constexpr float kMax = 88.72283935546875f, kMin = -103.97208404541015625f;
constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5·2^23
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187045e-06f;
constexpr float kTaylor[8] = {1.98412698e-4f, 1.38888889e-3f, 8.33333333e-3f,
                              4.16666667e-2f, 1.66666667e-1f, 0.5f, 1.0f, 1.0f};
}  // namespace exp_f32

// fma for exp_taylor's value types: float here, the CPU's SIMD vectors (policy_loss_simd.h)
// overload it.
inline float fmav(float a, float b, float c) { return fmaf(a, b, c); }

// e^r on |r| ≤ ln2/2, as described above: the one formula of the scalar exp and the CPU's
// vector ones (the same operations lane-wise, so the same bits).
template <typename T>
T exp_taylor(T r) {
  using namespace exp_f32;
  const T r2 = r * r, r4 = r2 * r2;
  const auto c = [](int i) { return T(kTaylor[i]); };
  const T q = fmav(fmav(c(0), r, c(1)), r4, fmav(fmav(c(2), r, c(3)), r2, fmav(c(4), r, c(5))));
  return fmav(fmav(q, r, c(6)), r, c(7));
}

RLKERN_HOST_DEVICE float exp_host_f32(float x) {
  using namespace exp_f32;
  float xc = x > kMax ? kMax : x;
  xc = xc < kMin ? kMin : xc;
  const float n = (xc * kLog2e + kRound) - kRound;  // round to nearest
  float r = fmaf(-n, kLn2Hi, xc);
  r = fmaf(-n, kLn2Lo, r);
  const float p = exp_taylor(r);
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1, n2 = ni - n1;
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23;
  const uint32_t b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, 4);
  memcpy(&s2, &b2, 4);
  float res = p * s1 * s2;
  res = x > kMax ? static_cast<float>(INFINITY) : res;
  res = x < kMin ? 0.0f : res;
  return res;
}
#endif

RLKERN_HOST_DEVICE float expv(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_host_f32(x);
#endif
}
RLKERN_HOST_DEVICE double expv(double x) { return exp(x); }
// expv of an argument with |x| ≤ kExpClampedMax (or NaN): the same value; the CPU's SIMD type
// (policy_loss_simd.h) skips its range test there, whose clamps and fix-ups fire only
// beyond it. exp_clamped_ok(C): a clamp to ±C keeps its result within that bound.
constexpr float kExpClampedMax = 87.0f;
RLKERN_HOST_DEVICE bool exp_clamped_ok(double clamp) {
  return clamp <= kExpClampedMax && clamp >= -kExpClampedMax;
}
template <typename T>
RLKERN_HOST_DEVICE T expv_clamped(T x) {
  return expv(x);
}
// log (dppo_kl's binary KL); the CPU's SIMD type has a lane-wise one (policy_loss_simd.h).
RLKERN_HOST_DEVICE float logv(float x) { return logf(x); }
RLKERN_HOST_DEVICE double logv(double x) { return log(x); }

// --------------------------------------------------------------------------------------------
// Ratios and weights (per-row quantities: scalar double)

// Sequence log-ratio from the row sums: mean of Δ over the valid tokens (len clamped to ≥ 1,
// as both verl and TRL do), clamped from above.
RLKERN_HOST_DEVICE double seq_log_ratio(double lp_sum, double len, double max_clamp,
                                        bool* passes) {
  const double mean = lp_sum / (len > 1.0 ? len : 1.0);
  *passes = mean <= max_clamp;
  return mean > max_clamp ? max_clamp : mean;
}

// Rollout (behaviour-policy) correction weight from a log-ratio d = old − rollout (token) or
// its row sum (sequence): exp of the clamped log-ratio, then truncated to [min, max] or
// zeroed outside it. A NaN log-ratio (a token the rollout engine could not score) counts as 0.
template <typename T>
RLKERN_HOST_DEVICE T rollout_weight(T d, const HParams& h, bool mask_mode) {
  d = drop(d != d, d);
  const T w = expv(clampv(d, T(-h.rollout_log_clamp), T(h.rollout_log_clamp)));
  const T lo = T(h.rollout_min), hi = T(h.rollout_max);
  return mask_mode ? keep(in_closed(w, lo, hi), w) : clampv(w, lo, hi);
}

// --------------------------------------------------------------------------------------------
// Per-token losses. Each gives the value ℓ, ∂ℓ/∂r (through the ratio) and ∂ℓ/∂logp (direct),
// plus metric indicators (0 / 1).

// The mask type of T: bool for float / double, a lane mask for a SIMD vector.
template <typename T>
using MaskOf = decltype(T() < T());

// m && u, where the caller may know every lane's answer of u: KNOWN = +1 all lanes true (then
// m), −1 none (no lanes), 0 unknown (m && u). Known, u's comparison is dropped and so are the
// masks and selects built on a mask of no lanes (GCC keeps an AND with an all-ones vector
// constant, hence m itself rather than m && true).
template <int KNOWN, typename M>
RLKERN_HOST_DEVICE M and_known(M m, M u) {
  if constexpr (KNOWN > 0) return m;
  else if constexpr (KNOWN < 0) return M{};
  else return m && u;
}

template <typename T>
struct TokenLoss {
  T loss;
  T d_r;     // ∂ℓ/∂r
  T d_logp;  // direct ∂ℓ/∂logp (cispo, reinforce)
  MaskOf<T> clipped, clip_low, clip_high, dual;  // metric indicators
};

template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> zero_loss() {
  TokenLoss<T> out;
  out.loss = out.d_r = out.d_logp = T(0);
  out.clipped = out.clip_low = out.clip_high = out.dual = T(0) < T(0);
  return out;
}

// PPO clipped surrogate with clip-higher (lo = 1 − ε_low, hi = 1 + ε_high), two-sided δ on
// the unclipped term and dual clip c for A < 0 (Ye et al. 2019, "Mastering complex control
// in MOBA games with deep RL", dual-clip PPO):
//   ℓ = max(−A·min(ρ, δ), −A·clip(ρ, lo, hi));  A < 0: ℓ = min(ℓ, −A·c).
// SIGN: the sign of A when the caller knows it for every lane (+1 or −1: one advantage per
// response, a row constant), 0 otherwise. A known sign answers the A < 0 / A > 0 masks at
// compile time (and_known), so the compiler drops the comparisons and selects they decide
// (the dual clip for A > 0, one clip indicator): the same formula, the same bits.
template <int SIGN = 0, typename T>
RLKERN_HOST_DEVICE TokenLoss<T> ppo_loss(T rho, T adv, T lo, T hi, T delta, T c) {
  const T rho_d = sel(rho > delta, delta, rho);
  const T g1 = keep(rho <= delta, rho);  // ∂min(ρ, δ)/∂r
  const T rc = clampv(rho, lo, hi);
  const T g2 = keep(in_closed(rho, lo, hi), rho);
  const T l1 = -adv * rho_d;
  const T l2 = -adv * rc;
  T loss = sel(l1 >= l2, l1, l2);
  // ∂/∂r of the chosen branch; an exact tie takes the mean (torch.maximum's convention)
  T d = -adv * sel(l1 > l2, g1, sel(l1 < l2, g2, T(0.5) * (g1 + g2)));
  const T l3 = -adv * c;
  // every lane's A < 0 / A > 0 answer when SIGN is known (+1 all, −1 none), else per lane
  constexpr int kNeg = SIGN == 0 ? 0 : (SIGN < 0 ? 1 : -1), kPos = -kNeg;
  const auto dual = and_known<kNeg>(loss > l3, adv < T(0));
  d = drop(dual, sel(and_known<kNeg>(loss == l3, adv < T(0)), T(0.5) * d, d));
  loss = sel(dual, l3, loss);
  TokenLoss<T> out;
  out.loss = loss;
  out.d_r = d;
  out.d_logp = T(0);
  out.clipped = l2 > l1;
  // the ratio as the loss sees it, min(ρ, δ) (TRL counts its clip ratios after the δ clamp)
  out.clip_low = and_known<kNeg>(rho_d < lo, adv < T(0));
  out.clip_high = and_known<kPos>(rho_d > hi, adv > T(0));
  out.dual = dual;
  return out;
}

// CISPO: ℓ = −sg[clip(ρ, lo, hi)]·A·logp (Chen et al. 2025, MiniMax-M1, eq. 4). verl uses
// lo = 1 − ε_low, hi = 1 + ε_high; TRL clips only above (lo = −inf, hi = ε_high).
template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> cispo_loss(T rho, T adv, T logp, T lo, T hi) {
  const T coef = -clampv(rho, lo, hi) * adv;
  TokenLoss<T> out;
  out.loss = coef * logp;
  out.d_r = T(0);
  out.d_logp = coef;
  out.clipped = (rho < lo) || (rho > hi);
  out.clip_low = (rho < lo) && (adv < T(0));
  out.clip_high = (rho > hi) && (adv > T(0));
  out.dual = T(0) < T(0);
  return out;
}

// SAPO soft gate: τ = τ_pos if A > 0 else τ_neg;  ℓ = −σ(τ(ρ − 1))·(4/τ)·A
// (Gao et al. 2025, "Soft Adaptive Policy Optimization");  ∂ℓ/∂r = −4A·σ(1 − σ)·ρ.
template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> sapo_loss(T rho, T adv, T tau_pos, T tau_neg) {
  const T tau = sel(adv > T(0), tau_pos, tau_neg);
  const T s = T(1) / (T(1) + expv(-(tau * (rho - T(1)))));
  TokenLoss<T> out = zero_loss<T>();
  out.loss = -(s * (T(4) / tau)) * adv;
  out.d_r = T(-4) * adv * s * (T(1) - s) * rho;
  return out;
}

template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> reinforce_loss(T adv, T logp) {
  TokenLoss<T> out = zero_loss<T>();
  out.loss = -adv * logp;
  out.d_logp = -adv;
  return out;
}

// DRO (verl's compute_policy_loss_dro): ℓ = −(logp·A − ½β·Δ²) with the unclamped
// Δ = logp − old; ∂ℓ/∂logp = β·Δ − A. `half_beta` = ½β.
template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> dro_loss(T adv, T logp, T old, T half_beta) {
  const T d = logp - old;
  TokenLoss<T> out = zero_loss<T>();
  out.loss = -(logp * adv - half_beta * (d * d));
  out.d_logp = T(2) * half_beta * d - adv;
  return out;
}

// DPPO's binary trust regions (arXiv 2602.04879, as verl's docstring cites it; verl's
// compute_policy_loss_dppo_tv / _dppo_kl), with p = e^logp, p_old = e^old, lo = −ε_low,
// hi = ε_high (clip_lo / clip_hi) and c the truncation (dual_clip_c):
//   ℓ = −A·sg[min(ρ, c)]·logp·valid,
//   TV: valid = A > 0 ? p − p_old ≤ hi : p − p_old ≥ lo;
//   KL: b = p_old·(old − logp) + (1 − p_old)·log((1 − p_old + 1e-8) / (1 − p + 1e-8)),
//       valid = A > 0 ? (b ≤ hi or p ≤ p_old) : (b ≤ −lo or p ≥ p_old)
// (a NaN A takes the A ≤ 0 side, as torch.where(A > 0, ...) does). Metric indicators:
// clipped = not valid (verl's pg_clipfrac), dual = ρ > c and valid (its pg_clipfrac_lower).
template <typename T>
RLKERN_HOST_DEVICE MaskOf<T> dppo_valid(bool binary_kl, T adv, T logp, T old, T lo, T hi) {
  const T p = expv(logp), po = expv(old);
  const auto pos = adv > T(0);
  if (binary_kl) {
    const T b = po * (old - logp) +
                (T(1) - po) * logv((T(1) - po + T(1e-8)) / (T(1) - p + T(1e-8)));
    return (pos && ((b <= hi) || (p <= po))) || (!pos && ((b <= -lo) || (p >= po)));
  }
  const T diff = p - po;
  return (pos && (diff <= hi)) || (!pos && (diff >= lo));
}

template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> dppo_loss(bool binary_kl, T rho, T adv, T logp, T old, T lo,
                                          T hi, T c) {
  const MaskOf<T> valid = dppo_valid(binary_kl, adv, logp, old, lo, hi);
  const T vf = keep(valid, T(1));
  const T coef = -adv * sel(rho > c, c, rho);  // torch.clamp(ρ, max=c): NaN stays NaN
  TokenLoss<T> out = zero_loss<T>();
  out.loss = coef * logp * vf;
  out.d_logp = coef * vf;
  out.clipped = !valid;
  out.dual = (rho > c) && valid;
  return out;
}

// Clip-Cov / KL-Cov (verl's compute_policy_loss_clip_cov / _kl_cov, adapted from
// PRIME-RL/Entropy-Mechanism-of-RL), with s the token's cov_select value (1: picked by the
// covariance selection, 0 otherwise):
//   clip_cov: PPO's max(−A·ρ, −A·clip(ρ, lo, hi)) (ppo_loss) × (1 − s); clipped = s > 0
//             (verl's pg_clipfrac is the selected fraction);
//   kl_cov:   −A·ρ + s·k·|Δ| (no clip), Δ = logp − old; ∂/∂logp of |Δ| is sign(Δ) (torch's).
template <typename T>
RLKERN_HOST_DEVICE TokenLoss<T> cov_loss(bool kl, T rho, T adv, T logp, T old, T s,
                                         const HParams& h) {
  if (kl) {
    const T d = logp - old;
    const T k = T(h.cov_kl_coef);
    TokenLoss<T> out = zero_loss<T>();
    out.loss = -adv * rho + s * (k * sel(d < T(0), -d, d));
    out.d_r = -adv * rho;
    out.d_logp = s * k * sel(d > T(0), T(1), keep(d < T(0), T(-1)));
    return out;
  }
  TokenLoss<T> out =
      ppo_loss(rho, adv, T(h.clip_lo), T(h.clip_hi), T(h.delta), T(h.dual_clip_c));
  const T keep = T(1) - s;
  out.loss = out.loss * keep;
  out.d_r = out.d_r * keep;
  out.clipped = s > T(0);
  out.clip_low = out.clip_high = out.dual = T(0) < T(0);
  return out;
}

// The token losses by kind (kPpo, kCispo, kSapo, kReinforce, kDro, kDppoTv, kDppoKl, kClipCov,
// kKlCov; kGvpo has no token loss; kVespo's is −A·logp, which the kernels scale by the row's φ
// for the sign of A: vespo_phi). `old`: the old log-probability (dro, dppo, kl_cov read it);
// `cov`: the cov_select value (clip_cov / kl_cov); both 0 at masked tokens.
// SIGN: ppo_loss's (the others ignore it).
template <typename T, int SIGN = 0>
RLKERN_HOST_DEVICE TokenLoss<T> token_loss(int kind, T rho, T adv, T logp, T old, T cov,
                                           const HParams& h) {
  if (kind == kClipCov || kind == kKlCov)
    return cov_loss(kind == kKlCov, rho, adv, logp, old, cov, h);
  if (kind == kDro) return dro_loss(adv, logp, old, T(0.5 * h.dro_beta));
  if (kind == kDppoTv || kind == kDppoKl)
    return dppo_loss(kind == kDppoKl, rho, adv, logp, old, T(h.clip_lo), T(h.clip_hi),
                     T(h.dual_clip_c));
  if (kind == kCispo) return cispo_loss(rho, adv, logp, T(h.clip_lo), T(h.clip_hi));
  if (kind == kSapo) return sapo_loss(rho, adv, T(h.sapo_tau_pos), T(h.sapo_tau_neg));
  if (kind == kReinforce || kind == kVespo) return reinforce_loss(adv, logp);
  if (kind == kGvpo) return zero_loss<T>();
  return ppo_loss<SIGN>(rho, adv, T(h.clip_lo), T(h.clip_hi), T(h.delta), T(h.dual_clip_c));
}

// GMPO token clip in log space: Δc = sgn(A)·min(sgn(A)·Δ, sgn(A)·clip(Δ, lo, hi)) with
// lo = −ε_low, hi = ε_high; `d` = ∂Δc/∂Δ ∈ {0, 1} (torch.min splits ties, which only occur
// inside the clip range or at A = 0).
template <typename T>
struct GmpoClip {
  T dc;
  T d;
  MaskOf<T> clipped;
};

template <typename T>
RLKERN_HOST_DEVICE GmpoClip<T> gmpo_clip(T delta, T adv, T lo, T hi) {
  const T sg = sel(adv > T(0), T(1), keep(adv < T(0), T(-1)));
  const T c = clampv(delta, lo, hi);
  const T a = sg * delta, b = sg * c;
  GmpoClip<T> out;
  out.dc = sg * sel(a < b, a, b);
  out.d = keep((a < b) || in_closed(delta, lo, hi), sg * sg);
  out.clipped = delta != c;
  return out;
}

// --------------------------------------------------------------------------------------------
// VESPO (TRL's GRPOTrainer.get_gamma_weights; Liger's get_gamma_weights): per row i,
//   S_i = Σ_t m·clamp(Δ_t, ±20) + Σ_t m·clamp(log w_t, log 1e-8, 20)   (w: token rollout weight)
//   log w_i = clamp(S_i, log 1e-8, 20);  φ = exp(λ + k·log w_i − λ·w_i), NaN / ±inf → 0,
// with (k, λ) = (k_pos, λ_pos) where A ≥ 0, else (k_neg, λ_neg), λ clamped to ≥ 1e-4 (φ(1) = 1).
// ℓ_t = −sg[φ]·A_t·logp_t: φ depends on the row only through S_i and the sign of A_t, so the
// forward sums −m·mult·A·logp split by that sign and scales the two sums by φ at the row's end;
// the backward recomputes φ from the saved log w_i (row_stats[kSeqLogRatio]).

// The (φ_pos, φ_neg) of a row from its S.
struct VespoPhi {
  double log_w, pos, neg;
};

inline constexpr double kVespoLogRatioClamp = 20.0;              // |Δ| clamp of S's terms
inline constexpr double kVespoLogWMin = -18.420680743952367;     // log(1e-8)
inline constexpr double kVespoLogWMax = 20.0;

// log w of the row from S (NaN stays NaN, so a poisoned row gets φ = 0, as in TRL).
RLKERN_HOST_DEVICE double vespo_log_w(double s) {
  return clampv(s, kVespoLogWMin, kVespoLogWMax);
}

// The gamma weight φ for log w and one sign's (k, λ).
RLKERN_HOST_DEVICE double vespo_phi(double log_w, double k, double lambda) {
  const double lam = lambda < 1e-4 ? 1e-4 : lambda;
  const double phi = exp(lam + k * log_w - lam * exp(log_w));
  return (phi == phi && phi != static_cast<double>(INFINITY)) ? phi : 0.0;  // exp(·) ≥ 0
}

RLKERN_HOST_DEVICE VespoPhi vespo_phis(double s, const HParams& h) {
  const double lw = vespo_log_w(s);
  return {lw, vespo_phi(lw, h.vespo_k_pos, h.vespo_lambda_pos),
          vespo_phi(lw, h.vespo_k_neg, h.vespo_lambda_neg)};
}

// One token's term of S from its rollout weight's log-ratio d = old − rollout (kRolloutToken):
// the log of rollout_weight(d), clamped to [log 1e-8, 20]. Formed in log space (log w is the
// clamped d, or the log of a truncation bound, or −inf for a masked-out weight), so no log is
// taken per token; exact up to the rounding of exp / log.
template <typename T>
RLKERN_HOST_DEVICE T vespo_log_rollout(T d, const HParams& h, bool mask_mode) {
  d = drop(d != d, d);
  const T x = clampv(d, T(-h.rollout_log_clamp), T(h.rollout_log_clamp));
  const T w = expv(x);
  const T lo = T(h.rollout_min), hi = T(h.rollout_max);
  const double ninf_d = -static_cast<double>(INFINITY);
  const T log_lo = T(h.rollout_min > 0.0 ? log(h.rollout_min) : ninf_d);
  const T log_hi = T(h.rollout_max > 0.0 ? log(h.rollout_max) : ninf_d);
  const T ninf = T(ninf_d);
  const T lw = mask_mode ? sel(in_closed(w, lo, hi), x, ninf)
                         : sel(w < lo, log_lo, sel(w > hi, log_hi, x));
  return clampv(lw, T(kVespoLogWMin), T(kVespoLogWMax));
}

// --------------------------------------------------------------------------------------------
// KL to the reference policy, x = logp − ref (Schulman 2020, "Approximating KL divergence"):
//   k1 = x;  k2 = x²/2;  k3 = exp(y) − y − 1 with y = clamp(ref − logp, ±kl_log_clamp),
//   clamped to ±kl_value_clamp (verl; TRL uses neither clamp);  abs = |x|.
// Straight-through ("k3+"): the value of the estimator with the gradient of k2 (= x).

template <typename T>
struct KlTerm {
  T value;
  T d_logp;
};

// k3's clamped log-ratio y = clamp(ref − logp, ±log_clamp), the argument of its exp.
template <typename T>
RLKERN_HOST_DEVICE T k3_exp_arg(T logp, T ref, T log_clamp) {
  return clampv(ref - logp, -log_clamp, log_clamp);
}

// kl_term with k3's e = expv(k3_exp_arg(logp, ref, log_clamp)) given (ignored by the other
// kinds): for a caller that forms the exps of a block first (the CPU's KL pass). The same
// operations as kl_term, so the same bits.
template <typename T>
RLKERN_HOST_DEVICE KlTerm<T> kl_term_given_exp(int kind, bool straight_through, T logp, T ref,
                                               T log_clamp, T value_clamp, T e) {
  const T x = logp - ref;
  KlTerm<T> out;
  if (kind == kKlK1) {
    out.value = x;
    out.d_logp = T(1);
  } else if (kind == kKlK2) {
    out.value = T(0.5) * (x * x);
    out.d_logp = x;
  } else if (kind == kKlAbs) {
    out.value = sel(x < T(0), -x, x);
    out.d_logp = sel(x > T(0), T(1), keep(x < T(0), T(-1)));
  } else {  // k3
    const T y = ref - logp;
    const T yc = k3_exp_arg(logp, ref, log_clamp);
    const T v0 = e - yc - T(1);
    out.value = clampv(v0, -value_clamp, value_clamp);
    out.d_logp =
        keep(in_closed(y, -log_clamp, log_clamp) && in_closed(v0, -value_clamp, value_clamp),
             T(1) - e);
  }
  if (straight_through) out.d_logp = x;
  return out;
}

template <typename T>
RLKERN_HOST_DEVICE KlTerm<T> kl_term(int kind, bool straight_through, T logp, T ref,
                                     T log_clamp, T value_clamp, bool exp_in_range = false) {
  T e(0);
  if (kind == kKlK3) {
    // exp_in_range: exp_clamped_ok(log_clamp) (the caller's promise), so the argument is
    // within it
    const T yc = k3_exp_arg(logp, ref, log_clamp);
    e = exp_in_range ? expv_clamped(yc) : expv(yc);
  }
  return kl_term_given_exp(kind, straight_through, logp, ref, log_clamp, value_clamp, e);
}


}  // namespace policy_loss
}  // namespace rlkern
