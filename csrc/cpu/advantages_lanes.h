// Contiguous groups eight at a time (AVX-512, or AVX2 + FMA: lanes8.h): group g0 + l in lane l
// of double vectors, for
// the estimators whose advantage is (x − group mean) · scale (grpo, dr_grpo, rloo, gpg) on
// float32 scores and outputs. The scalar path (advantages.cpp) summarises one group at a time:
// a chain of dependent double additions per group, then a division and a square root, then
// the rows one at a time, which left the op at ~7 ns a row. Here one instruction serves eight
// groups, and each group's rows are written eight at a time.
//
// Bit for bit the scalar path's numbers: the same shifted sums in the same row order (the
// first valid value as the shift, Σd by addition, Σd² by the FMA the scalar loop compiles to,
// min / max with the same operand order), the same moments (shifted_moments: the min == max
// and empty cases), σ (moments_std), group_affine's centre and scale for these estimators
// (group_stats.h), the same float32 roundings of scale, mean and σ, and the same row formula.
// tests/test_advantages_lanes.py compares the two paths on every option.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/lanes8.h"
#include "rlkern/group_stats.h"

#if defined(RLKERN_LANES8)

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace rlkern::cpu::lanes {

// Whether contiguous8 computes `p`'s estimator (the others need extras, a cold record or
// rank-shaped values: the scalar path).
inline bool applies(const AdvantageParams& p) {
  return p.estimator == kGrpo || p.estimator == kDrGrpo || p.estimator == kRloo ||
         p.estimator == kGpg;
}

// The first index in [begin, end) whose value is not finite (NaN or ±inf), or -1: a vector of
// floats per compare (x − x is 0 exactly for the finite ones, as score_is_valid tests).
inline int64_t first_nonfinite(const float* x, int64_t begin, int64_t end) {
  int64_t i = begin;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  for (; i + 16 <= end; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
    if (ok != 0xffff) return i + __builtin_ctz(~uint32_t(ok));
  }
#else
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= end; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const int ok = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_EQ_OQ));
    if (ok != 0xff) return i + __builtin_ctz(~uint32_t(ok));
  }
#endif
  for (; i < end; ++i)
    if (!(x[i] - x[i] == 0.0f)) return i;
  return -1;
}

// The outputs of a call: float32 advantages, group mean and σ per row, zero-variance flags.
// `overrun`: write8 may store whole vectors past a group's last row into the rows of the
// groups after it in the same eight, which store their own rows afterwards. Only where no
// output overlaps the scores (the later groups' scores are read after those stores).
struct Out {
  float* adv;
  float* mean;
  float* std;
  bool* zv;
  bool overrun = false;
};

