// The sampler's per-row building blocks (ALGORITHMS.md §4), shared by the CPU sampler
// (sample.cpp) and the truncated token log-probs (truncated_logprobs.cpp), so that both find
// the kept set — and sum the kept mass — with the same code, in the same order: the processed
// log-prob of a drawn token and the truncated log-prob of the same label are then bitwise equal.
//
// filter_row() forms, for one row: z = (x − max x)/T in an fp32 scratch row, w = exp(z) (fast
// 2^x), S = Σ w and Σ w z over the row; the length M of the kept prefix of the order "value
// descending, index ascending" (top-k / top-p / min-p, radix select over the fp32 order key of
// z, ties in index order); then zeroes w outside the kept set and forms S_kept = Σ_kept w from
// per-block sums (kSumBlock), the sums the draw walks.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/logprobs.h"  // DType
#include "cpu/logprobs_row.h"

namespace rlkern::cpu::sampler {

constexpr int W = VecF::size;
constexpr int64_t kSumBlock = 1024;  // granularity of the block sums used by the draw

// Per-thread scratch: z and w padded to a multiple of W (padding −inf / 0), the block sums,
// and the radix select's candidate lists.
struct Scratch {
  std::vector<float> z, w;
  std::vector<double> block;
  std::vector<uint32_t> ck;
  std::vector<float> cw;
  std::vector<uint32_t> ck2;
  std::vector<float> cw2;

  explicit Scratch(int64_t V) {
    const int64_t Vp = (V + W - 1) / W * W;
    z.resize(Vp);
    w.resize(Vp);
    block.resize((Vp + kSumBlock - 1) / kSumBlock);
  }
};

// Monotone map of a float to uint32 (larger float → larger key).
inline uint32_t float_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename Tag>
inline void load_raw(const typename Tag::storage* x, int64_t V, float* z) {
  const int64_t nv = V / W * W;
  for (int64_t i = 0; i < nv; i += W) VecF::load(x + i, Tag{}).store(z + i, F32{});
  if (nv < V) {
    alignas(64) float buf[W];
    load_tail<Tag>(x + nv, V - nv).store(buf, F32{});
    for (int64_t j = nv; j < V; ++j) z[j] = buf[j - nv];
  }
}

// Max over a padded row (padding is −inf). A NaN may or may not survive the max; it always
// poisons S = Σ exp(z − m) below, which is where bad rows are detected.
inline float row_max(const float* z, int64_t Vp) {
  VecF m0 = VecF::set1(kNegInf);
  for (int64_t i = 0; i < Vp; i += W) m0 = VecF::max(m0, VecF::load(z + i));
  return m0.reduce_max();
}

// w = exp(z − m) over the padded row; returns S = Σ w (double sum of fp32 block sums) and the
// block sums; *ent_t = Σ w (z − m).
inline double exp_row(const float* z, float* w, int64_t Vp, float m, double* block, double* ent_t) {
  // d = (z − m)·log2 e: the max gives exactly 2^0 = 1 (an FMA form z·c − m·c would not).
  const VecF L2E = VecF::set1(float(kLog2e)), NegM = VecF::set1(-m), One = VecF::set1(1.0f);
  const VecF lo = VecF::set1(kExp2Min);
  double S = 0.0, T = 0.0;
  for (int64_t b = 0, nb = 0; b < Vp; b += kSumBlock, ++nb) {
    const int64_t e = std::min(Vp, b + kSumBlock);
    VecF s = VecF::set1(0.0f), t = s;
    for (int64_t i = b; i < e; i += W) {
      VecF d = VecF::max(lo, VecF::fma(VecF::load(z + i), One, NegM) * L2E);
      VecF ev = VecF::exp2(d);
      ev.store(w + i, F32{});
      s = s + ev;
      t = VecF::fma(ev, d, t);
    }
    block[nb] = s.reduce_add();
    S += block[nb];
    T += double(t.reduce_add()) * kLn2;
  }
  *ent_t = T;
  return S;
}

inline double block_sums(const float* w, int64_t Vp, double* block) {
  double S = 0.0;
  for (int64_t b = 0, nb = 0; b < Vp; b += kSumBlock, ++nb) {
    const int64_t e = std::min(Vp, b + kSumBlock);
    VecF s = VecF::set1(0.0f);
    for (int64_t i = b; i < e; i += W) s = s + VecF::load(w + i);
    block[nb] = s.reduce_add();
    S += block[nb];
  }
  return S;
}

struct Sel {
  float value;       // the threshold z value t (the value of the last kept token)
  int64_t count_gt;  // tokens with z > t
  double mass_gt;    // Σ w over them
  int64_t count_eq;  // tokens with z == t
  float w_eq;        // w of one such token
};

// Largest threshold value t with measure(z ≥ t) ≥ target, measure = count (kByMass false) or
// Σ w (true). Radix select over the key bits, most significant first.
template <bool kByMass>
inline Sel radix_select(const float* z, const float* w, int64_t V, double target, Scratch& s) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7FFu, 0x7FFu, 0x3FFu};
  int64_t hc[2048];
  double hm[2048];
  int64_t count_gt = 0;
  double mass_gt = 0.0;
  int64_t n = V;
  uint32_t key = 0;
  float wsel = 0.0f;
  for (int level = 0; level < 3; ++level) {
    const int sh = kShift[level];
    const uint32_t mk = kMask[level];
    std::fill(hc, hc + mk + 1, 0);
    std::fill(hm, hm + mk + 1, 0.0);
    if (level == 0) {
      for (int64_t v = 0; v < V; ++v) {
        const uint32_t b = float_key(z[v]) >> sh;
        hc[b] += 1;
        hm[b] += w[v];  // mass is needed in count mode too (prefix_mass)
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t b = (s.ck[j] >> sh) & mk;
        hc[b] += 1;
        hm[b] += s.cw[j];
      }
    }
    int64_t lowest = -1;
    for (int64_t b = 0; b <= int64_t(mk); ++b)
      if (hc[b]) {
        lowest = b;
        break;
      }
    int64_t chosen = lowest;
    for (int64_t b = mk; b > lowest; --b) {
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
    // Narrow the candidates to the chosen bin.
    s.ck2.clear();
    s.cw2.clear();
    if (level == 0) {
      for (int64_t v = 0; v < V; ++v) {
        const uint32_t k = float_key(z[v]);
        if ((k >> sh) == uint32_t(chosen)) {
          s.ck2.push_back(k);
          s.cw2.push_back(w[v]);
        }
      }
    } else {
      for (int64_t j = 0; j < n; ++j)
        if (((s.ck[j] >> sh) & mk) == uint32_t(chosen)) {
          s.ck2.push_back(s.ck[j]);
          s.cw2.push_back(s.cw[j]);
        }
    }
    std::swap(s.ck, s.ck2);
    std::swap(s.cw, s.cw2);
    n = int64_t(s.ck.size());
    key = s.ck[0];
    wsel = s.cw[0];
  }
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float value;
  std::memcpy(&value, &bits, 4);
  return {value, count_gt, mass_gt, n, wsel};
}

