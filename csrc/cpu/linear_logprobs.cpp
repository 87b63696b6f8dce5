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

SoftmaxStats<double> load_state(const double* st) {
  return {st[kStatMax], st[kStatSum], st[kStatMoment], 0.0, 0.0};
}

void store_state(double* st, const SoftmaxStats<double>& row) {
  st[kStatMax] = row.m;
  st[kStatSum] = row.s;
  st[kStatMoment] = row.t;
}

template <typename Tag>
void tile_fwd_rows(const LinearTileArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  // c as log2(e) / T (not log2(e) · (1/T)): the rounding this epilogue has always used.
  const RowScale t{1.0 / a.temperature, float(kLog2e / a.temperature)};
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) continue;
    const storage* x = static_cast<const storage*>(a.tile) + r * a.stride_row;
    double* st = a.stats + r * kNumStats;
    SoftmaxStats<double> row = load_state(st);
    double unused = 0.0;
    if (a.with_entropy) fold_row<Tag, true, false>(x, a.vt, t, row, &unused);
    else fold_row<Tag, false, false>(x, a.vt, t, row, &unused);
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
    grad_row_of<Tag>(static_cast<const storage*>(a.tile) + r * a.stride_row, g, a.vt,
                     y - a.vocab_offset, a.in, r, t);
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
    const SoftmaxStats<double> row = load_state(st);
    const RowResult<double> res = softmax_stats_finish(row, 1);
    // x_y is NaN if the label was in no tile (out of range).
    const auto x_y = acc_of<Tag>(st[kStatLabelLogit]);
    logprobs[r] = out_t(label_logp<Tag>(row, res.lse, x_y, t));
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
  // The label logit is rounded as the vectorised sweeps saw it (F32) unless the inputs are
  // float64; one pass over the rows, 4096 per task.
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    if (f64) finish_rows<F64>(stats, labels, b, e, ignore_index, temperature, outputs);
    else finish_rows<F32>(stats, labels, b, e, ignore_index, temperature, outputs);
  });
}

}  // namespace rlkern::cpu
