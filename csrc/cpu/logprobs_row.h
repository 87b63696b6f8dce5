// Per-row building blocks of the CPU logprobs kernels, shared by the materialised-logits op
// (logprobs.cpp) and the fused linear op (linear_logprobs.cpp), so the numerics exist once.
//
// Every quantity is formed in coordinates shifted by the row max *before* the temperature
// scales them: r_v = x_v − m ≤ 0, z'_v = r_v / T. Then only lse = m / T + log s can leave the
// output's range; logprobs, entropy and the gradient of a finite row stay finite and accurate
// whatever its magnitude (a constant row of −1e10, one logit of 1e10, bf16's lowest value) or
// the temperature (1e-10, 1e300).
//
// Forward: a row (or a vocab tile of a row) is cut into blocks of kBlock logits; each block is
// swept twice while it sits in L1, once for its max m_b, once for Σ2^d, Σ2^d·d (and Σ4^d,
// Σ(x − m_b)) with d = (x − m_b)·c in base 2 (c = log2(e)/T). Block summaries are merged in
// double into a RowState, so the logits are read from memory once and the only per-element
// transcendental is one fast 2^x. A block holding NaN or +inf makes its row NaN.
//
// Backward: grad_v = p_v (c0 − g_ent z'_v)/T (+ g_lp/T at the label), one read and one write
// per element, with p_v = 2^(r_v c − ref·log2 e). A row with a moderate lse takes the shift 0 and
// ref = lse from the forward; a row whose lse is large (|lse| ≥ kBwdLseBound, where the float
// lse no longer pins p down) or infinite recomputes its max and normaliser first.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>

#include "cpu/logprobs.h"
#include "cpu/simd.h"
#include "rlkern/logprobs.h"
#include "rlkern/online_softmax.h"

namespace rlkern::cpu {

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// 4096 logits: 8 KiB of bf16 or 16 KiB of fp32, so the second sweep hits L1.
constexpr int64_t kBlock = 4096;

inline int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
}

// Loads the last n < W logits of a row, padded with −inf (which contributes exactly 0).
template <typename Tag>
inline VecF load_tail(const typename Tag::storage* x, int64_t n) {
  alignas(64) float buf[VecF::size];
  for (int i = 0; i < VecF::size; ++i) buf[i] = i < n ? load_scalar<Tag>(x + i) : kNegInf;
  return VecF::load(buf);
}

// A temperature as the row loops use it: 1/T, and c = log2(e)/T as the float the vectorised
// sweeps multiply x − m by. c is kept normal and finite: beyond T ≈ 1.2e38 (or below ≈ 4e-39) the
// float scale saturates, which changes nothing unless a row's spread exceeds ~1e30.
struct RowScale {
  double inv_t;
  float c;
};

inline RowScale row_scale(double temperature) {
  const double inv_t = 1.0 / temperature;
  const double c = std::clamp(kLog2e * inv_t, double(FLT_MIN), double(FLT_MAX));
  return {inv_t, float(c)};
}

// The running summary of a row: rlkern/online_softmax.h's, in double (m is the raw max, s, t
// and u are in natural units relative to it, zsum = Σ(x − m) feeds self-certainty).
using RowState = SoftmaxStats<double>;

// log p_y = (x_y − m)/T − log s.
inline double label_logp(const RowState& row, const RowResult<double>& res, double x_y,
                         double inv_t) {
  return (x_y - row.m) * inv_t - res.log_s;
}

// Block summary in base 2, relative to the block max mx of the raw logits:
// s = Σ 2^d, t = Σ 2^d d, u = Σ 4^d with d = (x − mx)·c, and rel = Σ(x − mx). s is NaN when the
// block holds a NaN or a +inf; an all −inf block has mx = −inf, s = 0 and rel = −inf.
struct Block2 {
  float mx;
  float s, t, u, rel;
};

