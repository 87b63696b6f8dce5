// The kept set of the sampler's filters for one row (ALGORITHMS.md §4), shared by the CPU
// sampler (sample.cpp) and the truncated token log-probs (truncated_logprobs.cpp): both call
// filter_row() and read the kept set and its mass through the functions below, so a drawn
// token's processed log-prob and the truncated log-prob of the same label are bitwise equal.
//
// Every filter keeps a prefix of the order "z descending, index ascending" (z = (x − max x)/T;
// top-k: k tokens; top-p: the shortest prefix whose mass reaches p·S; min-p: the tokens with
// w = exp(z) ≥ min_p), so the kept set is the prefix of the smallest length M. The search
// never sorts or scans the row more than it must: the row's summary comes from one read, and
// the selection runs on a short list of candidates that provably holds the kept set.
//
//  1. The fold of token_logprobs (logprobs_row.h: one read of the logits, blocks in L1) gives
//     max x, S = Σ w and Σ w z. Without top-k it also collects candidates on the way (a compare
//     per vector in the L1 sweep): min-p alone those with w ≥ min_p; top-p alone those with
//     w/S ≥ g, g a guess from the thread's previous row (its kept threshold ÷ 16; the bound
//     (1 − p)/(2V) at first), both against running values of the max and of T·log Σ exp(x/T),
//     which only undershoot.
//  2. The candidate list C, then:
//       min-p alone: C = {w ≥ min_p}, the kept set itself;
//       top-p alone: C narrows to L_j = {w ≥ 2^-j} for the smallest j whose tokens weigh
//              ≥ p·S (narrow_by_mass: masses per binary exponent of w, double sums in index
//              order), among the levels the guess's list holds whole. If none does, a second
//              sweep of the row (from L2) collects w ≥ (1 − p)·S/(2V): the tokens below weigh
//              less than (1 − p)·S/2, so that set holds mass > p·S and a level L_j in it always
//              reaches p·S (p within 1e-6 of 1: every token). L_j is the same set whatever list
//              it came from, so the sampler and the log-probs — whose guesses differ — search
//              the same candidates;
//       top-k (alone or with the others): the fold collects x ≥ T·log Σ exp(x/T) + rel_k
//              (running values; rel_k from the thread's previous top-k row). If fewer than k
//              tokens lie above the final reference's cutoff, one sweep (from L2) collects
//              x ≥ the r-th largest of a strided sample of the row, r chosen so that about
//              k + 4·stride tokens lie above it (every token if fewer than k do). The k largest
//              tokens are all any order of the filters needs: top-k first keeps a subset of
//              them; joint, a top-p prefix longer than the list is longer than k.
//  3. A radix select over C (three histogram levels of 11/11/10 bits of the fp32 order key of
//     z; ties at the threshold in index order) gives M and the threshold.
//  4. The kept tokens (index order) with their z and w, and S_kept = Σ_kept w as per-block sums
//     (kSumBlock entries of the kept list), the sums the draw walks.
//
// On the bench's peaked rows (V = 151,936, σ = 4, T = 0.7; bench/profile/rows.cpp) top-p 0.9
// collected ~480 candidates and narrowed them to ~40, top-k 50 ~380 (from the strided-sample
// cutoff); a flat
// row can put every token in C, at the cost of a full-row selection. With no filter active, or
// when the filters keep every token (M = V), the kept set is the row: folded_row() logs the
// fold's per-block sums for the draw, and the log-probs are the fold's (the raw ones'
// expression). float64 logits and the backward form z and w over the whole row (sample_row.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/sample_row.h"

namespace rlkern::cpu::sampler {

// What filter_row() leaves besides the scratch rows.
struct KeptRow {
  double xmax;    // the raw max: NaN (NaN / +inf logits) or −inf (all −inf): not `ok`
  double S;       // Σ_v w_v over the row (w = exp(z), z = (x − xmax)/T ≤ 0)
  double log_s;   // log S
  double ent_t;   // Σ_v w_v z_v over the row
  double S_kept;  // Σ over the kept set
  int64_t M;      // size of the kept set
  bool ok;        // the row can be sampled (finite max, S not NaN)
  bool all;       // the kept set is the whole row (s.z, s.w, s.block); else s.ki / s.kz / s.kw
  bool folded;    // `fold` holds the row's token-logprobs summary at the row's temperature
  RowState fold;
  double inv_t;     // 1 / T
  float c;          // log2(e)/T as the fold's sweeps use it
  const void* row;  // the row's logits (folded whole rows: kept_logprob reads the label's)
  DType dtype;
};

// Logit v of a row, widened exactly.
inline double logit_at(const void* row, DType dtype, int64_t v) {
  switch (dtype) {
    case DType::kFloat64: return static_cast<const double*>(row)[v];
    case DType::kFloat32: return static_cast<const float*>(row)[v];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[v]);
    default: return f16_to_float(static_cast<const uint16_t*>(row)[v]);
  }
}