// Mass of the prefix of length M (M < V) of the order value-descending, index-ascending.
inline double prefix_mass(const float* z, const float* w, int64_t V, int64_t M, Scratch& s) {
  const Sel sel = radix_select<false>(z, w, V, double(M), s);
  return sel.mass_gt + double(M - sel.count_gt) * sel.w_eq;
}

// z = (x − shift) · inv_t in place over the padded row (the padding stays −inf).
inline void shift_scale(float* z, int64_t Vp, float shift, float inv_t) {
  const VecF S = VecF::set1(shift), C = VecF::set1(inv_t);
  for (int64_t i = 0; i < Vp; i += W) ((VecF::load(z + i) - S) * C).store(z + i, F32{});
}

// z = (x − max x) · inv_t into the padded scratch row (padding −inf; the max of z is 0) and
// returns max x: shifted by the raw max before the temperature scales it, so that huge logits
// or a tiny T neither overflow nor lose their differences (x/T first would). NaN or ±inf
// returned: the row cannot be sampled (NaN or +inf logits, or all −inf) and z is not formed.
// float64 logits are shifted and scaled in double (they may lie beyond the float range);
// the others are widened to float exactly. inv_t as a float is kept normal and finite (T =
// 1e300 would round it to 0, and −inf · 0 is NaN): beyond the float range a temperature acts
// as the largest one within it.
inline double load_shifted(const void* row, DType dtype, int64_t V, double inv_t, float* z) {
  const int64_t Vp = (V + W - 1) / W * W;
  if (dtype == DType::kFloat64) {
    const double* x = static_cast<const double*>(row);
    double mx = -std::numeric_limits<double>::infinity();
    bool nan = false;
    for (int64_t v = 0; v < V; ++v) {
      nan |= std::isnan(x[v]);
      mx = std::max(mx, x[v]);
    }
    if (nan) return std::numeric_limits<double>::quiet_NaN();
    if (std::isinf(mx)) return mx;
    for (int64_t v = 0; v < V; ++v) z[v] = float((x[v] - mx) * inv_t);
    std::fill(z + V, z + Vp, kNegInf);
    return mx;
  }
  switch (dtype) {
    case DType::kFloat32: load_raw<F32>(static_cast<const float*>(row), V, z); break;
    case DType::kBFloat16: load_raw<BF16>(static_cast<const uint16_t*>(row), V, z); break;
    default: load_raw<F16>(static_cast<const uint16_t*>(row), V, z); break;
  }
  std::fill(z + V, z + Vp, kNegInf);
  const float mx = row_max(z, Vp);  // a NaN it skips shows as S = NaN later
  if (!std::isfinite(mx)) return mx;
  shift_scale(z, Vp, mx, std::clamp(float(inv_t), FLT_MIN, FLT_MAX));
  return mx;
}