// Candidate collection riding on sweep 2 (the sampler's kept-set search, kept_set.h): appends
// the row indices v (to `out`) and logits x_v as floats (to `vals`) of the block's tokens with
// x_v ≥ ref + rel: rel ≤ 0 a cutoff relative to the row's max (by_lse false) or to its
// T·log Σ exp(x/T) (by_lse true; −inf: every token), ref the running value of that reference
// over the blocks so far (this block's max included). The running value never exceeds the
// row's, so the list holds every token with x_v ≥ (the row's reference) + rel, and more.
struct Collect {
  double rel;
  bool by_lse;
  int32_t* out;     // room for the whole row plus VecF::size
  float* vals;      // as much
  int64_t n = 0;    // indices appended so far
  int64_t base = 0;  // row index of the block's first logit
  float m_run = -std::numeric_limits<float>::infinity();
  double lse_run = -std::numeric_limits<double>::infinity();  // T·log Σ exp(x/T), blocks before
  // Optional (non-null): each block's max and Σ 2^((x − max)·c), block b at [b] (the sampler's
  // draw walks them). rel = +inf collects no candidate at all.
  float* block_mx = nullptr;
  float* block_s = nullptr;

  void push(int64_t v, float x) {
    out[n] = int32_t(v);
    vals[n++] = x;
  }
};

// Sweep 1 of a block x[0, n): its max (four independent chains hide the latency of max; a
// NaN may be skipped, sweep 2 meets it), the −inf-padded tail vector in `vtail`, and with
// kWiden the logits as fp32 in widened[0, n / W · W), which saves sweep 2 the widening.
template <typename Tag, bool kWiden>
inline float block_max(const typename Tag::storage* x, int64_t n, float* widened, VecF& vtail) {
  constexpr int W = VecF::size;
  const int64_t nv = n / W * W;
  auto keep = [&](int64_t at, VecF v) {
    if constexpr (kWiden) v.store(widened + at, F32{});
  };
  VecF m0 = VecF::set1(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * W <= nv; i += 4 * W) {
    VecF a = VecF::load(x + i, Tag{}), b = VecF::load(x + i + W, Tag{});
    VecF d = VecF::load(x + i + 2 * W, Tag{}), e = VecF::load(x + i + 3 * W, Tag{});
    keep(i, a);
    keep(i + W, b);
    keep(i + 2 * W, d);
    keep(i + 3 * W, e);
    m0 = VecF::max(m0, a);
    m1 = VecF::max(m1, b);
    m2 = VecF::max(m2, d);
    m3 = VecF::max(m3, e);
  }
  for (; i < nv; i += W) {
    VecF a = VecF::load(x + i, Tag{});
    keep(i, a);
    m0 = VecF::max(m0, a);
  }
  if (nv < n) {
    vtail = load_tail<Tag>(x + nv, n - nv);
    m0 = VecF::max(m0, vtail);
  }
  return VecF::max(VecF::max(m0, m1), VecF::max(m2, m3)).reduce_max();
}