// Candidates {v : x_v ≥ xc} into s.ci / s.cz / s.ck / s.cw in index order, z and w formed as
// sample_row.h forms them for the whole row (the same operations, so the same bits); returns
// their number. Searched: the whole row, or (pre ≥ 0) the first `pre` indices already in s.ci
// (a superset collected during the fold), filtered in place.
template <typename Tag>
inline int64_t collect_candidates(const typename Tag::storage* x, int64_t V, double mx,
                                  double inv_t, double xc, Scratch& s, int64_t pre = -1) {
  int32_t* ci = s.ci.data();
  float* cz = s.cz.data();
  int64_t n = 0;
  if constexpr (kIsF64<Tag>) {
    for (int64_t v = 0; v < V; ++v)
      if (x[v] >= xc) {
        ci[n] = int32_t(v);
        cz[n++] = float((x[v] - mx) * inv_t);
      }
  } else {
    // xc rounded down to a float, so that the float compare keeps every x ≥ xc.
    float xcf = float(xc);
    if (double(xcf) > xc) xcf = std::nextafter(xcf, -std::numeric_limits<float>::infinity());
    const VecF XC = VecF::set1(xcf);
    float* cx = s.cx.data();
    if (pre >= 0 && xcf == -std::numeric_limits<float>::infinity()) {
      n = pre;
    } else if (pre >= 0) {  // in place: entry j moves to n ≤ j, after its vector is loaded
      std::fill(cx + pre, cx + pre + W, -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < pre; j += W)
        n += VecF::load(cx + j).compress_ge_ids(XC, ci + j, ci + n, cx + n);
    } else {
      const int64_t nv = V / W * W;
      for (int64_t i = 0; i < nv; i += W)
        n += VecF::load(x + i, Tag{}).compress_ge(XC, int32_t(i), ci + n, cx + n);
      for (int64_t v = nv; v < V; ++v)
        if (load_scalar<Tag>(x + v) >= xcf) {
          ci[n] = int32_t(v);
          cx[n++] = load_scalar<Tag>(x + v);
        }
    }
    // z = (x − max)·(1/T) as load_shifted forms it (float operations, so the same bits).
    const VecF M = VecF::set1(float(mx)), C = VecF::set1(std::clamp(float(inv_t), FLT_MIN, FLT_MAX));
    for (int64_t j = 0; j < n; j += W) ((VecF::load(cx + j) - M) * C).store(cz + j, F32{});
  }
  // w as exp_row forms it (padding z = −inf gives w = 0).
  const int64_t np = (n + W - 1) / W * W;
  std::fill(cz + n, cz + np, kNegInf);
  for (int64_t j = 0; j < np; j += W)
    VecF::exp2(weight_exponent(VecF::load(cz + j))).store(s.cw.data() + j, F32{});
  for (int64_t j = 0; j < n; ++j) s.ck[j] = rlkern::sample::order_key(cz[j]);
  return n;
}

// The top-k cutoff logit: the r-th largest of a strided sample of the row, r chosen so that
// about k + 4·stride tokens lie above it (−inf: take every token).
template <typename Tag>
inline double top_k_cutoff(const typename Tag::storage* x, int64_t V, int64_t k, Scratch& s) {
  const int64_t stride = std::max<int64_t>(1, V / 2048);
  s.sample.clear();
  for (int64_t v = 0; v < V; v += stride) {
    if constexpr (kIsF64<Tag>) s.sample.push_back(float(x[v]));
    else s.sample.push_back(load_scalar<Tag>(x + v));
  }
  const int64_t n = int64_t(s.sample.size());
  const int64_t r = (k * n + V - 1) / V + 4;
  if (r > n) return -std::numeric_limits<double>::infinity();
  std::nth_element(s.sample.begin(), s.sample.begin() + (r - 1), s.sample.end(),
                   std::greater<float>());
  // float64 logits were sampled as floats: step below the rounding.
  const double c = s.sample[r - 1];
  return kIsF64<Tag> ? c - std::abs(c) * 1e-6 - 1e-30 : c;
}

