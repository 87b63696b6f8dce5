// CPU kernels: group advantages (ALGORITHMS.md §2) as segmented reductions.
//
// Contiguous groups (group_size): threads split the groups; each group is summarised (moments,
// then the estimator's extras in a second sweep over its rows, still in L1) and its rows are
// written at once — one read of the scores, one write of the outputs. Estimators that need a
// batch-level constant first (σ_batch, REINFORCE++'s whitening) make one extra summary pass.
//
// Arbitrary ids: the groups are numbered (id − min for nearly dense ids, else one hash pass,
// group_index.h); float64 scores accumulate their moments in that pass, float32 scores in
// chunks of groups sized to a core's L2 (advantages_ids.h). The estimators that need more make
// one more row pass (unlikely's in-group ranks go through a counting sort of the rows by
// group); then a per-group record of the affine map A = (x − center)·scale + offset
// (group_stats.h), and a row pass applying it, threads splitting rows — one pass over 16-byte
// records when every group is centred on its mean (compact_pass). Large scratch arrays live in
// per-thread workspaces (workspace.h).
//
// Accumulation is in double; group_stats.h says why a group's results do not depend on the
// order of its rows beyond float32 rounding.
#include "cpu/advantages.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/advantages_ids.h"
#include "cpu/advantages_lanes.h"
#include "cpu/group_index.h"

namespace rlkern::cpu {

GroupRows group_rows(const Grouping& grouping, int64_t n) {
  GroupRows out;
  const int64_t k = grouping.num_groups;
  out.offsets.assign(size_t(k + 1), 0);
  out.rows.resize(size_t(n));
  if (grouping.group_size > 0) {
    for (int64_t g = 0; g <= k; ++g) out.offsets[g] = g * grouping.group_size;
    for (int64_t i = 0; i < n; ++i) out.rows[i] = i;
    return out;
  }
  for (int64_t i = 0; i < n; ++i) ++out.offsets[grouping.row_group[i] + 1];
  for (int64_t g = 0; g < k; ++g) out.offsets[g + 1] += out.offsets[g];
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) out.rows[cursor[grouping.row_group[i]]++] = i;
  return out;
}