// Bytes of one logit.
inline int64_t dtype_size(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

// One row's filters (per-row values; a filter is off for top_k ≥ V, top_p ≥ 1, min_p ≤ 0).
struct RowFilter {
  double temperature;
  int64_t top_k;
  double top_p;
  double min_p;
  bool joint;  // filter_order == joint: each filter sees the unfiltered distribution
};

// What filter_row() leaves besides the scratch rows (z; w zeroed outside the kept set; the
// kept weights' block sums).
struct KeptRow {
  double xmax;    // the raw max: NaN (NaN / +inf logits) or −inf (all −inf): not `ok`
  double S;       // Σ_v w_v over the row (w = exp(z), z = (x − xmax)/T ≤ 0)
  double log_s;   // log S
  double ent_t;   // Σ_v w_v z_v over the row
  double S_kept;  // Σ over the kept set
  int64_t M;      // size of the kept set
  bool ok;        // the row can be sampled (finite max, S not NaN)
};

// Kept set of one row: see the top of this file. `row` points at the row's first logit.
inline KeptRow filter_row(const void* row, DType dtype, int64_t V, const RowFilter& f,
                          Scratch& s) {
  const int64_t Vp = (V + W - 1) / W * W;
  float* z = s.z.data();
  float* w = s.w.data();
  double* block = s.block.data();
  KeptRow k{};
  k.xmax = load_shifted(row, dtype, V, 1.0 / f.temperature, z);
  if (!std::isfinite(k.xmax)) return k;  // NaN or +inf logits, or all −inf
  const float m = 0.0f;                  // the max of z, exactly
  k.S = exp_row(z, w, Vp, m, block, &k.ent_t);
  if (std::isnan(k.S)) {  // a NaN the max skipped
    k.xmax = std::numeric_limits<double>::quiet_NaN();
    return k;
  }
  k.ok = true;
  k.log_s = std::log(k.S);
  const double S = k.S;

  // Filters → the length M of the kept prefix.
  int64_t M = V;
  if (f.top_k < V) M = std::max<int64_t>(1, f.top_k);
  if (f.top_p < 1.0) {
    const double base = (f.joint || M == V) ? S : prefix_mass(z, w, V, M, s);
    const double target = f.top_p * base;
    const Sel sel = radix_select<true>(z, w, V, target, s);
    // Ties at the threshold are taken in index order while the mass before them is < target.
    int64_t take = sel.w_eq > 0.0f
                       ? int64_t(std::ceil((target - sel.mass_gt) / double(sel.w_eq)))
                       : sel.count_eq;
    take = std::min<int64_t>(std::max<int64_t>(take, 1), sel.count_eq);
    M = std::min(M, sel.count_gt + take);
  }
  if (f.min_p > 0.0) {
    // p_v ≥ min_p · max p  ⇔  w_v = exp(z_v − m) ≥ min_p (renormalising does not change it).
    const float mp = float(f.min_p);
    int64_t cnt = 0;
    for (int64_t v = 0; v < V; ++v) cnt += w[v] >= mp;
    M = std::min(M, std::max<int64_t>(cnt, 1));
  }
  k.M = M;
  k.S_kept = S;
  if (M < V) {
    const Sel sel = radix_select<false>(z, w, V, double(M), s);
    const float t = sel.value;
    for (int64_t v = 0; v < Vp; ++v) w[v] = z[v] < t ? 0.0f : w[v];
    int64_t ties_keep = M - sel.count_gt;
    if (ties_keep < sel.count_eq) {
      for (int64_t v = 0; v < V; ++v)
        if (z[v] == t && ties_keep-- <= 0) w[v] = 0.0f;
    }
    k.S_kept = block_sums(w, Vp, block);
  }
  return k;
}

// log(w_v / S_kept): the log-probability of token v under the kept, renormalised
// distribution — the one expression the sampler's processed log-prob and the truncated
// log-probs both evaluate (−inf for a token outside the kept set).
inline float kept_logprob(const Scratch& s, const KeptRow& k, int64_t v) {
  const float wv = s.w[v];
  if (!(wv > 0.0f)) return -std::numeric_limits<float>::infinity();
  return float(std::log(double(wv)) - std::log(k.S_kept));
}

}  // namespace rlkern::cpu::sampler
