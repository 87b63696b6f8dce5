// CPU kernels: token log-probabilities, entropy and softmax statistics, forward and backward.
//
// Forward, per row: the vocabulary is cut into blocks of kBlock logits. Each block is swept
// twice while it sits in L1: once for its max, once for Σ2^d, Σ2^d·d (and Σ4^d) with
// d = x·c − m_b in base 2 (c = log2(e)/T folds the temperature and the change of base into one
// FMA). The block summaries are merged in double with the shared online-softmax merge
// (csrc/include/rlkern/online_softmax.h), so the logits are read from memory exactly once and
// the only per-element transcendental is one fast 2^x.
//
// Backward, per row: grad_v = p_v (C0 − k x_v) (+ g_lp/T at the label), one read and one write
// of the row, with p_v = 2^(x_v c − lse·log2 e) recomputed from the saved lse.
//
// Threads split rows (at::parallel_for), never a row, so a row's result never depends on
// the other rows or on the thread count (batch invariance).
#include "cpu/logprobs.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "cpu/simd.h"
#include "rlkern/online_softmax.h"

namespace rlkern::cpu {
namespace {

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// 4096 logits: 8 KiB of bf16 or 16 KiB of fp32, so the second sweep hits L1.
constexpr int64_t kBlock = 4096;

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Loads the last n < W logits of a row, padded with −inf (which contributes exactly 0).
template <typename Tag>
VecF load_tail(const typename Tag::storage* x, int64_t n) {
  alignas(64) float buf[VecF::size];
  for (int i = 0; i < VecF::size; ++i) buf[i] = i < n ? load_scalar<Tag>(x + i) : kNegInf;
  return VecF::load(buf);
}

// Block summary in base 2: s = Σ 2^d, t = Σ 2^d d, u = Σ 4^d with d = x c − m2 (m2 = max x·c).
struct Block2 {
  float m2;
  float s, t, u;
};

template <typename Tag, bool kEntropy, bool kStats>
Block2 sweep_block(const typename Tag::storage* x, int64_t n, float c, double* xsum) {
  constexpr int W = VecF::size;
  const int64_t nv = n / W * W;
  const int64_t tail = n - nv;
  // Sweep 1: block max (four independent chains hide the latency of max) and Σx for stats.
  VecF m0 = VecF::set1(kNegInf), m1 = m0, m2v = m0, m3 = m0;
  VecF xs = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + 4 * W <= nv; i += 4 * W) {
    VecF a = VecF::load(x + i, Tag{}), b = VecF::load(x + i + W, Tag{});
    VecF d = VecF::load(x + i + 2 * W, Tag{}), e = VecF::load(x + i + 3 * W, Tag{});
    m0 = VecF::max(m0, a);
    m1 = VecF::max(m1, b);
    m2v = VecF::max(m2v, d);
    m3 = VecF::max(m3, e);
    if constexpr (kStats) xs = xs + ((a + b) + (d + e));
  }
  for (; i < nv; i += W) {
    VecF a = VecF::load(x + i, Tag{});
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
  for (i = 0; i < nv; i += W) step(VecF::load(x + i, Tag{}));
  if (tail) step(vtail);
  out.s = s.reduce_add();
  out.t = t.reduce_add();
  out.u = u.reduce_add();
  return out;
}

template <typename Tag, bool kEntropy, bool kStats>
void fwd_rows(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const auto* base = static_cast<const storage*>(a.logits);
  auto* logprobs = static_cast<float*>(a.logprobs);
  auto* lse_out = static_cast<float*>(a.lse);
  auto* entropy = static_cast<float*>(a.entropy);
  auto* sc = static_cast<float*>(a.self_certainty);
  auto* psq = static_cast<float*>(a.sum_p_sq);
  const double inv_t = 1.0 / a.temperature;
  const float c = float(kLog2e * inv_t);

  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      logprobs[r] = 0.0f;
      lse_out[r] = 0.0f;
      if constexpr (kEntropy) entropy[r] = 0.0f;
      if constexpr (kStats) sc[r] = psq[r] = 0.0f;
      continue;
    }
    const storage* x = base + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
    SoftmaxStats<double> row = softmax_stats_empty<double>();
    double xsum = 0.0;
    for (int64_t b = 0; b < a.V; b += kBlock) {
      const Block2 blk =
          sweep_block<Tag, kEntropy, kStats>(x + b, std::min(kBlock, a.V - b), c, &xsum);
      // Base 2 → natural units: m = m2 ln2, t = t2 ln2 (s and u are unitless).
      SoftmaxStats<double> part{double(blk.m2) * kLn2, blk.s, double(blk.t) * kLn2, blk.u, 0.0};
      row = softmax_stats_merge(row, part);
    }
    row.zsum = xsum * inv_t;
    const RowResult<double> res = softmax_stats_finish(row, a.V);
    // z_y − lse, with z_y − m taken from the same rounded c and m2 as the sweep so that the
    // large terms cancel exactly: logp = ln2 (x_y c − m2) − log s.
    double logp = std::numeric_limits<double>::quiet_NaN();  // out-of-range label: no read
    if (y >= 0 && y < a.V) {
      const double m2 = row.m * kLog2e;
      logp = kLn2 * (double(load_scalar<Tag>(x + y)) * double(c) - m2) - std::log(row.s);
    }
    logprobs[r] = float(logp);
    lse_out[r] = float(res.lse);
    if constexpr (kEntropy) entropy[r] = float(res.entropy);
    if constexpr (kStats) {
      sc[r] = float(res.self_certainty);
      psq[r] = float(res.sum_p_sq);
    }
  }
}

