// CPU sampler: one output row at a time, rows in parallel (at::parallel_for), so a row's
// result never depends on the batch. Per row:
//
//  1. z = (x − max x) / T into an fp32 scratch row (the only read of the logits; max z = 0);
//  2. w_v = exp(z_v − m) (fast 2^x), S = Σ w (per-block partial sums), Σ w (z − m) (entropy);
//  3. filters as lengths of a prefix of the order "value descending, index ascending": every
//     filter keeps such a prefix (top-k: k; top-p: the shortest prefix whose mass reaches p;
//     min-p: the tokens with w ≥ min_p), so the kept set is the prefix of the smallest length.
//     Lengths and thresholds come from a radix select over the fp32 bit pattern of z (three
//     histogram levels of 11/11/10 bits, candidates narrowed after each) — no sort;
//  4. inverse-CDF draw over the kept set in vocab order with one Philox uniform u per row:
//     the token whose cumulative weight first exceeds u · S_kept (block sums find the block,
//     a scan of one block finds the token). Exact for the filtered distribution.
#include "cpu/sample.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/logprobs_row.h"
#include "rlkern/philox.h"

namespace rlkern::cpu {
namespace {

constexpr int W = VecF::size;
constexpr int64_t kSumBlock = 1024;  // granularity of the block sums used by the draw

struct Scratch {
  std::vector<float> z, w;
  std::vector<double> block;
  std::vector<uint32_t> ck;
  std::vector<float> cw;
  std::vector<uint32_t> ck2;
  std::vector<float> cw2;
};

// Monotone map of a float to uint32 (larger float → larger key).
inline uint32_t float_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename Tag>
void load_raw(const typename Tag::storage* x, int64_t V, float* z) {
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
float row_max(const float* z, int64_t Vp) {
  VecF m0 = VecF::set1(kNegInf);
  for (int64_t i = 0; i < Vp; i += W) m0 = VecF::max(m0, VecF::load(z + i));
  return m0.reduce_max();
}

// w = exp(z − m) over the padded row; returns S = Σ w (double sum of fp32 block sums) and the
// block sums; *ent_t = Σ w (z − m).
double exp_row(const float* z, float* w, int64_t Vp, float m, double* block, double* ent_t) {
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

double block_sums(const float* w, int64_t Vp, double* block) {
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
Sel radix_select(const float* z, const float* w, int64_t V, double target, Scratch& s) {
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
double prefix_mass(const float* z, const float* w, int64_t V, int64_t M, Scratch& s) {
  const Sel sel = radix_select<false>(z, w, V, double(M), s);
  return sel.mass_gt + double(M - sel.count_gt) * sel.w_eq;
}

// z = (x − shift) · inv_t in place over the padded row (the padding stays −inf).
void shift_scale(float* z, int64_t Vp, float shift, float inv_t) {
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
double load_shifted(const SampleArgs& a, int64_t r, double inv_t, float* z) {
  const int64_t V = a.V, Vp = (V + W - 1) / W * W;
  const int64_t off = r * a.stride_row;
  if (a.dtype == DType::kFloat64) {
    const double* x = static_cast<const double*>(a.logits) + off;
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
  switch (a.dtype) {
    case DType::kFloat32: load_raw<F32>(static_cast<const float*>(a.logits) + off, V, z); break;
    case DType::kBFloat16:
      load_raw<BF16>(static_cast<const uint16_t*>(a.logits) + off, V, z);
      break;
    default: load_raw<F16>(static_cast<const uint16_t*>(a.logits) + off, V, z); break;
  }
  std::fill(z + V, z + Vp, kNegInf);
  const float mx = row_max(z, Vp);  // a NaN it skips shows as S = NaN later
  if (!std::isfinite(mx)) return mx;
  shift_scale(z, Vp, mx, std::clamp(float(inv_t), FLT_MIN, FLT_MAX));
  return mx;
}

void sample_row(const SampleArgs& a, int64_t i, Scratch& s) {
  const int64_t V = a.V;
  const int64_t Vp = (V + W - 1) / W * W;
  const int64_t r = a.indices ? a.indices[i] : i;
  const double T = a.temperature[i];
  float* z = s.z.data();
  float* w = s.w.data();
  double* block = s.block.data();
  const double xmax = load_shifted(a, r, 1.0 / T, z);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(xmax)) {  // NaN or +inf logits, or all −inf
    a.tokens[i] = -1;
    a.raw_logprobs[i] = a.processed_logprobs[i] = nan;
    if (a.entropy) a.entropy[i] = nan;
    a.lse[i] = xmax == -std::numeric_limits<double>::infinity() ? kNegInf : nan;
    return;
  }
  const float m = 0.0f;  // the max of z, exactly
  double ent_t = 0.0;
  const double S = exp_row(z, w, Vp, m, block, &ent_t);
  if (std::isnan(S)) {  // a NaN the max skipped
    a.tokens[i] = -1;
    a.raw_logprobs[i] = a.processed_logprobs[i] = nan;
    if (a.entropy) a.entropy[i] = nan;
    a.lse[i] = nan;
    return;
  }
  const double log_s = std::log(S);
  a.lse[i] = float(xmax / T + log_s);
  if (a.entropy) a.entropy[i] = float(log_s - ent_t / S);

  // Filters → the length M of the kept prefix.
  int64_t M = V;
  if (a.top_k && a.top_k[i] < V) M = std::max<int64_t>(1, a.top_k[i]);
  if (a.top_p && a.top_p[i] < 1.0) {
    const double base = (a.joint || M == V) ? S : prefix_mass(z, w, V, M, s);
    const double target = a.top_p[i] * base;
    const Sel sel = radix_select<true>(z, w, V, target, s);
    // Ties at the threshold are taken in index order while the mass before them is < target.
    int64_t take = sel.w_eq > 0.0f
                       ? int64_t(std::ceil((target - sel.mass_gt) / double(sel.w_eq)))
                       : sel.count_eq;
    take = std::min<int64_t>(std::max<int64_t>(take, 1), sel.count_eq);
    M = std::min(M, sel.count_gt + take);
  }
  if (a.min_p && a.min_p[i] > 0.0) {
    // p_v ≥ min_p · max p  ⇔  w_v = exp(z_v − m) ≥ min_p (renormalising does not change it).
    const float mp = float(a.min_p[i]);
    int64_t cnt = 0;
    for (int64_t v = 0; v < V; ++v) cnt += w[v] >= mp;
    M = std::min(M, std::max<int64_t>(cnt, 1));
  }
  double S_kept = S;
  if (M < V) {
    const Sel sel = radix_select<false>(z, w, V, double(M), s);
    const float t = sel.value;
    for (int64_t v = 0; v < Vp; ++v) w[v] = z[v] < t ? 0.0f : w[v];
    int64_t ties_keep = M - sel.count_gt;
    if (ties_keep < sel.count_eq) {
      for (int64_t v = 0; v < V; ++v)
        if (z[v] == t && ties_keep-- <= 0) w[v] = 0.0f;
    }
    S_kept = block_sums(w, Vp, block);
  }

  // Inverse-CDF draw over the kept weights in vocab order.
  const double u = philox_uniform(a.seeds[i], a.steps[i], 0u);
  const double target = u * S_kept;
  double acc = 0.0;
  int64_t tok = -1;
  const int64_t nb = (Vp + kSumBlock - 1) / kSumBlock;
  int64_t b = 0;
  for (; b < nb - 1; ++b) {
    if (acc + block[b] > target) break;
    acc += block[b];
  }
  const int64_t e = std::min(V, (b + 1) * kSumBlock);
  for (int64_t v = b * kSumBlock; v < e; ++v) {
    if (w[v] <= 0.0f) continue;
    acc += w[v];
    tok = v;  // the last kept token seen: the answer if rounding leaves acc ≤ target
    if (acc > target) break;
  }
  if (tok < 0)  // the block's sum rounded above its elements' sum: take the last kept token
    for (int64_t v = V - 1; v >= 0; --v)
      if (w[v] > 0.0f) {
        tok = v;
        break;
      }
  a.tokens[i] = tok;
  const double zt = double(z[tok]) - double(m);
  // log(w_tok / S_kept): the probability of the distribution the draw actually used (and
  // exactly 0 when one token is kept).
  a.processed_logprobs[i] = float(std::log(double(w[tok])) - std::log(S_kept));
  if (a.raw_temperature || T == 1.0) {
    a.raw_logprobs[i] = float(zt - log_s);
  } else {
    // vLLM-style raw logprobs of the untempered logits: log_softmax(x)[tok], one more pass.
    load_shifted(a, r, 1.0, z);
    double t2 = 0.0;
    const double S2 = exp_row(z, w, Vp, 0.0f, block, &t2);
    a.raw_logprobs[i] = float(double(z[tok]) - std::log(S2));
  }
}

}  // namespace

void sample(const SampleArgs& a) {
  if (a.N == 0) return;
  const int64_t Vp = (a.V + W - 1) / W * W;
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.z.resize(Vp);
    s.w.resize(Vp);
    s.block.resize((Vp + kSumBlock - 1) / kSumBlock);
    for (int64_t i = begin; i < end; ++i) sample_row(a, i, s);
  });
}

}  // namespace rlkern::cpu