// `prefetch` / `prefetch_bytes`: the memory sweep 1 of the next block will read (nullptr for
// none). Sweep 2 computes from L1 without touching memory, so it issues one prefetch per vector
// to bring the next block in meanwhile: the row then streams from memory while the exps run,
// instead of memory and arithmetic taking turns.
//
// kFast: the same sums with fewer instructions, exact only for a block of finite logits whose
// max is not ±0 (nearly every block), which sweep_block checks: sweep 1 takes the max of 16-bit
// logits as integers (max_bits16, no widened copy, so sweep 2 widens from L1 and the block,
// the copy and the next block's prefetched lines no longer crowd a 32 KiB L1), and sweep 2
// leaves out the clamp max(lo, ·), which only −inf logits need. A block it cannot take returns
// s = NaN; a −inf it met makes s or t NaN; sweep_block redoes either on the exact path.
template <typename Tag, bool kEntropy, bool kStats, bool kCollect, bool kFast>
inline Block2 sweep_block_impl(const typename Tag::storage* x, int64_t n, float c,
                               const char* prefetch, int64_t prefetch_bytes, Collect* col) {
  constexpr int W = VecF::size;
  const int64_t nv = n / W * W;
  const int64_t tail = n - nv;
  constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
  // Sweep 1: the block max. On the exact path 16-bit logits are widened once here and kept in
  // an L1-resident fp32 copy for sweep 2.
  constexpr bool k16 = !std::is_same_v<Tag, F32>;
  constexpr bool kWiden = k16 && !kFast;
  alignas(64) float widened[kWiden ? kBlock : 1];
  VecF vtail = VecF::set1(kNegInf);
  float mx;
#if defined(__AVX512BW__)
  if constexpr (kFast && k16) {
    const uint16_t top = max_bits16(x, n);
    mx = load_scalar<Tag>(&top);
    if (tail) vtail = load_tail<Tag>(x + nv, tail);
  } else
#endif
  {
    mx = block_max<Tag, kWiden>(x, n, widened, vtail);
  }
  if constexpr (kFast)  // not finite (NaN, ±inf, an all −inf block) or ±0: the exact path
    if (!std::isfinite(mx) || mx == 0.0f) return {mx, kNaNf, 0.0f, 0.0f, 0.0f};
  [[maybe_unused]] float xcf = kNegInf;  // kCollect: the block's cutoff
  [[maybe_unused]] bool collect = false;
  if constexpr (kCollect) {
    // The cutoff as a float rounded down, so that the float compare keeps every x ≥ it. A NaN
    // max (a NaN row, refused later) collects nothing.
    col->m_run = std::max(col->m_run, mx);
    double ref = col->m_run;
    if (col->by_lse && col->lse_run > ref) ref = col->lse_run;  // T·log Σ ≥ max
    const double xc = ref + col->rel;
    xcf = float(xc);
    if (double(xcf) > xc) xcf = std::nextafter(xcf, kNegInf);
    collect = !std::isnan(xcf) && xcf != std::numeric_limits<float>::infinity();
    if (collect && mx == kNegInf)  // a block of −inf only (returns below): a plain scan
      for (int64_t j = 0; j < n; ++j)
        if (load_scalar<Tag>(x + j) >= xcf) col->push(col->base + j, load_scalar<Tag>(x + j));
  }
  if (mx == kNegInf) {
    // Only −inf and NaN (which the max may have skipped): the block adds nothing, unless a NaN
    // is there to poison the row. Rare, so a plain scan.
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) nan |= std::isnan(load_scalar<Tag>(x + j));
    const float s = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    return {kNegInf, s, 0.0f, 0.0f, nan ? s : kNegInf};
  }

  // Sweep 2 (from L1): accumulate relative to the block max. r = x − mx ≤ 0 is exact for
  // nearby values (Sterbenz) and d = r·c never overflows, whatever the magnitude of x or 1/T.
  const VecF C = VecF::set1(c), M = VecF::set1(mx), lo = VecF::set1(kExp2Min);
  [[maybe_unused]] const VecF XC = VecF::set1(xcf);
  VecF s = VecF::set1(0.0f), t = s, u = s, rel = s;
  // `clamp`: max(lo, ·) keeps −inf logits finite (their 2^d is 0, so 2^d·d stays 0, not
  // NaN); NaN logits (and +inf ones, for which r = inf − inf) pass through and poison the row.
  // kFast leaves it out of the main loop: any finite d below lo gives 2^d = 0 as lo does, and
  // a −inf logit there makes s or t NaN (sweep_block then redoes the block) or, without t,
  // adds 0 as the clamp would. The tail's −inf padding is always clamped.
  auto step = [&](VecF xv, bool clamp) {
    const VecF r = xv - M;
    VecF d = clamp ? VecF::max(lo, r * C) : r * C;
    VecF e = VecF::exp2(d);
    s = s + e;
    if constexpr (kEntropy) t = VecF::fma(e, d, t);
    if constexpr (kStats) u = VecF::fma(e, e, u);
    return r;
  };
  const char* pf = prefetch;
  const char* const pf_end = prefetch ? prefetch + prefetch_bytes : nullptr;
  auto prefetch_line = [&] {
    if (pf < pf_end) {
      prefetch_l1(pf);
      pf += 64;
    }
  };
  auto sweep2 = [&](auto&& each) {
    for (int64_t i = 0; i < nv; i += W) {
      prefetch_line();
      const VecF xv = kWiden ? VecF::load(widened + i) : VecF::load(x + i, Tag{});
      const VecF r = step(xv, !kFast);
      if constexpr (kStats) rel = rel + r;
      each(xv, i);
    }
  };
  auto nothing = [](VecF, int64_t) {};
  if constexpr (kCollect) {
    if (collect) {
      // The count in a register: stores through the outputs could alias col->n.
      int64_t cn = col->n;
      int32_t* const out = col->out;
      float* const vals = col->vals;
      const int32_t base = int32_t(col->base);
      sweep2([&](VecF xv, int64_t at) {
        cn += xv.compress_ge(XC, base + int32_t(at), out + cn, vals + cn);
      });
      col->n = cn;
    } else {
      sweep2(nothing);
    }
  } else {
    sweep2(nothing);
  }
  float rel_sum = 0.0f;
  if (tail) {
    if constexpr (kCollect)
      if (collect)
        for (int64_t j = nv; j < n; ++j)
          if (load_scalar<Tag>(x + j) >= xcf) col->push(col->base + j, load_scalar<Tag>(x + j));
    step(vtail, true);  // the −inf padding adds 0 to s, t, u; rel takes the real elements only
    if constexpr (kStats)
      for (int64_t j = nv; j < n; ++j) rel_sum += load_scalar<Tag>(x + j) - mx;
  }
  if constexpr (kStats) rel_sum += rel.reduce_add();
  return {mx, s.reduce_add(), t.reduce_add(), u.reduce_add(), rel_sum};
}

