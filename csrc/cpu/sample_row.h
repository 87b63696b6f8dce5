// The sampler's per-row building blocks (ALGORITHMS.md §4): the scratch row z = (x − max x)/T,
// its weights w = exp(z) and sums. kept_set.h finds the kept set on top of them; both the CPU
// sampler (sample.cpp) and the truncated token log-probs (truncated_logprobs.cpp) run that one
// code, so a drawn token's processed log-prob and the truncated log-prob of the same label are
// bitwise equal.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/logprobs.h"  // DType
#include "cpu/logprobs_row.h"
#include "rlkern/kept_key.h"

namespace rlkern::cpu::sampler {

constexpr int W = VecF::size;
constexpr int64_t kSumBlock = 1024;  // granularity of the block sums used by the draw

// An allocator that leaves new elements uninitialised: the pages of a row-sized array that a
// row never reaches are never touched, so they cost no memory (every element is written before
// it is read).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
template <typename T>
using RowBuf = std::vector<T, NoInit<T>>;

// Per-thread scratch: z and w padded to a multiple of W (padding −inf / 0) with the row's block
// sums; the candidates of the kept set (index, logit, z, order key, w; index order); the radix
// select's narrowed lists; the kept set (index order) with its block sums.
struct Scratch {
  RowBuf<float> z, w;
  std::vector<double> block;
  RowBuf<int32_t> ci;
  RowBuf<uint32_t> ck;
  RowBuf<float> cx, cz, cw;
  std::vector<uint32_t> nk, nk2;
  std::vector<float> nw, nw2;
  std::vector<int32_t> ki;
  std::vector<float> kz, kw;
  std::vector<double> kblock;
  std::vector<float> sample;
  std::vector<float> block_mx, block_s;  // the fold's per-block max and sum (kBlock logits)
  std::vector<float> e;                  // one block's weights (the draw)
  // radix_select's histograms (kept_set.h), all zero between its calls: a level clears only
  // the bins its candidates reached.
  std::vector<int64_t> hist_count = std::vector<int64_t>(2048, 0);
  std::vector<double> hist_mass = std::vector<double>(2048, 0.0);
  double top_p_guess = 0.0;  // the previous top-p row's kept threshold w/S (kept_set.h)
  // The previous top-k row's k-th logit minus its max (NaN: none yet; kept_set.h).
  double top_k_guess = std::numeric_limits<double>::quiet_NaN();

  int64_t capacity = 0;  // the largest V the arrays serve

  explicit Scratch(int64_t V) { grow(V); }

  // The calling thread's scratch, grown to V and kept across calls: fresh arrays per call cost
  // a page fault per 4 KiB. Its arrays reserve ~37 bytes per logit (5.6 MB at V = 151,936) but
  // hold memory only where rows reach: the candidate lists' first entries, and z and w only
  // for float64 logits and the backward.
  static Scratch& for_thread(int64_t V) {
    thread_local Scratch s(0);
    s.grow(V);
    return s;
  }

  void grow(int64_t V) {
    if (V <= capacity) return;
    capacity = V;
    const int64_t Vp = (V + W - 1) / W * W;
    z.resize(Vp);
    w.resize(Vp);
    block.resize((Vp + kSumBlock - 1) / kSumBlock);
    ci.resize(Vp + W);  // compress_ge stores W entries at a time
    cx.resize(Vp + W);
    ck.resize(Vp);
    cz.resize(Vp);
    cw.resize(Vp);
    block_mx.resize((V + kBlock - 1) / kBlock);
    block_s.resize((V + kBlock - 1) / kBlock);
    e.resize(kBlock + W);
  }
};


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

// The base-2 exponent of a weight: w = 2^d with d = max(lo, z·log2 e), z ≤ 0 (the max has
// z = 0, so w = 1 exactly). The whole-row pass (exp_row) and the candidate lists (kept_set.h)
// both form weights with it, so a token's weight has the same bits either way. The clamp keeps
// z = −inf finite (w = 0, and w·d = 0, not NaN).
inline VecF weight_exponent(VecF z) {
  return VecF::max(VecF::set1(kExp2Min), z * VecF::set1(float(kLog2e)));
}

// w = exp(z) over the padded row (z ≤ 0, the max z = 0); returns S = Σ w (double sum of fp32
// block sums) and the block sums; *ent_t = Σ w z.
inline double exp_row(const float* z, float* w, int64_t Vp, double* block, double* ent_t) {
  double S = 0.0, T = 0.0;
  for (int64_t b = 0, nb = 0; b < Vp; b += kSumBlock, ++nb) {
    const int64_t e = std::min(Vp, b + kSumBlock);
    VecF s = VecF::set1(0.0f), t = s;
    for (int64_t i = b; i < e; i += W) {
      const VecF d = weight_exponent(VecF::load(z + i));
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
  // Whether the caller reads the row's entropy (KeptRow::ent_t): without it the row's fold
  // leaves out Σ w·z, one FMA of its ~19 instructions a vector.
  bool entropy = true;
};

}  // namespace rlkern::cpu::sampler