namespace {

// Rows per thread at least: a parallel region costs ~10 µs when the cores are idle and up to a
// scheduler time slice when they are shared, so batches below ~2^18 rows run on one thread.
constexpr int64_t kGrainRows = 1 << 17;
// The eight-lane path (advantages_lanes.h) is cheap per row, so its threads split from 2^15
// rows a thread.
constexpr int64_t kLaneGrainRows = 1 << 15;
// The ids path's compact pass (a gather per row) and its per-group records (a division and
// square roots a group) split the same way: from 2^15 rows, 2^12 groups.
constexpr int64_t kCompactGrainRows = 1 << 15, kRecordGrainGroups = 1 << 12;
constexpr double kLowest = -std::numeric_limits<double>::infinity();

int64_t grain_groups(int64_t group_size) {
  return std::max<int64_t>(1, kGrainRows / std::max<int64_t>(group_size, 1));
}

// First non-finite value of x[0, n), or -1.
template <typename T>
int64_t first_invalid(const T* x, int64_t n) {
  return at::parallel_reduce(
      0, n, kGrainRows, int64_t(-1),
      [&](int64_t begin, int64_t end, int64_t found) {
        return found >= 0 ? found : first_nonfinite_in(x, begin, end);
      },
      [](int64_t a, int64_t b) { return a < 0 ? b : (b < 0 ? a : std::min(a, b)); });
}

struct ExtrasNeeded {
  bool weighted, loglik, top;
  bool any() const { return weighted || loglik || top; }
};

ExtrasNeeded extras_needed(int estimator) {
  return {estimator == kOpo || estimator == kReinforcePPBaseline, estimator == kXrpo,
          estimator == kGrpoPassk};
}

GroupExtras extras_empty() { return GroupExtras{0.0, 0.0, 0.0, 0.0, kLowest, kLowest, -1}; }

// One valid row into a group's extras; `mean` is the group's (final) mean, so the weighted
// sums are two-pass exact.
void extras_push(GroupExtras& e, const ExtrasNeeded& need, double x, int64_t row, double mean,
                 double w, double loglik) {
  if (need.weighted) {
    const double d = x - mean;
    e.wsum += w;
    e.wdev += w * d;
    e.wdev2 += w * d * d;
  }
  if (need.loglik) e.aux_mean += loglik;  // a sum until divided by n
  if (need.top) {
    if (e.top_row < 0 || x > e.top1) {
      e.top2 = e.top1;
      e.top1 = x;
      e.top_row = row;
    } else if (x > e.top2) {
      e.top2 = x;
    }
  }
}

void extras_finish(GroupExtras& e, const ExtrasNeeded& need, const GroupMoments& m) {
  if (need.loglik) e.aux_mean = m.n > 0 ? e.aux_mean / m.n : 0.0;
}

// What the row pass needs of a group: the hot part (every estimator; 24 bytes for float32
// outputs, so that the random reads of the ids path touch as few cache lines as possible) and
// the cold part (grpo_passk, xrpo).
template <typename O>
struct HotRecord {
  double center;  // A = (x − center)·scale; the subtraction is exact where it must be
  O scale;
  O mean, std;  // of the scores, as reported
  bool zero_variance;
};

struct ColdRecord {
  double loglik_mean;  // xrpo
  double top_value;    // grpo_passk: the top row's advantage
  int64_t top_row;     // grpo_passk: -1 when none
  bool active;
};

template <typename O>
HotRecord<O> hot_record(const GroupMoments& ms, const GroupMoments& mx, const GroupExtras* e,
                        const AdvantageParams& p) {
  const RowAffine f = group_affine(mx, e, p);
  HotRecord<O> r;
  r.center = f.center;
  r.scale = O(f.scale);
  r.mean = O(ms.mean);
  r.std = O(moments_std(ms, p.std_mode));
  r.zero_variance = moments_zero_variance(ms);
  return r;
}

ColdRecord cold_record(const GroupMoments& mx, const GroupExtras* e, const AdvantageParams& p) {
  ColdRecord r{0.0, 0.0, -1, group_active(mx, p)};
  if (e != nullptr) r.loglik_mean = e->aux_mean;
  if (p.estimator == kGrpoPassk && r.active) {
    r.top_row = e->top_row;
    r.top_value = passk_top_advantage(mx, e, p);
  }
  return r;
}

bool needs_cold(const AdvantageParams& p) {
  return p.estimator == kGrpoPassk || p.estimator == kXrpo;
}

template <typename O>
struct RowOut {
  O* adv;
  O* mean;
  O* std;
  bool* zv;
};

// Row i (value x, valid or not) of a group with records (h, c); c only for needs_cold().
template <typename O>
inline void write_row(const RowOut<O>& out, int64_t i, double x, bool valid, const HotRecord<O>& h,
                      const ColdRecord* c, const AdvantageParams& p, const double* loglik) {
  double a = 0.0;
  if (valid) {
    if (c == nullptr) {
      a = (x - h.center) * double(h.scale);
    } else if (p.estimator == kGrpoPassk) {
      a = i == c->top_row ? c->top_value : 0.0;
    } else {  // xrpo
      a = (x - h.center) * double(h.scale);
      if (c->active) a = xrpo_sharpen(a, loglik[i], c->loglik_mean, p);
    }
  }
  out.adv[i] = O(a);
  out.mean[i] = h.mean;
  out.std[i] = h.std;
  out.zv[i] = h.zero_variance;
}

// unlikely: r' = s (1 − λ rank / n) over a group's valid rows, rank by (log-likelihood, row)
// with the least likely first. `rows` holds the group's rows; r' goes to xr (NaN for invalid).
template <typename T>
void unlikely_group(const T* s, const double* loglik, double lam, std::vector<int64_t>& rows,
                    double* xr) {
  size_t nv = 0;
  for (size_t j = 0; j < rows.size(); ++j) {
    const double x = double(s[rows[j]]);
    xr[rows[j]] = x;  // NaN/inf stay as they are: invalid
    if (score_is_valid(x)) rows[nv++] = rows[j];
  }
  rows.resize(nv);
  std::sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) {
    return loglik[a] < loglik[b] || (loglik[a] == loglik[b] && a < b);
  });
  for (size_t r = 0; r < nv; ++r)
    xr[rows[r]] = double(s[rows[r]]) * (1.0 - lam * (double(r) / double(nv)));
}

