// CPU kernels for ALGORITHMS.md §2.1 (see token_advantages.h). Accumulation in double; threads
// split rows (returns, EMPG) or groups (position-wise sums), never the accumulation of one
// sum, so results do not depend on the thread count.
#include "cpu/token_advantages.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/advantages_ids.h"
#include "cpu/advantages_lanes.h"
#include "cpu/group_index.h"

namespace rlkern::cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 17;  // see advantages.cpp: small batches, one thread
constexpr int64_t kRowGrain = 1 << 15;    // GiGPO's row pass: two threads from 65,536 steps

// Σ over [0, n) of term(i), in float64, summed in fixed blocks of kGrainElems and then in block
// order: the same bits for any thread count.
template <typename F>
double block_sum(int64_t n, F&& term) {
  const int64_t blocks = (n + kGrainElems - 1) / kGrainElems;
  std::vector<double> partial(static_cast<size_t>(blocks));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double acc = 0.0;
      const int64_t e = std::min(n, (b + 1) * kGrainElems);
      for (int64_t i = b * kGrainElems; i < e; ++i) acc += term(i);
      partial[b] = acc;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

int64_t grain_rows(int64_t t) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(t, 1)); }

template <typename T>
void returns_rows(const T* r, int64_t t_len, const uint8_t* reset, double gamma, T* out,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const T* ri = r + i * t_len;
    T* oi = out + i * t_len;
    double carry = 0.0;
    for (int64_t t = t_len - 1; t >= 0; --t) {
      const double a = (reset != nullptr && reset[i * t_len + t]) ? 0.0 : gamma;
      carry = double(ri[t]) + discount_product(a, carry);
      oi[t] = T(carry);
    }
  }
}

template <typename T>
void gae_rows(const T* r, const T* v, int64_t t_len, const uint8_t* valid, double gamma,
              double gamma_lam, T* adv, T* ret, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t base = i * t_len;
    GaeCarry c{0.0, 0.0};
    for (int64_t t = t_len - 1; t >= 0; --t) {
      const double vt = v != nullptr ? double(v[base + t]) : 0.0;
      const double a = gae_step(double(r[base + t]), vt, valid[base + t] != 0, gamma, gamma_lam,
                                &c);
      adv[base + t] = T(a);
      ret[base + t] = T(a + vt);
    }
  }
}

Grouping make_grouping(TokenGrouping g, int64_t n) {
  if (g.group_ids == nullptr) return contiguous_grouping(n, g.group_size);
  static thread_local Workspace<int32_t> store;
  return group_by_keys<1, float>(g.group_ids, nullptr, n, nullptr, store.get(size_t(n)), nullptr);
}

// For each group and position t, the sums Σ_valid f(x) for the requested transforms, then
// one write per element. `finish(x, sums..., valid)` gives the output value(s).
template <typename T, typename Body>
void per_position(const Grouping& grouping, int64_t n, int64_t t_len, const Body& body) {
  const GroupRows gr = group_rows(grouping, n);
  const int64_t groups_per_chunk = std::max<int64_t>(
      1, kGrainElems * grouping.num_groups / std::max<int64_t>(1, n * t_len));
  at::parallel_for(0, grouping.num_groups, groups_per_chunk, [&](int64_t begin, int64_t end) {
    std::vector<double> sum_a(static_cast<size_t>(t_len)), sum_b(static_cast<size_t>(t_len));
    for (int64_t g = begin; g < end; ++g) {
      std::fill(sum_a.begin(), sum_a.end(), 0.0);
      std::fill(sum_b.begin(), sum_b.end(), 0.0);
      const int64_t* rows = gr.rows.data() + gr.offsets[g];
      const int64_t count = gr.offsets[g + 1] - gr.offsets[g];
      body(rows, count, sum_a.data(), sum_b.data());
    }
  });
}

template <typename T>
void position_baseline_impl(const T* x, int64_t n, int64_t t_len, const uint8_t* valid,
                            const Grouping& grouping, T* out) {
  per_position<T>(grouping, n, t_len, [&](const int64_t* rows, int64_t count, double* sum,
                                          double* cnt) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t base = rows[j] * t_len;
      for (int64_t t = 0; t < t_len; ++t) {
        const bool v = valid[base + t] != 0;
        sum[t] += v ? double(x[base + t]) : 0.0;
        cnt[t] += v ? 1.0 : 0.0;
      }
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t base = rows[j] * t_len;
      for (int64_t t = 0; t < t_len; ++t) {
        const bool v = valid[base + t] != 0;
        out[base + t] = v ? T(double(x[base + t]) - sum[t] / cnt[t]) : T(0);
      }
    }
  });
}

