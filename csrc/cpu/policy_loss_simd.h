// Lane policies for the policy-loss CPU kernels: the per-token formulas of rlkern/policy_loss.h
// are templates over a value type; the kernels instantiate them with one of
//
//   Scalar<T>  one token per step (float or double; the portable path and float64);
//   Avx512F    16 float tokens per step (__m512 values, __mmask16 lane masks), when the
//              build targets AVX-512 (-march=native on an AVX-512 machine).
//
// A policy provides the value type V and mask type M, lane masks for a partial last step,
// masked loads / stores, masked accumulation (madd / mmin / mmax, and `count` of a mask's
// lanes: a popcount, off the vector ports), horizontal reductions, and (for the SIMD type) the
// operators, `sel` and `expv` the header's formulas use (found by argument-dependent lookup).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define RLKERN_PL_AVX512 1
#endif

#include "rlkern/policy_loss.h"

namespace rlkern::cpu::plsimd {

// min / max for the ratio statistics (their inputs are never NaN: masked lanes are ±inf).
inline float vmin(float a, float b) { return b < a ? b : a; }
inline float vmax(float a, float b) { return b > a ? b : a; }
inline double vmin(double a, double b) { return b < a ? b : a; }
inline double vmax(double a, double b) { return b > a ? b : a; }

template <typename T>
struct Scalar {
  using V = T;
  using M = bool;
  static constexpr int L = 1;
  static M lanes(int64_t remaining) { return remaining > 0; }
  static M valid(const uint8_t* m, M) { return *m != 0; }
  static V load(const T* p, M) { return *p; }
  static V load_valid(const T* p, M v) { return v ? *p : T(0); }  // 0 where not v
  static int count(M m) { return m ? 1 : 0; }
  static V madd(V acc, M m, V x) { return m ? acc + x : acc; }
  static V mmin(V acc, M m, V x) { return m && x < acc ? x : acc; }
  static V mmax(V acc, M m, V x) { return m && x > acc ? x : acc; }
  static V bcast(T x) { return x; }
  static void store(T* p, V v, M) { *p = v; }
  static T hsum(V v) { return v; }
  static T hmin(V v) { return v; }
  static T hmax(V v) { return v; }
};

#if defined(RLKERN_PL_AVX512)

struct MF {
  __mmask16 k;
};
inline MF operator&&(MF a, MF b) { return {static_cast<__mmask16>(a.k & b.k)}; }
inline MF operator||(MF a, MF b) { return {static_cast<__mmask16>(a.k | b.k)}; }
inline MF operator!(MF a) { return {static_cast<__mmask16>(~a.k)}; }

struct VF {
  __m512 v;
  VF() = default;
  VF(__m512 x) : v(x) {}
  VF(double x) : v(_mm512_set1_ps(static_cast<float>(x))) {}
};
inline VF operator+(VF a, VF b) { return _mm512_add_ps(a.v, b.v); }
inline VF operator-(VF a, VF b) { return _mm512_sub_ps(a.v, b.v); }
inline VF operator*(VF a, VF b) { return _mm512_mul_ps(a.v, b.v); }
inline VF operator/(VF a, VF b) { return _mm512_div_ps(a.v, b.v); }
inline VF operator-(VF a) {  // exact negation (flips the sign bit, as -x does for a float)
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(int(0x80000000u))));
}
// Ordered comparisons (false on NaN) except !=, which is true on NaN, as for floats.
inline MF operator<(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline MF operator>(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline MF operator<=(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline MF operator>=(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline MF operator==(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline MF operator!=(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_NEQ_UQ)}; }

inline VF sel(MF c, VF a, VF b) { return _mm512_mask_blend_ps(c.k, b.v, a.v); }
// clamp in two instructions; the data goes second so that a NaN lane stays NaN (x86 min/max
// return the second operand when either is NaN), as torch.clamp keeps NaN.
inline VF clampv(VF x, VF lo, VF hi) {
  return _mm512_min_ps(hi.v, _mm512_max_ps(lo.v, x.v));
}
inline VF vmin(VF a, VF b) { return _mm512_min_ps(a.v, b.v); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a.v, b.v); }

// exp_host_f32 of rlkern/policy_loss.h, 16 lanes: same reduction and polynomial; 2^n by
// scalef (exact, with graceful underflow). exp_poly is the part for lanes inside [kMin, kMax].
inline __m512 exp_poly(__m512 xc) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.98412698e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888889e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666667e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666667e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline VF expv(VF x) {
  // The common case, every |x| ≤ kExpClampedMax (log-ratios are small): the clamps below are
  // no-ops and their fix-ups never fire, so the polynomial alone gives the same bits, for four
  // fewer vector instructions (the token loops are bound by vector arithmetic). NaN lanes fail
  // the test and take the full path.
  const __m512 bound = _mm512_set1_ps(policy_loss::kExpClampedMax);
  const __m512 ax = _mm512_abs_ps(x.v);
  if (__builtin_expect(_mm512_cmp_ps_mask(ax, bound, _CMP_LE_OQ) == 0xffff, 1))
    return exp_poly(x.v);
  const __m512 kMax = _mm512_set1_ps(88.72283935546875f);
  const __m512 kMin = _mm512_set1_ps(-103.97208404541015625f);
  // max/min return the second operand when the first is NaN: keep NaN lanes NaN.
  __m512 xc = _mm512_min_ps(kMax, x.v);
  xc = _mm512_max_ps(kMin, xc);
  __m512 res = exp_poly(xc);
  res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, kMax, _CMP_GT_OQ), res,
                             _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, kMin, _CMP_LT_OQ), res,
                             _mm512_setzero_ps());
  return res;
}