// Keeps the candidates i < n with keep(i), in place and in index order; returns their number.
template <typename Keep>
inline int64_t compact_candidates(int64_t n, const Keep& keep, Scratch& s) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keep(i)) {
      s.ci[m] = s.ci[i];
      s.cz[m] = s.cz[i];
      s.ck[m] = s.ck[i];
      s.cw[m++] = s.cw[i];
    }
  return m;
}

// Top-p alone: narrows the n candidates (in place, index order kept) to L_j = {w ≥ 2^-j} for
// the smallest j whose tokens weigh ≥ target (with a 1e-9 relative margin), looking only at
// levels j ≤ j_max: those the candidates are known to hold whole. The masses come from one
// pass: each token's level is its weight's binary exponent, each level's mass a double sum in
// index order, so a level's mass — and j — do not depend on which lower tokens the candidates
// also hold: the narrowed set is the same for every candidate set that holds L_j whole (the
// sampler and the log-probs may start from different ones). Returns the new count, or −1 when
// no level up to j_max reaches the target.
inline int64_t narrow_by_mass(int64_t n, double target, int j_max, Scratch& s) {
  constexpr int kLevels = 64;
  j_max = std::min(j_max, kLevels - 1);
  if (j_max < 0) return -1;
  double mass[kLevels] = {};
  const float* cw = s.cw.data();
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, cw + i, 4);
    const int level = 127 - int(b >> 23);  // w ∈ [2^-level, 2^(1-level)); w ≤ 1, ≥ 0
    if (level <= j_max) mass[level] += cw[i];
  }
  double acc = 0.0;
  int j = 0;
  for (; j <= j_max; ++j) {
    acc += mass[j];
    if (acc >= target * (1.0 + 1e-9)) break;
  }
  if (j > j_max) return -1;
  const float t = std::ldexp(1.0f, -j);
  return compact_candidates(n, [&](int64_t i) { return cw[i] >= t; }, s);
}

// The deepest level j with 2^-j ≥ w_c·(1 + 1e-6): the levels a candidate set holding every
// token with w ≥ w_c holds whole.
inline int levels_held(double wc) {
  if (!(wc > 0.0)) return 1 << 20;
  return int(std::floor(-std::log2(wc * (1.0 + 1e-6))));
}

// The float whose order key is `key` (rlkern::sample::order_key's inverse).
inline float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Sel {
  uint32_t key;      // the threshold's order key (of the last kept token's z)
  int64_t count_gt;  // candidates with a larger key
  double mass_gt;    // Σ w over them
  int64_t count_eq;  // candidates with this key
  float w_eq;        // w of one such token
};

// Largest threshold key t with measure(key ≥ t) ≥ target over the n candidates (keys, weights),
// measure = count (kByMass false) or Σ w (true). Radix select over the key bits, most
// significant first; after each level the candidates narrow to the chosen bin.
//
// The histograms (s.hist_count, s.hist_mass: 2048 bins, 32 KiB together, a whole L1) stay zero
// between calls; a level visits only the bins between its candidates' lowest and highest and
// then clears just those. Clearing and scanning all 2048 bins at each of the three levels cost
// more than the few hundred candidates themselves. The non-empty bins are visited in the same
// order as a full scan, so the sums, and the result, are the same.
template <bool kByMass>
inline Sel radix_select(const uint32_t* keys, const float* ws, int64_t n, double target,
                        Scratch& s) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7FFu, 0x7FFu, 0x3FFu};
  int64_t* hc = s.hist_count.data();
  double* hm = s.hist_mass.data();
  int64_t count_gt = 0;
  double mass_gt = 0.0;
  for (int level = 0; level < 3; ++level) {
    const int sh = kShift[level];
    const uint32_t mk = kMask[level];
    uint32_t lowest = mk, highest = 0;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t b = (keys[j] >> sh) & mk;
      hc[b] += 1;
      hm[b] += ws[j];  // mass is needed in count mode too (prefix_mass)
      lowest = std::min(lowest, b);
      highest = std::max(highest, b);
    }
    uint32_t chosen = lowest;
    for (uint32_t b = highest; b > lowest; --b) {
      if (!hc[b]) continue;
      const double meas = kByMass ? hm[b] : double(hc[b]);
      const double acc = kByMass ? mass_gt : double(count_gt);
      if (acc + meas >= target) {
        chosen = b;
        break;
      }
      count_gt += hc[b];
      mass_gt += hm[b];
    }
    if (lowest <= highest) {  // (n ≥ 1 always: the row's max is a candidate)
      std::fill(hc + lowest, hc + highest + 1, 0);
      std::fill(hm + lowest, hm + highest + 1, 0.0);
    }
    s.nk2.clear();
    s.nw2.clear();
    for (int64_t j = 0; j < n; ++j)
      if (((keys[j] >> sh) & mk) == chosen) {
        s.nk2.push_back(keys[j]);
        s.nw2.push_back(ws[j]);
      }
    std::swap(s.nk, s.nk2);
    std::swap(s.nw, s.nw2);
    keys = s.nk.data();
    ws = s.nw.data();
    n = int64_t(s.nk.size());
  }
  return {keys[0], count_gt, mass_gt, n, ws[0]};
}

