// The float32 passes of group_advantages over arbitrary ids (csrc/cpu/advantages.cpp), once
// every row has its dense group number row_group[i] in [0, K):
//
//   1. group moments in one pass per *chunk of groups* (moments_chunked): the groups are split
//      into chunks whose accumulators (24 bytes a group) fit a core's L2, threads take whole
//      chunks, and each chunk streams every row and keeps its own (a vectorised filter). A
//      random access into an L2-resident array costs ~2 ns; into a 3–4 MiB one (all of
//      2^17 groups' accumulators) ~10 ns on the 2 MiB-L2 machines this runs on, so a second
//      streaming read of the rows is far cheaper than one pass with the whole array.
//      A group is accumulated by one thread, in row order, so the result does not depend on
//      the thread count or on the number of chunks.
//   2. one row pass gathering a 16-byte record per group (compact_rows) when every group's
//      centre is its mean — grpo, dr_grpo, rloo, gpg, any `std`, either `std_scope` — with
//      non-temporal stores for large batches (the 13 bytes of output per row would otherwise
//      evict the records from L2). Other estimators use advantages.cpp's general two passes.
//
// Numerics are exactly the contiguous path's shifted sums (rlkern/group_stats.h): the shift K
// is the group's first valid value in row order, d = x − K, Σd and Σd² in double. For float32
// values d is exact and d² cannot underflow, so Σd² == 0 exactly when all values equal K:
// that replaces the min/max pair (8 bytes a group) as the zero-variance test.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/compress_avx2.h"
#include "cpu/group_index.h"
#include "cpu/lanes8.h"
#include "cpu/workspace.h"
#include "rlkern/group_stats.h"

namespace rlkern::cpu {

// A group's shifted sums for float32 values: 24 bytes (the double version is 48).
struct FloatShifted {
  float shift;  // the group's first valid value
  uint32_t n;
  double s1, s2;  // Σ (x − shift), Σ (x − shift)²
};

// The moments of one group from its shifted sums, as shifted_moments() gives them except for
// min/max, which only serve the zero-variance test (moments_zero_variance, moments_merge):
// equal for a zero-variance group, (−inf, +inf) otherwise.
inline GroupMoments float_shifted_moments(const FloatShifted& a) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  if (a.n == 0) return GroupMoments{0.0, nan, 0.0, inf, -inf};
  const double n = double(a.n), k = double(a.shift);
  if (a.s2 == 0.0) return GroupMoments{n, k, 0.0, k, k};
  const double m2 = a.s2 - a.s1 * (a.s1 / n);
  return GroupMoments{n, k + a.s1 / n, m2 > 0.0 ? m2 : 0.0, -inf, inf};
}

// Rows of [begin, end) whose group lies in [lo, lo + size) and whose value is finite, appended
// to (local group, value) buffers; returns how many. The buffers need 16 entries of slack.
template <typename Groups>
int64_t select_chunk_rows(const float* x, const Groups& rg, int64_t begin, int64_t end,
                          int32_t lo, int32_t size, uint32_t* local, float* value) {
  int64_t m = 0, i = begin;
#if defined(__AVX512F__)
  const __m512i vlo = _mm512_set1_epi32(lo), vsize = _mm512_set1_epi32(size);
  for (; i + 16 <= end; i += 16) {
    // g − lo < size as unsigned is the range test; x − x == 0 is the finite test (NaN and
    // ±inf give NaN). The compress packs the selected lanes to the front of the vector.
    const __m512i g = _mm512_sub_epi32(rg.load16(i), vlo);
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 keep =
        _mm512_cmplt_epu32_mask(g, vsize) &
        _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
    _mm512_storeu_si512(local + m, _mm512_maskz_compress_epi32(keep, g));
    _mm512_storeu_ps(value + m, _mm512_maskz_compress_ps(keep, v));
    m += __builtin_popcount(unsigned(keep));
  }
#elif defined(__AVX2__)
  // The same eight at a time; AVX2 compares only signed integers, so the unsigned range test
  // compares both sides with their sign bits flipped.
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i vlo = _mm256_set1_epi32(lo);
  const __m256i vsize = _mm256_xor_si256(_mm256_set1_epi32(size), flip);
  for (; i + 8 <= end; i += 8) {
    const __m256i g = _mm256_sub_epi32(rg.load8(i), vlo);
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256i in_range = _mm256_cmpgt_epi32(vsize, _mm256_xor_si256(g, flip));
    const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ);
    const unsigned keep =
        unsigned(_mm256_movemask_ps(_mm256_and_ps(_mm256_castsi256_ps(in_range), finite)));
    const __m256i at = compress::lanes32(keep);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(local + m),
                        _mm256_permutevar8x32_epi32(g, at));
    _mm256_storeu_ps(value + m, _mm256_permutevar8x32_ps(v, at));
    m += __builtin_popcount(keep);
  }