template <typename T>
void gtpo_impl(const T* h, int64_t n, int64_t t_len, const uint8_t* valid,
               const Grouping& grouping, double eps, T* w, T* w_inv) {
  per_position<T>(grouping, n, t_len, [&](const int64_t* rows, int64_t count, double* sum,
                                          double* sum_inv) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t base = rows[j] * t_len;
      for (int64_t t = 0; t < t_len; ++t) {
        if (!valid[base + t]) continue;
        const double e = double(h[base + t]);
        sum[t] += e;
        sum_inv[t] += 1.0 / std::max(e, eps);
      }
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t base = rows[j] * t_len;
      for (int64_t t = 0; t < t_len; ++t) {
        const double e = double(h[base + t]);
        const bool v = valid[base + t] != 0;
        w[base + t] = T(v && sum[t] != 0.0 ? e / sum[t] : 0.0);
        w_inv[base + t] = T(v ? (1.0 / std::max(e, eps)) / sum_inv[t] : 0.0);
      }
    }
  });
}

// What a step needs of its group to be normalised, formed once a group (so that a step costs a
// subtraction and a division; σ's square root stays per group): A = (x − mean) / spread
// where spread is finite and nonzero, else 0. spread = σ + eps (divide; unbiased σ) or 1
// ((x − mean)/1 is x − mean exactly); +inf for a group of fewer than two steps, which carries
// no relative signal. σ + eps = 0 (eps = 0, a zero-variance group: x − mean = 0) gives 0, as
// inverse_spread does. 16 bytes, so the float32 row pass loads four to a vector. Both GiGPO
// paths use it.
struct alignas(16) SpreadRecord {
  double mean, spread;
};

SpreadRecord spread_record(const GroupMoments& m, bool divide, double eps) {
  if (m.n < 2.0) return {m.mean, std::numeric_limits<double>::infinity()};
  return {m.mean, divide ? moments_std(m, kStdUnbiased) + eps : 1.0};
}

double spread_normalised(const SpreadRecord& r, double x) {
  const double d = x - r.mean;
  return r.spread != 0.0 && r.spread != std::numeric_limits<double>::infinity() ? d / r.spread
                                                                                : 0.0;
}

// e + ω·s with one rounding where the target has FMA: what the compiler made of the plain
// expression there (it contracts it), spelled out so that GiGPO's float64 path, its float32
// row loop and that loop's vector form all round alike.
double omega_sum(double e, double omega, double s) {
#if defined(__FMA__)
  return std::fma(omega, s, e);
#else
  return e + omega * s;
#endif
}

