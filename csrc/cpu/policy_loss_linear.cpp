// The CPU's fused policy loss for a linear aggregate (python/rlkern/ops/policy_loss/fused.py),
// one op for the whole forward: the rows' weights, the fused kernel, the loss and its metrics.
//
// The Python form of the same steps (the rows' lengths, the weights, the gradient's row
// coefficients, the loss, ~10 metrics) is ~40 small torch calls, whose fixed costs were most
// of a call below ~1M tokens. Here they are loops over B doubles plus a few torch reductions.
//
// Bits: every weight, coefficient and metric is formed by the IEEE operations, in the order,
// of the two-pass path's Python (aggregate.py: _agg_weights, LinearAggregate.row_grads,
// aggregate, finish_metrics), and the sums whose order matters (each term's Σ_i w_i·sums_i
// and the per-statistic sums over the rows) call torch's own reductions, so the fused and two-pass
// paths give the same loss, metrics and gradient bit for bit (tests/test_policy_loss_fused.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/policy_loss.h"
#include "cpu/policy_loss_ops.h"
#include "policy_loss_checks.h"

namespace rlkern {

// agg:        [pg_mode, kl_mode (−1: no KL term), ent_mode (−1: no entropy input),
//              count_empty, norm_len, has_num_tokens, has_num_seqs, ent_global_norm]
//              (modes: enum AggMode; norm_len: seq-mean-token-sum-norm's L; ent_global_norm
//              0: the entropy term's weights ignore num_tokens / num_seqs)
// agg_values: [loss_scale, kl_coef, entropy_coef, num_tokens, num_seqs]
// upstream:   the loss's upstream gradient, when known before the forward: the kernel then
//             writes the gradient into token_grad[0]; None: the factors (token_grad[1]: the
//             KL factor, with a KL term)
// grad:       false: no gradient is wanted (token_grad is empty; the forward kernel alone)
// metrics:    one code per metric: a row_stats row (its sum over the rows / the valid tokens),
//             kMetricRatioMin / kMetricRatioMax, or kMetricPart0 − j (loss part j)
// → loss (0-dim, logprobs' dtype), parts (float64: pg_loss[, kl_loss][, entropy_loss]),
//   metrics (0-dim each, logprobs' dtype), row_stats, weights ((2, B) float64: the pg and
//   KL terms' per-row weights), token_grad, non_finite (rows that saw a non-finite input at
//   a valid token). The entropy input gets no gradient here (its term's coefficient does not
//   reach ∂loss/∂logprobs).
const char* const kPolicyLossFusedLinearSchema =
    "policy_loss_fused_linear(Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
    "Tensor mask, Tensor?[] inputs, int[] flags, float[] hparams, int[] agg, "
    "float[] agg_values, float? upstream, bool grad, int[] metrics) -> (Tensor loss, "
    "Tensor parts, Tensor[] metrics, Tensor row_stats, Tensor weights, Tensor[] token_grad, "
    "int non_finite)";
// The metrics of finish_metrics' host path from the rows' statistics (its codes as above;
// `parts`: the loss parts' values, for the codes kMetricPart0 − j).
const char* const kPolicyLossMetricsSchema =
    "policy_loss_metrics(Tensor row_stats, float[] parts, int[] metrics, ScalarType dtype) "
    "-> Tensor[]";
// ∂loss/∂row_sums ((kNumRowGrads, B) float64) for the upstream gradient `upstream` (a value
// of `dtype`, the loss's) from the rows' valid-token counts `lens` ((B,) float64): the fused
// backward's coefficients when the forward's guess of the upstream missed.
const char* const kPolicyLossLinearGradRowsSchema =
    "policy_loss_linear_grad_rows(Tensor lens, int[] agg, float[] agg_values, float upstream, "
    "ScalarType dtype) -> Tensor";

namespace {

namespace pl = policy_loss;

constexpr int64_t kMetricRatioMin = -1, kMetricRatioMax = -2, kMetricPart0 = -3;

struct LinearAgg {
  int64_t pg_mode, kl_mode, ent_mode, norm_len;
  bool count_empty, has_num_tokens, has_num_seqs, ent_global_norm;
  double loss_scale, kl_coef, entropy_coef, num_tokens, num_seqs;
  bool with_kl() const { return kl_mode >= 0; }
  bool with_entropy() const { return ent_mode >= 0; }
};

LinearAgg parse_agg(at::IntArrayRef agg, at::ArrayRef<double> values) {
  TORCH_CHECK(agg.size() == 8, "agg: expected 8 values, got ", agg.size());
  TORCH_CHECK(values.size() == 5, "agg_values: expected 5 values, got ", values.size());
  LinearAgg g{};
  g.pg_mode = agg[0];
  g.kl_mode = agg[1];
  g.ent_mode = agg[2];
  g.count_empty = agg[3] != 0;
  g.norm_len = agg[4];
  g.has_num_tokens = agg[5] != 0;
  g.has_num_seqs = agg[6] != 0;
  g.ent_global_norm = agg[7] != 0;
  g.loss_scale = values[0];
  g.kl_coef = values[1];
  g.entropy_coef = values[2];
  g.num_tokens = values[3];
  g.num_seqs = values[4];
  TORCH_CHECK(g.pg_mode >= 0 && g.pg_mode < pl::kNumAggModes, "agg: bad pg mode ", g.pg_mode);
  TORCH_CHECK(g.kl_mode >= -1 && g.kl_mode < pl::kNumAggModes, "agg: bad KL mode ", g.kl_mode);
  TORCH_CHECK(g.ent_mode >= -1 && g.ent_mode < pl::kNumAggModes, "agg: bad entropy mode ",
              g.ent_mode);
  // norm_len 0 (T = 0) divides by 0, as the Python weights do
  return g;
}

// The per-row weights c of one term, agg(sums) = Σ_i c_i·sums_i: aggregate.py's _agg_weights,
// operation for operation (its `1.0 / x` is torch's reciprocal(x)·1, the same IEEE quotient).
void term_weights(const double* lens, int64_t B, int64_t mode, const LinearAgg& g, double* w) {
  if (mode == pl::kAggTokenMean) {
    double d = g.num_tokens;
    if (!g.has_num_tokens) {
      double s = 0.0;  // integer counts: exact in any order
      for (int64_t b = 0; b < B; ++b) s += lens[b];
      d = s < 1.0 ? 1.0 : s;
    }
    std::fill(w, w + B, 1.0 / d);
    return;
  }
  if (mode == pl::kAggSum || mode == pl::kAggTokenSum) {
    std::fill(w, w + B, 1.0);
    return;
  }
  double d = g.num_seqs;
  if (!g.has_num_seqs) {
    int64_t k = B;
    if (!g.count_empty) {
      k = 0;
      for (int64_t b = 0; b < B; ++b) k += lens[b] > 0.0;
    }
    d = double(std::max<int64_t>(k, 1));
  }
  for (int64_t b = 0; b < B; ++b) {
    if (mode == pl::kAggSeqMeanTokenMean)
      w[b] = (lens[b] > 0.0 ? 1.0 / std::max(lens[b], 1.0) : 0.0) / d;
    else if (mode == pl::kAggSeqMeanTokenSum)
      w[b] = 1.0 / d;
    else  // seq-mean-token-sum-norm
      w[b] = 1.0 / d / double(g.norm_len);
  }
}

// weights: (2, B) float64, the pg term's row then the KL term's (zeros without one).
at::Tensor all_weights(const double* lens, int64_t B, const LinearAgg& g) {
  at::Tensor w = at::zeros({2, B}, at::kDouble);
  double* p = w.data_ptr<double>();
  term_weights(lens, B, g.pg_mode, g, p);
  if (g.with_kl()) term_weights(lens, B, g.kl_mode, g, p + B);
  return w;
}

// The upstream gradient as the loss's dtype holds it (the Python path makes it a tensor of
// that dtype first), in float64.
double upstream_in(double upstream, at::ScalarType dtype) {
  return dtype == at::kFloat ? double(static_cast<float>(upstream)) : upstream;
}

// ∂loss/∂row_sums, (kNumRowGrads, B), as autograd forms it through aggregate.py's aggregate:
// g = upstream × loss_scale; the pg row g·w_pg, the KL row (g·kl_coef)·w_kl, each written into
// zeros and the terms' tensors added when there are several (x + 0 turns −0 into +0, as
// autograd's sum does). The entropy row stays 0: its coefficient does not reach
// ∂loss/∂logprobs, and the entropy gets no gradient on this path.
void grad_rows(const double* w, int64_t B, const LinearAgg& g, double upstream, double* out) {
  const double gs = upstream * g.loss_scale;
  std::fill(out, out + pl::kNumRowGrads * B, 0.0);
  double* pg = out + pl::kGradPg * B;
  if (!g.with_kl() && !g.with_entropy()) {
    for (int64_t b = 0; b < B; ++b) pg[b] = gs * w[b];
    return;
  }
  for (int64_t b = 0; b < B; ++b) pg[b] = gs * w[b] + 0.0;
  if (!g.with_kl()) return;
  const double gk = gs * g.kl_coef;
  double* kl = out + pl::kGradKl * B;
  for (int64_t b = 0; b < B; ++b) kl[b] = 0.0 + gk * w[B + b];
}

// Σ_b w_b·x_b by torch's sum (aggregate.py's (w * sums).sum()): the same reduction order.
double weighted_sum(const double* w, const double* x, int64_t B) {
  at::Tensor prod = at::empty({B}, at::kDouble);
  double* p = prod.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) p[b] = w[b] * x[b];
  return prod.sum().item<double>();
}

// A 0-dim tensor of `dtype` holding v rounded once (as torch's float64 → float32 copy does).
at::Tensor scalar_of(double v, at::ScalarType dtype) {
  at::Tensor t = at::empty({}, dtype);
  if (dtype == at::kFloat) *t.data_ptr<float>() = static_cast<float>(v);
  else *t.data_ptr<double>() = v;
  return t;
}

// min / max over the rows of one row_stats row; NaN if any is NaN (torch.min / torch.max).
double row_extreme(const double* x, int64_t B, bool want_max) {
  double r = want_max ? -std::numeric_limits<double>::infinity()
                      : std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    if (std::isnan(x[b])) return x[b];
    r = want_max ? std::max(r, x[b]) : std::min(r, x[b]);
  }
  return r;
}