// Mass of the prefix of length M (M ≤ n) of the candidates' order.
inline double prefix_mass(int64_t n, int64_t M, Scratch& s) {
  const Sel sel = radix_select<false>(s.ck.data(), s.cw.data(), n, double(M), s);
  return sel.mass_gt + double(M - sel.count_gt) * sel.w_eq;
}

// The kept list: the candidates with key > sel.key, and the first M − count_gt with key ==
// sel.key (index order); S_kept from its block sums.
inline double list_kept(int64_t n, const Sel& sel, int64_t M, Scratch& s) {
  s.ki.clear();
  s.kz.clear();
  s.kw.clear();
  int64_t ties = M - sel.count_gt;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = s.ck[j];
    if (key > sel.key || (key == sel.key && ties-- > 0)) {
      s.ki.push_back(s.ci[j]);
      s.kz.push_back(s.cz[j]);
      s.kw.push_back(s.cw[j]);
    }
  }
  const int64_t m = int64_t(s.kw.size());
  s.kblock.assign((m + kSumBlock - 1) / kSumBlock, 0.0);
  double S_kept = 0.0;
  for (int64_t b = 0; b < int64_t(s.kblock.size()); ++b) {
    double acc = 0.0;
    for (int64_t j = b * kSumBlock; j < std::min(m, (b + 1) * kSumBlock); ++j) acc += s.kw[j];
    s.kblock[b] = acc;
    S_kept += acc;
  }
  return S_kept;
}

// The whole row as the kept set: z and w over the row (sample_row.h), S_kept = S.
inline KeptRow whole_row(const void* row, DType dtype, int64_t V, double temperature,
                         Scratch& s) {
  const int64_t Vp = (V + W - 1) / W * W;
  KeptRow k{};
  k.xmax = load_shifted(row, dtype, V, 1.0 / temperature, s.z.data());
  if (!std::isfinite(k.xmax)) return k;  // NaN or +inf logits, or all −inf
  k.S = exp_row(s.z.data(), s.w.data(), Vp, s.block.data(), &k.ent_t);
  if (std::isnan(k.S)) {  // a NaN the max skipped
    k.xmax = std::numeric_limits<double>::quiet_NaN();
    return k;
  }
  k.ok = k.all = true;
  k.log_s = std::log(k.S);
  k.M = V;
  k.S_kept = k.S;
  return k;
}

// The row's fold (fold_row; with `col`, collecting candidates on the way), with Σ w·z for the
// entropy only when `entropy`: the max and S are the same bits either way.
template <typename Tag, bool kEntropy>
inline void fold_kept_as(const typename Tag::storage* x, int64_t V, const RowScale& sc,
                         RowState& st, Collect* col) {
  if constexpr (!kIsF64<Tag>) {
    if (col != nullptr) {
      accumulate_row<Tag, kEntropy, false, true>(x, V, sc, st, 0.0, nullptr, col);
      return;
    }
  }
  fold_row<Tag, kEntropy, false>(x, V, sc, st);
}
template <typename Tag>
inline void fold_kept(const typename Tag::storage* x, int64_t V, const RowScale& sc,
                      RowState& st, bool entropy, Collect* col = nullptr) {
  if (entropy) fold_kept_as<Tag, true>(x, V, sc, st, col);
  else fold_kept_as<Tag, false>(x, V, sc, st, col);
}