// One block's summary (sweep_block_impl): the kFast path where the ISA has it, and the exact
// path for the blocks kFast leaves (s or t NaN), with the same bits as the exact path alone. A
// redone block restores what kFast did to `col`; it is in L1, so nothing is prefetched again.
// `try_fast` (per row, nullable): cleared when a block's fast sweep 2 was wasted on a −inf,
// and then the exact path at once. A row masked to −inf throughout (processed logits) holds
// −inf in every block; it pays for one wasted sweep, not one a block.
template <typename Tag, bool kEntropy, bool kStats, bool kCollect = false>
inline Block2 sweep_block(const typename Tag::storage* x, int64_t n, float c,
                          const char* prefetch = nullptr, int64_t prefetch_bytes = 0,
                          Collect* col = nullptr, bool* try_fast = nullptr) {
#if defined(__AVX512BW__)
  if (try_fast && !*try_fast)
    return sweep_block_impl<Tag, kEntropy, kStats, kCollect, false>(x, n, c, prefetch,
                                                                    prefetch_bytes, col);
  int64_t col_n = 0;
  float col_m = kNegInf;
  if constexpr (kCollect) {
    col_n = col->n;
    col_m = col->m_run;
  }
  const Block2 fast = sweep_block_impl<Tag, kEntropy, kStats, kCollect, true>(
      x, n, c, prefetch, prefetch_bytes, col);
  // a −inf logit makes s NaN (2^−inf computed as NaN) or, where 2^−inf came out 0, only t
  // (0 · −inf): without the entropy the block's sums are then the exact path's already
  if (!std::isnan(fast.s) && !(kEntropy && std::isnan(fast.t))) return fast;
  // (a NaN s from sweep 1's early return costs nothing to redo: the row may stay fast)
  if (try_fast && std::isfinite(fast.mx) && fast.mx != 0.0f) *try_fast = false;
  if constexpr (kCollect) {
    col->n = col_n;
    col->m_run = col_m;
  }
  prefetch = nullptr;
  prefetch_bytes = 0;
#endif
  return sweep_block_impl<Tag, kEntropy, kStats, kCollect, false>(x, n, c, prefetch,
                                                                  prefetch_bytes, col);
}

