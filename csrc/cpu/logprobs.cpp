// CPU kernels: token log-probabilities, entropy and softmax statistics, forward and backward,
// over a (B, L, V) view of materialised logits. The per-row math is in logprobs_row.h.
//
// Threads split rows (at::parallel_for), never a row, so a row's result never depends on
// the other rows or on the thread count (batch invariance).
#include "cpu/logprobs.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/logprobs_row.h"

namespace rlkern::cpu {
namespace {

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
    const storage* next =
        r + 1 < end ? base + ((r + 1) / a.L) * a.stride_0 + ((r + 1) % a.L) * a.stride_1 : nullptr;
    SoftmaxStats<double> row = softmax_stats_empty<double>();
    double xsum = 0.0;
    accumulate_row<Tag, kEntropy, kStats>(x, a.V, c, row, &xsum, next);
    row.zsum = xsum * inv_t;
    const RowResult<double> res = softmax_stats_finish(row, a.V);
    const double logp = (y >= 0 && y < a.V) ? logp_from_stats(row, load_scalar<Tag>(x + y), c)
                                            : std::numeric_limits<double>::quiet_NaN();  // no read
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
    SoftmaxStats<double> st = softmax_stats_empty<double>();
    double zsum = 0.0;
    accumulate_row_f64(x, a.V, inv_t, st, &zsum);
    st.zsum = zsum;
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

template <typename acc_t>
RowGrad row_grad(const LogprobsBwdArgs& a, int64_t r, double inv_t) {
  auto get = [r](const void* p) { return p ? double(static_cast<const acc_t*>(p)[r]) : 0.0; };
  return make_row_grad(get(a.grad_logprobs), get(a.grad_entropy), get(a.grad_lse), get(a.lse),
                       a.grad_entropy ? get(a.entropy) : 0.0, inv_t);
}

template <typename Tag>
void bwd_rows(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const auto* base = static_cast<const storage*>(a.logits);
  auto* gbase = static_cast<storage*>(a.grad_logits);
  const double inv_t = 1.0 / a.temperature;
  const float c = float(kLog2e * inv_t);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    const storage* x = base + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
    storage* g = gbase + (r / a.L) * a.grad_stride_0 + (r % a.L) * a.grad_stride_1;
    if (y == a.ignore_index) {
      std::fill(g, g + a.V, storage(0));  // +0.0 in bf16, fp16 and fp32 is all-zero bits
    } else if (y < 0 || y >= a.V) {  // out of range with checks off: undefined, say so with NaN
      for (int64_t j = 0; j < a.V; ++j)
        store_scalar<Tag>(g + j, std::numeric_limits<float>::quiet_NaN());
    } else {
      grad_row<Tag>(x, g, a.V, y, row_grad<float>(a, r, inv_t),
                    static_cast<const float*>(a.lse)[r], c, inv_t);
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
    if (y < 0 || y >= a.V) {
      std::fill(g, g + a.V, std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    grad_row_f64(x, g, a.V, y, row_grad<double>(a, r, inv_t),
                 static_cast<const double*>(a.lse)[r], inv_t);
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