// Batch-level constants from the per-group summaries of the values x.
void batch_constants(const GroupMoments* mx, const GroupExtras* ext, int64_t k, double valid_rows,
                     double nonzero_rows, AdvantageParams* p) {
  if (p->batch_scope) {
    GroupMoments all = moments_empty();  // Chan's merge of every group
    for (int64_t g = 0; g < k; ++g) all = moments_merge(all, mx[g]);
    p->batch_std = moments_std(all, p->std_mode);
  }
  if (p->estimator == kGpg) p->gpg_alpha = valid_rows / std::max(1.0, nonzero_rows);
  if (p->estimator == kReinforcePPBaseline) {
    // Whitening over the included rows' tokens. For a group centred on b:
    // Σw(x − b) = wdev + (μ − b)·wsum,  Σw(x − b)² = wdev2 + 2(μ − b)·wdev + (μ − b)²·wsum.
    double total = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t g = 0; g < k; ++g) {
      if (!group_active(mx[g], *p)) continue;
      const GroupExtras& e = ext[g];
      const double shift = mx[g].mean - group_baseline(mx[g], &e, *p);
      total += e.wsum;
      s1 += e.wdev + shift * e.wsum;
      s2 += e.wdev2 + 2.0 * shift * e.wdev + shift * shift * e.wsum;
    }
    const double mean = total > 0.0 ? s1 / total : 0.0;
    const double var = total > 1.0 ? std::max(0.0, s2 - total * mean * mean) / (total - 1.0) : 0.0;
    p->white_mean = mean;
    p->white_rstd = 1.0 / std::sqrt(var + kWhitenEps);
  }
}

template <typename T>
void count_rows(const T* s, int64_t n, double* valid, double* nonzero) {
  struct Counts {
    int64_t valid, nonzero;
  };
  const Counts c = at::parallel_reduce(
      0, n, kGrainRows, Counts{0, 0},
      [&](int64_t begin, int64_t end, Counts acc) {
        for (int64_t i = begin; i < end; ++i) {
          const double x = double(s[i]);
          const bool ok = score_is_valid(x);
          acc.valid += ok;
          acc.nonzero += ok && x != 0.0;
        }
        return acc;
      },
      [](Counts a, Counts b) { return Counts{a.valid + b.valid, a.nonzero + b.nonzero}; });
  *valid = double(c.valid);
  *nonzero = double(c.nonzero);
}

// ----------------------------------------------------------------------- contiguous groups

// Summary of one contiguous group [begin, end): moments of s and of x (r' for unlikely, whose
// values land in xr), and the extras of x.
struct GroupSummary {
  GroupMoments ms, mx;
  GroupExtras ext;
};

template <typename T>
GroupSummary summarize_contiguous(const GroupAdvantagesArgs& a, const T* s, int64_t begin,
                                  int64_t end, const ExtrasNeeded& need, double* xr,
                                  std::vector<int64_t>& scratch) {
  GroupSummary out;
  ShiftedSums acc = shifted_empty();
  for (int64_t i = begin; i < end; ++i) {
    const double x = double(s[i]);
    if (score_is_valid(x)) shifted_push(acc, x);
  }
  out.ms = shifted_moments(acc);
  out.mx = out.ms;
  auto value = [&](int64_t i) { return xr != nullptr ? xr[i] : double(s[i]); };
  if (xr != nullptr) {
    scratch.clear();
    for (int64_t i = begin; i < end; ++i) scratch.push_back(i);
    unlikely_group(s, a.loglik, a.params.lam, scratch, xr);
    acc = shifted_empty();
    for (int64_t i = begin; i < end; ++i)
      if (score_is_valid(xr[i])) shifted_push(acc, xr[i]);
    out.mx = shifted_moments(acc);
  }
  out.ext = extras_empty();
  if (need.any()) {
    for (int64_t i = begin; i < end; ++i) {
      const double x = value(i);
      if (score_is_valid(x))
        extras_push(out.ext, need, x, i, out.mx.mean, a.weights ? a.weights[i] : 1.0,
                    a.loglik ? a.loglik[i] : 0.0);
    }
    extras_finish(out.ext, need, out.mx);
  }
  return out;
}

