// Per-row building blocks of the CPU logprobs kernels, shared by the materialised-logits op
// (logprobs.cpp) and the fused linear op (linear_logprobs.cpp), so the numerics exist once.
//
// Forward: a row (or a vocab tile of a row) is cut into blocks of kBlock logits; each block is
// swept twice while it sits in L1, once for its max, once for Σ2^d, Σ2^d·d (and Σ4^d) with
// d = x·c − m_b in base 2 (c = log2(e)/T folds the temperature and the change of base into one
// FMA). Block summaries are merged in double with the shared online-softmax merge
// (rlkern/online_softmax.h), so the logits are read from memory once and the only
// per-element transcendental is one fast 2^x.
//
// Backward: grad_v = p_v (c0 − k x_v) (+ g_lp/T at the label), one read and one write per
// element, with p_v = 2^(x_v c − lse·log2 e) recomputed from the saved lse.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>

#include "cpu/logprobs.h"
#include "cpu/simd.h"
#include "rlkern/online_softmax.h"

namespace rlkern::cpu {

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
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

// Block summary in base 2: s = Σ 2^d, t = Σ 2^d d, u = Σ 4^d with d = x c − m2 (m2 = max x·c).
struct Block2 {
  float m2;
  float s, t, u;
};

// `prefetch` / `prefetch_bytes`: the memory sweep 1 of the next block will read (nullptr for
// none). Sweep 2 computes from L1 without touching memory, so it issues one prefetch per vector
// to bring the next block in meanwhile: the row then streams from memory while the exps run,
// instead of memory and arithmetic taking turns.
template <typename Tag, bool kEntropy, bool kStats>
inline Block2 sweep_block(const typename Tag::storage* x, int64_t n, float c, double* xsum,
                          const char* prefetch = nullptr, int64_t prefetch_bytes = 0) {
  constexpr int W = VecF::size;
  const int64_t nv = n / W * W;
  const int64_t tail = n - nv;
  // Sweep 1: block max (four independent chains hide the latency of max) and Σx for stats.
  // 16-bit logits are widened once here and kept in an L1-resident fp32 copy for sweep 2,
  // which saves sweep 2 the two widening instructions per vector.
  constexpr bool kWiden = !std::is_same_v<Tag, F32>;
  alignas(64) float widened[kWiden ? kBlock : 1];
  auto keep = [&](int64_t at, VecF v) {
    if constexpr (kWiden) v.store(widened + at, F32{});
  };
  VecF m0 = VecF::set1(kNegInf), m1 = m0, m2v = m0, m3 = m0;
  VecF xs = VecF::set1(0.0f);
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
    m2v = VecF::max(m2v, d);
    m3 = VecF::max(m3, e);
    if constexpr (kStats) xs = xs + ((a + b) + (d + e));
  }
  for (; i < nv; i += W) {
    VecF a = VecF::load(x + i, Tag{});
    keep(i, a);
    m0 = VecF::max(m0, a);
    if constexpr (kStats) xs = xs + a;
  }
  VecF vtail = VecF::set1(kNegInf);
  if (tail) {
    vtail = load_tail<Tag>(x + nv, tail);
    m0 = VecF::max(m0, vtail);
    if constexpr (kStats)
      for (int64_t j = nv; j < n; ++j) *xsum += load_scalar<Tag>(x + j);
  }
  if constexpr (kStats) *xsum += xs.reduce_add();
  const float mx = VecF::max(VecF::max(m0, m1), VecF::max(m2v, m3)).reduce_max();
  Block2 out{kNegInf, 0.0f, 0.0f, 0.0f};
  if (mx == kNegInf) return out;  // an all −inf block adds nothing
  out.m2 = mx * c;

  // Sweep 2 (from L1): accumulate relative to the block max.
  const VecF C = VecF::set1(c), M = VecF::set1(out.m2), lo = VecF::set1(kExp2Min);
  VecF s = VecF::set1(0.0f), t = s, u = s;
  auto step = [&](VecF xv) {
    // max(lo, ·) keeps −inf logits finite (their 2^d is 0, so 2^d·d stays 0, not NaN);
    // NaN logits pass through and poison the row's results, as documented.
    VecF d = VecF::max(lo, VecF::fms(xv, C, M));
    VecF e = VecF::exp2(d);
    s = s + e;
    if constexpr (kEntropy) t = VecF::fma(e, d, t);
    if constexpr (kStats) u = VecF::fma(e, e, u);
  };
  const char* pf = prefetch;
  const char* const pf_end = prefetch ? prefetch + prefetch_bytes : nullptr;
  auto prefetch_line = [&] {
    if (pf < pf_end) {
      prefetch_l1(pf);
      pf += 64;
    }
  };
  if constexpr (kWiden) {
    for (i = 0; i < nv; i += W) {
      prefetch_line();
      step(VecF::load(widened + i));
    }
  } else {
    for (i = 0; i < nv; i += W) {
      prefetch_line();
      step(VecF::load(x + i, Tag{}));
    }
  }
  if (tail) step(vtail);
  out.s = s.reduce_add();
  out.t = t.reduce_add();
  out.u = u.reduce_add();
  return out;
}