// float64 returns: each grouping numbers its rows and accumulates their shifted sums (48
// bytes a group, rlkern/group_stats.h) in the same pass.
Status gigpo_f64(const GigpoArgs& a) {
  using T = double;
  const T* ep = static_cast<const T*>(a.episode_returns);
  const T* st = static_cast<const T*>(a.step_returns);
  Grouping by_prompt, by_state;
  // Scratch kept across calls, bound here: worker threads must write this thread's copies.
  static thread_local std::vector<GroupMoments> mom_ep_tl, mom_st_tl;
  static thread_local Workspace<int32_t> rows_prompt, rows_state;
  std::vector<GroupMoments>& mom_ep = mom_ep_tl;
  std::vector<GroupMoments>& mom_st = mom_st_tl;
  int32_t* rg_prompt = rows_prompt.get(size_t(a.n));
  int32_t* rg_state = rows_state.get(size_t(a.n));
  if (grouping_threads(a.n) > 1) {
    // One grouping after the other, each split over the threads by key hash. Side by side,
    // one a thread (below), the pair grouping took about 2.5× the prompt grouping's time and
    // left the other thread waiting: at 65,536 and 1M steps this is 1.4× faster.
    by_prompt = group_by_ids_parallel<T, true>(a.group_ids, a.n, ep, rg_prompt, &mom_ep);
    by_state = group_by_ids_parallel<T, true, 2>(a.group_ids, a.n, st, rg_state, &mom_st,
                                                 a.state_keys);
  } else {
    // Too few rows to split a grouping: the two side by side, one a thread (each thread owns
    // its tables; the row-group arrays belong to this calling thread). Below 2^15 steps a
    // parallel region costs about what it saves.
    const int64_t jobs_grain = a.n >= (int64_t(1) << 15) ? 1 : 2;
    at::parallel_for(0, 2, jobs_grain, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        if (job == 0)
          by_prompt = group_by_keys<1, T>(a.group_ids, nullptr, a.n, ep, rg_prompt, &mom_ep);
        else
          by_state = group_by_keys<2, T>(a.group_ids, a.state_keys, a.n, st, rg_state, &mom_st);
      }
    });
  }
  static thread_local std::vector<SpreadRecord> rec_ep_tl, rec_st_tl;
  std::vector<SpreadRecord>& rec_ep = rec_ep_tl;
  std::vector<SpreadRecord>& rec_st = rec_st_tl;
  auto records = [&](const std::vector<GroupMoments>& m, bool divide,
                     std::vector<SpreadRecord>& rec) {
    rec.resize(m.size());
    for (size_t g = 0; g < m.size(); ++g) rec[g] = spread_record(m[g], divide, a.eps);
  };
  records(mom_ep, a.episode_std, rec_ep);
  records(mom_st, a.step_std, rec_st);
  T* adv = static_cast<T*>(a.advantages);
  T* adv_ep = static_cast<T*>(a.episode_advantages);
  T* adv_st = static_cast<T*>(a.step_advantages);
  at::parallel_for(0, a.n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double e = spread_normalised(rec_ep[by_prompt.row_group[i]], double(ep[i]));
      const double s = spread_normalised(rec_st[by_state.row_group[i]], double(st[i]));
      adv_ep[i] = T(e);
      adv_st[i] = T(s);
      adv[i] = T(omega_sum(e, a.omega, s));
    }
  });
  return {};
}

// ---- float32 returns: number first, then sum in L2-sized chunks of groups, then one row pass.
//
// The same passes as group_advantages' ids path (advantages_ids.h), for the same reason: a
// group's 24-byte float sums in an L2-resident chunk cost far less than the 48-byte double
// sums of every group updated at random while numbering (at 1M steps in 258k step groups:
// 12 MiB of them). The sums are the same shifted sums in the same row order, so the results
// are those of the float64 path's formulas, bit for bit.

// rec[g] for the k groups of row_group, from the float values x.
void spread_records(const float* x, int64_t n, const int32_t* row_group, int64_t k, bool divide,
                    double eps, SpreadRecord* rec) {
  shifted_sums_chunked(x, n, GroupArray{row_group}, k,
                       [&](int64_t lo, int64_t size, const FloatShifted* acc) {
                         for (int64_t g = 0; g < size; ++g)
                           rec[lo + g] = spread_record(float_shifted_moments(acc[g]), divide, eps);
                       });
}

// Row i of GiGPO's outputs from its two records (also the vector loop's tail).
void gigpo_row(const GigpoArgs& a, const int32_t* rg_ep, const SpreadRecord* rec_ep,
               const int32_t* rg_st, const SpreadRecord* rec_st, int64_t i) {
  const double e = spread_normalised(rec_ep[rg_ep[i]],
                                     double(static_cast<const float*>(a.episode_returns)[i]));
  const double s = spread_normalised(rec_st[rg_st[i]],
                                     double(static_cast<const float*>(a.step_returns)[i]));
  static_cast<float*>(a.episode_advantages)[i] = float(e);
  static_cast<float*>(a.step_advantages)[i] = float(s);
  static_cast<float*>(a.advantages)[i] = float(omega_sum(e, a.omega, s));
}

#if defined(RLKERN_LANES8)
// spread_normalised for eight rows: (x − mean) / spread, 0 where spread is 0 or +inf. Eight
// divisions in one instruction (two on AVX2): the scalar loop spent most of its time in its
// two divisions a row.
inline lanes::D8 spread_normalised8(lanes::D8 x, lanes::D8 mean, lanes::D8 spread) {
  using namespace lanes;
  const M8 live = cmp<_CMP_NEQ_UQ>(spread, lanes::zero()) &
                  cmp<_CMP_NEQ_UQ>(spread, set1(std::numeric_limits<double>::infinity()));
  return zero_unless(live, (x - mean) / spread);
}