template <typename T, typename O>
void run_contiguous(const GroupAdvantagesArgs& a, AdvantageParams p) {
  const T* s = static_cast<const T*>(a.rows.scores);
  const int64_t gs = a.rows.group_size, k = a.rows.n / gs;
  const ExtrasNeeded need = extras_needed(p.estimator);
  static thread_local Workspace<double> xr_store;
  double* xr = p.estimator == kUnlikely ? xr_store.get(size_t(a.rows.n)) : nullptr;
  if (p.batch_scope || p.estimator == kReinforcePPBaseline) {
    std::vector<GroupMoments> mx(static_cast<size_t>(k));
    std::vector<GroupExtras> ext(static_cast<size_t>(k));
    at::parallel_for(0, k, grain_groups(gs), [&](int64_t b, int64_t e) {
      std::vector<int64_t> scratch;
      for (int64_t g = b; g < e; ++g) {
        const GroupSummary sum =
            summarize_contiguous(a, s, g * gs, (g + 1) * gs, need, xr, scratch);
        mx[g] = sum.mx;
        ext[g] = sum.ext;
      }
    });
    batch_constants(mx.data(), ext.data(), k, 0.0, 0.0, &p);
  } else if (p.estimator == kGpg) {
    double valid = 0.0, nonzero = 0.0;
    count_rows(s, a.rows.n, &valid, &nonzero);
    batch_constants(nullptr, nullptr, 0, valid, nonzero, &p);
  }
  const RowOut<O> out{static_cast<O*>(a.out.advantages), static_cast<O*>(a.out.group_mean),
                      static_cast<O*>(a.out.group_std), a.out.zero_variance};
  int64_t done = 0;  // groups written by the eight-lane path
#if defined(RLKERN_LANES8)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<O, float>) {
    if (lanes::applies(p) && xr == nullptr) {
      const auto apart = [&](const auto* o) {  // o[0, n) and s[0, n) share no byte
        const auto oa = reinterpret_cast<uintptr_t>(o), sa = reinterpret_cast<uintptr_t>(s);
        const auto n = uintptr_t(a.rows.n);
        return oa + n * sizeof(*o) <= sa || sa + n * sizeof(*s) <= oa;
      };
      const lanes::Out lo{out.adv, out.mean, out.std, out.zv,
                          apart(out.adv) && apart(out.mean) && apart(out.std) &&
                              apart(out.zv)};
      const int64_t blocks = k / 8;
      at::parallel_for(0, blocks, std::max<int64_t>(1, kLaneGrainRows / (gs * 8)),
                       [&](int64_t b, int64_t e) { lanes::contiguous_blocks(s, b, e, gs, p, lo); });
      done = blocks * 8;
    }
  }
#endif
  at::parallel_for(done, k, grain_groups(gs), [&](int64_t b, int64_t e) {
    std::vector<int64_t> scratch;
    for (int64_t g = b; g < e; ++g) {
      const int64_t begin = g * gs, end = begin + gs;
      const GroupSummary sum = summarize_contiguous(a, s, begin, end, need, xr, scratch);
      const GroupExtras* e = need.any() ? &sum.ext : nullptr;
      const HotRecord<O> hot = hot_record<O>(sum.ms, sum.mx, e, p);
      const ColdRecord cold = cold_record(sum.mx, e, p);
      const ColdRecord* c = needs_cold(p) ? &cold : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const double x = xr != nullptr ? xr[i] : double(s[i]);
        write_row(out, i, x, score_is_valid(x), hot, c, p, a.loglik);
      }
    }
  });
}

// ----------------------------------------------------------------------------- by ids

// The estimators whose every group is centred on its mean (grpo, dr_grpo, rloo, gpg) with
// float32 scores: one row pass gathering a 16-byte record per group (advantages_ids.h).
// Returns false, having written nothing, when some group is centred elsewhere (verl's
// singletons: b = 0); the caller then runs the general passes.
// The compact records of `count` groups (moments ms, also those of the values normalised)
// into rec; false when some group is centred elsewhere than on its mean.
bool compact_records(const GroupMoments* ms, int64_t count, const AdvantageParams& p,
                     CompactRecord* rec) {
  bool ok = true;
  int64_t g0 = 0;  // groups recorded eight at a time
#if defined(RLKERN_LANES8)
  if (lanes::applies(p)) {
    for (; g0 + 8 <= count; g0 += 8) {
      const lanes::Records8 r = lanes::records8(ms + g0, p);
      ok = ok && r.centred == 0xff;
      for (int l = 0; l < 8; ++l)
        rec[g0 + l] = compact_record(r.mean[l], r.scale[l], r.sd[l], (r.zero_var >> l) & 1);
    }
  }
#endif
  for (int64_t g = g0; g < count; ++g) {
    const HotRecord<float> h = hot_record<float>(ms[g], ms[g], nullptr, p);
    // A group without a valid row, or one whose rows all get 0 (scale 0: a singleton under
    // singleton="zero"), may take its mean as centre: its advantages stay 0.
    const bool centred = ms[g].n == 0.0 || h.scale == 0.0f || h.center == ms[g].mean;
    ok = ok && centred;
    rec[g] = compact_record(ms[g].mean, h.scale, h.std, h.zero_variance);
  }
  return ok;
}