// Folds the logits x[0, n) of one row into its running summary `row` (natural units).
// `xsum` accumulates Σx when kStats. Any blocking of a row gives the same merge order for the
// same n, so results are reproducible; rows never interact. `next_row` (nullable, n logits
// long) is prefetched while the last block is computed.
template <typename Tag, bool kEntropy, bool kStats>
inline void accumulate_row(const typename Tag::storage* x, int64_t n, float c,
                           SoftmaxStats<double>& row, double* xsum,
                           const typename Tag::storage* next_row = nullptr) {
  using storage = typename Tag::storage;
  for (int64_t b = 0; b < n; b += kBlock) {
    const bool last = b + kBlock >= n;
    const storage* ahead = last ? next_row : x + b + kBlock;
    const int64_t ahead_n = last ? (next_row ? std::min(kBlock, n) : 0)
                                 : std::min(kBlock, n - b - kBlock);
    const Block2 blk = sweep_block<Tag, kEntropy, kStats>(
        x + b, std::min(kBlock, n - b), c, xsum, reinterpret_cast<const char*>(ahead),
        ahead_n * int64_t(sizeof(storage)));
    // Base 2 → natural units: m = m2 ln2, t = t2 ln2 (s and u are unitless).
    const SoftmaxStats<double> part{double(blk.m2) * kLn2, blk.s, double(blk.t) * kLn2, blk.u, 0.0};
    row = softmax_stats_merge(row, part);
  }
}

// log p_y = z_y − lse, with z_y − m formed from the raw logit and the same rounded c and block
// max as the sweeps, so the large terms cancel exactly: ln2 (x_y c − m2) − log s.
inline double logp_from_stats(const SoftmaxStats<double>& row, float x_y, float c) {
  const double m2 = row.m * kLog2e;
  return kLn2 * (double(x_y) * double(c) - m2) - std::log(row.s);
}

// Per-row backward constants: grad_v = p_v (c0 − k x_v) + [v = y] g_lp / T, where
// c0 = (g_ent E_p[z] + g_lse − g_lp) / T and k = g_ent / T² (z_v = x_v / T).
struct RowGrad {
  double c0, k, g_label;
};

inline RowGrad make_row_grad(double g_lp, double g_ent, double g_lse, double lse, double entropy,
                             double inv_t) {
  const double c0 = logprobs_grad_row_const(g_lp, g_ent, lse, entropy) + g_lse;
  return {c0 * inv_t, g_ent * inv_t * inv_t, g_lp * inv_t};
}

// Writes the gradient of one row (or vocab tile) x[0, n) into g[0, n) (g may alias x).
// y_local is the label's index inside [0, n), or outside it when the label lies in another
// tile (then no label term here).
template <typename Tag>
inline void grad_row(const typename Tag::storage* x, typename Tag::storage* g, int64_t n,
                     int64_t y_local, const RowGrad& rg, float lse, float c, double inv_t) {
  constexpr int W = VecF::size;
  // lse·log2(e) split into hi + lo so that 2^(x c − lse2) keeps ~fp32 accuracy for large lse.
  const double lse2 = double(lse) * kLog2e;
  const float lse2_hi = float(lse2), lse2_lo = float(lse2 - double(lse2_hi));
  const bool has_label = y_local >= 0 && y_local < n;
  const float x_y = has_label ? load_scalar<Tag>(x + y_local) : 0.0f;  // read before writes

  const VecF C = VecF::set1(c), H = VecF::set1(lse2_hi), NegLo = VecF::set1(-lse2_lo);
  const VecF lo = VecF::set1(kExp2Min), C0 = VecF::set1(float(rg.c0)), K = VecF::set1(float(rg.k));
  auto grad = [&](VecF xv) {
    VecF p = VecF::exp2(VecF::max(lo, VecF::fms(xv, C, H) + NegLo));
    // p (c0 − k x), forced to 0 where x = −inf (p = 0 there, but k x would be −inf).
    return VecF::zero_where_neginf(p * VecF::fnma(K, xv, C0), xv);
  };
  const int64_t nv = n / W * W;
  for (int64_t i = 0; i < nv; i += W) grad(VecF::load(x + i, Tag{})).store(g + i, Tag{});
  if (nv < n) {
    alignas(64) float buf[W];
    grad(load_tail<Tag>(x + nv, n - nv)).store(buf, F32{});
    for (int64_t j = nv; j < n; ++j) store_scalar<Tag>(g + j, buf[j - nv]);
  }
  if (has_label) {
    const double p_y = std::exp(double(x_y) * inv_t - lse2 * kLn2);
    store_scalar<Tag>(g + y_local, float(p_y * (rg.c0 - rg.k * double(x_y)) + rg.g_label));
  }
}