// Σ w·z of a fold, or NaN where the fold left it out (so that a misuse shows).
inline double fold_entropy_sum(const RowState& st, bool entropy) {
  return entropy ? st.t : std::numeric_limits<double>::quiet_NaN();
}

// The whole row as the kept set, from one read: the fold (its summary gives S, the log-probs
// and, with `entropy`, Σ w·z; NaN without) logs each block's max and sum, and s.kblock gets
// the blocks' masses relative to the row max — the draw walks them and re-forms one block's
// weights. The max and S, hence the draw, do not depend on `entropy`.
template <typename Tag>
inline KeptRow folded_row(const typename Tag::storage* x, DType dtype, int64_t V,
                          double temperature, bool entropy, Scratch& s) {
  if constexpr (kIsF64<Tag>) {
    return whole_row(x, dtype, V, temperature, s);  // float64 (tests): the plain path
  } else {
    KeptRow k{};
    const RowScale sc = row_scale(temperature);
    k.inv_t = sc.inv_t;
    k.c = sc.c;
    k.row = x;
    k.dtype = dtype;
    k.fold = softmax_stats_empty<double>();
    Collect col{std::numeric_limits<double>::infinity(), false, nullptr, nullptr};
    col.block_mx = s.block_mx.data();
    col.block_s = s.block_s.data();
    fold_kept<Tag>(x, V, sc, k.fold, entropy, &col);
    k.folded = true;
    if (!(k.fold.s > 0.0)) {  // NaN (NaN / +inf logits) or 0 (all −inf)
      k.xmax = std::isnan(k.fold.s) ? std::numeric_limits<double>::quiet_NaN() : k.fold.m;
      return k;
    }
    k.ok = k.all = true;
    k.xmax = k.fold.m;
    k.S = k.S_kept = k.fold.s;
    k.log_s = std::log(k.S);
    k.ent_t = fold_entropy_sum(k.fold, entropy);
    k.M = V;
    const int64_t nb = (V + kBlock - 1) / kBlock;
    s.kblock.resize(nb);
    for (int64_t b = 0; b < nb; ++b)
      s.kblock[b] = s.block_s[b] > 0.0f
                        ? double(s.block_s[b]) * std::exp((double(s.block_mx[b]) - k.xmax) * k.inv_t)
                        : 0.0;
    return k;
  }
}

// The whole row as the kept set, by dtype.
inline KeptRow whole_kept(const void* row, DType dtype, int64_t V, const RowFilter& f,
                          Scratch& s) {
  const double T = f.temperature;
  switch (dtype) {
    case DType::kFloat64: return whole_row(row, dtype, V, T, s);
    case DType::kFloat32:
      return folded_row<F32>(static_cast<const float*>(row), dtype, V, T, f.entropy, s);
    case DType::kBFloat16:
      return folded_row<BF16>(static_cast<const uint16_t*>(row), dtype, V, T, f.entropy, s);
    default: return folded_row<F16>(static_cast<const uint16_t*>(row), dtype, V, T, f.entropy, s);
  }
}