// The row pass of the compact path: A = (x − center)·scale and the group's mean, σ and flag
// from each row's record.
template <typename Groups>
void compact_rows_pass(const GroupAdvantagesArgs& a, const Groups& rg, const CompactRecord* rec) {
  const float* x = static_cast<const float*>(a.rows.scores);
  float* adv = static_cast<float*>(a.out.advantages);
  float* mean = static_cast<float*>(a.out.group_mean);
  float* sd = static_cast<float*>(a.out.group_std);
  // Non-temporal stores once the outputs are far larger than the caches (and aligned).
  const bool aligned = ((reinterpret_cast<uintptr_t>(adv) | reinterpret_cast<uintptr_t>(mean) |
                         reinterpret_cast<uintptr_t>(sd)) & 63) == 0;
  const bool stream = aligned && a.rows.n >= (int64_t(1) << 19);
  at::parallel_for(0, a.rows.n, kCompactGrainRows, [&](int64_t b, int64_t e) {
    compact_rows(x, rg, rec, b, e, adv, mean, sd, a.out.zero_variance, stream);
  });
}

CompactRecord* compact_record_store(int64_t k) {
  static thread_local Workspace<CompactRecord> store;
  return store.get(size_t(k));
}

bool compact_pass(const GroupAdvantagesArgs& a, const AdvantageParams& p,
                  const std::vector<GroupMoments>& ms, const int32_t* rg, int64_t k) {
  CompactRecord* rec = compact_record_store(k);
  std::atomic<bool> ok{true};
  at::parallel_for(0, k, kRecordGrainGroups, [&](int64_t b, int64_t e) {
    if (!compact_records(ms.data() + b, e - b, p, rec + b))
      ok.store(false, std::memory_order_relaxed);
  });
  if (!ok.load()) return false;
  compact_rows_pass(a, GroupArray{rg}, rec);
  return true;
}

// The estimators whose records need only each group's own moments (no batch constant, no
// extras): their records are formed by the thread that summed the group, chunk by chunk,
// without the moments array and its pass (fused_compact_pass).
bool records_need_only_groups(const AdvantageParams& p) {
  return (p.estimator == kGrpo || p.estimator == kDrGrpo || p.estimator == kRloo ||
          p.estimator == kNgrpo) &&
         !p.batch_scope;
}

// compact_pass straight from the chunked shifted sums of float32 scores. False (rows untouched)
// when some group is centred elsewhere: the caller then takes the general passes.
template <typename Groups>
bool fused_compact_pass(const GroupAdvantagesArgs& a, const AdvantageParams& p,
                        const Groups& rg, int64_t k) {
  CompactRecord* rec = compact_record_store(k);
  std::atomic<bool> ok{true};
  shifted_sums_chunked(static_cast<const float*>(a.rows.scores), a.rows.n, rg, k,
                       [&](int64_t lo, int64_t size, const FloatShifted* acc) {
    constexpr int64_t kBlock = 256;  // moments of a block of groups, on the stack
    GroupMoments ms[kBlock];
    bool chunk_ok = true;
    for (int64_t b = 0; b < size; b += kBlock) {
      const int64_t m = std::min(kBlock, size - b);
      for (int64_t g = 0; g < m; ++g) ms[g] = float_shifted_moments(acc[b + g]);
      chunk_ok = compact_records(ms, m, p, rec + lo + b) && chunk_ok;
    }
    if (!chunk_ok) ok.store(false, std::memory_order_relaxed);
  });
  if (!ok.load()) return false;
  compact_rows_pass(a, rg, rec);
  return true;
}

