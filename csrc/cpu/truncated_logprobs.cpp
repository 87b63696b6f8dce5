// CPU token log-probs under the sampler's truncated distribution (see truncated_logprobs.h).
// Rows in parallel (at::parallel_for), so a row's result never depends on the batch; each row
// runs kept_set.h's filter_row() — the sampler's kept set and kept mass, summed in the same
// order — so logprobs equal the sampler's processed log-probs bit for bit.
#include "cpu/truncated_logprobs.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu/kept_set.h"

namespace rlkern::cpu {
namespace {

using namespace sampler;

constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();

const void* row_ptr(const TruncatedLogprobsArgs& a, int64_t r) {
  return static_cast<const char*>(a.logits) +
         ((r / a.L) * a.stride_0 + (r % a.L) * a.stride_1) * dtype_size(a.dtype);
}

RowFilter row_filter(const TruncatedLogprobsArgs& a, int64_t r) {
  return {a.temperature[r], a.top_k ? a.top_k[r] : a.V, a.top_p ? a.top_p[r] : 1.0,
          a.min_p ? a.min_p[r] : 0.0, a.joint};
}

void fwd_row(const TruncatedLogprobsArgs& a, int64_t r, Scratch& s) {
  const int64_t y = a.labels[r];
  if (y == a.ignore_index) {
    a.logprobs[r] = a.lse[r] = 0.0f;
    if (a.entropy) a.entropy[r] = 0.0f;
    return;
  }
  const RowFilter f = row_filter(a, r);
  const KeptRow k = filter_row(row_ptr(a, r), a.dtype, a.V, f, s);
  if (!k.ok) {  // NaN or +inf logits (lse NaN), or all −inf (lse −inf)
    a.logprobs[r] = kNaNf;
    if (a.entropy) a.entropy[r] = kNaNf;
    a.lse[r] = k.xmax == -std::numeric_limits<double>::infinity() ? kNegInf : kNaNf;
    return;
  }
  a.lse[r] = float(k.xmax / f.temperature + k.log_s);
  // An out-of-range label (checks off) gives NaN, never a read outside the row.
  a.logprobs[r] = (y >= 0 && y < a.V) ? kept_logprob(s, k, y) : kNaNf;
  if (a.entropy) a.entropy[r] = float(std::log(k.S_kept) - kept_moment(s, k, a.V) / k.S_kept);
}

// Converts the fp32 gradient row g (padded) to the logits' dtype.
template <typename Tag>
void store_row(typename Tag::storage* out, const float* g, int64_t V) {
  if constexpr (kIsF64<Tag>) {
    for (int64_t v = 0; v < V; ++v) out[v] = g[v];
  } else {
    const int64_t nv = V / W * W;
    for (int64_t i = 0; i < nv; i += W) VecF::load(g + i).store(out + i, Tag{});
    for (int64_t v = nv; v < V; ++v) store_scalar<Tag>(out + v, g[v]);
  }
}

template <typename Tag>
void store_at(void* out, int64_t v, double d) {
  auto* o = static_cast<typename Tag::storage*>(out);
  if constexpr (kIsF64<Tag>) o[v] = d;
  else store_scalar<Tag>(o + v, float(d));
}

// The gradient of one row, the kept set K fixed (q = w / S_kept on K, 0 elsewhere; p = w / S):
//   d_v = [g_lse · p_v + q_v · (g_ent · (E − z_v) − g_lp) + [v = y] g_lp] / T,  E = Σ_K q z,
// g_lp taken as 0 when y ∉ K. The whole-row term g_lse · p_v is one vector pass over w (0 when
// lse has no gradient, the usual case); the terms of the kept tokens (a short list unless K is
// the row) are computed in double and overwrite their entries.
void bwd_row(const TruncatedLogprobsArgs& a, int64_t r, Scratch& s, std::vector<double>& kd) {
  const int64_t V = a.V, Vp = (V + W - 1) / W * W, y = a.labels[r];
  const double g_lp_in = a.grad_logprobs ? double(a.grad_logprobs[r]) : 0.0;
  const double g_ent = a.grad_entropy ? double(a.grad_entropy[r]) : 0.0;
  const double g_lse = a.grad_lse ? double(a.grad_lse[r]) : 0.0;
  float* g = s.w.data();  // the kept list holds what the gradient needs of z and w
  kd.clear();
  bool listed = true;  // kd holds the kept list's entries (else every entry of the row)
  if (y == a.ignore_index) {
    std::fill(g, g + Vp, 0.0f);
  } else {
    const RowFilter f = row_filter(a, r);
    KeptRow k = filter_row(row_ptr(a, r), a.dtype, V, f, s);
    // A whole row kept: its gradient needs z and w over the row.
    if (k.ok && k.all && k.folded) k = whole_row(row_ptr(a, r), a.dtype, V, f.temperature, s);
    if (!k.ok) {
      std::fill(g, g + Vp, std::numeric_limits<float>::quiet_NaN());
    } else {
      const double inv_t = 1.0 / f.temperature;
      const bool y_kept = y >= 0 && y < V && std::isfinite(kept_logprob(s, k, y));
      const double g_lp = y_kept ? g_lp_in : 0.0;
      const double E = g_ent != 0.0 ? kept_moment(s, k, V) / k.S_kept : 0.0;
      auto kept_term = [&](double wv, double z) {
        return wv > 0.0 ? wv / k.S_kept * (g_ent * (E - z) - g_lp) : 0.0;
      };
      if (k.all) {
        listed = false;
        for (int64_t v = 0; v < V; ++v) {
          const double wv = s.w[v];
          double d = g_lse * (wv / k.S) + kept_term(wv, s.z[v]);
          if (v == y) d += g_lp;
          kd.push_back(d * inv_t);
        }
      } else {
        for (size_t j = 0; j < s.ki.size(); ++j) {
          const int64_t v = s.ki[j];
          double d = g_lse * (double(s.kw[j]) / k.S) + kept_term(s.kw[j], s.kz[j]);
          if (v == y) d += g_lp;
          kd.push_back(d * inv_t);
        }
        if (g_lse == 0.0) {
          std::fill(g, g + Vp, 0.0f);
        } else {  // g_lse · p_v over the row: w formed over the whole row (rarely needed)
          const KeptRow whole = whole_row(row_ptr(a, r), a.dtype, V, f.temperature, s);
          const VecF c = VecF::set1(float(g_lse / whole.S * inv_t));
          for (int64_t i = 0; i < Vp; i += W) (VecF::load(g + i) * c).store(g + i, F32{});
        }
      }
    }
  }
  void* out = static_cast<char*>(a.grad_logits) + r * V * dtype_size(a.dtype);
  auto finish = [&](auto tag) {
    using Tag = decltype(tag);
    if (listed) store_row<Tag>(static_cast<typename Tag::storage*>(out), g, V);
    for (size_t j = 0; j < kd.size(); ++j) store_at<Tag>(out, listed ? s.ki[j] : j, kd[j]);
  };
  switch (a.dtype) {
    case DType::kFloat64: finish(F64{}); break;
    case DType::kFloat32: finish(F32{}); break;
    case DType::kBFloat16: finish(BF16{}); break;
    default: finish(F16{}); break;
  }
}

}  // namespace

void truncated_logprobs_fwd(const TruncatedLogprobsArgs& a) {
  const int64_t N = a.B * a.L;
  if (N == 0) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = Scratch::for_thread(a.V);
    for (int64_t r = begin; r < end; ++r) fwd_row(a, r, s);
  });
}

void truncated_logprobs_bwd(const TruncatedLogprobsArgs& a) {
  const int64_t N = a.B * a.L;
  if (N == 0) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = Scratch::for_thread(a.V);
    std::vector<double> kd;
    for (int64_t r = begin; r < end; ++r) bwd_row(a, r, s, kd);
  });
}

}  // namespace rlkern::cpu
