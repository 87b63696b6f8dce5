// CPU kernels of the policy-loss family: one pass over each sequence forward, one backward.
// The per-token math is rlkern/policy_loss.h (shared with CUDA); this file streams rows.
//
// Threads split rows (sequences), never a row, so a row's results do not depend on the other
// rows or on the thread count (rows are handed out in chunks, dynamically: parallel_rows).
// Within a row the header's formulas run on a lane policy (cpu/policy_loss_simd.h): 16 float
// tokens per step on AVX-512 (masked loads for the row's tail, exp by the header's
// polynomial), one token per step otherwise and for float64. Row sums are accumulated per
// block of kBlock tokens in the compute dtype and across blocks in double.
//
// Forward, per row:  [prefix]  Σ m, Σ m·Δ, Σ m·(old − rollout)   (sequence quantities)
//                    [aux]     multipliers of the policy term + entropy sums (add-ons only)
//                    [main]    per-token loss, clip counters, ratio statistics
//                    [kl]      the KL term (with a reference only)
// Backward, per row: the same passes, writing ∂/∂logp; the sequence values come from the
// forward's row_stats (nothing per token was saved).
// Fused (Args::token_grad, policy_loss_fused_ok): the forward's [main] and [kl] passes also
// write each token's gradient factor; policy_loss_fused_bwd scales them into the gradient.
// Given the row coefficients up front (Args::grad_rows), they write the gradient itself:
// the backward's products, in its order, so that nothing is left for a backward pass.
// Every pass of a row stops at its last valid token (valid_extent: the right padding costs
// no token math), and the main token loops prefetch their streams a page ahead
// (prefetch_ahead): rows are a page or a few long, so without it each page starts with
// demand misses.
#include "cpu/policy_loss.h"

// GCC 12 flags the deliberately undefined upper lanes inside its own AVX-512 reduction
// intrinsics (_mm512_reduce_*_ps) as maybe-uninitialized: a false positive in its header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "cpu/policy_loss_simd.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace rlkern::cpu {
namespace {

namespace pl = rlkern::policy_loss;
using pl::HParams;
using pl::clampv;  // the SIMD overload (min / max instructions) is found by ADL
using pl::expv;
using pl::expv_clamped;
using pl::sel;  // float / double; the SIMD overload is found by argument-dependent lookup
using pl::keep;  // sel(c, x, 0) and sel(c, 0, x): the same, AVX2's overloads by ADL
using pl::drop;

constexpr int64_t kBlock = 1024;

// Software prefetch of the token streams, kAheadTokens tokens ahead (4 KiB of float32). A
// (B, T) row of float32 spans a page or a few, and the hardware prefetcher does not cross a
// page: without these requests every page of every stream (log-probs, old log-probs, mask,
// the stored gradient) starts with demand misses, and the token loops wait on memory instead
// of computing. Vector lanes only (the scalar float64 path would issue eight requests a line).
// The address may lie past the array: a prefetch never faults.
constexpr uintptr_t kAheadTokens = 1024;

template <typename P, typename E>
void prefetch_ahead(const E* p, int64_t t) {
  if constexpr (P::L > 1)
    prefetch_l1(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p + t) +
                                              kAheadTokens * sizeof(E)));
}

template <typename P, typename E>
void prefetch_ahead_for_write(E* p, int64_t t) {
  if constexpr (P::L > 1)
    prefetch_l1_for_write(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p + t) +
                                                  kAheadTokens * sizeof(E)));
}

// A token loop's steps: step(t, end) for P::L tokens from t, its lanes bounded by `end` (so a
// full step's lane mask folds to a constant). On the SIMD lanes, two full steps an
// iteration: the compiler interleaves their independent exps and token math, long dependency
// chains that otherwise leave the vector units waiting (docs/policy_loss.md, "Paired token
// steps", has the bench figures).
// Each accumulator still takes the steps in order, so every sum keeps the one-step loop's
// bits. The scalar lanes (float64) keep one token a step: paired, GCC 12 at -O3 compiled
// bwd_main's DRO case to wrong gradients (not isolated further; a prefetch between the two
// steps hid it; test_policy_loss_fused.py's T = 131 case catches it).
#if defined(__GNUC__)
#define RLKERN_PL_STEP_INLINE __attribute__((always_inline))
#else
#define RLKERN_PL_STEP_INLINE
#endif

// Whether the n mask bytes at m (a multiple of 8) are all nonzero: a zero byte of each 8-byte
// word shows in (w − 0x01…01) & ~w & 0x80…80.
inline bool all_valid(const uint8_t* m, int n) {
  uint64_t zero = 0;
  for (int i = 0; i < n; i += 8) {
    uint64_t w;
    std::memcpy(&w, m + i, 8);
    zero |= (w - 0x0101010101010101ull) & ~w & 0x8080808080808080ull;
  }
  return zero == 0;
}

// The steps of both loops below: step(t, end, full), `full` a std::true_type where CHECK and
// the pair's mask bytes at m are all set (a row's interior: its masked operations then compile
// to plain ones, load_step<…, FULL>), else std::false_type. The same operations on the same
// values either way, so the same bits.
template <typename P, bool CHECK, typename F>
RLKERN_PL_STEP_INLINE inline void step_pairs(const uint8_t* m, int64_t t0, int64_t t1,
                                             F&& step) {
  int64_t t = t0;
  if constexpr (P::L > 1) {
    for (; t + 2 * P::L <= t1; t += 2 * P::L) {
      if (CHECK && all_valid(m + t, 2 * P::L)) {
        if constexpr (CHECK) {  // (for_steps instantiates no all-valid step)
          step(t, t + P::L, std::true_type{});
          step(t + P::L, t + 2 * P::L, std::true_type{});
        }
      } else {
        step(t, t + P::L, std::false_type{});
        step(t + P::L, t + 2 * P::L, std::false_type{});
      }
    }
  }
  for (; t < t1; t += P::L) step(t, t1, std::false_type{});
}

template <typename P, typename F>
RLKERN_PL_STEP_INLINE inline void for_steps(int64_t t0, int64_t t1, F&& step) {
  step_pairs<P, false>(nullptr, t0, t1, [&](int64_t t, int64_t end, auto)
                                            RLKERN_PL_STEP_INLINE { step(t, end); });
}

// for_steps for a loop that reads the mask m, told which pairs are all valid. The scalar lanes
// take the general step only (no second copy of their loop).
template <typename P, typename F>
RLKERN_PL_STEP_INLINE inline void for_valid_steps(const uint8_t* m, int64_t t0, int64_t t1,
                                                  F&& step) {
  step_pairs<P, true>(m, t0, t1, step);
}

// The token loops take the row pointers, hyperparameters and row constants by value: local
// copies cannot alias the gradient being stored, so the compiler keeps them in registers
// instead of reloading (and re-converting) them on every step.

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename T>
struct Row {
  const T* lp;
  const T* old;
  const T* adv;  // row start (per-token advantages) or the row's scalar
  const uint8_t* m;
  const T* opt[pl::kNumInputs];  // the optional (B, T) inputs by slot (nullptr: absent)
};

template <typename T, typename E = T>
const E* row_of(const pl::RowArray& a, int64_t b) {
  return a.p ? static_cast<const E*>(a.p) + b * a.stride : nullptr;
}

// One past the row's last valid token (0 for an empty row). Responses are right-padded in
// every trainer (a quarter to a half of a batch's positions is padding), and a masked token
// adds an exact +0 to every row sum and gets gradient +0, so the token passes stop here and
// the tail of each (B, T) output is filled with zeros: the same bits, no work on the padding.
// The scan runs forward, as the token pass then reads the mask: a scan from the row's end
// would start each row with a cache miss the hardware prefetcher does not cover.
#if defined(RLKERN_PL_AVX512)
// Bit i set where m[i] != 0, for the 64 mask bytes at m (one load, one test).
inline uint64_t nonzero_bytes64(const uint8_t* m) {
  const __m512i v = _mm512_loadu_si512(m);
  return _mm512_test_epi8_mask(v, v);
}
#elif defined(RLKERN_PL_AVX2)
// The same from two 32-byte halves (a compare with 0 and a byte movemask each).
inline uint64_t nonzero_bytes64(const uint8_t* m) {
  const __m256i zero = _mm256_setzero_si256();
  auto half = [&](const uint8_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
  };
  return uint64_t{half(m + 32)} << 32 | half(m);
}
#endif