// finish_metrics' host path (aggregate.py _host_metrics) for the codes of `codes`.
std::vector<at::Tensor> metrics_of(const at::Tensor& row_stats, const std::vector<double>& parts,
                                   at::IntArrayRef codes, at::ScalarType dtype) {
  const int64_t B = row_stats.size(1);
  const at::Tensor sums_t = row_stats.sum(1);  // torch's reduction: the same bits
  const double* sums = sums_t.const_data_ptr<double>();
  const double* rs = row_stats.const_data_ptr<double>();
  const double n_valid = sums[pl::kLen];
  const double n = std::max(n_valid, 1.0);
  const bool bounded = B > 0 && n_valid > 0.0;
  const bool poisoned = sums[pl::kNonFinite] > 0.0;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t M = static_cast<int64_t>(codes.size());
  // float32 / float64 directly (one rounding, as torch.tensor(values, dtype) gives); other
  // dtypes through float64 and torch's cast, as the Python path does
  const bool direct = dtype == at::kFloat || dtype == at::kDouble;
  std::vector<double> values(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t c = codes[i];
    double v;
    if (c >= 0) {
      TORCH_CHECK(c < pl::kNumRowStats, "metrics: bad row ", c);
      v = sums[c] / n;
    } else if (c == kMetricRatioMin || c == kMetricRatioMax) {
      v = bounded ? row_extreme(rs + (c == kMetricRatioMin ? pl::kRatioMin : pl::kRatioMax) * B,
                                B, c == kMetricRatioMax)
                  : nan;
    } else {
      const int64_t j = kMetricPart0 - c;
      TORCH_CHECK(j < static_cast<int64_t>(parts.size()), "metrics: no loss part ", j);
      v = parts[j];
    }
    values[i] = poisoned ? nan : v;
  }
  if (!direct) {
    at::Tensor out = at::empty({M}, at::kDouble);
    std::copy(values.begin(), values.end(), out.data_ptr<double>());
    return out.to(dtype).unbind(0);
  }
  // one 0-dim tensor each: cheaper than M views of one (unbind's view metadata)
  std::vector<at::Tensor> metrics;
  metrics.reserve(M);
  for (const double v : values) metrics.push_back(scalar_of(v, dtype));
  return metrics;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor,
           std::vector<at::Tensor>, int64_t>
fused_linear(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
             const at::Tensor& advantages, const at::Tensor& mask,
             const policy_loss::InputList& inputs, at::IntArrayRef flags,
             at::ArrayRef<double> hparams, at::IntArrayRef agg, at::ArrayRef<double> agg_values,
             std::optional<double> upstream, bool grad, at::IntArrayRef metric_codes) {
  const LinearAgg g = parse_agg(agg, agg_values);
  TORCH_CHECK(static_cast<int64_t>(flags.size()) == pl::kNumFlags, "flags: expected ",
              pl::kNumFlags, " values");
  const auto f = pl::from_fields<pl::Flags>(flags.data());
  // the weights above are those of a token-level loss (gmpo's and gvpo's aggregates differ)
  TORCH_CHECK(pl::fused_ok(f) && f.loss_kind != pl::kGvpo,
              "policy_loss_fused_linear: a token-level kind with token ratios (not gmpo, vespo "
              "or gvpo)");
  TORCH_CHECK(logprobs.dim() == 2, "logprobs: expected (B, T), got ", logprobs.sizes());
  const at::ScalarType dtype = logprobs.scalar_type();
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor row_stats = at::empty({pl::kNumRowStats, B}, f64);
  TORCH_CHECK(grad || !upstream.has_value(), "upstream: only with grad");
  std::vector<at::Tensor> token_grad;
  const bool kl_factor = grad && !upstream.has_value() && f.kl_kind != pl::kKlNone;
  for (int i = 0; i < int(grad) + int(kl_factor); ++i) {
    token_grad.push_back(at::empty({B, T}, logprobs.options()));
    // fresh each call: fault it in 2 MiB pages. glibc returns a freed gradient of a few MiB
    // to the kernel and maps the next one anew, and page faults in 4 KiB pieces took ~19 % of
    // a (4096, 1024) call on two threads (perf; docs/policy_loss.md, "A shorter chain per
    // token").
    cpu::advise_huge_pages(token_grad.back().data_ptr(), token_grad.back().nbytes());
  }
  at::Tensor weights;
  std::optional<at::Tensor> coefs;
  if (upstream.has_value()) {  // the weights from the counts first, then the gradient itself
    at::Tensor lens = at::empty({B}, f64);
    policy_loss_lens_out(mask, lens);
    weights = all_weights(lens.const_data_ptr<double>(), B, g);
    coefs = at::empty({pl::kNumRowGrads, B}, f64);
    grad_rows(weights.const_data_ptr<double>(), B, g, upstream_in(*upstream, dtype),
              coefs->data_ptr<double>());
  }
  policy_loss_fused_fwd_out(logprobs, old_logprobs, advantages, mask, inputs, flags, hparams,
                            row_stats, grad ? token_grad[0] : at::Tensor(),
                            kl_factor ? std::optional<at::Tensor>(token_grad[1]) : std::nullopt,
                            coefs);
  const double* rs = row_stats.const_data_ptr<double>();
  if (!upstream.has_value()) weights = all_weights(rs + pl::kLen * B, B, g);
  // aggregate.py's aggregate: pg (+ kl_coef·kl) (− entropy_coef·entropy), × loss_scale
  const double* w = weights.const_data_ptr<double>();
  std::vector<double> parts{weighted_sum(w, rs + pl::kPgSum * B, B)};
  double total = parts[0];
  if (g.with_kl()) {
    parts.push_back(weighted_sum(w + B, rs + pl::kKlSum * B, B));
    total = total + g.kl_coef * parts.back();
  }
  if (g.with_entropy()) {  // weights from the rows' entropy counts, known only now
    LinearAgg e = g;
    if (!g.ent_global_norm) e.has_num_tokens = e.has_num_seqs = false;
    std::vector<double> w_ent(B);
    term_weights(rs + pl::kEntCount * B, B, g.ent_mode, e, w_ent.data());
    parts.push_back(weighted_sum(w_ent.data(), rs + pl::kEntSum * B, B));
    if (g.entropy_coef != 0.0) total = total - g.entropy_coef * parts.back();
  }
  at::Tensor parts_t = at::empty({static_cast<int64_t>(parts.size())}, f64);
  std::copy(parts.begin(), parts.end(), parts_t.data_ptr<double>());
  int64_t non_finite = 0;
  for (int64_t b = 0; b < B; ++b) non_finite += rs[pl::kNonFinite * B + b] > 0.0;
  return {scalar_of(total * g.loss_scale, dtype), parts_t,
          metrics_of(row_stats, parts, metric_codes, dtype), row_stats, weights,
          std::move(token_grad), non_finite};
}

std::vector<at::Tensor> metrics(const at::Tensor& row_stats, at::ArrayRef<double> parts,
                                at::IntArrayRef codes, at::ScalarType dtype) {
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == pl::kNumRowStats,
              "row_stats: expected (", pl::kNumRowStats, ", B), got ", row_stats.sizes());
  checks::array(row_stats, "row_stats", row_stats.numel(), at::kDouble, row_stats);
  return metrics_of(row_stats, std::vector<double>(parts.begin(), parts.end()), codes, dtype);
}

at::Tensor linear_grad_rows(const at::Tensor& lens, at::IntArrayRef agg,
                            at::ArrayRef<double> agg_values, double upstream,
                            at::ScalarType dtype) {
  const LinearAgg g = parse_agg(agg, agg_values);
  TORCH_CHECK(lens.dim() == 1, "lens: expected (B,), got ", lens.sizes());
  checks::array(lens, "lens", lens.size(0), at::kDouble, lens);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype: float32 or float64");
  const int64_t B = lens.size(0);
  const at::Tensor weights = all_weights(lens.const_data_ptr<double>(), B, g);
  at::Tensor out = at::empty({pl::kNumRowGrads, B}, at::kDouble);
  grad_rows(weights.const_data_ptr<double>(), B, g, upstream_in(upstream, dtype),
            out.data_ptr<double>());
  return out;
}

}  // namespace

void impl_policy_loss_linear_cpu(torch::Library& m) {
  m.impl("policy_loss_fused_linear", &fused_linear);
  m.impl("policy_loss_linear_grad_rows", &linear_grad_rows);
  m.impl("policy_loss_metrics", &metrics);
}

}  // namespace rlkern