#endif
  for (; i < end; ++i) {  // branch-free append: the entry is written, and kept or overwritten
    const uint32_t g = uint32_t(rg[i] - lo);
    local[m] = g;
    value[m] = x[i];
    m += int64_t(g < uint32_t(size) && x[i] - x[i] == 0.0f);
  }
  return m;
}

// The shifted sums of the finite values x grouped by row_group (K groups), one chunk of groups
// at a time: finish(lo, size, acc) receives groups [lo, lo + size) (acc[0 .. size)) from the
// thread that accumulated them, while they are still in its cache.
template <typename Groups, typename Finish>
void shifted_sums_chunked(const float* x, int64_t n, const Groups& row_group, int64_t k,
                          const Finish& finish) {
  constexpr int64_t kChunkBytes = int64_t(1536) << 10;  // of a 2 MiB L2: rows stream through
  constexpr int64_t kMinRowsPerThread = int64_t(1) << 15;
  const int64_t per_chunk_max = kChunkBytes / int64_t(sizeof(FloatShifted));
  int64_t chunks = (k + per_chunk_max - 1) / per_chunk_max;
  // Enough chunks for every thread once the batch is large enough to be worth splitting;
  // each extra chunk costs one more streaming read of (row_group, x): 8 bytes a row.
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n / kMinRowsPerThread);
  if (nt > 1 && chunks % nt != 0) chunks += nt - chunks % nt;
  chunks = std::max<int64_t>(1, std::min(chunks, k));
  const int64_t per_chunk = (k + chunks - 1) / chunks;
  static thread_local Workspace<FloatShifted> acc_ws;
  FloatShifted* acc = acc_ws.get(size_t(k));  // bound here, not in the workers (thread_local)
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    constexpr int64_t kBlock = 2048;
    uint32_t local[kBlock + 16];
    float value[kBlock + 16];
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t lo = c * per_chunk, size = std::min(per_chunk, k - lo);
      if (size <= 0) continue;
      FloatShifted* a = acc + lo;
      std::memset(static_cast<void*>(a), 0, size_t(size) * sizeof(FloatShifted));
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t m = select_chunk_rows(x, row_group, b, std::min(n, b + kBlock),
                                            int32_t(lo), int32_t(size), local, value);
        for (int64_t j = 0; j < m; ++j) {
          // Shifted sums (group_stats.h); the first value becomes the shift through a
          // select, not a branch: with groups of 8, one row in 8 is a group's first.
          FloatShifted& s = a[local[j]];
          const float v = value[j];
          const float shift = s.n == 0 ? v : s.shift;
          s.shift = shift;
          const double d = double(v) - double(shift);
          s.n += 1;
          s.s1 += d;
          s.s2 += d * d;
        }
      }
      finish(lo, size, static_cast<const FloatShifted*>(a));
    }
  });
}

// Moments of the finite values x grouped by row_group (K groups) into `out` (resized to K).
inline void moments_chunked(const float* x, int64_t n, const int32_t* row_group, int64_t k,
                            std::vector<GroupMoments>* out) {
  out->resize(size_t(k));
  GroupMoments* mom = out->data();
  shifted_sums_chunked(x, n, GroupArray{row_group}, k,
                       [&](int64_t lo, int64_t size, const FloatShifted* a) {
                         for (int64_t g = 0; g < size; ++g)
                           mom[lo + g] = float_shifted_moments(a[g]);
                       });
}

// What the row pass needs of a group whose centre is its mean: A = (x − center)·scale,
// group_mean = float(center), group_std = |std_zv|, zero_variance = signbit(std_zv) (a
// zero-variance group has std 0, stored as −0).
struct alignas(16) CompactRecord {
  double center;
  float scale;
  float std_zv;
};

inline CompactRecord compact_record(double center, float scale, float std, bool zero_variance) {
  return CompactRecord{center, scale, zero_variance ? -std::fabs(std) : std};
}