int64_t valid_extent(const uint8_t* m, int64_t n) {
  int64_t e = 0, i = 0;
#if defined(RLKERN_PL_AVX512) || defined(RLKERN_PL_AVX2)
  for (; i + 64 <= n; i += 64) {
    const uint64_t k = nonzero_bytes64(m + i);
    e = k ? i + 64 - __builtin_clzll(k) : e;
  }
#endif
  for (; i < n; ++i) e = m[i] ? i + 1 : e;
  return e;
}

template <typename T>
void zero_tail(T* p, int64_t from, int64_t n) {
  if (p != nullptr && from < n) std::fill(p + from, p + n, T(0));
}

template <typename T>
Row<T> row_ptrs(const PolicyLossArgs& a, int64_t b) {
  Row<T> r;
  r.lp = row_of<T>(a.in.logp, b);
  r.old = row_of<T>(a.in.old, b);
  r.adv = row_of<T>(a.in.adv, b);
  r.m = row_of<T, uint8_t>(a.in.mask, b);
  for (int k = 0; k < pl::kNumInputs; ++k)
    r.opt[k] = pl::input_shape(k) == pl::kRows ? row_of<T>(a.in.opt[k], b) : nullptr;
  return r;
}

bool has(const PolicyLossArgs& a, pl::Input slot) { return a.in.opt[slot].p != nullptr; }

// The entropy mask's threshold (0 when there is none: then it is not read).
template <typename T>
T entropy_threshold(const PolicyLossArgs& a) {
  return has(a, pl::kInEntropyThreshold)
             ? *static_cast<const T*>(a.in.opt[pl::kInEntropyThreshold].p) : T(0);
}

// Per-row values known before the token pass.
template <typename T>
struct RowConst {
  double len = 0, lp_sum = 0, roll_sum = 0;
  T r_seq = 0;       // sequence log-ratio (seq modes)
  bool pass_seq = true;
  T seq_w = 1;       // sequence rollout weight
};

template <typename T>
RowConst<T> row_prefix(const Row<T> r, int64_t n, bool want_roll) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  RowConst<T> c;
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    V len(0.0), lps(0.0), rs(0.0);
    for (int64_t t = t0; t < t1; t += P::L) {
      const auto ln = P::lanes(t1 - t);
      const auto v = P::valid(r.m + t, ln);
      len = len + keep(v, V(1.0));
      lps = lps + keep(v, P::load(r.lp + t, ln) - P::load(r.old + t, ln));
      if (want_roll) {
        const V d = P::load(r.old + t, ln) - P::load(r.opt[pl::kInRollout] + t, ln);
        rs = rs + keep(v && (d == d), d);  // NaN (unscored token): no correction
      }
    }
    c.len += P::hsum(len);
    c.lp_sum += P::hsum(lps);
    c.roll_sum += P::hsum(rs);
  }
  return c;
}

// Sequence ratio and weight of a row from its sums (double, so that forward and backward
// recompute identical values).
template <typename T>
void finish_row_const(RowConst<T>& c, const PolicyLossArgs& a) {
  bool pass = true;
  c.r_seq = T(pl::seq_log_ratio(c.lp_sum, c.len, a.hp.seq_log_ratio_max, &pass));
  c.pass_seq = pass;
  if (a.flags.rollout_level == pl::kRolloutSeq)
    c.seq_w = T(pl::rollout_weight<double>(c.roll_sum, a.hp, a.flags.rollout_mask != 0));
}

struct Acc {
  double pg = 0, clip = 0, clip_low = 0, clip_high = 0, dual = 0, neg_lr = 0, ratio_sum = 0;
  double ratio_min = kInf<double>, ratio_max = -kInf<double>;
  // Σ of every input over the valid tokens (beyond those summed anyway): a NaN or ±inf input
  // makes its row's sums non-finite, so the NaN policy costs no per-token work.
  double check = 0;
  double kl = 0, ent = 0, ent_count = 0, ent_valid = 0, w_sum = 0;
  double seq_w = 1, seq_r = 0, adv_sum = 0;
  double len = 0, lp_sum = 0;  // token-level kinds without the prefix pass
  // vespo: S (its rollout part from aux_pass), the A < 0 part of pg (pg holds A ≥ 0's), the
  // valid tokens with A ≥ 0
  double vespo_s = 0, pg_neg = 0, n_pos = 0, phi_sum = 0;
};

template <typename V>
V one_if(decltype(V(0.0) < V(0.0)) c) {
  return keep(c, V(1.0));
}

// [aux] multipliers of the policy term: rollout weight · entropy mask · token weight (0 at
// masked tokens), and the entropy / rollout sums. Only runs when an add-on is present.
template <typename T>
void aux_pass(const Row<T> r, int64_t n, const PolicyLossArgs& a, const RowConst<T> c,
              T* mult, Acc& acc, bool write_mult) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const bool roll_tok = a.flags.rollout_level == pl::kRolloutToken;
  const bool roll_seq = a.flags.rollout_level == pl::kRolloutSeq;
  const bool mask_mode = a.flags.rollout_mask != 0;
  const bool has_thr = has(a, pl::kInEntropyThreshold);
  // vespo folds the rollout weight into its sequence weight instead of multiplying by it
  const bool fold = a.flags.loss_kind == pl::kVespo;
  const V thr(double(entropy_threshold<T>(a)));
  const V one(1.0);
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    V ent(0.0), ent_count(0.0), ent_valid(0.0), w_sum(0.0), tws(0.0), vs(0.0);
    for (int64_t t = t0; t < t1; t += P::L) {
      const auto ln = P::lanes(t1 - t);
      const auto v = P::valid(r.m + t, ln);
      V w = one;
      if (roll_tok) {
        const V d = keep(v, P::load(r.old + t, ln) - P::load(r.opt[pl::kInRollout] + t, ln));
        w = pl::rollout_weight<V>(d, a.hp, mask_mode);
        if (fold) vs = vs + keep(v, pl::vespo_log_rollout<V>(d, a.hp, mask_mode));
      }
      if (roll_seq) w = V(double(c.seq_w));
      V em = one;
      if (r.opt[pl::kInEntropy]) {
        const V raw = P::load(r.opt[pl::kInEntropy] + t, ln);
        const V h = keep(v, raw);
        if (has_thr) em = one_if<V>(h >= thr);
        ent = ent + keep(v, em * h);
        ent_count = ent_count + keep(v, em);
        ent_valid = ent_valid + h;
      }
      V wt = one;
      if (r.opt[pl::kInTokenWeights]) {
        const V raw = P::load(r.opt[pl::kInTokenWeights] + t, ln);
        wt = keep(v, raw);
        tws = tws + wt;
      }
      w_sum = w_sum + keep(v, w);
      if (write_mult) P::store(mult + t, keep(v, (fold ? one : w) * em * wt), ln);
    }
    acc.vespo_s += P::hsum(vs);
    acc.ent += P::hsum(ent);
    acc.ent_count += P::hsum(ent_count);
    acc.ent_valid += P::hsum(ent_valid);
    acc.w_sum += P::hsum(w_sum);
    acc.check += P::hsum(tws);
  }
}

// Token inputs of one step, masked tokens zeroed (their values are never used). VM: the type
// of the valid-token mask v, plsimd::AllLanes where the step is known to be all valid.
template <typename P, typename T, typename VM = typename P::M>
struct Step {
  typename P::M ln;
  VM v;
  typename P::V lp, old, a;
};

