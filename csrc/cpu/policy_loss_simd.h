// Lane policies for the policy-loss CPU kernels: the per-token formulas of rlkern/policy_loss.h
// are templates over a value type; the kernels instantiate them with one of
//
//   Scalar<T>  one token per step (float or double; the portable path and float64);
//   Avx512F    16 float tokens per step (__m512 values, __mmask16 lane masks), when the
//              build targets AVX-512 (-march=native on an AVX-512 machine);
//   Avx2F      8 float tokens per step (__m256 values, lane masks as all-ones __m256
//              lanes), when it targets AVX2 + FMA without AVX-512.
//
// Each computes the scalar path's per-token values bit for bit (the same operations in the
// same order, one lane a token; its exp is exp_host_f32 lane-wise); only the sums over tokens
// differ, by their lane-parallel order.
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
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstring>
#define RLKERN_PL_AVX2 1
#endif

#include "rlkern/policy_loss.h"

namespace rlkern::cpu::plsimd {

// min / max for the ratio statistics (their inputs are never NaN: masked lanes are ±inf).
inline float vmin(float a, float b) { return b < a ? b : a; }
inline float vmax(float a, float b) { return b > a ? b : a; }
inline double vmin(double a, double b) { return b < a ? b : a; }
inline double vmax(double a, double b) { return b > a ? b : a; }

// The lane mask of a step whose every lane is a valid token (a row's interior, where the mask
// bytes are all set): a type of its own, so that the masked operations below reduce to their
// plain forms at compile time (a madd to an add, a count to L, `m && all` to m, a masked load
// to a load), the same values as with an all-ones mask.
struct AllLanes {};
template <typename M>
M operator&&(M m, AllLanes) {
  return m;
}
template <typename M>
M operator&&(AllLanes, M m) {
  return m;
}
template <typename V>
V keep(AllLanes, V x) {
  return x;
}

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
  static V load_valid(const T* p, AllLanes) { return *p; }
  static int count(AllLanes) { return 1; }
  static V madd(V acc, AllLanes, V x) { return acc + x; }
  static V mmin(V acc, AllLanes, V x) { return x < acc ? x : acc; }
  static V mmax(V acc, AllLanes, V x) { return x > acc ? x : acc; }
  static V bcast(T x) { return x; }
  static void store(T* p, V v, M) { *p = v; }
  static void store(T* p, V v, AllLanes) { *p = v; }
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

inline VF fmav(VF a, VF b, VF c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }

// exp_host_f32 of rlkern/policy_loss.h, 16 lanes: same reduction and polynomial; 2^n by
// scalef (exact, with graceful underflow). For |x| ≤ kExpClampedMax exp_poly is all of it.
inline __m512 exp_poly(__m512 xc) {
  using namespace policy_loss::exp_f32;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  return _mm512_scalef_ps(policy_loss::exp_taylor(VF(r)).v, n);
}

// f on each lane through the scalar code: the rare paths (an exp beyond ±kExpClampedMax or of
// NaN, dppo_kl's log), which then have the scalar path's bits by construction.
template <typename F>
inline VF lanewise(VF x, F f) {
  alignas(64) float b[16];
  _mm512_store_ps(b, x.v);
  for (float& v : b) v = f(v);
  return _mm512_load_ps(b);
}

inline VF expv(VF x) {
  // The common case, every |x| ≤ kExpClampedMax (log-ratios are small): exp_host_f32's clamps
  // are no-ops and its fix-ups never fire, so the polynomial alone gives its bits (the token
  // loops are bound by vector arithmetic). Other lanes, NaN among them, fail the test: the
  // vector then takes the scalar exp lane by lane.
  const __m512 bound = _mm512_set1_ps(policy_loss::kExpClampedMax);
  const __m512 ax = _mm512_abs_ps(x.v);
  if (__builtin_expect(_mm512_cmp_ps_mask(ax, bound, _CMP_LE_OQ) == 0xffff, 1))
    return exp_poly(x.v);
  return lanewise(x, policy_loss::exp_host_f32);  // the scalar exp: its bits by definition
}

// expv of an argument clamped to |x| ≤ kExpClampedMax (or NaN): expv's bits without its range
// test (its abs, compare, mask move and branch: a few of the forward token loop's ~100
// instructions). Beyond the bound the range test's clamps and fix-ups may fire, so expv
// keeps it there.
inline VF expv_clamped(VF x) { return exp_poly(x.v); }

// log per lane (dppo_kl's binary KL only): lane by lane through logf, exact as the scalar path.
inline VF logv(VF x) {
  return lanewise(x, [](float v) { return logf(v); });
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
  static V load_valid(const float* p, AllLanes) { return _mm512_loadu_ps(p); }
  static int count(AllLanes) { return L; }
  static V madd(V acc, AllLanes, V x) { return _mm512_add_ps(acc.v, x.v); }
  static V mmin(V acc, AllLanes, V x) { return _mm512_min_ps(acc.v, x.v); }
  static V mmax(V acc, AllLanes, V x) { return _mm512_max_ps(acc.v, x.v); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static void store(float* p, V v, M ln) { _mm512_mask_storeu_ps(p, ln.k, v.v); }
  static void store(float* p, V v, AllLanes) { _mm512_storeu_ps(p, v.v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v.v); }
  static float hmin(V v) { return _mm512_reduce_min_ps(v.v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v.v); }
};

using FloatLanes = Avx512F;

#elif defined(RLKERN_PL_AVX2)

struct MF {  // a lane is all ones (true) or all zeros
  __m256 k;
};
inline MF operator&&(MF a, MF b) { return {_mm256_and_ps(a.k, b.k)}; }
inline MF operator||(MF a, MF b) { return {_mm256_or_ps(a.k, b.k)}; }
inline MF operator!(MF a) {
  return {_mm256_xor_ps(a.k, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))};
}

struct VF {
  __m256 v;
  VF() = default;
  VF(__m256 x) : v(x) {}
  VF(double x) : v(_mm256_set1_ps(static_cast<float>(x))) {}
};
inline VF operator+(VF a, VF b) { return _mm256_add_ps(a.v, b.v); }
inline VF operator-(VF a, VF b) { return _mm256_sub_ps(a.v, b.v); }
inline VF operator*(VF a, VF b) { return _mm256_mul_ps(a.v, b.v); }
inline VF operator/(VF a, VF b) { return _mm256_div_ps(a.v, b.v); }
inline VF operator-(VF a) {  // exact negation (flips the sign bit, as -x does for a float)
  return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f));
}
// Ordered comparisons (false on NaN) except !=, which is true on NaN, as for floats.
inline MF operator<(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline MF operator>(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline MF operator<=(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline MF operator>=(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline MF operator==(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline MF operator!=(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_NEQ_UQ)}; }

inline VF sel(MF c, VF a, VF b) { return _mm256_blendv_ps(b.v, a.v, c.k); }
// sel(c, x, 0) and sel(c, 0, x) of rlkern/policy_loss.h: a lane of c is all ones or all zeros,
// so one AND (GCC compiles the blend against +0 to a sign test of c and an AND).
inline VF keep(MF c, VF x) { return _mm256_and_ps(c.k, x.v); }
inline VF drop(MF c, VF x) { return _mm256_andnot_ps(c.k, x.v); }
// As Avx512F's: the data second, so that a NaN lane stays NaN.
inline VF clampv(VF x, VF lo, VF hi) {
  return _mm256_min_ps(hi.v, _mm256_max_ps(lo.v, x.v));
}
inline VF vmin(VF a, VF b) { return _mm256_min_ps(a.v, b.v); }
inline VF vmax(VF a, VF b) { return _mm256_max_ps(a.v, b.v); }

inline VF fmav(VF a, VF b, VF c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }

// exp_host_f32 of rlkern/policy_loss.h, 8 lanes: its rounding of n, its reduction and
// polynomial, so the same p and n. On exp_poly's domain, |x| ≤ kExpClampedMax
// (and NaN), exp_host_f32's clamps and fix-ups never fire and its p·2^n is a normal float
// (≥ e^−87 > FLT_MIN: x ≥ −87 gives n ≥ −126 with p > 1 there), so the two exponent-field
// factors it multiplies by are exact, and adding n into p's exponent field gives the same bits:
// one shift and one add where the scaling took six integer ops and two dependent multiplies
// (the forward token loop waits on its exp chain). A NaN x gives n = INT_MIN, whose n << 23 is
// 0: p, the NaN, unchanged, as p · 1 · 1 left it. tests/cpp/policy_loss_exp_exhaustive.cpp
// checks the bits.
inline __m256 exp_poly(__m256 xc) {
  using namespace policy_loss::exp_f32;
  // round to nearest even: what adding and subtracting 1.5·2^23 does for |x·log2 e| < 2^22
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  const __m256 p = policy_loss::exp_taylor(VF(r)).v;
  const __m256i ni = _mm256_cvttps_epi32(n);  // n is an integer: the truncation is exact
  return _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(ni, 23)));
}

template <typename F>
inline VF lanewise(VF x, F f) {  // as Avx512F's
  alignas(32) float b[8];
  _mm256_store_ps(b, x.v);
  for (float& v : b) v = f(v);
  return _mm256_load_ps(b);
}

inline VF expv(VF x) {  // as Avx512F's
  const __m256 bound = _mm256_set1_ps(policy_loss::kExpClampedMax);
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x.v);
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(ax, bound, _CMP_LE_OQ)) == 0xff, 1))
    return exp_poly(x.v);
  return lanewise(x, policy_loss::exp_host_f32);
}