// float64 logits (testing, gradcheck): plain two-sweep scalar code in double.
void fwd_rows_f64(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  const auto* base = static_cast<const double*>(a.logits);
  auto* logprobs = static_cast<double*>(a.logprobs);
  auto* lse_out = static_cast<double*>(a.lse);
  auto* entropy = static_cast<double*>(a.entropy);
  auto* sc = static_cast<double*>(a.self_certainty);
  auto* psq = static_cast<double*>(a.sum_p_sq);
  const double inv_t = 1.0 / a.temperature;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      logprobs[r] = lse_out[r] = 0.0;
      if (entropy) entropy[r] = 0.0;
      if (sc) sc[r] = psq[r] = 0.0;
      continue;
    }
    const double* x = base + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
    double m = -std::numeric_limits<double>::infinity(), zsum = 0.0;
    for (int64_t v = 0; v < a.V; ++v) {
      const double z = x[v] * inv_t;
      m = std::isnan(z) ? z : std::max(m, z);
      zsum += z;
    }
    SoftmaxStats<double> st{m, 0.0, 0.0, 0.0, zsum};
    if (m != -std::numeric_limits<double>::infinity()) {
      for (int64_t v = 0; v < a.V; ++v) {
        const double d = x[v] * inv_t - m;
        const double e = std::exp(d);
        st.s += e;
        if (e > 0.0) st.t += e * d;
        st.u += e * e;
      }
    }
    const RowResult<double> res = softmax_stats_finish(st, a.V);
    logprobs[r] = (y >= 0 && y < a.V) ? x[y] * inv_t - res.lse
                                      : std::numeric_limits<double>::quiet_NaN();
    lse_out[r] = res.lse;
    if (entropy) entropy[r] = res.entropy;
    if (sc) {
      sc[r] = res.self_certainty;
      psq[r] = res.sum_p_sq;
    }
  }
}

// Per-row backward constants: grad_v = p_v (c0 − k x_v) + [v = y] g_lp / T, where
// c0 = (g_ent E_p[z] + g_lse − g_lp) / T and k = g_ent / T² (z_v = x_v / T).
struct RowGrad {
  double c0, k, g_label;
};

template <typename acc_t>
RowGrad row_grad(const LogprobsBwdArgs& a, int64_t r, double inv_t) {
  auto get = [r](const void* p) { return p ? double(static_cast<const acc_t*>(p)[r]) : 0.0; };
  const double g_lp = get(a.grad_logprobs), g_ent = get(a.grad_entropy), g_lse = get(a.grad_lse);
  const double lse = get(a.lse), ent = a.grad_entropy ? get(a.entropy) : 0.0;
  const double c0 = logprobs_grad_row_const(g_lp, g_ent, lse, ent) + g_lse;
  return {c0 * inv_t, g_ent * inv_t * inv_t, g_lp * inv_t};
}