// The prefetches of load_step's streams (prefetch_ahead).
template <typename P, bool ADVTOK, typename T>
void prefetch_step(const Row<T> r, int64_t t) {
  prefetch_ahead<P>(r.lp, t);
  prefetch_ahead<P>(r.old, t);
  prefetch_ahead<P>(r.m, t);
  if constexpr (ADVTOK) prefetch_ahead<P>(r.adv, t);
}

// FULL: the step's tokens are all valid (for_valid_steps checked their mask bytes).
template <typename P, bool ADVTOK, bool FULL = false, typename T>
auto load_step(const Row<T> r, int64_t t, int64_t t1, typename P::V adv0) {
  Step<P, T, std::conditional_t<FULL, plsimd::AllLanes, typename P::M>> s;
  s.ln = P::lanes(t1 - t);
  if constexpr (FULL) s.v = plsimd::AllLanes{};
  else s.v = P::valid(r.m + t, s.ln);
  // Masked tokens load as 0 (never read): every per-token term is then finite and its
  // indicators false there, so most sums need no select.
  s.lp = P::load_valid(r.lp + t, s.v);
  s.old = P::load_valid(r.old + t, s.v);
  // A per-response advantage stays the loop-invariant adv0 (its products hoist out of the
  // loop); consumers mask their sums with v.
  if constexpr (ADVTOK) s.a = P::load_valid(r.adv + t, s.v);
  else s.a = adv0;
  return s;
}

// e^clamp(a_t − b_t, ±C) of a block's tokens [t0, t1) into out[0, t1 − t0), rounded up to whole
// vectors (room for kBlock); prefetch(t) issues each step's prefetches. The SIMD token loops
// take their exps from here instead of forming them in-line (block_ratios: the ratios; fwd_kl:
// k3's). Why: a token is one long dependency chain (loads, the exp's argument, the exp's FMAs,
// the loss, the gradient), of which the core's out-of-order window holds only about 1.5 steps,
// so the one loop waited on latency. This pass's steps are short and independent (many fit in
// the window), and the loop after it starts each chain from an exp already computed. The same
// operations on the same values: the same bits.
// Every token's exp, masked or not, and the mask is not read: the loops read the exps only into
// consumers masked by v (sums, counts, min / max, the stored gradient), so a masked token's may
// be anything. Only the row's end bounds the loads.
// Inlined into its callers: called, it left fwd_main 2–3 % slower in the paired probe
// (bench/profile/policy_loss_ab.sh).
template <typename P, typename T, typename F>
RLKERN_PL_STEP_INLINE inline void block_exps(const T* a, const T* b, int64_t t0, int64_t t1,
                                             typename P::V C, bool clamped, T* out,
                                             F&& prefetch) {
  using V = typename P::V;
  const plsimd::AllLanes all;
  auto pass = [&](auto in_range) RLKERN_PL_STEP_INLINE {
    auto exp_of = [&](V x, V y) RLKERN_PL_STEP_INLINE {
      const V c = clampv(x - y, -C, C);
      return in_range ? expv_clamped(c) : expv(c);
    };
    int64_t t = t0;
    for (; t + P::L <= t1; t += P::L) {
      prefetch(t);
      P::store(out + (t - t0), exp_of(P::load_valid(a + t, all), P::load_valid(b + t, all)), all);
    }
    if (t < t1) {
      const auto ln = P::lanes(t1 - t);
      P::store(out + (t - t0), exp_of(P::load(a + t, ln), P::load(b + t, ln)), all);
    }
  };
  if (clamped) pass(std::true_type{});
  else pass(std::false_type{});
}

// The ratios ρ_t = e^clamp(Δ_t, ±C) of a block (block_exps), for the token-ratio mode.
template <typename P, bool ADVTOK, typename T>
void block_ratios(const Row<T> r, int64_t t0, int64_t t1, typename P::V C, bool clamped,
                  T* ratios) {
  block_exps<P>(r.lp, r.old, t0, t1, C, clamped, ratios,
                [&](int64_t t) RLKERN_PL_STEP_INLINE { prefetch_step<P, ADVTOK>(r, t); });
}

// ρ of the token-ratio step at t of the block from t0: from block_ratios' buffer where the
// loop took the ratios first (SPLIT), else formed here from dc, as block_ratios forms it.
template <typename P, bool SPLIT, typename T>
RLKERN_PL_STEP_INLINE inline typename P::V ratio_at(const T* ratios, int64_t t, int64_t t0,
                                                    typename P::V dc, bool clamped) {
  if constexpr (SPLIT) return P::load_valid(ratios + (t - t0), plsimd::AllLanes{});
  else return clamped ? expv_clamped(dc) : expv(dc);
}

// A KL loop's step from t to end: its valid-token mask v, and its loads and stores, plain where
// the step's tokens are all valid (FULL: for_valid_steps checked their mask bytes; v is then
// AllLanes and every keep(v, ·) folds away), else masked to the step's lanes. The same values
// either way, so the same bits.
template <typename P, typename T, bool FULL>
struct StepIo {
  typename P::M ln;
  std::conditional_t<FULL, plsimd::AllLanes, typename P::M> v{};
  RLKERN_PL_STEP_INLINE StepIo(const uint8_t* m, int64_t t, int64_t end)
      : ln(P::lanes(end - t)) {
    if constexpr (!FULL) v = P::valid(m + t, ln);
  }
  RLKERN_PL_STEP_INLINE typename P::V load(const T* p) const {
    if constexpr (FULL) return P::load_valid(p, plsimd::AllLanes{});
    else return P::load(p, ln);
  }
  RLKERN_PL_STEP_INLINE void store(T* p, typename P::V x) const {
    if constexpr (FULL) P::store(p, x, plsimd::AllLanes{});
    else P::store(p, x, ln);
  }
};

// The token's cov_select value (clip_cov / kl_cov; 0 for the other kinds and masked tokens).
template <typename P, int K, typename T, typename VM>
typename P::V cov_at(const Row<T> r, int64_t t, VM v) {
  if constexpr (K == pl::kClipCov || K == pl::kKlCov)
    return P::load_valid(r.opt[pl::kInCovSelect] + t, v);
  else
    return typename P::V(0.0);
}

// ∂ℓ_t/∂logp_t in the token-ratio mode, times the token's multiplier `mt` (MULT): the direct
// term plus the ratio's, which dc = clamp(Δ, ±C) passes where it leaves Δ unchanged (inside
// [−C, C]: one compare, where in_closed takes two; a NaN Δ compares unequal, as it fails
// in_closed). The fused forward stores it and the backward scales it by the row's
// coefficient; both form it here, so the two paths give the same bits.
template <bool MULT, typename V>
V token_d_pg(const pl::TokenLoss<V>& L, V d, V dc, V mt) {
  const V dl = L.d_logp + keep(dc == d, L.d_r);
  if constexpr (MULT) return mt * dl;
  else return dl;
}

// ∂kl_t/∂logp_t in the token-ratio mode; with bias correction the KL value is weighted by the
// clamped ratio ρ (whose clamp passes the gradient inside [−C, C]). Shared as token_d_pg is.
template <bool BIAS, typename V>
V token_d_kl(const pl::KlTerm<V>& k, V rho, V d, V dc) {
  if constexpr (BIAS) return k.d_logp * rho + keep(dc == d, k.value * rho);
  else return k.d_logp;
}

