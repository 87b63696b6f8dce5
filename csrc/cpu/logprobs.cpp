// CPU kernels: token log-probabilities, entropy and softmax statistics, forward and backward,
// over a (B, L, V) view of materialised logits. The per-row math is in logprobs_row.h.
//
// Threads split rows (at::parallel_for), never a row, so a row's result never depends on
// the other rows or on the thread count (batch invariance).
#include "cpu/logprobs.h"

#include <limits>

#include "cpu/logprobs_row.h"

namespace rlkern::cpu {
namespace {

using namespace rlkern::logprobs;  // Output

template <typename Tag, bool kWithEntropy, bool kWithStats>
void fwd_rows(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  using out_t = acc_of<Tag>;
  auto out = [&](Output o) { return static_cast<out_t*>(a.outputs[o]); };
  out_t* logprobs = out(kLogprobs);
  out_t* lse = out(kLse);
  out_t* entropy = out(kEntropy);
  out_t* sc = out(kSelfCertainty);
  out_t* psq = out(kSumPSq);
  const RowScale t = row_scale(a.temperature);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      logprobs[r] = lse[r] = out_t(0);
      if constexpr (kWithEntropy) entropy[r] = out_t(0);
      if constexpr (kWithStats) sc[r] = psq[r] = out_t(0);
      continue;
    }
    const auto* x = row_start<storage>(a, r);
    const auto* next = r + 1 < end ? row_start<storage>(a, r + 1) : nullptr;
    RowState row = softmax_stats_empty<double>();
    // zsum's constant: the first logit (0 unless finite), so that Σ(x − c) neither overflows
    // nor cancels.
    const double x0 = kWithStats && a.V > 0 ? double(load_logit<Tag>(x)) : 0.0;
    const double c = std::isfinite(x0) ? x0 : 0.0;
    fold_row<Tag, kWithEntropy, kWithStats>(x, a.V, t, row, c, next);
    const RowResult<double> res = softmax_stats_finish(row, a.V, t.inv_t, c);
    logprobs[r] = out_t((y >= 0 && y < a.V)
                            ? label_logp(row, res, load_logit<Tag>(x + y), t.inv_t)
                            : kNaN);  // no read
    lse[r] = out_t(res.lse);
    if constexpr (kWithEntropy) entropy[r] = out_t(res.entropy);
    if constexpr (kWithStats) {
      sc[r] = out_t(res.self_certainty);
      psq[r] = out_t(res.sum_p_sq);
    }
  }
}

template <typename Tag>
void bwd_rows(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const RowScale t = row_scale(a.temperature);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    storage* g = static_cast<storage*>(a.grad_logits) + (r / a.L) * a.grad_stride_0 +
                 (r % a.L) * a.grad_stride_1;
    RowGrad rg;
    if (y == a.ignore_index) {
      fill_row<Tag>(g, a.V, 0.0f);
    } else if (!row_grad_of<Tag>(row_start<storage>(a, r), a.V, a.in, r, t, &rg)) {
      // A row whose outputs are NaN (NaN, +inf, all −inf): no gradient, say so with NaN.
      fill_row<Tag>(g, a.V, std::numeric_limits<float>::quiet_NaN());
    } else {
      // An out-of-range label (checks off) is outside [0, V): it matches no column and adds no
      // label term (its logprob is NaN, the other outputs are the row's).
      grad_row_any<Tag>(row_start<storage>(a, r), g, a.V, y, rg, t);
    }
  }
}

}  // namespace

void logprobs_fwd(const LogprobsFwdArgs& a) {
  const bool ent = a.outputs[kEntropy] != nullptr, stats = a.outputs[kSelfCertainty] != nullptr;
  parallel_rows(a.dtype, a.B * a.L, a.V, [&](auto tag, int64_t b, int64_t e) {
    using Tag = decltype(tag);
    if (ent && stats) fwd_rows<Tag, true, true>(a, b, e);
    else if (ent) fwd_rows<Tag, true, false>(a, b, e);
    else if (stats) fwd_rows<Tag, false, true>(a, b, e);
    else fwd_rows<Tag, false, false>(a, b, e);
  });
}

void logprobs_bwd(const LogprobsBwdArgs& a) {
  parallel_rows(a.dtype, a.B * a.L, a.V, [&](auto tag, int64_t b, int64_t e) {
    bwd_rows<decltype(tag)>(a, b, e);
  });
}

}  // namespace rlkern::cpu
