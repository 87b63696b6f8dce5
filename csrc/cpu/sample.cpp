// CPU sampler: one output row at a time, rows in parallel (at::parallel_for), so a row's
// result never depends on the batch. Per row:
//
//  1. kept_set.h's filter_row(): one read of the row by the token-logprobs fold (max, S, the
//     entropy's sum) and the kept set of the filters — a prefix of the order "value
//     descending, index ascending", found by a radix select over a short candidate list — or,
//     with no filter, the fold's per-block sums;
//  2. inverse-CDF draw over the kept set in vocab order with one Philox uniform u per draw:
//     the token whose cumulative weight first exceeds u · S_kept (block sums find the block,
//     a scan of one block finds the token). Exact for the filtered distribution. With
//     num_samples = G, step 1 runs once per row and step 2 G times (draw j: Philox index j).
//
// filter_row() is shared with the truncated token log-probs; the raw log-probs come from the
// token-logprobs row code (logprobs_row.h; the fold of step 1 when it ran at the raw
// temperature), so both ops' outputs agree bit for bit (processed: truncated token_logprobs;
// raw: plain token_logprobs).
#include "cpu/sample.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu/kept_set.h"
#include "rlkern/philox.h"

namespace rlkern::cpu {
namespace {

using namespace sampler;

// log_softmax(x / T)[tok] of each drawn token by the token-logprobs row code (logprobs_row.h:
// fold_row, softmax_stats_finish, label_logp) — the reduction rlkern.token_logprobs runs, so a
// raw log-prob equals token_logprobs(...).logprobs of the token bit for bit. `folded`: the
// row's summary at T when filter_row() already folded it; nullptr (an unfiltered float64 row,
// or the raw log-prob at T = 1) folds the row once more, usually from cache.
template <typename Tag>
void raw_logprobs(const void* row, int64_t V, double T, const int64_t* toks, float* out,
                  int64_t G, const RowState* folded) {
  const auto* x = static_cast<const typename Tag::storage*>(row);
  const RowScale sc = row_scale(T);
  RowState st = softmax_stats_empty<double>();
  if (folded) st = *folded;
  else fold_row<Tag, false, false>(x, V, sc, st);
  const RowResult<double> res = softmax_stats_finish(st, V, sc.inv_t, 0.0);
  for (int64_t j = 0; j < G; ++j)
    out[j] = float(label_logp(st, res, load_logit<Tag>(x + toks[j]), sc.inv_t));
}

// Source row i (logits row indices ? indices[i] : i) → output rows i·G … i·G + G − 1.
void sample_row(const SampleArgs& a, int64_t i, Scratch& s) {
  const int64_t V = a.V, G = a.num_samples;
  const int64_t r = a.indices ? a.indices[i] : i;
  const double T = a.temperature[i];
  const void* row = static_cast<const char*>(a.logits) + r * a.stride_row * dtype_size(a.dtype);
  const RowFilter f{T, a.top_k ? a.top_k[i] : V, a.top_p ? a.top_p[i] : 1.0,
                    a.min_p ? a.min_p[i] : 0.0, a.joint, a.entropy != nullptr};
  const KeptRow k = filter_row(row, a.dtype, V, f, s);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!k.ok) {  // NaN or +inf logits, or all −inf
    const float lse = k.xmax == -std::numeric_limits<double>::infinity() ? kNegInf : nan;
    for (int64_t o = i * G; o < (i + 1) * G; ++o) {
      a.tokens[o] = -1;
      a.raw_logprobs[o] = a.processed_logprobs[o] = nan;
      if (a.entropy) a.entropy[o] = nan;
      a.lse[o] = lse;
    }
    return;
  }
  const float lse = float(k.xmax / T + k.log_s);
  const float ent = float(k.log_s - k.ent_t / k.S);
  for (int64_t j = 0; j < G; ++j) {
    const int64_t o = i * G + j;
    a.lse[o] = lse;
    if (a.entropy) a.entropy[o] = ent;
    const int64_t tok = draw(s, k, V, philox_uniform(a.seeds[i], a.steps[i], uint32_t(j)));
    a.tokens[o] = tok;
    // log(w_tok / S_kept): the probability of the distribution the draw actually used (and
    // exactly 0 when one token is kept).
    a.processed_logprobs[o] = kept_logprob(s, k, tok);
  }
  // Raw log-probs: of x / T, or of x (vLLM's raw_logprobs) with raw_temperature false.
  const double T_raw = a.raw_temperature ? T : 1.0;
  int64_t* toks = a.tokens + i * G;
  float* raw = a.raw_logprobs + i * G;
  const RowState* folded = k.folded && a.raw_temperature ? &k.fold : nullptr;
  switch (a.dtype) {
    case DType::kFloat64: raw_logprobs<F64>(row, V, T_raw, toks, raw, G, folded); break;
    case DType::kFloat32: raw_logprobs<F32>(row, V, T_raw, toks, raw, G, folded); break;
    case DType::kBFloat16: raw_logprobs<BF16>(row, V, T_raw, toks, raw, G, folded); break;
    default: raw_logprobs<F16>(row, V, T_raw, toks, raw, G, folded); break;
  }
}

}  // namespace

void sample(const SampleArgs& a) {
  if (a.N == 0) return;
  at::parallel_for(0, a.N / a.num_samples, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = Scratch::for_thread(a.V);
    for (int64_t i = begin; i < end; ++i) sample_row(a, i, s);
  });
}

}  // namespace rlkern::cpu