// Folds the logits x[0, n) of one row into its running summary `row`. `xsum` (kStats)
// accumulates Σ(x − max). Any blocking of a row gives the same merge order for the same n, so
// results are reproducible; rows never interact. `next_row` (nullable, n logits long) is
// prefetched while the last block is computed.
template <typename Tag, bool kEntropy, bool kStats, bool kCollect = false>
inline void accumulate_row(const typename Tag::storage* x, int64_t n, const RowScale& sc,
                           RowState& row, double c,
                           const typename Tag::storage* next_row = nullptr,
                           Collect* col = nullptr) {
  using storage = typename Tag::storage;
  bool try_fast = true;
  for (int64_t b = 0; b < n; b += kBlock) {
    const bool last = b + kBlock >= n;
    const int64_t nb = std::min(kBlock, n - b);
    const storage* ahead = last ? next_row : x + b + kBlock;
    const int64_t ahead_n = last ? (next_row ? std::min(kBlock, n) : 0)
                                 : std::min(kBlock, n - b - kBlock);
    if constexpr (kCollect) {
      col->base = b;
      if (row.s > 0.0) col->lse_run = row.m + std::log(row.s) / sc.inv_t;
    }
    const Block2 blk = sweep_block<Tag, kEntropy, kStats, kCollect>(
        x + b, nb, sc.c, reinterpret_cast<const char*>(ahead),
        ahead_n * int64_t(sizeof(storage)), col, &try_fast);
    if constexpr (kCollect)
      if (col->block_s) {
        col->block_mx[b / kBlock] = blk.mx;
        col->block_s[b / kBlock] = blk.s;
      }
    // Base 2 → natural units: t = t2 ln2 (s and u are unitless).
    // Σ(x − c) = Σ(x − m_b) + n_b (m_b − c), in double (−inf for a block of −inf only).
    const double zsum = kStats ? double(blk.rel) + double(nb) * (double(blk.mx) - c) : 0.0;
    const RowState part{blk.mx, blk.s, double(blk.t) * kLn2, blk.u, zsum};
    row = softmax_stats_merge(row, part, sc.inv_t);
  }
}

// float64 logits (tests, gradcheck): the same summary in plain double arithmetic.
template <bool kStats>
inline void accumulate_row_f64(const double* x, int64_t n, double inv_t, RowState& row,
                               double c) {
  double mx = kNegInfD;
  bool nan = false;
  for (int64_t v = 0; v < n; ++v) {
    nan |= std::isnan(x[v]);
    mx = std::max(mx, x[v]);
  }
  RowState part{mx, 0.0, 0.0, 0.0, 0.0};
  if (nan || mx == -kNegInfD) {  // NaN or +inf: the row is NaN
    part.s = part.zsum = kNaN;
  } else if (mx == kNegInfD) {  // all −inf: nothing to add but −inf to Σx
    part.zsum = kNegInfD;
  } else {
    for (int64_t v = 0; v < n; ++v) {
      const double r = x[v] - mx;
      const double d = r * inv_t;
      const double e = std::exp(d);
      part.s += e;
      if (e > 0.0) part.t += e * d;
      part.u += e * e;
      if constexpr (kStats) part.zsum += x[v] - c;
    }
  }
  row = softmax_stats_merge(row, part, inv_t);
}

// What one row's gradient is formed from (natural units), with z'_v = (x_v − shift)/T:
//   grad_v = p_v (g_ent (e_z − z'_v) + c) / T + [v = y] g_lp / T,   p_v = exp(z'_v − ref),
// e_z = E_p[z'], c = g_lse − g_lp. The shift is 0 (ref = the forward's lse, e_z = lse −
// entropy) or the row max (ref = log s, e_z = t / s, recomputed). e_z − z'_v is formed first:
// it cancels exactly where it should (a row of one logit, or all equal: 0), rather than leaving
// the rounding of two products that huge weights would amplify in the fused linear op.
struct RowGrad {
  double shift, ref, e_z, c, g_ent, g_lp;
};

// 1/T as the float the vectorised backward scales x − shift by, kept normal and finite (as c:
// 1/T = 0 would turn a −inf logit into −inf · 0 = NaN).
inline float inv_t_float(const RowScale& sc) {
  return float(std::clamp(sc.inv_t, double(FLT_MIN), double(FLT_MAX)));
}

