// CPU epilogues of the fused linear logprobs op; the row math is shared with the materialised
// op through logprobs_row.h. Threads split rows of a tile, never a row.
#include "cpu/linear_logprobs.h"

#include "cpu/logprobs_row.h"

namespace rlkern::cpu {
namespace {

using namespace rlkern::linear_logprobs;  // Stat
using logprobs::kEntropy;
using logprobs::kLogprobs;
using logprobs::kLse;

// The stats columns (rlkern/logprobs.h): m is the raw max, s and t are relative to m / T; a
// row that met a NaN or +inf has s = NaN.
RowState load_state(const double* st) {
  return {st[kStatMax], st[kStatSum], st[kStatMoment], 0.0, 0.0};
}

void store_state(double* st, const RowState& row) {
  st[kStatMax] = row.m;
  st[kStatSum] = row.s;
  st[kStatMoment] = row.t;
}

template <typename Tag>
void tile_fwd_rows(const LinearTileArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const RowScale t = row_scale(a.temperature);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) continue;
    const storage* x = static_cast<const storage*>(a.tile) + r * a.stride_row;
    double* st = a.stats + r * kNumStats;
    RowState row = load_state(st);
    if (a.with_entropy) fold_row<Tag, true, false>(x, a.vt, t, row);
    else fold_row<Tag, false, false>(x, a.vt, t, row);
    store_state(st, row);
    const int64_t y_local = y - a.vocab_offset;
    if (y_local >= 0 && y_local < a.vt) st[kStatLabelLogit] = load_logit<Tag>(x + y_local);
  }
}

template <typename Tag>
void tile_bwd_rows(const LinearTileArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const RowScale t = row_scale(a.temperature);
  for (int64_t r = begin; r < end; ++r) {
    storage* g = static_cast<storage*>(a.grad_tile) + r * a.grad_stride_row;
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      fill_row<Tag>(g, a.vt, 0.0f);
      continue;
    }
    // With the row's complete summary (`stats`, m not NaN): the exact, max-shifted path. Else
    // the forward's lse (the caller passes stats for the rows whose lse is not moderate).
    const RowUpstream u = upstream<Tag>(a.in, r);
    RowGrad rg{0.0, u.lse, u.lse - u.entropy, u.g_lse - u.g_lp, u.g_ent, u.g_lp};
    bool ok = !std::isnan(u.lse);
    if (a.exact_stats && !std::isnan(a.exact_stats[r * kNumStats + kStatMax])) {
      ok = row_grad_from_state(load_state(a.exact_stats + r * kNumStats), u.g_lp, u.g_ent,
                               u.g_lse, &rg);
    }
    if (!ok) {
      fill_row<Tag>(g, a.vt, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    grad_row_any<Tag>(static_cast<const storage*>(a.tile) + r * a.stride_row, g, a.vt,
                      y - a.vocab_offset, rg, t);
  }
}

template <typename Tag>
void finish_rows(const double* stats, const int64_t* labels, int64_t begin, int64_t end,
                 int64_t ignore_index, double temperature,
                 const std::array<void*, logprobs::kNumOutputs>& outputs) {
  using out_t = acc_of<Tag>;
  out_t* logprobs = static_cast<out_t*>(outputs[kLogprobs]);
  out_t* lse = static_cast<out_t*>(outputs[kLse]);
  out_t* entropy = static_cast<out_t*>(outputs[kEntropy]);
  const RowScale t = row_scale(temperature);
  for (int64_t r = begin; r < end; ++r) {
    if (labels[r] == ignore_index) {
      logprobs[r] = lse[r] = out_t(0);
      if (entropy) entropy[r] = out_t(0);
      continue;
    }
    const double* st = stats + r * kNumStats;
    const RowState row = load_state(st);
    const RowResult<double> res = softmax_stats_finish(row, 1, t.inv_t);
    // x_y is NaN if the label was in no tile (out of range).
    logprobs[r] = out_t(label_logp(row, res, st[kStatLabelLogit], t.inv_t));
    lse[r] = out_t(res.lse);
    if (entropy) entropy[r] = out_t(res.entropy);
  }
}

}  // namespace

void linear_logprobs_tile_fwd(const LinearTileArgs& a) {
  parallel_rows(a.dtype, a.n, a.vt, [&](auto tag, int64_t b, int64_t e) {
    tile_fwd_rows<decltype(tag)>(a, b, e);
  });
}

void linear_logprobs_tile_bwd(const LinearTileArgs& a) {
  parallel_rows(a.dtype, a.n, a.vt, [&](auto tag, int64_t b, int64_t e) {
    tile_bwd_rows<decltype(tag)>(a, b, e);
  });
}

void linear_logprobs_finish(const double* stats, const int64_t* labels, int64_t n,
                            int64_t ignore_index, double temperature, bool f64,
                            const std::array<void*, logprobs::kNumOutputs>& outputs) {
  // Float32 outputs unless the inputs are float64; one pass over the rows, 4096 per task.
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    if (f64) finish_rows<F64>(stats, labels, b, e, ignore_index, temperature, outputs);
    else finish_rows<F32>(stats, labels, b, e, ignore_index, temperature, outputs);
  });
}

}  // namespace rlkern::cpu