// [main] forward, token-level kinds (ppo / cispo / sapo / reinforce / gvpo's metrics).
// STORE (the fused forward, token-ratio mode): also writes g_pg·token_d_pg to dg (0 at masked
// tokens): the factor itself for g_pg = 1, else bwd_main's product.
// SIGN: the row's advantage sign when known (ppo_loss's; one advantage per response), else 0.
template <typename T, int K, bool SEQ, bool MULT, bool ADVTOK, bool STORE, int SIGN = 0>
void fwd_main(const Row<T> r, int64_t n, const T* mult, const RowConst<T> c,
              const HParams h, Acc& acc, T* dg, T g_pg) {
  static_assert(!(STORE && (SEQ || K == pl::kVespo)), "the fused forward: token-level kinds");
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V C(h.log_ratio_clamp), inf(kInf<double>), ninf(-kInf<double>);
  // the sequence ratio (seq modes; no exp in the token mode, where it is unused)
  const V rho_seq = SEQ ? expv(V(double(c.r_seq))) : V(1.0);
  const V adv0(ADVTOK ? 0.0 : double(*r.adv));
  const V gpg = V(double(g_pg));
  // clamp(Δ, ±C) within the exp's range: no range test (verl's C = 20; TRL clamps nothing)
  const bool clamped = pl::exp_clamped_ok(h.log_ratio_clamp);
  // The SIMD lanes take the ratios first (block_ratios: why).
  constexpr bool kSplit = !SEQ && P::L > 1;
  alignas(64) T ratios[kSplit ? kBlock : 1];
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    if constexpr (kSplit) block_ratios<P, ADVTOK>(r, t0, t1, C, clamped, ratios);
    V pg(0.0), nlr(0.0), rs(0.0), as(0.0), lps(0.0), pgn(0.0), vs(0.0);
    int64_t clip = 0, clo = 0, chi = 0, dual = 0, len = 0, npos = 0;
    V rmin = inf, rmax = ninf;
    for_valid_steps<P>(r.m, t0, t1, [&](int64_t t, int64_t end, auto full) RLKERN_PL_STEP_INLINE {
      if constexpr (!kSplit) prefetch_step<P, ADVTOK>(r, t);
      if constexpr (STORE) prefetch_ahead_for_write<P>(dg, t);
      const auto s = load_step<P, ADVTOK, decltype(full)::value>(r, t, end, adv0);
      const V d = s.lp - s.old;
      const V dc = clampv(d, -C, C);
      const V rho = SEQ ? rho_seq : ratio_at<P, kSplit>(ratios, t, t0, dc, clamped);
      const pl::TokenLoss<V> L =
          pl::token_loss<V, SIGN>(K, rho, s.a, s.lp, s.old, cov_at<P, K>(r, t, s.v), h);
      const V mt = MULT ? P::load(mult + t, s.ln) : V(1.0);
      const V val = MULT ? mt * L.loss : L.loss;
      if constexpr (STORE)
        P::store(dg + t, keep(s.v, gpg * token_d_pg<MULT>(L, d, dc, mt)), s.ln);
      if constexpr (K == pl::kVespo) {  // split by the sign of A (a NaN A counts as A < 0)
        const auto pos = s.a >= V(0.0);
        const V vpos = keep(pos, val);
        pg = P::madd(pg, s.v, vpos);
        pgn = P::madd(pgn, s.v, val - vpos);
        npos += P::count(s.v && pos);
        const V L20(pl::kVespoLogRatioClamp);
        vs = vs + clampv(d, -L20, L20);  // masked tokens load as 0
      } else {
        pg = P::madd(pg, s.v, val);
      }
      clip += P::count(s.v && L.clipped);
      clo += P::count(s.v && L.clip_low);
      chi += P::count(s.v && L.clip_high);
      dual += P::count(s.v && L.dual);
      len += P::count(s.v);
      nlr = nlr - dc;
      rs = P::madd(rs, s.v, rho);
      if constexpr (ADVTOK) as = P::madd(as, s.v, s.a);  // else adv0 · len, below
      lps = lps + d;
      rmin = P::mmin(rmin, s.v, rho);
      rmax = P::mmax(rmax, s.v, rho);
    });
    acc.pg += P::hsum(pg);
    acc.pg_neg += P::hsum(pgn);
    acc.vespo_s += P::hsum(vs);
    acc.n_pos += double(npos);
    acc.clip += double(clip);
    acc.clip_low += double(clo);
    acc.clip_high += double(chi);
    acc.dual += double(dual);
    acc.neg_lr += P::hsum(nlr);
    acc.ratio_sum += P::hsum(rs);
    acc.ratio_min = std::min(acc.ratio_min, double(P::hmin(rmin)));
    acc.ratio_max = std::max(acc.ratio_max, double(P::hmax(rmax)));
    acc.adv_sum += ADVTOK ? double(P::hsum(as)) : len ? double(*r.adv) * double(len) : 0.0;
    acc.len += double(len);
    acc.lp_sum += P::hsum(lps);
  }
}

// [main] forward of gmpo: the sequence loss −Ā·exp(Σ m Δc / len)·w from one pass of sums.
template <typename T, bool ADVTOK>
void fwd_gmpo(const Row<T> r, int64_t n, const T* wts, const RowConst<T> c,
              const HParams h, Acc& acc) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V lo(h.clip_lo), hi(h.clip_hi), C(h.log_ratio_clamp), zero(0.0);
  const V adv0(ADVTOK ? 0.0 : double(*r.adv));
  double s_dc = 0, s_logw = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    V sdc(0.0), nlr(0.0), as(0.0);
    int64_t clip = 0, clo = 0, chi = 0;
    for (int64_t t = t0; t < t1; t += P::L) {
      const Step<P, T> s = load_step<P, ADVTOK>(r, t, t1, adv0);
      const V d = s.lp - s.old;
      const pl::GmpoClip<V> g = pl::gmpo_clip<V>(d, s.a, lo, hi);
      sdc = sdc + g.dc;
      clip += P::count(s.v && g.clipped);
      clo += P::count(s.v && (s.a < zero) && g.clipped);
      chi += P::count(s.v && (s.a > zero) && g.clipped);
      nlr = nlr - clampv(d, -C, C);
      as = P::madd(as, s.v, s.a);
    }
    if (wts) {  // geometric mean of the rollout weights (verl's geo_mean), log(w + 1e-10)
      for (int64_t t = t0; t < t1; ++t)
        if (r.m[t]) s_logw += std::log(double(wts[t]) + 1e-10);
    }
    s_dc += P::hsum(sdc);
    acc.clip += double(clip);
    acc.clip_low += double(clo);
    acc.clip_high += double(chi);
    acc.neg_lr += P::hsum(nlr);
    acc.adv_sum += P::hsum(as);
  }
  const double len1 = c.len > 1 ? c.len : 1.0;
  acc.seq_r = s_dc / len1;
  const double rho = std::exp(acc.seq_r);
  acc.seq_w = wts ? std::exp(s_logw / len1) : 1.0;
  acc.pg = -(acc.adv_sum / len1) * rho * acc.seq_w;
  acc.ratio_sum = c.len * rho;
  if (c.len > 0) acc.ratio_min = acc.ratio_max = rho;
}

// What the fused forward's [kl] pass writes: nothing (the plain forward), token_d_kl (the
// factor, for the backward to scale), or g_kl·token_d_kl added to the policy part of the
// gradient (bwd_kl's sum, when the coefficients are known up front).
enum KlStore { kKlStoreNone, kKlStoreFactor, kKlStoreAdd };

// The exps a KL loop takes first, a block at a time (block_exps: why), on the SIMD lanes: k3's
// e^clamp(ref − logp, ±C_kl) (K3) and, with the bias correction in the token-ratio mode, the
// token ratios (RHO). Shared by fwd_kl and bwd_kl. Their arguments clamped within the exp's
// range take no range test (as in fwd_main): the same values as expv's.
template <typename P, typename T, int KL, bool BIAS, bool SEQ>
struct KlExps {
  using V = typename P::V;
  static constexpr bool K3 = KL == pl::kKlK3 && P::L > 1;
  static constexpr bool RHO = BIAS && !SEQ && P::L > 1;
  const Row<T> r;
  const bool kl_clamped, clamped;
  alignas(64) T k3[K3 ? kBlock : 1];
  alignas(64) T ratios[RHO ? kBlock : 1];