// Writes the gradient of one row (or vocab tile) x[0, n) into g[0, n) (g may alias x).
// y_local is the label's index inside [0, n), or outside it when the label lies in another
// tile (then no label term here).
template <typename Tag>
inline void grad_row(const typename Tag::storage* x, typename Tag::storage* g, int64_t n,
                     int64_t y_local, const RowGrad& rg, const RowScale& sc) {
  constexpr int W = VecF::size;
  // ref·log2(e) split into hi + lo so that 2^(r c − ref2) keeps ~fp32 accuracy for large ref.
  const double ref2 = rg.ref * kLog2e;
  const float ref2_hi = float(ref2), ref2_lo = float(ref2 - double(ref2_hi));
  const bool has_label = y_local >= 0 && y_local < n;
  const double x_y = has_label ? load_scalar<Tag>(x + y_local) : 0.0;  // read before writes

  // grad = p (G (E − z') + A) with G = g_ent/T, A = c/T. Where p = 0, z' may be anything down
  // to −inf: it is clamped 200 below ref (p < e^-200 is 0 in float), which keeps E − z'
  // finite there (0 · finite = 0) and changes no other entry; NaN passes through.
  const VecF C = VecF::set1(sc.c), H = VecF::set1(ref2_hi), NegLo = VecF::set1(-ref2_lo);
  const VecF S = VecF::set1(float(rg.shift)), lo = VecF::set1(kExp2Min);
  const VecF IT = VecF::set1(inv_t_float(sc)), Zlo = VecF::set1(float(rg.ref - 200.0));
  const VecF E = VecF::set1(float(rg.e_z)), G = VecF::set1(float(rg.g_ent * sc.inv_t));
  const VecF A = VecF::set1(float(rg.c * sc.inv_t));
  auto grad = [&](VecF xv) {
    const VecF r = xv - S;
    const VecF p = VecF::exp2_short(VecF::max(lo, VecF::fms(r, C, H) + NegLo));
    const VecF z = VecF::max(Zlo, r * IT);
    return p * VecF::fma(E - z, G, A);
  };
  const int64_t nv = n / W * W;
  int64_t i = 0;
  for (; i + 2 * W <= nv; i += 2 * W)  // pairs: one store for both on AVX2 bf16
    store_pair<Tag>(g + i, grad(VecF::load(x + i, Tag{})), grad(VecF::load(x + i + W, Tag{})));
  for (; i < nv; i += W) grad(VecF::load(x + i, Tag{})).store(g + i, Tag{});
  if (nv < n) {
    alignas(64) float buf[W];
    grad(load_tail<Tag>(x + nv, n - nv)).store(buf, F32{});
    for (int64_t j = nv; j < n; ++j) store_scalar<Tag>(g + j, buf[j - nv]);
  }
  if (has_label) {
    // In double; a label on a −inf logit has p_y = 0 and only the g_lp term (0·∞ is avoided).
    const double z_y = (x_y - rg.shift) * sc.inv_t;
    const double p_y = std::exp(z_y - rg.ref);
    const double term = p_y > 0.0 ? p_y * (rg.g_ent * (rg.e_z - z_y) + rg.c) : 0.0;
    store_scalar<Tag>(g + y_local, float((term + rg.g_lp) * sc.inv_t));
  }
}

inline void grad_row_f64(const double* x, double* g, int64_t n, int64_t y_local,
                         const RowGrad& rg, double inv_t) {
  for (int64_t v = 0; v < n; ++v) {
    const double z = (x[v] - rg.shift) * inv_t;
    const double p = std::exp(z - rg.ref);
    // The label's two terms are added before 1/T scales them: g_lp (1 − p_y) cancels there,
    // exactly when p_y = 1, rather than leaving the rounding of two products of size 1/T.
    const double label = v == y_local ? rg.g_lp : 0.0;
    g[v] = ((p > 0.0 ? p * (rg.g_ent * (rg.e_z - z) + rg.c) : p * (rg.g_ent + rg.c)) + label)
           * inv_t;
  }
}

// -------------------------------------------------------------------------------------------
// One row function for every dtype: float64 logits (tests, gradcheck) take plain double
// arithmetic, the others the vectorised blocks above; these wrappers pick the path so that the
// row loops of the kernels are written once.

// Storage tag of float64 logits.
struct F64 {
  using storage = double;
};

template <typename Tag>
constexpr bool kIsF64 = std::is_same_v<Tag, F64>;

// The accumulation (and output) type of a dtype: double for float64 logits, float otherwise.
template <typename Tag>
using acc_of = std::conditional_t<kIsF64<Tag>, double, float>;

template <typename Tag>
inline acc_of<Tag> load_logit(const typename Tag::storage* x) {
  if constexpr (kIsF64<Tag>) return *x;
  else return load_scalar<Tag>(x);
}

// Sets g[0, n) to `value` (0 for ignored rows, NaN for rows that have no valid gradient).
template <typename Tag>
inline void fill_row(typename Tag::storage* g, int64_t n, float value) {
  if constexpr (kIsF64<Tag>) {
    std::fill(g, g + n, double(value));
  } else if (value == 0.0f) {
    std::fill(g, g + n, typename Tag::storage(0));  // +0.0 is all-zero bits in every format
  } else {
    for (int64_t j = 0; j < n; ++j) store_scalar<Tag>(g + j, value);
  }
}

