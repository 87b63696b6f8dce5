// CPU epilogues of the fused linear logprobs op; the row math is shared with the materialised
// op through logprobs_row.h. Threads split rows of a tile, never a row.
#include "cpu/linear_logprobs.h"

#include <vector>

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

// Logit soft-capping: the row math runs on z = c·tanh(x/c), formed per row in the accumulation
// type (float, or double for float64 tiles) into a per-thread buffer, never written back to the
// tile (whose dtype would round z a second time). The forward and the backward form z with the
// same expression from the same x, so the backward's max shift matches the forward's exactly.
template <typename Tag>
using AccTag = std::conditional_t<kIsF64<Tag>, F64, F32>;

// z[j] = c·tanh(x[j]/c) and, when `dz` is given, dz[j] = ∂z/∂x = 1 − tanh²(x[j]/c), computed
// in double and rounded once. tanh(±inf) = ±1, so an infinite logit is capped like a large one.
template <typename Tag>
void softcap_row(const typename Tag::storage* x, int64_t n, double cap, acc_of<Tag>* z,
                 acc_of<Tag>* dz) {
  for (int64_t j = 0; j < n; ++j) {
    const double th = std::tanh(double(load_logit<Tag>(x + j)) / cap);
    z[j] = acc_of<Tag>(cap * th);
    if (dz) dz[j] = acc_of<Tag>((1.0 - th) * (1.0 + th));
  }
}

// A per-thread row buffer of at least n entries (reused across rows and calls).
template <typename T>
T* row_buffer(int64_t n, int slot) {
  thread_local std::vector<T> buffers[2];
  std::vector<T>& b = buffers[slot];
  if (int64_t(b.size()) < n) b.resize(size_t(n));
  return b.data();
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
    const int64_t y_local = y - a.vocab_offset;
    const bool owns_label = y_local >= 0 && y_local < a.vt;
    if (a.softcap > 0.0) {
      using acc_t = acc_of<Tag>;
      acc_t* z = row_buffer<acc_t>(a.vt, 0);
      softcap_row<Tag>(x, a.vt, a.softcap, z, nullptr);
      if (a.with_entropy) fold_row<AccTag<Tag>, true, false>(z, a.vt, t, row);
      else fold_row<AccTag<Tag>, false, false>(z, a.vt, t, row);
      if (owns_label) st[kStatLabelLogit] = z[y_local];
    } else {
      if (a.with_entropy) fold_row<Tag, true, false>(x, a.vt, t, row);
      else fold_row<Tag, false, false>(x, a.vt, t, row);
      if (owns_label) st[kStatLabelLogit] = load_logit<Tag>(x + y_local);
    }
    store_state(st, row);
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
    const storage* x = static_cast<const storage*>(a.tile) + r * a.stride_row;
    if (a.softcap > 0.0) {
      // ∂L/∂z on the capped row, then the chain rule ∂L/∂x = ∂L/∂z · (1 − tanh²)
      using acc_t = acc_of<Tag>;
      acc_t* z = row_buffer<acc_t>(a.vt, 0);
      acc_t* dz = row_buffer<acc_t>(a.vt, 1);
      softcap_row<Tag>(x, a.vt, a.softcap, z, dz);
      grad_row_any<AccTag<Tag>>(z, z, a.vt, y - a.vocab_offset, rg, t);
      for (int64_t j = 0; j < a.vt; ++j) {
        if constexpr (kIsF64<Tag>) g[j] = z[j] * dz[j];
        else store_scalar<Tag>(g + j, z[j] * dz[j]);
      }
    } else {
      grad_row_any<Tag>(x, g, a.vt, y - a.vocab_offset, rg, t);
    }
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
