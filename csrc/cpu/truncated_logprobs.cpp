// CPU token log-probs under the sampler's truncated distribution (see truncated_logprobs.h).
// Rows in parallel (at::parallel_for), so a row's result never depends on the batch; each row
// runs sample_row.h's filter_row() — the sampler's kept set and kept mass, summed in the same
// order — so logprobs equal the sampler's processed log-probs bit for bit.
#include "cpu/truncated_logprobs.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu/sample_row.h"

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

// Σ_K w z (w is 0 outside K, where z may be −inf).
double kept_moment(const Scratch& s, int64_t V) {
  double e = 0.0;
  for (int64_t v = 0; v < V; ++v)
    if (s.w[v] > 0.0f) e += double(s.w[v]) * double(s.z[v]);
  return e;
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
  if (a.entropy) a.entropy[r] = float(std::log(k.S_kept) - kept_moment(s, a.V) / k.S_kept);
}

template <typename Tag>
void store_row(typename Tag::storage* g, const double* val, int64_t V) {
  for (int64_t v = 0; v < V; ++v) {
    if constexpr (kIsF64<Tag>) g[v] = val[v];
    else store_scalar<Tag>(g + v, float(val[v]));
  }
}

void bwd_row(const TruncatedLogprobsArgs& a, int64_t r, Scratch& s, std::vector<double>& g) {
  const int64_t V = a.V, y = a.labels[r];
  const double g_lp_in = a.grad_logprobs ? double(a.grad_logprobs[r]) : 0.0;
  const double g_ent = a.grad_entropy ? double(a.grad_entropy[r]) : 0.0;
  const double g_lse = a.grad_lse ? double(a.grad_lse[r]) : 0.0;
  if (y == a.ignore_index) {
    std::fill(g.begin(), g.end(), 0.0);
  } else {
    const RowFilter f = row_filter(a, r);
    const KeptRow k = filter_row(row_ptr(a, r), a.dtype, V, f, s);
    if (!k.ok) {
      std::fill(g.begin(), g.end(), std::numeric_limits<double>::quiet_NaN());
    } else {
      const double inv_t = 1.0 / f.temperature;
      const bool y_kept = y >= 0 && y < V && s.w[y] > 0.0f;
      const double g_lp = y_kept ? g_lp_in : 0.0;
      const double E = g_ent != 0.0 ? kept_moment(s, V) / k.S_kept : 0.0;
      for (int64_t v = 0; v < V; ++v) {
        double d = 0.0;
        const double z = s.z[v];
        if (g_lse != 0.0) d += g_lse * std::exp(z - k.log_s);  // p_v of the whole row
        if (s.w[v] > 0.0f) {
          const double q = double(s.w[v]) / k.S_kept;
          d += q * ((g_ent != 0.0 ? g_ent * (E - z) : 0.0) - g_lp);
        }
        if (v == y) d += g_lp;
        g[v] = d * inv_t;
      }
    }
  }
  void* out = static_cast<char*>(a.grad_logits) + r * V * dtype_size(a.dtype);
  switch (a.dtype) {
    case DType::kFloat64: store_row<F64>(static_cast<double*>(out), g.data(), V); break;
    case DType::kFloat32: store_row<F32>(static_cast<float*>(out), g.data(), V); break;
    case DType::kBFloat16: store_row<BF16>(static_cast<uint16_t*>(out), g.data(), V); break;
    default: store_row<F16>(static_cast<uint16_t*>(out), g.data(), V); break;
  }
}

}  // namespace

void truncated_logprobs_fwd(const TruncatedLogprobsArgs& a) {
  const int64_t N = a.B * a.L;
  if (N == 0) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch s(a.V);
    for (int64_t r = begin; r < end; ++r) fwd_row(a, r, s);
  });
}

void truncated_logprobs_bwd(const TruncatedLogprobsArgs& a) {
  const int64_t N = a.B * a.L;
  if (N == 0) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch s(a.V);
    std::vector<double> g(a.V);
    for (int64_t r = begin; r < end; ++r) bwd_row(a, r, s, g);
  });
}

}  // namespace rlkern::cpu