// Steps 1–4 of the top of this file for a row with a filter active.
template <typename Tag>
inline KeptRow filtered_row(const typename Tag::storage* x, DType dtype, int64_t V,
                            const RowFilter& f, Scratch& s) {
  KeptRow k{};
  const RowScale sc = row_scale(f.temperature);
  const bool by_k = f.top_k < V, by_p = f.top_p < 1.0, by_min = f.min_p > 0.0;
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t kk = std::max<int64_t>(1, f.top_k);
  const float mp = float(f.min_p);
  // z ≥ log w_c ⇔ x ≥ max x + T log w_c: the cutoff relative to the max, lowered by a margin
  // well above the rounding of z (−inf for w_c = 0: every token).
  auto rel_of = [&](double wc) {
    return wc > 0.0 ? f.temperature * (std::log(wc) * (1.0 + 1e-5) - 1e-3) : -inf;
  };
  // 1–2. The fold; without top-k it collects the candidates of a cutoff w_g on the way (from
  // L1), relative to running values of the max (min-p) or of T·log Σ exp(x/T) (top-p). Top-p's
  // w_g/S starts at the bound (1 − p)/(2V) and then follows the kept threshold of the thread's
  // previous row (÷16): a guess, checked below, that only decides how much is collected.
  k.fold = softmax_stats_empty<double>();
  int64_t pre = -1;
  double guess = 0.0;  // top-p: the collected set holds every token with w ≥ guess·S
  // top-k: the collected set holds every token with x ≥ T·log Σ exp(x/T) + rel_k (a guess from
  // the thread's previous top-k row: its k-th logit below that, ×1.25 and T/2 lower). The
  // reference is the log-sum-exp, not the max: on N(0, 16) rows the max moves ~1.1 logits
  // (s.d.) from row to row and the log-sum-exp less, so fewer rows miss (docs/sampling.md).
  const double rel_k = 1.25 * s.top_k_guess - 0.5 * f.temperature;
  if constexpr (!kIsF64<Tag>) {
    if (by_k && !std::isnan(rel_k)) {
      Collect col{rel_k, true, s.ci.data(), s.cx.data()};
      fold_kept<Tag>(x, V, sc, k.fold, f.entropy, &col);
      pre = col.n;
    } else if (!by_k) {
      const double safe = 1.0 - f.top_p < 1e-6 ? 0.0 : (1.0 - f.top_p) / double(2 * V);
      guess = std::max(safe, s.top_p_guess / 16.0);
      Collect col{rel_of(by_p ? guess : std::min(double(mp), 1.0)), by_p, s.ci.data(),
                  s.cx.data()};
      fold_kept<Tag>(x, V, sc, k.fold, f.entropy, &col);
      pre = col.n;
    }
  }
  if (pre < 0) fold_kept<Tag>(x, V, sc, k.fold, f.entropy);
  k.folded = true;
  if (!(k.fold.s > 0.0)) {  // NaN (NaN / +inf logits) or 0 (all −inf)
    k.xmax = std::isnan(k.fold.s) ? std::numeric_limits<double>::quiet_NaN() : k.fold.m;
    return k;
  }
  k.ok = true;
  k.xmax = k.fold.m;
  k.S = k.fold.s;
  k.log_s = std::log(k.S);
  k.ent_t = fold_entropy_sum(k.fold, f.entropy);

  // 2. Candidates. Top-p: w_c = (1 − p)·S/(2V), min-p alone: w_c = min_p, as logits.
  double wc = inf;
  if (by_p && !by_k) wc = 1.0 - f.top_p < 1e-6 ? 0.0 : (1.0 - f.top_p) * k.S / double(2 * V);
  if (!by_p && !by_k) wc = std::min(double(mp), 1.0);  // the row's max has w = 1 exactly
  const double xc = k.xmax + rel_of(wc);
  int64_t n = 0;
  if (by_k) {
    // The k largest tokens and their ties, C_k, are all any order of the filters needs: top-k
    // first keeps a subset of them; joint, a top-p prefix longer than C_k is longer than k.
    // Collected from the guess's list when it holds k tokens, else by one sweep above a
    // strided-sample cutoff (every token if fewer than k lie above it); C_k is the same set
    // either way.
    // The row's T·log Σ exp(x/T), raised by a margin over the rounding of the fold's running
    // values, each of which set a block's cutoff: every cutoff was at most ref_k + rel_k.
    const double lse = k.xmax + k.log_s * f.temperature;
    const double ref_k = lse + 1e-9 * (std::abs(lse) + f.temperature);
    n = pre >= 0 ? collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, ref_k + rel_k, s, pre) : 0;
    if (n < kk) {
      const double xk = top_k_cutoff<Tag>(x, V, kk, s);
      n = collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, xk, s);
      if (n < kk && xk > -inf) n = collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, -inf, s);
    }
    const Sel sk = radix_select<false>(s.ck.data(), s.cw.data(), n, double(kk), s);
    n = compact_candidates(n, [&](int64_t i) { return s.ck[i] >= sk.key; }, s);
    // (performance only) the k-th logit below the log-sum-exp: z_k·T − T·log S
    s.top_k_guess = (double(key_value(sk.key)) - k.log_s) * f.temperature;
  } else if (!by_p) {
    n = collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, xc, s, pre);
  } else {
    // Narrowed to the level set L_j holding the top-p prefix, the same whatever was collected.
    const double target = f.top_p * k.S;
    n = pre >= 0 ? collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, -inf, s, pre) : -1;
    if (n >= 0) n = narrow_by_mass(n, target, levels_held(guess * k.S), s);
    if (n < 0) {  // the guess collected too little (or float64 logits): the bound's set
      n = collect_candidates<Tag>(x, V, k.xmax, sc.inv_t, xc, s);
      const int64_t m = narrow_by_mass(n, target, levels_held(wc), s);
      if (m >= 0) n = m;
    }
  }

  // 3. The prefix length M of each filter; the smallest wins.
  int64_t M = by_k ? kk : V;
  bool have_sel = false;
  Sel sel{};
  if (by_p) {
    const double base = (f.joint || !by_k) ? k.S : prefix_mass(n, kk, s);
    const double target = f.top_p * base;
    const Sel p = radix_select<true>(s.ck.data(), s.cw.data(), n, target, s);
    // Ties at the threshold are taken in index order while the mass before them is < target.
    int64_t take = p.w_eq > 0.0f ? int64_t(std::ceil((target - p.mass_gt) / double(p.w_eq)))
                                 : p.count_eq;
    take = std::min<int64_t>(std::max<int64_t>(take, 1), p.count_eq);
    if (p.count_gt + take < M) {
      M = p.count_gt + take;
      sel = p;
      have_sel = true;
    }
  }
  if (by_min) {
    // p_v ≥ min_p · max p  ⇔  w_v ≥ min_p. Counting over C suffices: C holds every token with
    // w ≥ min_p, or else more tokens than the other filters keep.
    int64_t cnt = 0;
    for (int64_t j = 0; j < n; ++j) cnt += s.cw[j] >= mp;
    if (std::max<int64_t>(cnt, 1) < M) {
      M = std::max<int64_t>(cnt, 1);
      have_sel = false;
    }
  }
  if (M >= V) return whole_kept(x, dtype, V, f, s);  // every token kept

  // 4. The kept list and its mass.
  if (!have_sel) sel = radix_select<false>(s.ck.data(), s.cw.data(), n, double(M), s);
  k.M = M;
  k.S_kept = list_kept(n, sel, M, s);
  if (by_p && !by_k) s.top_p_guess = double(sel.w_eq) / k.S;  // (performance only)
  return k;
}