// Folds x[0, n) into the running summary `row` (its zsum = Σ(x − c) only with kStats).
template <typename Tag, bool kEntropy, bool kStats>
inline void fold_row(const typename Tag::storage* x, int64_t n, const RowScale& sc,
                     RowState& row, double c = 0.0,
                     const typename Tag::storage* next_row = nullptr) {
  if constexpr (kIsF64<Tag>) accumulate_row_f64<kStats>(x, n, sc.inv_t, row, c);
  else accumulate_row<Tag, kEntropy, kStats>(x, n, sc, row, c, next_row);
}

// The backward of a row with a moderate lse: the shift 0 and ref = the forward's lse (its
// rounding moves p by at most |lse|·2^-24 relatively); E_p[z] = lse − entropy.
inline constexpr double kBwdLseBound = logprobs::kBwdLseBound;

// RowGrad from a complete summary (the exact path): shift = the row max, ref = log s,
// E_p[z'] = t / s. False when the row's gradient is undefined (NaN, +inf or all −inf).
inline bool row_grad_from_state(const RowState& row, double g_lp, double g_ent, double g_lse,
                                RowGrad* rg) {
  if (!(row.s > 0.0)) return false;  // NaN (NaN / +inf logits) or 0 (all −inf)
  *rg = {row.m, std::log(row.s), row.t / row.s, g_lse - g_lp, g_ent, g_lp};
  return true;
}

// The upstream gradients of row r (acc_of<Tag> arrays; an absent one is 0).
struct RowUpstream {
  double lse, entropy, g_lp, g_ent, g_lse;
};

template <typename Tag>
inline RowUpstream upstream(const logprobs::GradInputs& in, int64_t r) {
  auto get = [r](const void* p) {
    return p ? double(static_cast<const acc_of<Tag>*>(p)[r]) : 0.0;
  };
  return {get(in.lse), in.grad_entropy ? get(in.entropy) : 0.0, get(in.grad_logprobs),
          get(in.grad_entropy), get(in.grad_lse)};
}

// RowGrad of row r of a backward over whole rows: from the saved lse when it is moderate, else
// from the row's summary, recomputed (one more read of the row). False: the gradient row is
// undefined (NaN lse: a NaN / +inf row; or an all −inf row).
template <typename Tag>
inline bool row_grad_of(const typename Tag::storage* x, int64_t n,
                        const logprobs::GradInputs& in, int64_t r, const RowScale& sc,
                        RowGrad* rg) {
  const RowUpstream u = upstream<Tag>(in, r);
  if (std::isnan(u.lse)) return false;
  if (std::abs(u.lse) < kBwdLseBound) {
    *rg = {0.0, u.lse, u.lse - u.entropy, u.g_lse - u.g_lp, u.g_ent, u.g_lp};
    return true;
  }
  RowState row = softmax_stats_empty<double>();
  fold_row<Tag, true, false>(x, n, sc, row);
  return row_grad_from_state(row, u.g_lp, u.g_ent, u.g_lse, rg);
}

// grad_row / grad_row_f64 by dtype.
template <typename Tag>
inline void grad_row_any(const typename Tag::storage* x, typename Tag::storage* g, int64_t n,
                         int64_t y_local, const RowGrad& rg, const RowScale& sc) {
  if constexpr (kIsF64<Tag>) grad_row_f64(x, g, n, y_local, rg, sc.inv_t);
  else grad_row<Tag>(x, g, n, y_local, rg, sc);
}

// Runs fn(tag, begin, end) over the rows [0, n) in parallel chunks (grain_rows(V) rows each),
// `tag` being the storage tag of `dtype` (BF16, F16, F32 or F64).
template <typename Fn>
void parallel_rows(DType dtype, int64_t n, int64_t V, const Fn& fn) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t b, int64_t e) {
    switch (dtype) {
      case DType::kBFloat16: fn(BF16{}, b, e); break;
      case DType::kFloat16: fn(F16{}, b, e); break;
      case DType::kFloat32: fn(F32{}, b, e); break;
      case DType::kFloat64: fn(F64{}, b, e); break;
    }
  });
}

}  // namespace rlkern::cpu