template <typename Tag>
void bwd_rows(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  constexpr int W = VecF::size;
  const auto* base = static_cast<const storage*>(a.logits);
  auto* gbase = static_cast<storage*>(a.grad_logits);
  const double inv_t = 1.0 / a.temperature;
  const float c = float(kLog2e * inv_t);
  const int64_t nv = a.V / W * W;

  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    const storage* x = base + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
    storage* g = gbase + (r / a.L) * a.grad_stride_0 + (r % a.L) * a.grad_stride_1;
    if (y == a.ignore_index) {
      std::fill(g, g + a.V, storage(0));  // +0.0 in bf16, fp16 and fp32 is all-zero bits
      continue;
    }
    const RowGrad rg = row_grad<float>(a, r, inv_t);
    // lse·log2(e) split into hi + lo so that 2^(x c − lse2) keeps ~fp32 accuracy for large lse.
    const double lse2 = double(static_cast<const float*>(a.lse)[r]) * kLog2e;
    const float lse2_hi = float(lse2), lse2_lo = float(lse2 - double(lse2_hi));
    const bool label_ok = y >= 0 && y < a.V;
    const float x_y = label_ok ? load_scalar<Tag>(x + y) : 0.0f;  // read before any write

    const VecF C = VecF::set1(c), H = VecF::set1(lse2_hi), NegLo = VecF::set1(-lse2_lo);
    const VecF lo = VecF::set1(kExp2Min), C0 = VecF::set1(float(rg.c0)),
               K = VecF::set1(float(rg.k));
    auto grad = [&](VecF xv) {
      VecF p = VecF::exp2(VecF::max(lo, VecF::fms(xv, C, H) + NegLo));
      // p (c0 − k x), forced to 0 where x = −inf (p = 0 there, but k x would be −inf).
      return VecF::zero_where_neginf(p * VecF::fnma(K, xv, C0), xv);
    };
    for (int64_t i = 0; i < nv; i += W) grad(VecF::load(x + i, Tag{})).store(g + i, Tag{});
    if (nv < a.V) {
      alignas(64) float buf[W];
      grad(load_tail<Tag>(x + nv, a.V - nv)).store(buf, F32{});
      for (int64_t j = nv; j < a.V; ++j) store_scalar<Tag>(g + j, buf[j - nv]);
    }
    if (label_ok) {
      const double p_y = std::exp((double(x_y) * inv_t) - lse2 * kLn2);
      const double gy = p_y * (rg.c0 - rg.k * double(x_y)) + rg.g_label;
      store_scalar<Tag>(g + y, float(gy));
    } else {  // label out of range (checks off): the gradient is undefined, say so with NaN
      for (int64_t j = 0; j < a.V; ++j)
        store_scalar<Tag>(g + j, std::numeric_limits<float>::quiet_NaN());
    }
  }
}

void bwd_rows_f64(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  const auto* base = static_cast<const double*>(a.logits);
  auto* gbase = static_cast<double*>(a.grad_logits);
  const double inv_t = 1.0 / a.temperature;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    const double* x = base + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
    double* g = gbase + (r / a.L) * a.grad_stride_0 + (r % a.L) * a.grad_stride_1;
    if (y == a.ignore_index) {
      std::fill(g, g + a.V, 0.0);
      continue;
    }
    const RowGrad rg = row_grad<double>(a, r, inv_t);
    const double lse = static_cast<const double*>(a.lse)[r];
    for (int64_t v = 0; v < a.V; ++v) {
      const double xv = x[v];
      const double p = std::exp(xv * inv_t - lse);
      g[v] = p > 0.0 ? p * (rg.c0 - rg.k * xv) : 0.0;
    }
    if (y >= 0 && y < a.V) {
      g[y] += rg.g_label;
    } else {
      std::fill(g, g + a.V, std::numeric_limits<double>::quiet_NaN());
    }
  }
}

template <typename Tag>
void fwd_dispatch_flags(const LogprobsFwdArgs& a, int64_t b, int64_t e) {
  const bool ent = a.entropy != nullptr, stats = a.self_certainty != nullptr;
  if (ent && stats) fwd_rows<Tag, true, true>(a, b, e);
  else if (ent) fwd_rows<Tag, true, false>(a, b, e);
  else if (stats) fwd_rows<Tag, false, true>(a, b, e);
  else fwd_rows<Tag, false, false>(a, b, e);
}

}  // namespace

void logprobs_fwd(const LogprobsFwdArgs& a) {
  const int64_t rows = a.B * a.L;
  at::parallel_for(0, rows, grain_rows(a.V), [&](int64_t b, int64_t e) {
    switch (a.dtype) {
      case DType::kBFloat16: fwd_dispatch_flags<BF16>(a, b, e); break;
      case DType::kFloat16: fwd_dispatch_flags<F16>(a, b, e); break;
      case DType::kFloat32: fwd_dispatch_flags<F32>(a, b, e); break;
      case DType::kFloat64: fwd_rows_f64(a, b, e); break;
    }
  });
}

void logprobs_bwd(const LogprobsBwdArgs& a) {
  const int64_t rows = a.B * a.L;
  at::parallel_for(0, rows, grain_rows(a.V), [&](int64_t b, int64_t e) {
    switch (a.dtype) {
      case DType::kBFloat16: bwd_rows<BF16>(a, b, e); break;
      case DType::kFloat16: bwd_rows<F16>(a, b, e); break;
      case DType::kFloat32: bwd_rows<F32>(a, b, e); break;
      case DType::kFloat64: bwd_rows_f64(a, b, e); break;
    }
  });
}

}  // namespace rlkern::cpu