template <typename T, typename O>
void run_ids(const GroupAdvantagesArgs& a, AdvantageParams p) {
  const T* s = static_cast<const T*>(a.rows.scores);
  const int64_t n = a.rows.n;
  // Per-thread scratch kept across calls. Bound to references here: a thread_local named
  // inside a parallel_for body would resolve to the worker thread's own (empty) instance.
  static thread_local Workspace<int32_t> row_group_store;
  static thread_local std::vector<GroupMoments> ms_tl, mx_tl;
  static thread_local std::vector<GroupExtras> ext_tl;
  std::vector<GroupMoments>& ms = ms_tl;
  std::vector<GroupMoments>& mx_store = mx_tl;
  std::vector<GroupExtras>& ext = ext_tl;
  int32_t* rows = row_group_store.get(size_t(n));
  const std::optional<IdRange> dense_ids = dense_range(a.rows.group_ids, n);
  const bool dense = dense_ids.has_value();
  const IdRange range = dense_ids.value_or(IdRange{0, -1});
  Grouping grouping;
  if constexpr (std::is_same_v<T, float>) {
    // Number the groups first (no accumulator: a small table, or none for dense ids), then
    // the moments one L2-sized chunk of groups at a time (advantages_ids.h).
    const bool fusable = std::is_same_v<O, float> && records_need_only_groups(p);
    // Nearly dense ids need no row-group array on this path: the passes read id − min.
    if (dense && fusable &&
        fused_compact_pass(a, p, DenseIds{a.rows.group_ids, range.min},
                           int64_t(uint64_t(range.max) - uint64_t(range.min)) + 1))
      return;
    grouping = dense ? dense_numbering(a.rows.group_ids, n, range, rows)
                     : group_by_ids_parallel<T, false>(a.rows.group_ids, n, nullptr, rows, nullptr);
    if (!dense && fusable &&
        fused_compact_pass(a, p, GroupArray{grouping.row_group}, grouping.num_groups))
      return;
    moments_chunked(s, n, grouping.row_group, grouping.num_groups, &ms);
  } else {  // float64 scores: shifted sums accumulated with the numbering (group_stats.h)
    grouping = dense ? group_by_dense_ids<T>(a.rows.group_ids, n, range, s, rows, &ms)
                     : group_by_ids_parallel<T, true>(a.rows.group_ids, n, s, rows, &ms);
  }
  const int64_t k = grouping.num_groups;
  const int32_t* rg = grouping.row_group;

  // The values the estimator normalises: the scores, or unlikely's r'.
  static thread_local Workspace<double> xr_store;
  double* xr = nullptr;
  if (p.estimator == kUnlikely) {
    xr = xr_store.get(size_t(n));
    const GroupRows gr = group_rows(grouping, n);
    at::parallel_for(0, k, grain_groups(8), [&](int64_t b, int64_t e) {
      std::vector<int64_t> rows;
      for (int64_t g = b; g < e; ++g) {
        rows.assign(gr.rows.begin() + gr.offsets[g], gr.rows.begin() + gr.offsets[g + 1]);
        unlikely_group(s, a.loglik, a.params.lam, rows, xr);
      }
    });
    std::vector<ShiftedSums> acc(size_t(k), shifted_empty());
    for (int64_t i = 0; i < n; ++i)
      if (score_is_valid(xr[i])) shifted_push(acc[rg[i]], xr[i]);
    mx_store.resize(size_t(k));
    for (int64_t g = 0; g < k; ++g) mx_store[g] = shifted_moments(acc[g]);
  }
  const std::vector<GroupMoments>& mx = xr != nullptr ? mx_store : ms;
  auto value = [&](int64_t i) { return xr != nullptr ? xr[i] : double(s[i]); };

  const ExtrasNeeded need = extras_needed(p.estimator);
  if (need.any()) {
    ext.assign(size_t(k), extras_empty());
    for (int64_t i = 0; i < n; ++i) {  // row order: deterministic top rows and sums
      const double x = value(i);
      if (score_is_valid(x))
        extras_push(ext[rg[i]], need, x, i, mx[rg[i]].mean, a.weights ? a.weights[i] : 1.0,
                    a.loglik ? a.loglik[i] : 0.0);
    }
    for (int64_t g = 0; g < k; ++g) extras_finish(ext[g], need, mx[g]);
  }
  double valid = 0.0, nonzero = 0.0;
  if (p.estimator == kGpg) count_rows(s, n, &valid, &nonzero);
  batch_constants(mx.data(), need.any() ? ext.data() : nullptr, k, valid, nonzero, &p);

  const bool with_cold = needs_cold(p);
  if constexpr (std::is_same_v<T, float> && std::is_same_v<O, float>) {
    if (!need.any() && !with_cold && xr == nullptr && compact_pass(a, p, ms, rg, k)) return;
  }

  // Per-group results as separate arrays, applied in two row passes: each pass gathers from
  // arrays small enough to stay in L2 (for 131k groups: 1.5 MiB, then 1.1 MiB), which costs
  // far less than one pass gathering from a single 3 MiB array of records.
  static thread_local Workspace<double> center_store;
  static thread_local Workspace<O> scale_store, mean_store, std_store;
  static thread_local Workspace<uint8_t> zv_store;
  static thread_local std::vector<ColdRecord> cold_tl;
  std::vector<ColdRecord>& cold = cold_tl;
  double* center = center_store.get(size_t(k));
  O* scale = scale_store.get(size_t(k));
  O* g_mean = mean_store.get(size_t(k));
  O* g_std = std_store.get(size_t(k));
  uint8_t* g_zv = zv_store.get(size_t(k));
  if (with_cold) cold.resize(size_t(k));
  at::parallel_for(0, k, kGrainRows, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const GroupExtras* ex = need.any() ? &ext[g] : nullptr;
      const HotRecord<O> h = hot_record<O>(ms[g], mx[g], ex, p);
      center[g] = h.center;
      scale[g] = h.scale;
      g_mean[g] = h.mean;
      g_std[g] = h.std;
      g_zv[g] = h.zero_variance;
      if (with_cold) cold[g] = cold_record(mx[g], ex, p);
    }
  });
  O* adv = static_cast<O*>(a.out.advantages);
  O* mean_out = static_cast<O*>(a.out.group_mean);
  O* std_out = static_cast<O*>(a.out.group_std);
  at::parallel_for(0, n, kGrainRows, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int32_t g = rg[i];
      const double x = value(i);
      double out = 0.0;
      if (score_is_valid(x)) {
        if (!with_cold) {
          out = (x - center[g]) * double(scale[g]);
        } else if (p.estimator == kGrpoPassk) {
          out = i == cold[g].top_row ? cold[g].top_value : 0.0;
        } else {  // xrpo
          out = (x - center[g]) * double(scale[g]);
          if (cold[g].active) out = xrpo_sharpen(out, a.loglik[i], cold[g].loglik_mean, p);
        }
      }
      adv[i] = O(out);
    }
    for (int64_t i = b; i < e; ++i) {
      const int32_t g = rg[i];
      mean_out[i] = g_mean[g];
      std_out[i] = g_std[g];
      a.out.zero_variance[i] = g_zv[g] != 0;
    }
  });
}

