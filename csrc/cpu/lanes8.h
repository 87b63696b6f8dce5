// Eight double lanes with masks, for the advantages' eight-groups-at-a-time path
// (advantages_lanes.h): one __m512d on AVX-512, two __m256d on AVX2 + FMA. Each operation is
// the IEEE operation of the scalar code lane by lane (the same rounding, x86's min/max operand
// order), so both builds give the scalar path's bits. RLKERN_LANES8 says whether the build has
// them.
#pragma once

#include <cstdint>

// AVX2 is asked of AVX-512 builds too (every AVX-512 CPU has it): callers mix in 256-bit code.
#if defined(__AVX2__) && (defined(__AVX512F__) || defined(__FMA__))
#define RLKERN_LANES8 1
#include <immintrin.h>

namespace rlkern::cpu::lanes {

#if defined(__AVX512F__)

struct D8 {
  __m512d v;
};
struct M8 {  // bit l: lane l
  __mmask8 k;
};

inline D8 set1(double x) { return {_mm512_set1_pd(x)}; }
inline D8 operator+(D8 a, D8 b) { return {_mm512_add_pd(a.v, b.v)}; }
inline D8 operator-(D8 a, D8 b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline D8 operator*(D8 a, D8 b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline D8 operator/(D8 a, D8 b) { return {_mm512_div_pd(a.v, b.v)}; }
inline D8 sqrt(D8 a) { return {_mm512_sqrt_pd(a.v)}; }
inline D8 fnmadd(D8 a, D8 b, D8 c) { return {_mm512_fnmadd_pd(a.v, b.v, c.v)}; }  // c − a·b
inline D8 fmadd(D8 a, D8 b, D8 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }  // a·b + c
template <int kPred>
inline M8 cmp(D8 a, D8 b) { return {_mm512_cmp_pd_mask(a.v, b.v, kPred)}; }
inline M8 operator&(M8 a, M8 b) { return {__mmask8(a.k & b.k)}; }
inline M8 operator|(M8 a, M8 b) { return {__mmask8(a.k | b.k)}; }
inline M8 operator~(M8 a) { return {__mmask8(~a.k)}; }
inline M8 no_lanes() { return {0}; }
inline uint8_t bits(M8 m) { return m.k; }
// m ? a : b
inline D8 where(M8 m, D8 a, D8 b) { return {_mm512_mask_mov_pd(b.v, m.k, a.v)}; }
inline D8 zero_unless(M8 m, D8 a) { return {_mm512_maskz_mov_pd(m.k, a.v)}; }
// m ? acc + b : acc
inline D8 where_add(M8 m, D8 acc, D8 b) { return {_mm512_mask_add_pd(acc.v, m.k, acc.v, b.v)}; }
// m ? a·b + acc : acc (one rounding)
inline D8 where_fmadd(M8 m, D8 a, D8 b, D8 acc) {
  return {_mm512_mask3_fmadd_pd(a.v, b.v, acc.v, m.k)};
}
// m ? (x < acc ? x : acc) : acc, and the max alike (minpd / maxpd with x first)
inline D8 where_min(M8 m, D8 x, D8 acc) { return {_mm512_mask_min_pd(acc.v, m.k, x.v, acc.v)}; }
inline D8 where_max(M8 m, D8 x, D8 acc) { return {_mm512_mask_max_pd(acc.v, m.k, x.v, acc.v)}; }
inline D8 widen(__m256 f) { return {_mm512_cvtps_pd(f)}; }
inline D8 from_halves(__m256d lo, __m256d hi) {  // lanes 0–3, then 4–7
  return {_mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1)};
}
inline __m256 narrow(D8 a) { return _mm512_cvtpd_ps(a.v); }  // round to nearest
inline void store(double* p, D8 a) { _mm512_storeu_pd(p, a.v); }
// base[idx[l]] in lane l (idx in doubles)
inline D8 gather(const double* base, __m256i idx) { return {_mm512_i32gather_pd(idx, base, 8)}; }
// The first n ≤ 8 floats at p (the rest 0), and their store.
inline __m256 load_first(const float* p, int64_t n) {
  return _mm256_maskz_loadu_ps(__mmask8((1u << n) - 1u), p);
}
inline void store_first(float* p, int64_t n, __m256 v) {
  _mm256_mask_storeu_ps(p, __mmask8((1u << n) - 1u), v);
}

#else  // AVX2 + FMA: lanes 0–3 in lo, 4–7 in hi; a mask lane is all ones or all zeros

struct D8 {
  __m256d lo, hi;
};
struct M8 {
  __m256d lo, hi;
};

inline D8 set1(double x) { return {_mm256_set1_pd(x), _mm256_set1_pd(x)}; }
inline D8 operator+(D8 a, D8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline D8 operator-(D8 a, D8 b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
inline D8 operator*(D8 a, D8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
inline D8 operator/(D8 a, D8 b) { return {_mm256_div_pd(a.lo, b.lo), _mm256_div_pd(a.hi, b.hi)}; }
inline D8 sqrt(D8 a) { return {_mm256_sqrt_pd(a.lo), _mm256_sqrt_pd(a.hi)}; }
inline D8 fnmadd(D8 a, D8 b, D8 c) {
  return {_mm256_fnmadd_pd(a.lo, b.lo, c.lo), _mm256_fnmadd_pd(a.hi, b.hi, c.hi)};
}
inline D8 fmadd(D8 a, D8 b, D8 c) {
  return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)};
}
template <int kPred>
inline M8 cmp(D8 a, D8 b) {
  return {_mm256_cmp_pd(a.lo, b.lo, kPred), _mm256_cmp_pd(a.hi, b.hi, kPred)};
}
inline M8 operator&(M8 a, M8 b) { return {_mm256_and_pd(a.lo, b.lo), _mm256_and_pd(a.hi, b.hi)}; }
inline M8 operator|(M8 a, M8 b) { return {_mm256_or_pd(a.lo, b.lo), _mm256_or_pd(a.hi, b.hi)}; }
inline M8 operator~(M8 a) {
  const __m256d ones = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
  return {_mm256_xor_pd(a.lo, ones), _mm256_xor_pd(a.hi, ones)};
}
inline M8 no_lanes() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
inline uint8_t bits(M8 m) {
  return uint8_t(_mm256_movemask_pd(m.lo) | (_mm256_movemask_pd(m.hi) << 4));
}
inline D8 where(M8 m, D8 a, D8 b) {
  return {_mm256_blendv_pd(b.lo, a.lo, m.lo), _mm256_blendv_pd(b.hi, a.hi, m.hi)};
}
inline D8 zero_unless(M8 m, D8 a) { return {_mm256_and_pd(a.lo, m.lo), _mm256_and_pd(a.hi, m.hi)}; }
inline D8 where_add(M8 m, D8 acc, D8 b) { return where(m, acc + b, acc); }
inline D8 where_fmadd(M8 m, D8 a, D8 b, D8 acc) { return where(m, fmadd(a, b, acc), acc); }
inline D8 where_min(M8 m, D8 x, D8 acc) {
  return where(m, D8{_mm256_min_pd(x.lo, acc.lo), _mm256_min_pd(x.hi, acc.hi)}, acc);
}
inline D8 where_max(M8 m, D8 x, D8 acc) {
  return where(m, D8{_mm256_max_pd(x.lo, acc.lo), _mm256_max_pd(x.hi, acc.hi)}, acc);
}
inline D8 widen(__m256 f) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))};
}
inline D8 from_halves(__m256d lo, __m256d hi) { return {lo, hi}; }
inline __m256 narrow(D8 a) {
  return _mm256_set_m128(_mm256_cvtpd_ps(a.hi), _mm256_cvtpd_ps(a.lo));
}
inline void store(double* p, D8 a) {
  _mm256_storeu_pd(p, a.lo);
  _mm256_storeu_pd(p + 4, a.hi);
}
inline D8 gather(const double* base, __m256i idx) {
  return {_mm256_i32gather_pd(base, _mm256_castsi256_si128(idx), 8),
          _mm256_i32gather_pd(base, _mm256_extracti128_si256(idx, 1), 8)};
}
inline __m256i first_lanes(int64_t n) {  // lane l all ones where l < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 load_first(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, first_lanes(n));
}
inline void store_first(float* p, int64_t n, __m256 v) {
  _mm256_maskstore_ps(p, first_lanes(n), v);
}

#endif

inline D8 zero() { return set1(0.0); }

}  // namespace rlkern::cpu::lanes

#endif  // AVX2 with AVX-512F or FMA