  KlExps(const Row<T> row, const HParams& h)
      : r(row), kl_clamped(pl::exp_clamped_ok(h.kl_log_clamp)),
        clamped(pl::exp_clamped_ok(h.log_ratio_clamp)) {}

  // The KL loop's streams at step t: by the k3 pass where it runs, else by the loop itself.
  RLKERN_PL_STEP_INLINE void prefetch(int64_t t) const {
    prefetch_ahead<P>(r.lp, t);
    prefetch_ahead<P>(r.opt[pl::kInRef], t);
    prefetch_ahead<P>(r.m, t);
    if constexpr (BIAS) prefetch_ahead<P>(r.old, t);
  }

  // The block [t0, t1)'s exps into k3 and ratios.
  RLKERN_PL_STEP_INLINE void form(int64_t t0, int64_t t1, V Ck, V C) {
    if constexpr (K3)
      block_exps<P>(r.opt[pl::kInRef], r.lp, t0, t1, Ck, kl_clamped, k3,
                    [&](int64_t t) RLKERN_PL_STEP_INLINE { prefetch(t); });
    if constexpr (RHO) block_exps<P>(r.lp, r.old, t0, t1, C, clamped, ratios, [](int64_t) {});
  }

  // The KL term of the step at t of the block from t0 (lp and ref masked to 0 where invalid).
  RLKERN_PL_STEP_INLINE pl::KlTerm<V> term(bool st, V lp, V ref, V Ck, V Cv, int64_t t,
                                           int64_t t0) const {
    if constexpr (K3)
      return pl::kl_term_given_exp<V>(KL, st, lp, ref, Ck, Cv,
                                      P::load_valid(k3 + (t - t0), plsimd::AllLanes{}));
    else
      return pl::kl_term<V>(KL, st, lp, ref, Ck, Cv, kl_clamped);
  }

  // ρ of the step at t (token-ratio mode), from dc = clamp(Δ, ±C).
  RLKERN_PL_STEP_INLINE V rho(int64_t t, int64_t t0, V dc) const {
    return ratio_at<P, RHO>(ratios, t, t0, dc, clamped);
  }
};

// [kl] forward. STORE (the fused forward, token-ratio mode; a KlStore): also writes to dk
// (0 at masked tokens); ST, the straight-through gradient, matters only then.
template <typename T, int KL, bool BIAS, bool SEQ, bool ST, int STORE>
void fwd_kl(const Row<T> r, int64_t n, const RowConst<T> c, const HParams h, Acc& acc, T* dk,
            T g_kl) {
  static_assert(!(STORE != kKlStoreNone && SEQ), "the fused forward: token-ratio mode");
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V Ck(h.kl_log_clamp), Cv(h.kl_value_clamp), C(h.log_ratio_clamp);
  const V gkl = V(double(g_kl));
  // the sequence ratio (seq modes; no exp in the token mode, where it is unused)
  const V rho_seq = SEQ ? expv(V(double(c.r_seq))) : V(1.0);
  using Exps = KlExps<P, T, KL, BIAS, SEQ>;
  Exps ex(r, h);
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    ex.form(t0, t1, Ck, C);
    V kl(0.0), refs(0.0);
    for_valid_steps<P>(r.m, t0, t1, [&](int64_t t, int64_t end, auto full) RLKERN_PL_STEP_INLINE {
      if constexpr (!Exps::K3) ex.prefetch(t);
      if constexpr (STORE != kKlStoreNone) prefetch_ahead_for_write<P>(dk, t);
      const StepIo<P, T, decltype(full)::value> io(r.m, t, end);
      const auto v = io.v;
      const V ref_raw = io.load(r.opt[pl::kInRef] + t);
      const V lp = keep(v, io.load(r.lp + t)), ref = keep(v, ref_raw);
      const pl::KlTerm<V> k = ex.term(ST, lp, ref, Ck, Cv, t, t0);
      V val = k.value;
      V rho(1.0), d(0.0), dc(0.0);
      if (BIAS) {
        d = lp - keep(v, io.load(r.old + t));
        dc = clampv(d, -C, C);
        rho = SEQ ? rho_seq : ex.rho(t, t0, dc);
        val = val * rho;
      }
      if constexpr (STORE == kKlStoreFactor)
        io.store(dk + t, keep(v, token_d_kl<BIAS>(k, rho, d, dc)));
      if constexpr (STORE == kKlStoreAdd)
        io.store(dk + t, io.load(dk + t) + keep(v, gkl * token_d_kl<BIAS>(k, rho, d, dc)));
      kl = kl + keep(v, val);
      refs = refs + ref;
    });
    acc.kl += P::hsum(kl);
    acc.check += P::hsum(refs);
  }
}

// [main] backward, token-level kinds. MODE: kRatioToken / kRatioSeqDetached / kRatioSeqFull.
// Writes the policy part of ∂/∂logp into g; for kRatioSeqFull adds Σ_t m·∂/∂r to *G.
template <typename T, int K, int MODE, bool MULT, bool ADVTOK>
void bwd_main(const Row<T> r, int64_t n, const T* mult, const RowConst<T> c,
              const HParams h, T g_pg, T* g, double* G, pl::VespoPhi phi) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V C(h.log_ratio_clamp), zero(0.0), gpg = V(double(g_pg));
  // the sequence ratio (seq modes; no exp in the token mode, where it is unused)
  const V rho_seq = MODE != pl::kRatioToken ? expv(V(double(c.r_seq))) : V(1.0);
  const V adv0(ADVTOK ? 0.0 : double(*r.adv));
  const V pass_seq(c.pass_seq ? 1.0 : 0.0);
  const bool clamped = pl::exp_clamped_ok(h.log_ratio_clamp);  // as in fwd_main
  constexpr bool kSplit = MODE == pl::kRatioToken && P::L > 1;  // as in fwd_main
  alignas(64) T ratios[kSplit ? kBlock : 1];
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    if constexpr (kSplit) block_ratios<P, ADVTOK>(r, t0, t1, C, clamped, ratios);
    V Gl(0.0);
    for_valid_steps<P>(r.m, t0, t1, [&](int64_t t, int64_t end, auto full) RLKERN_PL_STEP_INLINE {
      if constexpr (!kSplit) prefetch_step<P, ADVTOK>(r, t);
      prefetch_ahead_for_write<P>(g, t);
      const auto s = load_step<P, ADVTOK, decltype(full)::value>(r, t, end, adv0);
      const V d = s.lp - s.old;
      const V dc = clampv(d, -C, C);
      const V rho = MODE != pl::kRatioToken ? rho_seq
                                             : ratio_at<P, kSplit>(ratios, t, t0, dc, clamped);
      const pl::TokenLoss<V> L = pl::token_loss<V>(K, rho, s.a, s.lp, s.old, cov_at<P, K>(r, t, s.v), h);
      V wpg = gpg;
      if constexpr (K == pl::kVespo) wpg = wpg * sel(s.a >= zero, V(phi.pos), V(phi.neg));
      if constexpr (MODE == pl::kRatioToken) {
        // g_pg times the fused forward's stored factor (the same expression, the same bits)
        const V mt = MULT ? P::load(mult + t, s.ln) : V(1.0);
        P::store(g + t, keep(s.v, wpg * token_d_pg<MULT>(L, d, dc, mt)), s.ln);
        return;
      }
      const V w = MULT ? wpg * P::load(mult + t, s.ln) : wpg;
      const V direct = w * L.d_logp;
      const V gr = w * L.d_r;
      if constexpr (MODE == pl::kRatioSeqFull) {
        P::store(g + t, keep(s.v, direct), s.ln);
        Gl = Gl + keep(s.v, gr);
      } else {
        P::store(g + t, keep(s.v, direct + gr * pass_seq), s.ln);
      }
    });
    *G += P::hsum(Gl);
  }
}