// float64 logits (tests, gradcheck): the same two summaries in plain double arithmetic.
inline void accumulate_row_f64(const double* x, int64_t n, double inv_t,
                               SoftmaxStats<double>& row, double* xsum) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < n; ++v) {
    const double z = x[v] * inv_t;
    m = std::isnan(z) ? z : std::max(m, z);
    *xsum += z;
  }
  SoftmaxStats<double> part{m, 0.0, 0.0, 0.0, 0.0};
  if (m != -std::numeric_limits<double>::infinity()) {
    for (int64_t v = 0; v < n; ++v) {
      const double d = x[v] * inv_t - m;
      const double e = std::exp(d);
      part.s += e;
      if (e > 0.0) part.t += e * d;
      part.u += e * e;
    }
  }
  row = softmax_stats_merge(row, part);
}

inline void grad_row_f64(const double* x, double* g, int64_t n, int64_t y_local,
                         const RowGrad& rg, double lse, double inv_t) {
  for (int64_t v = 0; v < n; ++v) {
    const double xv = x[v];
    const double p = std::exp(xv * inv_t - lse);
    g[v] = p > 0.0 ? p * (rg.c0 - rg.k * xv) : 0.0;
  }
  if (y_local >= 0 && y_local < n) g[y_local] += rg.g_label;
}

// -------------------------------------------------------------------------------------------
// One row function for every dtype: float64 logits (tests, gradcheck) take plain double
// arithmetic, the others the vectorised blocks above; these wrappers pick the path so that the
// row loops of the kernels are written once.

// A temperature as the row loops use it: 1/T, and c = log2(e)/T rounded to float, the scale
// of the vectorised sweeps (see sweep_block).
struct RowScale {
  double inv_t;
  float c;
};

inline RowScale row_scale(double temperature) {
  const double inv_t = 1.0 / temperature;
  return {inv_t, float(kLog2e * inv_t)};
}

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

// Folds x[0, n) into the running summary `row`; `xsum` accumulates Σz for float64 logits and
// Σx for the others (with kStats; see zsum_of).
template <typename Tag, bool kEntropy, bool kStats>
inline void fold_row(const typename Tag::storage* x, int64_t n, const RowScale& t,
                     SoftmaxStats<double>& row, double* xsum,
                     const typename Tag::storage* next_row = nullptr) {
  if constexpr (kIsF64<Tag>) accumulate_row_f64(x, n, t.inv_t, row, xsum);
  else accumulate_row<Tag, kEntropy, kStats>(x, n, t.c, row, xsum, next_row);
}

template <typename Tag>
inline double zsum_of(double xsum, const RowScale& t) {
  return kIsF64<Tag> ? xsum : xsum * t.inv_t;
}

// log p_y from the row summary and the raw label logit x_y (see logp_from_stats).
template <typename Tag>
inline double label_logp(const SoftmaxStats<double>& row, double lse, acc_of<Tag> x_y,
                         const RowScale& t) {
  if constexpr (kIsF64<Tag>) return x_y * t.inv_t - lse;
  else return logp_from_stats(row, x_y, t.c);
}

// The backward constants of row r from the per-row arrays of a backward (acc_of<Tag> each).
template <typename Tag>
inline RowGrad row_grad(const logprobs::GradInputs& in, int64_t r, double inv_t) {
  auto get = [r](const void* p) {
    return p ? double(static_cast<const acc_of<Tag>*>(p)[r]) : 0.0;
  };
  return make_row_grad(get(in.grad_logprobs), get(in.grad_entropy), get(in.grad_lse),
                       get(in.lse), in.grad_entropy ? get(in.entropy) : 0.0, inv_t);
}

// grad_row / grad_row_f64 for row r of a backward.
template <typename Tag>
inline void grad_row_of(const typename Tag::storage* x, typename Tag::storage* g, int64_t n,
                        int64_t y_local, const logprobs::GradInputs& in, int64_t r,
                        const RowScale& t) {
  const acc_of<Tag> lse = static_cast<const acc_of<Tag>*>(in.lse)[r];
  const RowGrad rg = row_grad<Tag>(in, r, t.inv_t);
  if constexpr (kIsF64<Tag>) grad_row_f64(x, g, n, y_local, rg, lse, t.inv_t);
  else grad_row<Tag>(x, g, n, y_local, rg, lse, t.c, t.inv_t);
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
