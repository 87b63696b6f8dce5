// CPU epilogues of the fused linear logprobs op; the row math is shared with the materialised
// op through logprobs_row.h. Threads split rows of a tile, never a row.
#include "cpu/linear_logprobs.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/logprobs_row.h"

namespace rlkern::cpu {
namespace {

SoftmaxStats<double> load_state(const double* st) { return {st[0], st[1], st[2], 0.0, 0.0}; }

void store_state(double* st, const SoftmaxStats<double>& row) {
  st[0] = row.m;
  st[1] = row.s;
  st[2] = row.t;
}

template <typename Tag>
void tile_fwd_rows(const LinearTileArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const auto* base = static_cast<const storage*>(a.tile);
  const float c = float(kLog2e / a.temperature);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) continue;
    const storage* x = base + r * a.stride_row;
    double* st = a.stats + r * kLinearStatsWidth;
    SoftmaxStats<double> row = load_state(st);
    double unused = 0.0;
    if (a.with_entropy) accumulate_row<Tag, true, false>(x, a.vt, c, row, &unused);
    else accumulate_row<Tag, false, false>(x, a.vt, c, row, &unused);
    store_state(st, row);
    const int64_t y_local = y - a.vocab_offset;
    if (y_local >= 0 && y_local < a.vt) st[3] = load_scalar<Tag>(x + y_local);
  }
}

void tile_fwd_rows_f64(const LinearTileArgs& a, int64_t begin, int64_t end) {
  const auto* base = static_cast<const double*>(a.tile);
  const double inv_t = 1.0 / a.temperature;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) continue;
    const double* x = base + r * a.stride_row;
    double* st = a.stats + r * kLinearStatsWidth;
    SoftmaxStats<double> row = load_state(st);
    double unused = 0.0;
    accumulate_row_f64(x, a.vt, inv_t, row, &unused);
    store_state(st, row);
    const int64_t y_local = y - a.vocab_offset;
    if (y_local >= 0 && y_local < a.vt) st[3] = x[y_local];
  }
}

template <typename acc_t>
RowGrad tile_row_grad(const LinearTileArgs& a, int64_t r, double inv_t) {
  auto get = [r](const void* p) { return p ? double(static_cast<const acc_t*>(p)[r]) : 0.0; };
  return make_row_grad(get(a.grad_logprobs), get(a.grad_entropy), get(a.grad_lse), get(a.lse),
                       a.grad_entropy ? get(a.entropy) : 0.0, inv_t);
}

template <typename Tag>
void tile_bwd_rows(const LinearTileArgs& a, int64_t begin, int64_t end) {
  using storage = typename Tag::storage;
  const auto* base = static_cast<const storage*>(a.tile);
  auto* gbase = static_cast<storage*>(a.grad_tile);
  const double inv_t = 1.0 / a.temperature;
  const float c = float(kLog2e * inv_t);
  for (int64_t r = begin; r < end; ++r) {
    storage* g = gbase + r * a.grad_stride_row;
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      std::fill(g, g + a.vt, storage(0));
      continue;
    }
    grad_row<Tag>(base + r * a.stride_row, g, a.vt, y - a.vocab_offset,
                  tile_row_grad<float>(a, r, inv_t), static_cast<const float*>(a.lse)[r], c,
                  inv_t);
  }
}

void tile_bwd_rows_f64(const LinearTileArgs& a, int64_t begin, int64_t end) {
  const auto* base = static_cast<const double*>(a.tile);
  auto* gbase = static_cast<double*>(a.grad_tile);
  const double inv_t = 1.0 / a.temperature;
  for (int64_t r = begin; r < end; ++r) {
    double* g = gbase + r * a.grad_stride_row;
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      std::fill(g, g + a.vt, 0.0);
      continue;
    }
    grad_row_f64(base + r * a.stride_row, g, a.vt, y - a.vocab_offset,
                 tile_row_grad<double>(a, r, inv_t), static_cast<const double*>(a.lse)[r],
                 inv_t);
  }
}

template <typename out_t>
void finish_rows(const double* stats, const int64_t* labels, int64_t begin, int64_t end,
                 int64_t ignore_index, double temperature, bool f64, out_t* logprobs,
                 out_t* lse, out_t* entropy) {
  const double inv_t = 1.0 / temperature;
  const float c = float(kLog2e * inv_t);
  for (int64_t r = begin; r < end; ++r) {
    if (labels[r] == ignore_index) {
      logprobs[r] = lse[r] = out_t(0);
      if (entropy) entropy[r] = out_t(0);
      continue;
    }
    const double* st = stats + r * kLinearStatsWidth;
    const SoftmaxStats<double> row = load_state(st);
    const RowResult<double> res = softmax_stats_finish(row, 1);
    const double x_y = st[3];  // NaN if the label was in no tile (out of range)
    const double logp = f64 ? x_y * inv_t - res.lse : logp_from_stats(row, float(x_y), c);
    logprobs[r] = out_t(logp);
    lse[r] = out_t(res.lse);
    if (entropy) entropy[r] = out_t(res.entropy);
  }
}

}  // namespace

void linear_logprobs_tile_fwd(const LinearTileArgs& a) {
  at::parallel_for(0, a.n, grain_rows(a.vt), [&](int64_t b, int64_t e) {
    switch (a.dtype) {
      case DType::kBFloat16: tile_fwd_rows<BF16>(a, b, e); break;
      case DType::kFloat16: tile_fwd_rows<F16>(a, b, e); break;
      case DType::kFloat32: tile_fwd_rows<F32>(a, b, e); break;
      case DType::kFloat64: tile_fwd_rows_f64(a, b, e); break;
    }
  });
}

void linear_logprobs_tile_bwd(const LinearTileArgs& a) {
  at::parallel_for(0, a.n, grain_rows(a.vt), [&](int64_t b, int64_t e) {
    switch (a.dtype) {
      case DType::kBFloat16: tile_bwd_rows<BF16>(a, b, e); break;
      case DType::kFloat16: tile_bwd_rows<F16>(a, b, e); break;
      case DType::kFloat32: tile_bwd_rows<F32>(a, b, e); break;
      case DType::kFloat64: tile_bwd_rows_f64(a, b, e); break;
    }
  });
}

void linear_logprobs_finish(const double* stats, const int64_t* labels, int64_t n,
                            int64_t ignore_index, double temperature, bool f64, void* logprobs,
                            void* lse, void* entropy) {
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    if (f64) {
      finish_rows(stats, labels, b, e, ignore_index, temperature, true,
                  static_cast<double*>(logprobs), static_cast<double*>(lse),
                  static_cast<double*>(entropy));
    } else {
      finish_rows(stats, labels, b, e, ignore_index, temperature, false,
                  static_cast<float*>(logprobs), static_cast<float*>(lse),
                  static_cast<float*>(entropy));
    }
  });
}

}  // namespace rlkern::cpu