// The kept set of one row: see the top of this file. `row` points at the row's first logit.
inline KeptRow filter_row(const void* row, DType dtype, int64_t V, const RowFilter& f,
                          Scratch& s) {
  if (f.top_k >= V && f.top_p >= 1.0 && f.min_p <= 0.0)
    return whole_kept(row, dtype, V, f, s);
  switch (dtype) {
    case DType::kFloat64: return filtered_row<F64>(static_cast<const double*>(row), dtype, V, f, s);
    case DType::kFloat32: return filtered_row<F32>(static_cast<const float*>(row), dtype, V, f, s);
    case DType::kBFloat16: return filtered_row<BF16>(static_cast<const uint16_t*>(row), dtype, V, f, s);
    default: return filtered_row<F16>(static_cast<const uint16_t*>(row), dtype, V, f, s);
  }
}

// log(w_v / S_kept): the log-probability of token v under the kept, renormalised
// distribution — the one expression the sampler's processed log-prob and the truncated
// log-probs both evaluate (−inf for a token outside the kept set).
// A kept token whose weight underflowed to 0 stays finite (rlkern/kept_key.h).
inline float kept_logprob(const Scratch& s, const KeptRow& k, int64_t v) {
  // A folded whole row: (x_v − max)/T − log S, the raw log-prob's expression (sample.cpp).
  if (k.all && k.folded) return float((logit_at(k.row, k.dtype, v) - k.fold.m) * k.inv_t - k.log_s);
  float wv = 0.0f, zv = kNegInf;
  if (k.all) {
    wv = s.w[v];
    zv = s.z[v];
  } else {
    const auto it = std::lower_bound(s.ki.begin(), s.ki.end(), int32_t(v));
    if (it != s.ki.end() && *it == v) {
      wv = s.kw[it - s.ki.begin()];
      zv = s.kz[it - s.ki.begin()];
    }
  }
  return float(rlkern::sample::kept_log_weight(wv, zv) - std::log(k.S_kept));
}

// Σ_K w z over the kept set (tokens of weight 0, where z may be −inf, left out).
inline double kept_moment(const Scratch& s, const KeptRow& k, int64_t V) {
  if (k.all) return k.ent_t;
  double e = 0.0;
  {
    for (size_t j = 0; j < s.ki.size(); ++j)
      if (s.kw[j] > 0.0f) e += double(s.kw[j]) * double(s.kz[j]);
  }
  return e;
}

