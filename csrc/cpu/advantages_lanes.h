// Contiguous groups eight at a time (AVX-512): group g0 + l in lane l of double vectors, for
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

#include "rlkern/group_stats.h"

#if defined(__AVX512F__)

#include <immintrin.h>

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

// The first index in [begin, end) whose value is not finite (NaN or ±inf), or -1: sixteen
// floats per compare (x − x is 0 exactly for the finite ones, as score_is_valid tests).
inline int64_t first_nonfinite(const float* x, int64_t begin, int64_t end) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
    if (ok != 0xffff) return i + __builtin_ctz(~uint32_t(ok));
  }
  for (; i < end; ++i)
    if (!(x[i] - x[i] == 0.0f)) return i;
  return -1;
}

// The outputs of a call: float32 advantages, group mean and σ per row, zero-variance flags.
struct Out {
  float* adv;
  float* mean;
  float* std;
  bool* zv;
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
  __m512d center, scale;
  __m256 mean, sd;
  __mmask8 zero_var;
};

// hot_record for eight groups' moments (n, mean, m2 and flat = min == max, as GroupMoments
// holds them): moments_std, group_affine's centre and scale for these estimators, the float32
// roundings of scale, mean and σ, moments_zero_variance.
inline Stats8 affine8(__m512d n, __m512d mean, __m512d m2, __mmask8 flat,
                      const AdvantageParams& p) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d nan = _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN());
  const __mmask8 empty = _mm512_cmp_pd_mask(n, zero, _CMP_EQ_OQ);
  // moments_std
  const __mmask8 small = _mm512_cmp_pd_mask(n, _mm512_set1_pd(2.0), _CMP_LT_OQ);  // n < 2
  const __m512d denom = p.std_mode == kStdBiased ? n : _mm512_sub_pd(n, one);
  __m512d sd = _mm512_sqrt_pd(_mm512_div_pd(m2, denom));
  sd = _mm512_mask_mov_pd(sd, small, zero);
  sd = _mm512_mask_mov_pd(sd, empty, nan);
  const __mmask8 zero_var = __mmask8(flat & ~small);
  // group_affine
  const __mmask8 single = __mmask8(small & ~empty);
  const __mmask8 active = __mmask8(~small | (p.singleton_verl ? single : __mmask8(0)));
  const __m512d center = _mm512_maskz_mov_pd(__mmask8(active & ~small), mean);
  __m512d scale = one;
  if (p.estimator == kRloo) {
    scale = _mm512_mask_div_pd(one, __mmask8(~small), n, _mm512_sub_pd(n, one));
  } else if (p.estimator == kGpg) {
    scale = _mm512_set1_pd(p.gpg_alpha);
  } else if (p.estimator == kGrpo && p.std_mode != kStdNone) {
    const __m512d sigma = p.batch_scope ? _mm512_set1_pd(p.batch_std)
                                        : _mm512_mask_mov_pd(sd, single, one);
    const __m512d spread = _mm512_add_pd(sigma, _mm512_set1_pd(p.eps));
    scale = _mm512_maskz_div_pd(_mm512_cmp_pd_mask(spread, zero, _CMP_NEQ_UQ), one, spread);
  }
  scale = _mm512_maskz_mov_pd(active, scale);
  // hot_record's float32 values
  return {center, _mm512_cvtps_pd(_mm512_cvtpd_ps(scale)), _mm512_cvtpd_ps(mean),
          _mm512_cvtpd_ps(sd), zero_var};
}

// What the ids path's compact pass (advantages.cpp) records of eight groups ms[0 .. 8) whose
// moments are also those of the values normalised: the double mean (the record's centre),
// hot_record's float32 scale and σ, the zero-variance flags, and which groups are centred on
// their mean (compact_pass's test: empty, scale 0, or centre == mean). Vector divisions and
// square roots: the scalar loop spent ~9 ns a group on them.
struct Records8 {
  alignas(64) double mean[8];
  alignas(32) float scale[8];
  alignas(32) float sd[8];
  __mmask8 zero_var, centred;
};

inline Records8 records8(const GroupMoments* ms, const AdvantageParams& p) {
  static_assert(sizeof(GroupMoments) == 5 * sizeof(double), "GroupMoments: five doubles");
  const __m256i at = _mm256_setr_epi32(0, 5, 10, 15, 20, 25, 30, 35);  // group l, in doubles
  const double* base = &ms[0].n;
  const __m512d n = _mm512_i32gather_pd(at, base + 0, 8);
  const __m512d mean = _mm512_i32gather_pd(at, base + 1, 8);
  const __m512d m2 = _mm512_i32gather_pd(at, base + 2, 8);
  const __mmask8 flat = _mm512_cmp_pd_mask(_mm512_i32gather_pd(at, base + 3, 8),
                                           _mm512_i32gather_pd(at, base + 4, 8), _CMP_EQ_OQ);
  const Stats8 st = affine8(n, mean, m2, flat, p);
  Records8 r;
  _mm512_store_pd(r.mean, mean);
  _mm256_store_ps(r.scale, _mm512_cvtpd_ps(st.scale));
  _mm256_store_ps(r.sd, st.sd);
  r.zero_var = st.zero_var;
  r.centred = __mmask8(_mm512_cmp_pd_mask(n, _mm512_setzero_pd(), _CMP_EQ_OQ) |
                       _mm512_cmp_pd_mask(st.scale, _mm512_setzero_pd(), _CMP_EQ_OQ) |
                       _mm512_cmp_pd_mask(st.center, mean, _CMP_EQ_OQ));
  return r;
}