// The records of rows i .. i + 7 (rec[rg[i + l]] in lane l), their means and spreads.
inline void spread_records8(const SpreadRecord* rec, const int32_t* rg, int64_t i,
                            lanes::D8& mean, lanes::D8& spread) {
  const RecordWords8 w = record_words8(rec, GroupArray{rg}, i);
  mean = lanes::from_halves(w.first[0], w.first[1]);
  spread = lanes::from_halves(w.second[0], w.second[1]);
}
#endif

// Rows [begin, end) of GiGPO's outputs, the same formula eight rows at a time with AVX-512 or
// AVX2 + FMA.
void gigpo_rows(const GigpoArgs& a, const int32_t* rg_ep, const SpreadRecord* rec_ep,
                const int32_t* rg_st, const SpreadRecord* rec_st, int64_t begin, int64_t end) {
  int64_t i = begin;
#if defined(RLKERN_LANES8)
  using namespace lanes;
  const float* ep = static_cast<const float*>(a.episode_returns);
  const float* st = static_cast<const float*>(a.step_returns);
  float* adv = static_cast<float*>(a.advantages);
  float* adv_ep = static_cast<float*>(a.episode_advantages);
  float* adv_st = static_cast<float*>(a.step_advantages);
  const D8 omega = set1(a.omega);
  for (; i + 8 <= end; i += 8) {
    D8 mean, spread;
    spread_records8(rec_ep, rg_ep, i, mean, spread);
    const D8 e = spread_normalised8(widen(_mm256_loadu_ps(ep + i)), mean, spread);
    spread_records8(rec_st, rg_st, i, mean, spread);
    const D8 s = spread_normalised8(widen(_mm256_loadu_ps(st + i)), mean, spread);
    _mm256_storeu_ps(adv_ep + i, narrow(e));
    _mm256_storeu_ps(adv_st + i, narrow(s));
    _mm256_storeu_ps(adv + i, narrow(fmadd(omega, s, e)));  // omega_sum's one rounding
  }
#endif
  for (; i < end; ++i) gigpo_row(a, rg_ep, rec_ep, rg_st, rec_st, i);
}

Status gigpo_f32(const GigpoArgs& a) {
  const float* ep = static_cast<const float*>(a.episode_returns);
  const float* st = static_cast<const float*>(a.step_returns);
  static thread_local Workspace<int32_t> rows_prompt, rows_state;
  static thread_local Workspace<SpreadRecord> rec_prompt, rec_state;
  int32_t* rg_ep = rows_prompt.get(size_t(a.n));
  int32_t* rg_st = rows_state.get(size_t(a.n));
  SpreadRecord* rec_ep = nullptr;
  SpreadRecord* rec_st = nullptr;
  // Bound here: the workers below must fill this thread's buffers, not their own.
  Workspace<SpreadRecord>& rec_ep_store = rec_prompt;
  Workspace<SpreadRecord>& rec_st_store = rec_state;
  // Nearly dense prompt ids (indices, or uids already numbered: the verl integration's
  // codes) need no hashing: the group of a step is id − min.
  const std::optional<IdRange> dense = dense_range(a.group_ids, a.n);
  if (grouping_threads(a.n) > 1) {
    // One grouping after the other, each split over the threads by key hash (see gigpo_f64).
    const Grouping p =
        dense ? dense_numbering(a.group_ids, a.n, *dense, rg_ep)
              : group_by_ids_parallel<float, false>(a.group_ids, a.n, nullptr, rg_ep, nullptr);
    const Grouping s = group_by_ids_parallel<float, false, 2>(a.group_ids, a.n, nullptr, rg_st,
                                                              nullptr, a.state_keys);
    rec_ep = rec_ep_store.get(size_t(p.num_groups));
    rec_st = rec_st_store.get(size_t(s.num_groups));
    spread_records(ep, a.n, rg_ep, p.num_groups, a.episode_std, a.eps, rec_ep);
    spread_records(st, a.n, rg_st, s.num_groups, a.step_std, a.eps, rec_st);
  } else {
    // Small batches: each grouping numbered and summed whole by one thread, the two side by
    // side (nested parallel regions run inline, so each sums in its own thread).
    const int64_t jobs_grain = a.n >= (int64_t(1) << 15) ? 1 : 2;
    at::parallel_for(0, 2, jobs_grain, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const bool prompt = job == 0;
        int32_t* rg = prompt ? rg_ep : rg_st;
        const Grouping g =
            !prompt ? group_by_keys<2, float>(a.group_ids, a.state_keys, a.n, nullptr, rg, nullptr)
            : dense ? dense_numbering(a.group_ids, a.n, *dense, rg)
                    : group_by_keys<1, float>(a.group_ids, nullptr, a.n, nullptr, rg, nullptr);
        SpreadRecord* rec = (prompt ? rec_ep_store : rec_st_store).get(size_t(g.num_groups));
        spread_records(prompt ? ep : st, a.n, rg, g.num_groups,
                       prompt ? a.episode_std : a.step_std, a.eps, rec);
        (prompt ? rec_ep : rec_st) = rec;
      }
    });
  }
  at::parallel_for(0, a.n, kRowGrain, [&](int64_t begin, int64_t end) {
    gigpo_rows(a, rg_ep, rec_ep, rg_st, rec_st, begin, end);
  });
  return {};
}