template <typename T, bool ADVTOK>
void bwd_gmpo(const Row<T> r, int64_t n, const HParams h, T coef, T* g) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V lo(h.clip_lo), hi(h.clip_hi), cf = V(double(coef));
  const V adv0(ADVTOK ? 0.0 : double(*r.adv));
  for (int64_t t = 0; t < n; t += P::L) {
    const Step<P, T> s = load_step<P, ADVTOK>(r, t, n, adv0);
    P::store(g + t, keep(s.v, cf * pl::gmpo_clip<V>(s.lp - s.old, s.a, lo, hi).d), s.ln);
  }
}

// [kl] backward: adds g_kl·∂kl/∂logp to g (and, with bias correction in kRatioSeqFull, the
// ratio part to *G).
template <typename T, int KL, bool ST, bool BIAS, int MODE>
void bwd_kl(const Row<T> r, int64_t n, const RowConst<T> c, const HParams h, T g_kl, T* g,
            double* G) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V Ck(h.kl_log_clamp), Cv(h.kl_value_clamp), C(h.log_ratio_clamp);
  const V gkl = V(double(g_kl)), pass_seq(c.pass_seq ? 1.0 : 0.0);
  // the sequence ratio (seq modes; no exp in the token mode, where it is unused)
  const V rho_seq = MODE != pl::kRatioToken ? expv(V(double(c.r_seq))) : V(1.0);
  constexpr bool kSeq = MODE != pl::kRatioToken;
  using Exps = KlExps<P, T, KL, BIAS, kSeq>;  // the exps first, as in fwd_kl
  Exps ex(r, h);
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t t1 = std::min(n, t0 + kBlock);
    ex.form(t0, t1, Ck, C);
    V Gl(0.0);
    for_valid_steps<P>(r.m, t0, t1, [&](int64_t t, int64_t end, auto full) RLKERN_PL_STEP_INLINE {
      if constexpr (!Exps::K3) ex.prefetch(t);
      prefetch_ahead_for_write<P>(g, t);
      const StepIo<P, T, decltype(full)::value> io(r.m, t, end);
      const auto v = io.v;
      const V lp = keep(v, io.load(r.lp + t));
      const V ref = keep(v, io.load(r.opt[pl::kInRef] + t));
      const pl::KlTerm<V> k = ex.term(ST, lp, ref, Ck, Cv, t, t0);
      V add = gkl * k.d_logp;
      if constexpr (!kSeq) {  // g_kl times the fused forward's stored factor
        V rho(1.0), d(0.0), dc(0.0);
        if constexpr (BIAS) {
          d = lp - keep(v, io.load(r.old + t));
          dc = clampv(d, -C, C);
          rho = ex.rho(t, t0, dc);
        }
        add = gkl * token_d_kl<BIAS>(k, rho, d, dc);
      } else if constexpr (BIAS) {  // the sequence ratio's modes
        add = add * rho_seq;
        const V gr = gkl * k.value * rho_seq;
        if constexpr (MODE == pl::kRatioSeqFull) Gl = Gl + keep(v, gr);
        else add = add + gr * pass_seq;
      }
      io.store(g + t, io.load(g + t) + keep(v, add));
    });
    *G += P::hsum(Gl);
  }
}

// ------------------------------------------------------------------ template dispatch helpers

// f(std::integral_constant<int, v>) for the runtime code v: one instantiation per listed
// code, the first (Default) for any other value.
template <int Default, int... Others, typename F>
void with_code(int v, F&& f) {
  const bool other = ((v == Others && (f(std::integral_constant<int, Others>{}), true)) || ...);
  if (!other) f(std::integral_constant<int, Default>{});
}

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// gmpo has its own kernels; kPpo also runs GSPO (its ratio mode differs).
template <typename F>
void with_kind(int kind, F&& f) {
  with_code<pl::kPpo, pl::kCispo, pl::kSapo, pl::kReinforce, pl::kGvpo, pl::kVespo, pl::kDro,
            pl::kDppoTv, pl::kDppoKl, pl::kClipCov, pl::kKlCov>(kind, f);
}

// f(std::integral_constant<int, s>) with s the sign of the row's one advantage (+1, −1; 0
// when zero or NaN) for PPO with per-response advantages, 0 for anything else: ppo_loss then
// skips the comparisons the sign decides (three instantiations of PPO's token loops only).
template <int K, bool ADVTOK, typename T, typename F>
void with_adv_sign(const T* adv, F&& f) {
  if constexpr (K == pl::kPpo && !ADVTOK) {
    if (*adv > T(0)) return f(std::integral_constant<int, 1>{});
    if (*adv < T(0)) return f(std::integral_constant<int, -1>{});
  }
  f(std::integral_constant<int, 0>{});
}

template <typename F>
void with_kl(int kind, F&& f) {
  with_code<pl::kKlK3, pl::kKlK1, pl::kKlK2, pl::kKlAbs>(kind, f);
}

template <typename F>
void with_mode(int mode, F&& f) {
  with_code<pl::kRatioToken, pl::kRatioSeqDetached, pl::kRatioSeqFull>(mode, f);
}

bool needs_aux(const PolicyLossArgs& a) {
  return a.flags.rollout_level != pl::kRolloutNone || has(a, pl::kInEntropy) ||
         has(a, pl::kInTokenWeights);
}

bool has_mult(const PolicyLossArgs& a) {
  return a.flags.rollout_level != pl::kRolloutNone || has(a, pl::kInEntropyThreshold) ||
         has(a, pl::kInTokenWeights);
}

// g[t] += x at the valid tokens of [0, n) (the backward's per-row constant terms).
template <typename T>
void add_at_valid(const uint8_t* m, int64_t n, T x, T* g) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const V add = V(double(x));
  for (int64_t t = 0; t < n; t += P::L) {
    const auto ln = P::lanes(n - t);
    const auto v = P::valid(m + t, ln);
    P::store(g + t, P::load(g + t, ln) + keep(v, add), ln);
  }
}

int64_t grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

// ----------------------------------------------------------------------------------- forward