inline VF expv_clamped(VF x) { return exp_poly(x.v); }

// log per lane (dppo_kl's binary KL only): lane by lane through logf, exact as the scalar path.
inline VF logv(VF x) {
  return lanewise(x, [](float v) { return logf(v); });
}

struct Avx2F {
  using V = VF;
  using M = MF;
  static constexpr int L = 8;
  static M lanes(int64_t remaining) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int n = remaining >= 8 ? 8 : static_cast<int>(remaining);
    return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota))};
  }
  static int width(M ln) { return __builtin_popcount(_mm256_movemask_ps(ln.k)); }
  static M valid(const uint8_t* m, M ln) {
    // only the lanes' bytes are read (a partial last step must not read past the mask)
    uint64_t bytes = 0;
    const int n = width(ln);
    if (n == 8) std::memcpy(&bytes, m, 8);
    else std::memcpy(&bytes, m, static_cast<size_t>(n));
    // lanes past the step's end hold a 0 byte, so they are invalid without testing ln again;
    // a byte widened to 0..255 is nonzero where it is > 0 (one signed compare)
    const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
    return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()))};
  }
  static V load(const float* p, M ln) { return _mm256_maskload_ps(p, _mm256_castps_si256(ln.k)); }
  static V load_valid(const float* p, M v) {
    return _mm256_maskload_ps(p, _mm256_castps_si256(v.k));
  }
  static int count(M m) { return width(m); }
  static V madd(V acc, M m, V x) { return _mm256_blendv_ps(acc.v, _mm256_add_ps(acc.v, x.v), m.k); }
  static V mmin(V acc, M m, V x) { return _mm256_blendv_ps(acc.v, _mm256_min_ps(acc.v, x.v), m.k); }
  static V mmax(V acc, M m, V x) { return _mm256_blendv_ps(acc.v, _mm256_max_ps(acc.v, x.v), m.k); }
  static V load_valid(const float* p, AllLanes) { return _mm256_loadu_ps(p); }
  static int count(AllLanes) { return L; }
  static V madd(V acc, AllLanes, V x) { return _mm256_add_ps(acc.v, x.v); }
  static V mmin(V acc, AllLanes, V x) { return _mm256_min_ps(acc.v, x.v); }
  static V mmax(V acc, AllLanes, V x) { return _mm256_max_ps(acc.v, x.v); }
  static V bcast(float x) { return _mm256_set1_ps(x); }
  // A full step takes a plain store: vmaskmovps to memory is microcoded on AMD's cores (on
  // Zen 3 one took ~10× a plain store of the same 8 lanes), and every token loop stores
  // through here. The test is one movemask, known at compile time for most full steps.
  static void store(float* p, V v, M ln) {
    if (_mm256_movemask_ps(ln.k) == 0xff) _mm256_storeu_ps(p, v.v);
    else _mm256_maskstore_ps(p, _mm256_castps_si256(ln.k), v.v);
  }
  static void store(float* p, V v, AllLanes) { _mm256_storeu_ps(p, v.v); }
  // A tree: the two halves, then their halves, then the last two lanes.
  static float hsum(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v.v), _mm256_extractf128_ps(v.v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
  static float hmin(V v) {
    alignas(32) float b[8];
    _mm256_store_ps(b, v.v);
    float r = b[0];
    for (int i = 1; i < 8; ++i) r = vmin(r, b[i]);
    return r;
  }
  static float hmax(V v) {
    alignas(32) float b[8];
    _mm256_store_ps(b, v.v);
    float r = b[0];
    for (int i = 1; i < 8; ++i) r = vmax(r, b[i]);
    return r;
  }
};

using FloatLanes = Avx2F;
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