// The first step whose return is NaN or infinite (episode returns first), or −1.
int64_t first_bad_return(const GigpoArgs& a) {
  for (const void* x : {a.episode_returns, a.step_returns}) {
    const int64_t bad = a.f64 ? first_nonfinite_in(static_cast<const double*>(x), 0, a.n)
                              : first_nonfinite_in(static_cast<const float*>(x), 0, a.n);
    if (bad >= 0) return bad;
  }
  return -1;
}

template <typename T>
void empg_impl(const T* adv, const T* h, const T* h_next, int64_t n, double k, double k_f,
               double zeta, T* out) {
  struct MinMax {
    double lo, hi;
  };
  const double inf = std::numeric_limits<double>::infinity();
  const MinMax mm = at::parallel_reduce(
      0, n, kGrainElems, MinMax{inf, -inf},
      [&](int64_t begin, int64_t end, MinMax acc) {
        for (int64_t i = begin; i < end; ++i) {
          acc.lo = std::min(acc.lo, double(h[i]));
          acc.hi = std::max(acc.hi, double(h[i]));
        }
        return acc;
      },
      [](MinMax a, MinMax b) { return MinMax{std::min(a.lo, b.lo), std::max(a.hi, b.hi)}; });
  const double range = mm.hi - mm.lo;
  const double scale = range > 0.0 ? 1.0 / range : 0.0;  // all equal: Ĥ = 0
  // The mean of e^{−kĤ} is summed in fixed blocks so that it does not depend on the threads.
  const double total =
      block_sum(n, [&](int64_t i) { return std::exp(-k * (double(h[i]) - mm.lo) * scale); });
  const double inv_mean = double(n) / total;
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double g = std::exp(-k * (double(h[i]) - mm.lo) * scale) * inv_mean;
      const double hn = double(h_next[i]);
      const double f = std::isnan(hn) ? 0.0 : std::exp(-k_f * (hn - mm.lo) * scale);
      out[i] = T(g * double(adv[i]) + zeta * f);
    }
  });
}

}  // namespace

void discounted_returns(const void* rewards, bool f64, int64_t n, int64_t t, const uint8_t* reset,
                        double gamma, void* out) {
  at::parallel_for(0, n, grain_rows(t), [&](int64_t begin, int64_t end) {
    if (f64) {
      returns_rows(static_cast<const double*>(rewards), t, reset, gamma, static_cast<double*>(out),
                   begin, end);
    } else {
      returns_rows(static_cast<const float*>(rewards), t, reset, gamma, static_cast<float*>(out),
                   begin, end);
    }
  });
}

namespace {

// T: x's type; C: the type of verl's count arithmetic; W: the mask's element type.
template <typename T, typename C, typename W>
bool masked_whiten_impl(const T* x, const W* w, int64_t n, T* out, double* count) {
  // Three passes over x (two sums, then the output) instead of verl's eight torch passes and
  // their (N, T) temporaries.
  const double c = block_sum(n, [&](int64_t i) { return double(w[i]); });
  *count = c;
  if (c == 0.0 || c == 1.0) return false;
  const double s1 = block_sum(n, [&](int64_t i) {
    return w[i] != W(0) ? double(x[i]) * double(w[i]) : 0.0;
  });
  const C cnt = C(c), denom = cnt + C(kWhitenEps);
  const T mean = T(s1) / T(denom);
  const double s2 = block_sum(n, [&](int64_t i) {
    const T d = x[i] - mean;
    return w[i] != W(0) ? double(d * d) * double(w[i]) : 0.0;
  });
  T var = T(s2) / T(denom);
  var = var * T(cnt / (cnt - C(1)));
  const T r = T(1) / std::sqrt(var + T(kWhitenEps));
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = (x[i] - mean) * r;
  });
  return true;
}