template <typename T>
void fwd_rows(const PolicyLossArgs& a, int64_t b0, int64_t b1) {
  const int64_t row_len = a.in.T;
  const pl::Flags& f = a.flags;
  const bool seq_ratio = f.ratio_mode != pl::kRatioToken;
  const bool aux = needs_aux(a), mult_on = has_mult(a);
  std::vector<T> mult(mult_on ? row_len : 0);
  // The fused forward's per-token factors (policy_loss_fused_ok): ∂pg_sum/∂logp and, with a
  // KL term, ∂kl_sum/∂logp, each (B, T); or, given the coefficients (grad_rows), the gradient.
  T* const dg_all = static_cast<T*>(a.token_grad);
  T* const dk_all = static_cast<T*>(a.token_grad_kl);
  const bool to_grad = dg_all != nullptr && a.grad_rows != nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    const Row<T> r = row_ptrs<T>(a, b);
    T* const dg = dg_all ? dg_all + b * row_len : nullptr;
    T* const dk = dk_all ? dk_all + b * row_len : nullptr;
    // bwd_rows' coefficients (1 and 0: the factors themselves)
    const auto gr = [&](int k) { return to_grad ? T(a.grad_rows[k * a.in.B + b]) : T(0); };
    const T g_pg = to_grad ? gr(pl::kGradPg) : T(1), g_kl = gr(pl::kGradKl);
    const T g_lp = gr(pl::kGradLp);
    const int64_t n = valid_extent(r.m, row_len);  // the passes stop at the last valid token
    zero_tail(dg, n, row_len);
    zero_tail(dk, n, row_len);
    // The prefix pass (row sums before the token pass) only when a sequence quantity needs
    // them; token-level kinds accumulate the length and Σ m·Δ in their main pass.
    const bool prefix = seq_ratio || f.rollout_level == pl::kRolloutSeq ||
                        f.loss_kind == pl::kGmpo;
    RowConst<T> c;
    if (prefix) c = row_prefix<T>(r, n, f.rollout_level == pl::kRolloutSeq);
    finish_row_const(c, a);
    Acc acc;
    if (aux) aux_pass<T>(r, n, a, c, mult.data(), acc, mult_on);
    const T* mp = mult_on ? mult.data() : nullptr;
    if (f.loss_kind == pl::kGmpo) {
      const T* wts = f.rollout_level != pl::kRolloutNone ? mult.data() : nullptr;
      with_bool(a.in.adv_per_token, [&](auto adv_tok) {
        fwd_gmpo<T, decltype(adv_tok)::value>(r, n, wts, c, a.hp, acc);
      });
    } else {
      with_kind(f.loss_kind, [&](auto k) {
        with_bool(seq_ratio, [&](auto seq) {
          with_bool(mult_on, [&](auto mo) {
            with_bool(a.in.adv_per_token, [&](auto at) {
              constexpr int K = decltype(k)::value;
              constexpr bool kSeq = decltype(seq)::value;
              constexpr bool kMult = decltype(mo)::value, kAdvTok = decltype(at)::value;
              with_adv_sign<K, kAdvTok>(r.adv, [&](auto sign) {
                constexpr int kSign = decltype(sign)::value;
                if constexpr (!kSeq && K != pl::kVespo) {
                  if (dg) {
                    fwd_main<T, K, kSeq, kMult, kAdvTok, true, kSign>(r, n, mp, c, a.hp, acc,
                                                                       dg, g_pg);
                    return;
                  }
                }
                fwd_main<T, K, kSeq, kMult, kAdvTok, false, kSign>(r, n, mp, c, a.hp, acc,
                                                                    nullptr, T(1));
              });
            });
          });
        });
      });
      acc.seq_r = seq_ratio ? double(c.r_seq) : 0.0;
      acc.seq_w = double(c.seq_w);
      if (!prefix) {
        c.len = acc.len;
        c.lp_sum = acc.lp_sum;
      }
      if (f.loss_kind == pl::kVespo) {
        const pl::VespoPhi phi = pl::vespo_phis(acc.vespo_s, a.hp);
        acc.pg = phi.pos * acc.pg + phi.neg * acc.pg_neg;
        acc.phi_sum = phi.pos * acc.n_pos + phi.neg * (c.len - acc.n_pos);
        acc.seq_r = phi.log_w;
      }
    }
    if (f.kl_kind != pl::kKlNone) {
      with_kl(f.kl_kind, [&](auto kl) {
        with_bool(f.kl_bias_correction != 0, [&](auto bias) {
          with_bool(seq_ratio, [&](auto seq) {
            constexpr int KL = decltype(kl)::value;
            constexpr bool kBias = decltype(bias)::value, kSeq = decltype(seq)::value;
            if constexpr (!kSeq) {
              if (dk || to_grad) {
                with_bool(f.kl_straight_through != 0, [&](auto st) {
                  constexpr bool kSt = decltype(st)::value;
                  if (to_grad)
                    fwd_kl<T, KL, kBias, kSeq, kSt, kKlStoreAdd>(r, n, c, a.hp, acc, dg, g_kl);
                  else
                    fwd_kl<T, KL, kBias, kSeq, kSt, kKlStoreFactor>(r, n, c, a.hp, acc, dk, T(0));
                });
                return;
              }
            }
            fwd_kl<T, KL, kBias, kSeq, false, kKlStoreNone>(r, n, c, a.hp, acc, nullptr, T(0));
          });
        });
      });
    }
    if (to_grad && g_lp != T(0)) add_at_valid(r.m, n, g_lp, dg);  // bwd_rows' Σ m·Δ term
    if (f.loss_kind == pl::kGvpo) acc.clip_low = acc.clip_high = 0;
    // Statistic-major layout: row_stats[k * B + b].
    const auto s = [&](int k) -> double& { return a.row_stats[k * a.in.B + b]; };
    s(pl::kLen) = c.len;
    s(pl::kPgSum) = acc.pg;
    s(pl::kKlSum) = acc.kl;
    s(pl::kEntSum) = acc.ent;
    s(pl::kLpSum) = c.lp_sum;
    s(pl::kEntCount) = acc.ent_count;
    s(pl::kSeqLogRatio) = acc.seq_r;
    s(pl::kSeqWeight) = acc.seq_w;
    s(pl::kAdvSum) = acc.adv_sum;
    s(pl::kClip) = acc.clip;
    s(pl::kClipLow) = acc.clip_low;
    s(pl::kClipHigh) = acc.clip_high;
    s(pl::kDualClip) = acc.dual;
    s(pl::kNegLogRatio) = acc.neg_lr;
    s(pl::kRatioSum) = acc.ratio_sum;
    s(pl::kRatioMin) = acc.ratio_min;
    s(pl::kRatioMax) = acc.ratio_max;
    s(pl::kEntropyValid) = acc.ent_valid;
    s(pl::kRolloutWSum) = f.rollout_level != pl::kRolloutNone ? acc.w_sum : 0.0;
    const double check = acc.check + acc.ent_valid + acc.adv_sum + c.lp_sum;
    s(pl::kNonFinite) = std::isfinite(check) ? 0.0 : 1.0;
    s(pl::kPhiSum) = acc.phi_sum;
  }
}

// ---------------------------------------------------------------------------------- backward

template <typename T>
void bwd_rows(const PolicyLossArgs& a, int64_t b0, int64_t b1) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const int64_t row_len = a.in.T;
  const pl::Flags& f = a.flags;
  const bool mult_on = has_mult(a);
  const bool ratio_full = f.ratio_mode == pl::kRatioSeqFull;
  std::vector<T> mult(mult_on ? row_len : 0);
  const T thr = entropy_threshold<T>(a);
  for (int64_t b = b0; b < b1; ++b) {
    const Row<T> r = row_ptrs<T>(a, b);
    const int64_t n = valid_extent(r.m, row_len);  // the passes stop at the last valid token
    const auto s = [&](int k) { return a.row_stats[k * a.in.B + b]; };
    const auto gr = [&](int k) { return T(a.grad_rows[k * a.in.B + b]); };
    const T g_pg = gr(pl::kGradPg), g_kl = gr(pl::kGradKl);
    const T g_ent = gr(pl::kGradEnt), g_lp = gr(pl::kGradLp);
    RowConst<T> c;
    c.len = s(pl::kLen);
    c.lp_sum = s(pl::kLpSum);
    finish_row_const(c, a);
    // The sequence rollout weight is the forward's (its log-ratio sum is not saved); for gmpo
    // the column holds the geometric mean instead, which the gmpo backward does not use.
    c.seq_w = T(s(pl::kSeqWeight));
    T* g = static_cast<T*>(a.grad_logp) + b * row_len;
    zero_tail(g, n, row_len);
    if (mult_on) {
      Acc unused;
      aux_pass<T>(r, n, a, c, mult.data(), unused, true);
    }
    double G = 0;
    // vespo: φ from the forward's log w (vespo_phis clamps it again: a no-op); other kinds
    // skip its two exps
    const pl::VespoPhi phi = f.loss_kind == pl::kVespo
                                 ? pl::vespo_phis(s(pl::kSeqLogRatio), a.hp)
                                 : pl::VespoPhi{0.0, 0.0, 0.0};
    if (f.loss_kind == pl::kGmpo) {
      const double len1 = c.len > 1 ? c.len : 1.0;
      const T coef = T(double(g_pg) * s(pl::kPgSum) / len1);  // ∂ℓ_i/∂logp_t = ℓ_i/len · ∂Δc/∂Δ
      with_bool(a.in.adv_per_token, [&](auto at) {
        bwd_gmpo<T, decltype(at)::value>(r, n, a.hp, coef, g);
      });
    } else {
      with_kind(f.loss_kind, [&](auto k) {
        with_mode(f.ratio_mode, [&](auto mode) {
          with_bool(mult_on, [&](auto mo) {
            with_bool(a.in.adv_per_token, [&](auto at) {
              bwd_main<T, decltype(k)::value, decltype(mode)::value, decltype(mo)::value,
                       decltype(at)::value>(r, n, mult.data(), c, a.hp, g_pg, g, &G, phi);
            });
          });
        });
      });
    }
    if (f.kl_kind != pl::kKlNone) {
      with_kl(f.kl_kind, [&](auto kl) {
        with_bool(f.kl_straight_through != 0, [&](auto st) {
          with_bool(f.kl_bias_correction != 0, [&](auto bias) {
            with_mode(f.ratio_mode, [&](auto mode) {
              bwd_kl<T, decltype(kl)::value, decltype(st)::value, decltype(bias)::value,
                     decltype(mode)::value>(r, n, c, a.hp, g_kl, g, &G);
            });
          });
        });
      });
    }
    // ∂/∂logp of the row sum Σ m·(logp − old) (gvpo), and the sequence ratio's share.
    const T extra = ratio_full && c.pass_seq ? T(G / (c.len > 1 ? c.len : 1.0)) : T(0);
    if (g_lp != T(0) || extra != T(0)) add_at_valid(r.m, n, T(g_lp + extra), g);
    if (a.grad_entropy) {
      T* ge = static_cast<T*>(a.grad_entropy) + b * row_len;
      zero_tail(ge, n, row_len);
      const bool has_thr = has(a, pl::kInEntropyThreshold);
      const V gent = V(double(g_ent)), thrv = V(double(thr));
      for (int64_t t = 0; t < n; t += P::L) {
        const auto ln = P::lanes(n - t);
        const auto v = P::valid(r.m + t, ln);
        V out = keep(v, gent);
        const V h = keep(v, P::load(r.opt[pl::kInEntropy] + t, ln));
        if (has_thr) out = keep(h >= thrv, out);
        P::store(ge + t, out, ln);
      }
    }
  }
}