// expv of an argument clamped to |x| ≤ kExpClampedMax (or NaN): expv's bits without its range
// test (its abs, compare, mask move and branch: a few of the forward token loop's ~100
// instructions). Beyond the bound the range test's clamps and fix-ups may fire, so expv
// keeps it there.
inline VF expv_clamped(VF x) { return exp_poly(x.v); }

// log per lane (dppo_kl's binary KL only): lane by lane through logf, exact as the scalar path.
inline VF logv(VF x) {
  alignas(64) float b[16];
  _mm512_store_ps(b, x.v);
  for (float& v : b) v = logf(v);
  return _mm512_load_ps(b);
}

struct Avx512F {
  using V = VF;
  using M = MF;
  static constexpr int L = 16;
  static M lanes(int64_t remaining) {
    return {remaining >= 16 ? static_cast<__mmask16>(0xffff)
                            : static_cast<__mmask16>((1u << remaining) - 1u)};
  }
  static M valid(const uint8_t* m, M ln) {
    const __m128i b = _mm_maskz_loadu_epi8(ln.k, m);
    return {_mm_test_epi8_mask(b, b)};
  }
  static V load(const float* p, M ln) { return _mm512_maskz_loadu_ps(ln.k, p); }
  static V load_valid(const float* p, M v) { return _mm512_maskz_loadu_ps(v.k, p); }
  static int count(M m) { return __builtin_popcount(m.k); }
  static V madd(V acc, M m, V x) { return _mm512_mask_add_ps(acc.v, m.k, acc.v, x.v); }
  static V mmin(V acc, M m, V x) { return _mm512_mask_min_ps(acc.v, m.k, acc.v, x.v); }
  static V mmax(V acc, M m, V x) { return _mm512_mask_max_ps(acc.v, m.k, acc.v, x.v); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static void store(float* p, V v, M ln) { _mm512_mask_storeu_ps(p, ln.k, v.v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v.v); }
  static float hmin(V v) { return _mm512_reduce_min_ps(v.v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v.v); }
};

using FloatLanes = Avx512F;
#else
using FloatLanes = Scalar<float>;
#endif

// The lane policy used for a compute dtype.
template <typename T>
struct LanesFor {
  using type = Scalar<T>;
};
template <>
struct LanesFor<float> {
  using type = FloatLanes;
};

}  // namespace rlkern::cpu::plsimd