template <typename T>
Status passk_singletons(const GroupAdvantagesArgs& a) {
  // verl raises on a pass@k group with a single response; so does singleton = "verl".
  const T* s = static_cast<const T*>(a.rows.scores);
  std::vector<GroupMoments> ms;
  std::vector<int32_t> rg(static_cast<size_t>(a.rows.n));
  const Grouping grouping =
      a.rows.group_ids != nullptr
          ? group_by_keys<1, T>(a.rows.group_ids, nullptr, a.rows.n, s, rg.data(), &ms)
          : contiguous_grouping(a.rows.n, a.rows.group_size);
  if (a.rows.group_ids == nullptr) {
    ms.assign(size_t(grouping.num_groups), moments_empty());
    for (int64_t i = 0; i < a.rows.n; ++i)
      if (score_is_valid(double(s[i]))) moments_push(ms[grouping.group_of(i)], double(s[i]));
  }
  for (int64_t i = 0; i < a.rows.n; ++i)
    if (score_is_valid(double(s[i])) && ms[grouping.group_of(i)].n == 1.0)
      return {Status::kPasskSingleton, i};
  return {};
}

// The first non-finite score as a Status when they are an error.
template <typename T>
Status check_scores(const T* s, int64_t n, bool nan_omit) {
  const int64_t bad = nan_omit ? -1 : first_invalid(s, n);
  return bad >= 0 ? Status{Status::kInvalidScore, bad} : Status{};
}