// The draw over a folded whole row: the block whose cumulative mass first exceeds u·Σ blocks,
// then that block's weights 2^((x − block max)·c) re-formed as the fold formed them, walked in
// 16-lane chunks and then lanes. Rounding that leaves the walk short takes the block's last
// token of nonzero weight (or the last such block's).
template <typename Tag>
inline int64_t draw_folded(Scratch& s, const KeptRow& k, int64_t V, double u) {
  const auto* x = static_cast<const typename Tag::storage*>(k.row);
  const int64_t nb = int64_t(s.kblock.size());
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) total += s.kblock[b];
  const double target = u * total;
  double acc = 0.0;
  int64_t b = 0;
  for (; b < nb - 1; ++b) {
    if (acc + s.kblock[b] > target) break;
    acc += s.kblock[b];
  }
  while (b > 0 && s.kblock[b] <= 0.0) --b;  // a trailing block of −inf only
  const double scale = s.kblock[b] / double(s.block_s[b]);  // 2^… of the block → the row's
  const double local = (target - acc) / scale;
  const int64_t lo_v = b * kBlock, n = std::min(kBlock, V - lo_v);
  const int64_t nv = n / W * W;
  const VecF C = VecF::set1(k.c), M = VecF::set1(s.block_mx[b]);
  const VecF lo = VecF::set1(kExp2Min);
  float* e = s.e.data();
  for (int64_t i = 0; i < nv; i += W)
    VecF::exp2(VecF::max(lo, (VecF::load(x + lo_v + i, Tag{}) - M) * C)).store(e + i, F32{});
  if (nv < n) {
    VecF::exp2(VecF::max(lo, (load_tail<Tag>(x + lo_v + nv, n - nv) - M) * C)).store(e + nv, F32{});
  }
  double a = 0.0;
  int64_t j = 0;
  for (; j + W < nv; j += W) {
    const double c = VecF::load(e + j).reduce_add();
    if (a + c > local) break;
    a += c;
  }
  int64_t tok = -1;
  for (; j < n; ++j) {
    if (!(e[j] > 0.0f)) continue;
    a += e[j];
    tok = lo_v + j;
    if (a > local) break;
  }
  if (tok < 0)
    for (j = n - 1; j >= 0; --j)
      if (e[j] > 0.0f) return lo_v + j;
  return tok;
}

// Inverse-CDF draw over the kept set in vocabulary order for the uniform u: the token whose
// cumulative weight first exceeds u · S_kept (block sums find the block, a scan of one block
// finds the token). Weights walked: the row's w (k.all) or the kept list.
inline int64_t draw(Scratch& s, const KeptRow& k, int64_t V, double u) {
  if (k.all && k.folded) {
    switch (k.dtype) {
      case DType::kFloat32: return draw_folded<F32>(s, k, V, u);
      case DType::kBFloat16: return draw_folded<BF16>(s, k, V, u);
      default: return draw_folded<F16>(s, k, V, u);
    }
  }
  const bool all = k.all;
  const int64_t len = all ? V : int64_t(s.ki.size());
  const float* w = all ? s.w.data() : s.kw.data();
  const double* block = all ? s.block.data() : s.kblock.data();
  const int64_t nb = all ? ((V + W - 1) / W * W + kSumBlock - 1) / kSumBlock
                         : int64_t(s.kblock.size());
  auto token = [&](int64_t j) { return all ? j : int64_t(s.ki[j]); };
  const double target = u * k.S_kept;
  double acc = 0.0;
  int64_t tok = -1;
  int64_t b = 0;
  for (; b < nb - 1; ++b) {
    if (acc + block[b] > target) break;
    acc += block[b];
  }
  const int64_t e = std::min(len, (b + 1) * kSumBlock);
  for (int64_t j = b * kSumBlock; j < e; ++j) {
    if (w[j] <= 0.0f) continue;
    acc += w[j];
    tok = token(j);  // the last kept token seen: the answer if rounding leaves acc ≤ target
    if (acc > target) break;
  }
  if (tok < 0)  // the block's sum rounded above its elements' sum: take the last kept token
    for (int64_t j = len - 1; j >= 0; --j)
      if (w[j] > 0.0f) {
        tok = token(j);
        break;
      }
  return tok;
}

}  // namespace rlkern::cpu::sampler