// The statistics of groups [g0, g0 + 8) of the scores `s` (the batch's first row at s[0]).
inline Stats8 stats8(const float* s, int64_t g0, int64_t gs, const AdvantageParams& p) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d nan = _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN());
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(int32_t(gs)));
  const float* first = s + g0 * gs;
  // shifted_push, lane by lane: row j of the eight groups per step.
  __m512d n = zero, shift = zero, s1 = zero, s2 = zero;
  __m512d mn = _mm512_set1_pd(INFINITY), mx = _mm512_set1_pd(-INFINITY);
  __mmask8 seen = 0;
  auto push = [&](__m256 row_j) {
    const __m512d x = _mm512_cvtps_pd(row_j);
    const __mmask8 v = _mm512_cmp_pd_mask(_mm512_sub_pd(x, x), zero, _CMP_EQ_OQ);  // finite
    shift = _mm512_mask_mov_pd(shift, __mmask8(v & ~seen), x);
    seen = __mmask8(seen | v);
    const __m512d d = _mm512_sub_pd(x, shift);
    n = _mm512_mask_add_pd(n, v, n, one);
    s1 = _mm512_mask_add_pd(s1, v, s1, d);
    s2 = _mm512_mask3_fmadd_pd(d, d, s2, v);
    mn = _mm512_mask_min_pd(mn, v, x, mn);  // x < min ? x : min
    mx = _mm512_mask_max_pd(mx, v, x, mx);  // x > max ? x : max
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
  const __mmask8 empty = _mm512_cmp_pd_mask(n, zero, _CMP_EQ_OQ);
  const __mmask8 flat = _mm512_cmp_pd_mask(mn, mx, _CMP_EQ_OQ);  // never for an empty group
  const __m512d q = _mm512_div_pd(s1, n);
  __m512d mean = _mm512_mask_mov_pd(_mm512_add_pd(shift, q), flat, mn);
  mean = _mm512_mask_mov_pd(mean, empty, nan);
  __m512d m2 = _mm512_fnmadd_pd(s1, q, s2);
  m2 = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(m2, zero, _CMP_GT_OQ), m2);  // NaN → 0 too
  m2 = _mm512_mask_mov_pd(m2, __mmask8(flat | empty), zero);
  return affine8(n, mean, m2, flat, p);
}

// The rows of groups [g0, g0 + 8): A = (x − center) · scale, and each group's mean, σ and
// zero-variance flag.
inline void write8(const float* s, int64_t g0, int64_t gs, const Stats8& st, const Out& out) {
  const __m512d zero = _mm512_setzero_pd();
  alignas(64) double c_l[8], sc_l[8];
  alignas(32) float mean_l[8], sd_l[8];
  _mm512_store_pd(c_l, st.center);
  _mm512_store_pd(sc_l, st.scale);
  _mm256_store_ps(mean_l, st.mean);
  _mm256_store_ps(sd_l, st.sd);
  for (int l = 0; l < 8; ++l) {
    const int64_t begin = (g0 + l) * gs;
    const __m512d c = _mm512_set1_pd(c_l[l]), sc = _mm512_set1_pd(sc_l[l]);
    const __m256 mean_v = _mm256_set1_ps(mean_l[l]), sd_v = _mm256_set1_ps(sd_l[l]);
    if (gs % 8 == 0) {
      // Whole vectors and 8-byte flag stores, cheaper than the masked stores and the memset
      // call per group below.
      const uint64_t zv8 = ((st.zero_var >> l) & 1) ? 0x0101010101010101ull : 0;
      for (int64_t i = begin; i < begin + gs; i += 8) {
        const __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(s + i));
        const __mmask8 v = _mm512_cmp_pd_mask(_mm512_sub_pd(x, x), zero, _CMP_EQ_OQ);
        const __m512d a = _mm512_maskz_mul_pd(v, _mm512_sub_pd(x, c), sc);
        _mm256_storeu_ps(out.adv + i, _mm512_cvtpd_ps(a));
        _mm256_storeu_ps(out.mean + i, mean_v);
        _mm256_storeu_ps(out.std + i, sd_v);
        std::memcpy(out.zv + i, &zv8, 8);
      }
      continue;
    }
    for (int64_t j = 0; j < gs; j += 8) {
      const __mmask8 m = gs - j >= 8 ? __mmask8(0xff) : __mmask8((1u << (gs - j)) - 1u);
      const int64_t i = begin + j;
      const __m512d x = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, s + i));
      const __mmask8 v = _mm512_cmp_pd_mask(_mm512_sub_pd(x, x), zero, _CMP_EQ_OQ);
      const __m512d a = _mm512_maskz_mul_pd(v, _mm512_sub_pd(x, c), sc);
      _mm256_mask_storeu_ps(out.adv + i, m, _mm512_cvtpd_ps(a));
      _mm256_mask_storeu_ps(out.mean + i, m, mean_v);
      _mm256_mask_storeu_ps(out.std + i, m, sd_v);
    }
    std::memset(out.zv + begin, (st.zero_var >> l) & 1, size_t(gs));
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

#endif  // __AVX512F__

namespace rlkern::cpu {

// The first index in [begin, end) whose value fails score_is_valid (NaN or ±inf), or -1:
// float32 sixteen at a time with AVX-512 (a scalar loop with an early exit does not vectorise).
template <typename T>
int64_t first_nonfinite_in(const T* x, int64_t begin, int64_t end) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return lanes::first_nonfinite(x, begin, end);
#endif
  for (int64_t i = begin; i < end; ++i)
    if (!score_is_valid(double(x[i]))) return i;
  return -1;
}

}  // namespace rlkern::cpu