// --------------------------------------------------------------------------- fused backward

// In place, per row: D_pg ← g_pg·D_pg (+ g_kl·D_kl) (+ g_lp at valid tokens), in the order
// and with the factors of bwd_rows (token_d_pg, token_d_kl), so the gradient has its bits. The
// stored factors are 0 at masked tokens, so a row with g_pg finite and nothing to add is one
// multiply a token. Otherwise the mask is read, as bwd_rows does: a non-finite coefficient
// must not reach masked tokens, and each product is selected by the mask before it is added,
// in bwd_rows' order.
template <typename T>
void fused_bwd_rows(const PolicyLossArgs& a, int64_t b0, int64_t b1) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const int64_t n = a.in.T, B = a.in.B;
  const bool kl = a.flags.kl_kind != pl::kKlNone;
  T* const d_all = static_cast<T*>(a.token_grad);
  const T* const dk_all = static_cast<const T*>(a.token_grad_kl);
  for (int64_t b = b0; b < b1; ++b) {
    const auto gr = [&](int k) { return T(a.grad_rows[k * B + b]); };
    const T g_pg = gr(pl::kGradPg), g_kl = kl ? gr(pl::kGradKl) : T(0), g_lp = gr(pl::kGradLp);
    const bool finite = std::isfinite(g_pg) && std::isfinite(g_kl);
    const V gpg = V(double(g_pg)), gkl = V(double(g_kl)), glp = V(double(g_lp));
    T* const g = d_all + b * n;
    const T* const dk = kl ? dk_all + b * n : nullptr;
    const uint8_t* const m = static_cast<const uint8_t*>(a.in.mask.p) + b * a.in.mask.stride;
    if (finite && !kl && g_lp == T(0)) {
      for (int64_t t = 0; t < n; t += P::L) {
        prefetch_ahead_for_write<P>(g, t);
        const auto ln = P::lanes(n - t);
        P::store(g + t, gpg * P::load(g + t, ln), ln);
      }
      continue;
    }
    for (int64_t t = 0; t < n; t += P::L) {
      prefetch_ahead_for_write<P>(g, t);
      prefetch_ahead<P>(m, t);
      if (kl) prefetch_ahead<P>(dk, t);
      const auto ln = P::lanes(n - t);
      const auto v = P::valid(m + t, ln);
      V x = keep(v, gpg * P::load(g + t, ln));
      if (kl) x = x + keep(v, gkl * P::load(dk + t, ln));
      if (g_lp != T(0)) x = x + keep(v, glp);
      P::store(g + t, x, ln);
    }
  }
}

// ------------------------------------------------------------------------------------- KL op

template <typename T, int KL, bool ST>
void kl_range(const KlArgs& a, int64_t i0, int64_t i1) {
  using P = typename plsimd::LanesFor<T>::type;
  using V = typename P::V;
  const T* lp = static_cast<const T*>(a.logp);
  const T* ref = static_cast<const T*>(a.ref);
  const T* grad = static_cast<const T*>(a.grad);
  T* out = static_cast<T*>(a.out);
  const V Ck(a.log_clamp), Cv(a.value_clamp);
  for (int64_t i = i0; i < i1; i += P::L) {
    const auto ln = P::lanes(i1 - i);
    const pl::KlTerm<V> k = pl::kl_term<V>(KL, ST, P::load(lp + i, ln), P::load(ref + i, ln), Ck, Cv);
    P::store(out + i, grad ? P::load(grad + i, ln) * k.d_logp : k.value, ln);
  }
}

}  // namespace

namespace {

// Rows in chunks of grain(T), handed out dynamically to at::parallel_for's threads: on a
// machine shared with other jobs a descheduled thread then delays its own chunk only, not a
// fixed half of the batch. Rows are independent, so the results do not depend on which
// thread takes which chunk (batch invariance is kept).
template <typename F>
void parallel_rows(int64_t B, int64_t T, F&& rows) {
  const int64_t chunk = grain(T);
  const int64_t chunks = (B + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1) {
    rows(int64_t(0), B);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      rows(c * chunk, std::min(B, (c + 1) * chunk));
  });
}

}  // namespace

void policy_loss_fwd(const PolicyLossArgs& a) {
  parallel_rows(a.in.B, a.in.T, [&](int64_t b0, int64_t b1) {
    if (a.in.f64) fwd_rows<double>(a, b0, b1);
    else fwd_rows<float>(a, b0, b1);
  });
}

void policy_loss_bwd(const PolicyLossArgs& a) {
  parallel_rows(a.in.B, a.in.T, [&](int64_t b0, int64_t b1) {
    if (a.in.f64) bwd_rows<double>(a, b0, b1);
    else bwd_rows<float>(a, b0, b1);
  });
}

void policy_loss_fused_bwd(const PolicyLossArgs& a) {
  parallel_rows(a.in.B, a.in.T, [&](int64_t b0, int64_t b1) {
    if (a.in.f64) fused_bwd_rows<double>(a, b0, b1);
    else fused_bwd_rows<float>(a, b0, b1);
  });
}

void policy_loss_lens(const uint8_t* mask, int64_t B, int64_t T, int64_t stride, double* lens) {
  parallel_rows(B, T, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* m = mask + b * stride;
      int64_t n = 0, t = 0;
#if defined(RLKERN_PL_AVX512) || defined(RLKERN_PL_AVX2)
      for (; t + 64 <= T; t += 64) n += __builtin_popcountll(nonzero_bytes64(m + t));
#endif
      for (; t < T; ++t) n += m[t] != 0;
      lens[b] = double(n);
    }
  });
}

void kl_penalty(const KlArgs& a) {
  at::parallel_for(0, a.n, 16384, [&](int64_t i0, int64_t i1) {
    with_kl(a.kind, [&](auto kl) {
      with_bool(a.straight_through, [&](auto st) {
        if (a.f64) kl_range<double, decltype(kl)::value, decltype(st)::value>(a, i0, i1);
        else kl_range<float, decltype(kl)::value, decltype(st)::value>(a, i0, i1);
      });
    });
  });
}

}  // namespace rlkern::cpu