#if defined(RLKERN_LANES8)
// The 16-byte records of rows i .. i + 7, rec[rg[i]] .. rec[rg[i + 7]], split into their two
// 8-byte words in row order: first[0] / second[0] hold rows i .. i + 3, first[1] / second[1]
// rows i + 4 .. i + 7. Two records to a vector (an aligned 16-byte load each), rows (j, j + 2)
// with (j + 1, j + 3), so that one unpack puts each word of four rows in order: a third of the
// time of gathering the fields (a load a lane). AVX2 instructions, on AVX-512 machines too.
// Also GiGPO's row pass (token_advantages.cpp).
struct RecordWords8 {
  __m256d first[2], second[2];
};

template <typename Record, typename Groups>
inline RecordWords8 record_words8(const Record* rec, const Groups& rg, int64_t i) {
  static_assert(sizeof(Record) == 16 && alignof(Record) == 16, "16-byte records");
  const double* r = reinterpret_cast<const double*>(rec);
  auto two = [&](int64_t a, int64_t b) {
    return _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_load_pd(r + 2 * int64_t(rg[a]))),
                                _mm_load_pd(r + 2 * int64_t(rg[b])), 1);
  };
  RecordWords8 w;
  for (int h = 0; h < 2; ++h) {
    const int64_t j = i + 4 * h;
    const __m256d r02 = two(j, j + 2), r13 = two(j + 1, j + 3);
    w.first[h] = _mm256_unpacklo_pd(r02, r13);
    w.second[h] = _mm256_unpackhi_pd(r02, r13);
  }
  return w;
}

// A vector of a compact pass output: non-temporal (`stream`: p 32-byte aligned) or plain.
inline void store_output(float* p, __m256 v, bool stream) {
  if (stream) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
}
#endif

// Row i of the compact pass (also the scalar tail of the vector loop).
template <typename Groups>
void compact_row(const float* x, const Groups& rg, const CompactRecord* rec, int64_t i,
                 float* adv, float* mean, float* std, bool* zv) {
  const CompactRecord& r = rec[rg[i]];
  const double v = double(x[i]);
  adv[i] = score_is_valid(v) ? float((v - r.center) * double(r.scale)) : 0.0f;
  mean[i] = float(r.center);
  std[i] = std::fabs(r.std_zv);
  zv[i] = std::signbit(r.std_zv);
}

// Rows [begin, end) of the compact pass. `stream`: non-temporal stores (caller checked that
// the three float outputs are 64-byte aligned).
template <typename Groups>
void compact_rows(const float* x, const Groups& rg, const CompactRecord* rec, int64_t begin,
                  int64_t end, float* adv, float* mean, float* std, bool* zv, bool stream) {
  int64_t i = begin;
#if defined(RLKERN_LANES8)
  using namespace lanes;
  for (; i < end && (i & 7) != 0; ++i) compact_row(x, rg, rec, i, adv, mean, std, zv);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= end; i += 8) {
    const RecordWords8 w = record_words8(rec, rg, i);
    const D8 center = from_halves(w.first[0], w.first[1]);
    // The second words' even (scale) and odd (std_zv) floats come out as rows 0 1 4 5 |
    // 2 3 6 7; one 64-bit permute puts them in row order.
    const __m256 f0 = _mm256_castpd_ps(w.second[0]), f1 = _mm256_castpd_ps(w.second[1]);
    auto in_row_order = [](__m256 v) {
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
    };
    const __m256 sc = in_row_order(_mm256_shuffle_ps(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256 sd = in_row_order(_mm256_shuffle_ps(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 valid = _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ);
    // (x − center)·scale in double, as the scalar formula, then rounded once to float.
    const __m256 a = _mm256_and_ps(valid, narrow((widen(v) - center) * widen(sc)));
    // zero_variance: the sign bits of std_zv as eight bytes of 0 / 1
    const __m256i sign = _mm256_srli_epi32(_mm256_castps_si256(sd), 31);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(sign),
                                          _mm256_extracti128_si256(sign, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(zv + i), _mm_packus_epi16(words, words));
    store_output(adv + i, a, stream);
    store_output(mean + i, narrow(center), stream);
    store_output(std + i, _mm256_and_ps(sd, abs_mask), stream);
  }
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
  for (; i < end; ++i) compact_row(x, rg, rec, i, adv, mean, std, zv);
}

}  // namespace rlkern::cpu