template <typename T, typename O>
Status run_group_advantages(const GroupAdvantagesArgs& a) {
  const T* s = static_cast<const T*>(a.rows.scores);
  Status st = check_scores(s, a.rows.n, a.params.nan_omit);
  if (st.code == Status::kOk && a.params.estimator == kGrpoPassk && a.params.singleton_verl)
    st = passk_singletons<T>(a);
  if (st.code != Status::kOk) return st;
  if (a.rows.group_ids != nullptr) {
    run_ids<T, O>(a, a.params);
  } else {
    run_contiguous<T, O>(a, a.params);
  }
  return {};
}

template <typename T, typename O>
Status run_group_finish(const GroupFinishArgs& a) {
  const T* s = static_cast<const T*>(a.rows.scores);
  const Status st = check_scores(s, a.rows.n, a.params.nan_omit);
  if (st.code != Status::kOk) return st;
  AdvantageParams p = a.params;
  double valid = 0.0, nonzero = 0.0;
  if (p.estimator == kGpg) count_rows(s, a.rows.n, &valid, &nonzero);
  batch_constants(a.moments, nullptr, a.num_groups, valid, nonzero, &p);
  std::vector<HotRecord<O>> records(static_cast<size_t>(a.num_groups));
  at::parallel_for(0, a.num_groups, kGrainRows, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g)
      records[g] = hot_record<O>(a.moments[g], a.moments[g], nullptr, p);
  });
  const RowOut<O> out{static_cast<O*>(a.out.advantages), static_cast<O*>(a.out.group_mean),
                      static_cast<O*>(a.out.group_std), a.out.zero_variance};
  at::parallel_for(0, a.rows.n, kGrainRows, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double x = double(s[i]);
      write_row(out, i, x, score_is_valid(x), records[a.row_group[i]], nullptr, p, nullptr);
    }
  });
  return {};
}

// run(T{}, O{}) with the score type T and the output type O of a call (float or double).
template <typename F>
Status dispatch(const ScoreRows& rows, const RowOutputs& out, F&& run) {
  if (rows.f64) return out.f64 ? run(double{}, double{}) : run(double{}, float{});
  return out.f64 ? run(float{}, double{}) : run(float{}, float{});
}

}  // namespace

Status group_advantages(const GroupAdvantagesArgs& a) {
  if (a.rows.n == 0) return {};
  return dispatch(a.rows, a.out, [&](auto t, auto o) {
    return run_group_advantages<decltype(t), decltype(o)>(a);
  });
}

Status group_finish(const GroupFinishArgs& a) {
  if (a.rows.n == 0) return {};
  return dispatch(a.rows, a.out, [&](auto t, auto o) {
    return run_group_finish<decltype(t), decltype(o)>(a);
  });
}

Status group_moments(const ScoreRows& rows, bool nan_omit, int64_t* keys_out,
                     GroupMoments* moments_out, int64_t* num_groups) {
  *num_groups = 0;
  if (rows.n == 0) return {};
  auto run = [&](auto* s) -> Status {
    const Status st = check_scores(s, rows.n, nan_omit);
    if (st.code != Status::kOk) return st;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
    std::vector<GroupMoments> mom;
    std::vector<int64_t> keys;
    if (rows.group_ids != nullptr) {
      std::vector<int32_t> rg(static_cast<size_t>(rows.n));
      group_by_keys<1, T>(rows.group_ids, nullptr, rows.n, s, rg.data(), &mom, &keys);
    } else {
      const int64_t gs = rows.group_size, k = rows.n / gs;
      mom.resize(size_t(k));
      keys.resize(size_t(k));
      for (int64_t g = 0; g < k; ++g) {
        ShiftedSums acc = shifted_empty();
        for (int64_t i = g * gs; i < (g + 1) * gs; ++i)
          if (score_is_valid(double(s[i]))) shifted_push(acc, double(s[i]));
        mom[g] = shifted_moments(acc);
        keys[g] = g;
      }
    }
    *num_groups = int64_t(mom.size());
    std::copy(keys.begin(), keys.end(), keys_out);
    std::copy(mom.begin(), mom.end(), moments_out);
    return {};
  };
  return rows.f64 ? run(static_cast<const double*>(rows.scores))
                  : run(static_cast<const float*>(rows.scores));
}

void moments_merge_rows(const GroupMoments* a, const GroupMoments* b, int64_t k,
                        GroupMoments* out) {
  at::parallel_for(0, k, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) out[g] = moments_merge(a[g], b[g]);
  });
}

}  // namespace rlkern::cpu