// c[j] = (r[0][j], ..., r[7][j]): the 8×8 transpose of eight rows of eight floats.
inline void transpose8(const __m256 r[8], __m256 c[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)  // h: rows 0–3, rows 4–7
    for (int i = 0; i < 2; ++i) {
      u[4 * h + 2 * i] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * h + 2 * i + 1] =
          _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    c[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

// What the rows of eight groups need, group g0 + l in lane l: hot_record's centre and float32
// scale (as doubles), the float32 mean and σ, the zero-variance flags.
struct Stats8 {
  D8 center, scale;
  __m256 mean, sd;
  M8 zero_var;
};

// hot_record for eight groups' moments (n, mean, m2 and flat = min == max, as GroupMoments
// holds them): moments_std, group_affine's centre and scale for these estimators, the float32
// roundings of scale, mean and σ, moments_zero_variance.
inline Stats8 affine8(D8 n, D8 mean, D8 m2, M8 flat, const AdvantageParams& p) {
  const D8 zero = lanes::zero(), one = set1(1.0);
  const D8 nan = set1(std::numeric_limits<double>::quiet_NaN());
  const M8 empty = cmp<_CMP_EQ_OQ>(n, zero);
  // moments_std
  const M8 small = cmp<_CMP_LT_OQ>(n, set1(2.0));  // n < 2
  const D8 denom = p.std_mode == kStdBiased ? n : n - one;
  D8 sd = lanes::sqrt(m2 / denom);
  sd = where(small, zero, sd);
  sd = where(empty, nan, sd);
  const M8 zero_var = flat & ~small;
  // group_affine
  const M8 single = small & ~empty;
  const M8 active = ~small | (p.singleton_verl ? single : no_lanes());
  const D8 center = zero_unless(active & ~small, mean);
  D8 scale = one;
  if (p.estimator == kRloo) {
    scale = where(~small, n / (n - one), one);
  } else if (p.estimator == kGpg) {
    scale = set1(p.gpg_alpha);
  } else if (p.estimator == kGrpo && p.std_mode != kStdNone) {
    const D8 sigma = p.batch_scope ? set1(p.batch_std) : where(single, one, sd);
    const D8 spread = sigma + set1(p.eps);
    scale = zero_unless(cmp<_CMP_NEQ_UQ>(spread, zero), one / spread);
  }
  scale = zero_unless(active, scale);
  // hot_record's float32 values
  return {center, widen(narrow(scale)), narrow(mean), narrow(sd), zero_var};
}

// What the ids path's compact pass (advantages.cpp) records of eight groups ms[0 .. 8) whose
// moments are also those of the values normalised: the double mean (the record's centre),
// hot_record's float32 scale and σ, the zero-variance flags, and which groups are centred on
// their mean (compact_pass's test: empty, scale 0, or centre == mean), bit l for group l. Vector
// divisions and square roots: the scalar loop spent ~9 ns a group on them.
struct Records8 {
  alignas(64) double mean[8];
  alignas(32) float scale[8];
  alignas(32) float sd[8];
  uint8_t zero_var, centred;
};

inline Records8 records8(const GroupMoments* ms, const AdvantageParams& p) {
  static_assert(sizeof(GroupMoments) == 5 * sizeof(double), "GroupMoments: five doubles");
  const __m256i at = _mm256_setr_epi32(0, 5, 10, 15, 20, 25, 30, 35);  // group l, in doubles
  const double* base = &ms[0].n;
  const D8 n = gather(base + 0, at), mean = gather(base + 1, at), m2 = gather(base + 2, at);
  const M8 flat = cmp<_CMP_EQ_OQ>(gather(base + 3, at), gather(base + 4, at));
  const Stats8 st = affine8(n, mean, m2, flat, p);
  Records8 r;
  store(r.mean, mean);
  _mm256_store_ps(r.scale, narrow(st.scale));
  _mm256_store_ps(r.sd, st.sd);
  r.zero_var = bits(st.zero_var);
  r.centred = bits(cmp<_CMP_EQ_OQ>(n, lanes::zero()) | cmp<_CMP_EQ_OQ>(st.scale, lanes::zero()) |
                   cmp<_CMP_EQ_OQ>(st.center, mean));
  return r;
}

// The statistics of groups [g0, g0 + 8) of the scores `s` (the batch's first row at s[0]).
inline Stats8 stats8(const float* s, int64_t g0, int64_t gs, const AdvantageParams& p) {
  const D8 zero = lanes::zero(), one = set1(1.0);
  const D8 nan = set1(std::numeric_limits<double>::quiet_NaN());
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(int32_t(gs)));
  const float* first = s + g0 * gs;
  // shifted_push, lane by lane: row j of the eight groups per step.
  D8 n = zero, shift = zero, s1 = zero, s2 = zero;
  D8 mn = set1(INFINITY), mx = set1(-INFINITY);
  M8 seen = no_lanes();
  auto push = [&](__m256 row_j) {
    const D8 x = widen(row_j);
    const M8 v = cmp<_CMP_EQ_OQ>(x - x, zero);  // finite
    shift = where(v & ~seen, x, shift);
    seen = seen | v;
    const D8 d = x - shift;
    n = where_add(v, n, one);
    s1 = where_add(v, s1, d);
    s2 = where_fmadd(v, d, d, s2);
    mn = where_min(v, x, mn);  // x < min ? x : min
    mx = where_max(v, x, mx);  // x > max ? x : max
  };
  if (gs % 8 == 0) {
    // Eight rows of the eight groups at a time: eight contiguous loads and an 8×8 transpose
    // (24 shuffles), where a gather per row position costs several times more.
    for (int64_t j0 = 0; j0 < gs; j0 += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(first + l * gs + j0);
      __m256 c[8];
      transpose8(r, c);
      for (int j = 0; j < 8; ++j) push(c[j]);
    }
  } else {
    for (int64_t j = 0; j < gs; ++j) push(_mm256_i32gather_ps(first + j, idx, 4));
  }
  // shifted_moments
  const M8 empty = cmp<_CMP_EQ_OQ>(n, zero);
  const M8 flat = cmp<_CMP_EQ_OQ>(mn, mx);  // never for an empty group
  const D8 q = s1 / n;
  D8 mean = where(flat, mn, shift + q);
  mean = where(empty, nan, mean);
  D8 m2 = fnmadd(s1, q, s2);
  m2 = zero_unless(cmp<_CMP_GT_OQ>(m2, zero), m2);  // NaN → 0 too
  m2 = where(flat | empty, zero, m2);
  return affine8(n, mean, m2, flat, p);
}

// The rows of groups [g0, g0 + 8): A = (x − center) · scale, and each group's mean, σ and
// zero-variance flag.
inline void write8(const float* s, int64_t g0, int64_t gs, const Stats8& st, const Out& out) {
  const D8 zero = lanes::zero();
  alignas(64) double c_l[8], sc_l[8];
  alignas(32) float mean_l[8], sd_l[8];
  store(c_l, st.center);
  store(sc_l, st.scale);
  _mm256_store_ps(mean_l, st.mean);
  _mm256_store_ps(sd_l, st.sd);
  const uint8_t zero_var = bits(st.zero_var);
  const int64_t end8 = (g0 + 8) * gs;  // one past the eight groups' rows
  for (int l = 0; l < 8; ++l) {
    const int64_t begin = (g0 + l) * gs;
    const D8 c = set1(c_l[l]), sc = set1(sc_l[l]);
    const __m256 mean_v = _mm256_set1_ps(mean_l[l]), sd_v = _mm256_set1_ps(sd_l[l]);
    const uint64_t zv8 = ((zero_var >> l) & 1) ? 0x0101010101010101ull : 0;  // 8 flags
    for (int64_t j = 0; j < gs; j += 8) {
      const int64_t m = std::min<int64_t>(8, gs - j);
      const int64_t i = begin + j;
      const D8 x = widen(m == 8 ? _mm256_loadu_ps(s + i) : load_first(s + i, m));
      const D8 a = zero_unless(cmp<_CMP_EQ_OQ>(x - x, zero), (x - c) * sc);
      if (m == 8 || (out.overrun && i + 8 <= end8)) {
        // Whole vectors and the flags as one 8-byte store: a masked store is microcoded on
        // AMD's cores (~10× a plain one on Zen 3), and groups of 4, 5, 6 or 12 rows end in a
        // partial step every group.
        _mm256_storeu_ps(out.adv + i, narrow(a));
        _mm256_storeu_ps(out.mean + i, mean_v);
        _mm256_storeu_ps(out.std + i, sd_v);
        std::memcpy(out.zv + i, &zv8, 8);
      } else {
        store_first(out.adv + i, m, narrow(a));
        store_first(out.mean + i, m, mean_v);
        store_first(out.std + i, m, sd_v);
        std::memset(out.zv + i, (zero_var >> l) & 1, size_t(m));
      }
    }
  }
}

// Groups [8·b, 8·e) of the scores `s`. The statistics end in a chain of a division, a square
// root and another division: the rows of the previous eight groups are written after the next
// eight's statistics are issued, so the out-of-order core can overlap the writes with the
// chain.
inline void contiguous_blocks(const float* s, int64_t b, int64_t e, int64_t gs,
                              const AdvantageParams& p, const Out& out) {
  if (b >= e) return;
  Stats8 prev = stats8(s, 8 * b, gs, p);
  for (int64_t i = b + 1; i < e; ++i) {
    const Stats8 cur = stats8(s, 8 * i, gs, p);
    write8(s, 8 * (i - 1), gs, prev, out);
    prev = cur;
  }
  write8(s, 8 * (e - 1), gs, prev, out);
}

}  // namespace rlkern::cpu::lanes

#endif  // RLKERN_LANES8

namespace rlkern::cpu {

// The first index in [begin, end) whose value fails score_is_valid (NaN or ±inf), or -1:
// float32 a vector at a time (a scalar loop with an early exit does not vectorise).
template <typename T>
int64_t first_nonfinite_in(const T* x, int64_t begin, int64_t end) {
#if defined(RLKERN_LANES8)
  if constexpr (std::is_same_v<T, float>) return lanes::first_nonfinite(x, begin, end);
#endif
  for (int64_t i = begin; i < end; ++i)
    if (!score_is_valid(double(x[i]))) return i;
  return -1;
}

}  // namespace rlkern::cpu