template <typename W>
bool masked_whiten_typed(const void* x, const W* w, bool f64, bool count_f64, int64_t n,
                         void* out, double* count) {
  if (!f64)
    return masked_whiten_impl<float, float>(static_cast<const float*>(x), w, n,
                                            static_cast<float*>(out), count);
  const auto* xd = static_cast<const double*>(x);
  auto* od = static_cast<double*>(out);
  return count_f64 ? masked_whiten_impl<double, double>(xd, w, n, od, count)
                   : masked_whiten_impl<double, float>(xd, w, n, od, count);
}

}  // namespace

bool masked_whiten(const void* x, const void* w, WeightType wt, bool f64, bool count_f64,
                   int64_t n, void* out, double* count) {
  const auto run = [&](const auto* typed) {
    return masked_whiten_typed(x, typed, f64, count_f64, n, out, count);
  };
  switch (wt) {
    case WeightType::kFloat32: return run(static_cast<const float*>(w));
    case WeightType::kFloat64: return run(static_cast<const double*>(w));
    case WeightType::kBool: return run(static_cast<const uint8_t*>(w));
    case WeightType::kInt32: return run(static_cast<const int32_t*>(w));
    case WeightType::kInt64: return run(static_cast<const int64_t*>(w));
  }
  return false;
}

void gae(const void* rewards, const void* values, bool f64, int64_t n, int64_t t,
         const uint8_t* valid, double gamma, double lam, void* advantages, void* returns) {
  const double gamma_lam = gamma * lam;
  at::parallel_for(0, n, grain_rows(t), [&](int64_t begin, int64_t end) {
    if (f64) {
      gae_rows(static_cast<const double*>(rewards), static_cast<const double*>(values), t, valid,
               gamma, gamma_lam, static_cast<double*>(advantages), static_cast<double*>(returns),
               begin, end);
    } else {
      gae_rows(static_cast<const float*>(rewards), static_cast<const float*>(values), t, valid,
               gamma, gamma_lam, static_cast<float*>(advantages), static_cast<float*>(returns),
               begin, end);
    }
  });
}

void position_baseline(const void* returns, bool f64, int64_t n, int64_t t, const uint8_t* valid,
                       TokenGrouping grouping, void* out) {
  if (n == 0 || t == 0) return;
  const Grouping g = make_grouping(grouping, n);
  if (f64) {
    position_baseline_impl(static_cast<const double*>(returns), n, t, valid, g,
                           static_cast<double*>(out));
  } else {
    position_baseline_impl(static_cast<const float*>(returns), n, t, valid, g,
                           static_cast<float*>(out));
  }
}

void gtpo_weights(const void* entropy, bool f64, int64_t n, int64_t t, const uint8_t* valid,
                  TokenGrouping grouping, double eps, void* weight, void* inverse_weight) {
  if (n == 0 || t == 0) return;
  const Grouping g = make_grouping(grouping, n);
  if (f64) {
    gtpo_impl(static_cast<const double*>(entropy), n, t, valid, g, eps,
              static_cast<double*>(weight), static_cast<double*>(inverse_weight));
  } else {
    gtpo_impl(static_cast<const float*>(entropy), n, t, valid, g, eps, static_cast<float*>(weight),
              static_cast<float*>(inverse_weight));
  }
}

Status gigpo_advantages(const GigpoArgs& a) {
  if (a.n == 0) return {};
  const int64_t bad = first_bad_return(a);
  if (bad >= 0) return {Status::kInvalidScore, bad};
  return a.f64 ? gigpo_f64(a) : gigpo_f32(a);
}

void empg_modulate(const void* advantages, const void* step_entropy,
                   const void* next_step_entropy, bool f64, int64_t n, double k, double k_f,
                   double zeta, void* out) {
  if (n == 0) return;
  if (f64) {
    empg_impl(static_cast<const double*>(advantages), static_cast<const double*>(step_entropy),
              static_cast<const double*>(next_step_entropy), n, k, k_f, zeta,
              static_cast<double*>(out));
  } else {
    empg_impl(static_cast<const float*>(advantages), static_cast<const float*>(step_entropy),
              static_cast<const float*>(next_step_entropy), n, k, k_f, zeta,
              static_cast<float*>(out));
  }
}

}  // namespace rlkern::cpu
