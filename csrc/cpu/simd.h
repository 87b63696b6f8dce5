// A small fp32 SIMD vector for the CPU kernels: AVX-512, AVX2+FMA, or a scalar fallback,
// chosen at compile time from the target ISA (-march=native by default, see CMakeLists.txt).
//
// Only what the kernels need: loads from bf16 / fp16 / fp32 storage (widened to fp32), stores
// back with round-to-nearest-even, FMA arithmetic, horizontal reductions and a fast 2^x.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>  // _mm_prefetch of the portable (baseline x86-64) build
#endif

namespace rlkern::cpu {

// Storage tags: the kernels are templated on how a logit is stored.
struct BF16 {
  using storage = uint16_t;
};
struct F16 {
  using storage = uint16_t;
};
struct F32 {
  using storage = float;
};

// A float's bit pattern, and the float of a bit pattern.
inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(bits >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exp + 112u) << 23 | man << 13;
  }
  return bits_float(bits);
}

inline uint16_t float_to_f16(float f) {
#if defined(__F16C__)
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  const uint32_t bits = float_bits(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow (after rounding) → inf
  if (abs < 0x33000001u) return sign;             // below half the smallest subnormal
  int exp = int(abs >> 23) - 127;
  uint32_t man = (abs & 0x7fffffu) | 0x800000u;
  int shift = exp < -14 ? 13 + (-14 - exp) : 13;
  uint32_t half_man = man >> shift;
  const uint32_t rem = man & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
  if (exp < -14) return sign | uint16_t(half_man);
  return sign | uint16_t(((exp + 15) << 10) + (half_man - 0x400u));
#endif
}

// Asks for the cache line at p to be brought into L1 (a hint: never faults).
inline void prefetch_l1(const void* p) {
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__SSE__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// The same for a line about to be written (a hint: never faults).
inline void prefetch_l1_for_write(void* p) { __builtin_prefetch(p, 1, 3); }

// The largest of n 16-bit floats (bf16 or fp16) as its bits, compared as integers: both
// formats are sign-magnitude, so the non-negative values order as signed integers and the
// negative ones in reverse as unsigned. If any value is non-negative the signed max is it;
// otherwise the unsigned min is the negative value nearest 0. Exact for every value but NaN
// (a positive NaN wins, a negative one is skipped) and a +0 / −0 tie (+0 wins). 32 values an
// instruction pair where the float compare takes 16 after widening. AVX-512BW only.
#if defined(__AVX512BW__)
inline uint16_t max_bits16(const uint16_t* x, int64_t n) {
  __m512i smax0 = _mm512_set1_epi16(std::numeric_limits<int16_t>::min()), smax1 = smax0;
  __m512i umin0 = _mm512_set1_epi16(-1), umin1 = umin0;  // 0xffff: neutral for both
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {  // two chains of each hide the latency
    const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
    smax0 = _mm512_max_epi16(smax0, a);
    umin0 = _mm512_min_epu16(umin0, a);
    smax1 = _mm512_max_epi16(smax1, b);
    umin1 = _mm512_min_epu16(umin1, b);
  }
  for (; i < n; i += 32) {  // the rest, padded with 0xffff (a negative NaN: moves neither result)
    const __mmask32 m = n - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
    const __m512i a = _mm512_mask_loadu_epi16(_mm512_set1_epi16(-1), m, x + i);
    smax0 = _mm512_max_epi16(smax0, a);
    umin0 = _mm512_min_epu16(umin0, a);
  }
  // Horizontal: halve to 128 bits, then one minpos (the unsigned min of 8 lanes) each; the
  // signed max is the unsigned min of x ^ 0x7fff (which reverses the signed order), undone.
  const __m512i sm512 = _mm512_max_epi16(smax0, smax1), um512 = _mm512_min_epu16(umin0, umin1);
  const __m256i sm256 = _mm256_max_epi16(_mm512_castsi512_si256(sm512),
                                         _mm512_extracti64x4_epi64(sm512, 1));
  const __m256i um256 = _mm256_min_epu16(_mm512_castsi512_si256(um512),
                                         _mm512_extracti64x4_epi64(um512, 1));
  const __m128i flip = _mm_set1_epi16(0x7fff);
  const __m128i sm128 = _mm_max_epi16(_mm256_castsi256_si128(sm256),
                                      _mm256_extracti128_si256(sm256, 1));
  const __m128i um128 = _mm_min_epu16(_mm256_castsi256_si128(um256),
                                      _mm256_extracti128_si256(um256, 1));
  const int16_t sm = int16_t(_mm_extract_epi16(_mm_minpos_epu16(_mm_xor_si128(sm128, flip)), 0)
                             ^ 0x7fff);
  const uint16_t um = uint16_t(_mm_extract_epi16(_mm_minpos_epu16(um128), 0));
  return sm >= 0 ? uint16_t(sm) : um;
}
#define RLKERN_MAX_BITS16 1  // tests/cpp/max_bits16_check.cpp checks it where defined
#endif

template <typename Tag>
inline float load_scalar(const typename Tag::storage* p) {
  if constexpr (std::is_same_v<Tag, BF16>) return bf16_to_float(*p);
  else if constexpr (std::is_same_v<Tag, F16>) return f16_to_float(*p);
  else return *p;
}

template <typename Tag>
inline void store_scalar(typename Tag::storage* p, float v) {
  if constexpr (std::is_same_v<Tag, BF16>) *p = float_to_bf16(v);
  else if constexpr (std::is_same_v<Tag, F16>) *p = float_to_f16(v);
  else *p = v;
}

// 2^r on r ∈ [−½, ½]: a degree-5 polynomial 1 + c1 r + … + c5 r^5 fitted to minimise the
// relative error (iteratively reweighted least squares on Chebyshev nodes): 9e-8 from the fit,
// ~2e-7 with fp32 Horner rounding, so 2^x = 2^n · 2^r is accurate to ~2 ulp, one FMA cheaper
// than the degree-6 Taylor series of the same accuracy.
constexpr float kExp2C1 = 0.6931469772847744f;
constexpr float kExp2C2 = 0.24022242044257505f;
constexpr float kExp2C3 = 0.05550734171884052f;
constexpr float kExp2C4 = 0.00967151451894321f;
constexpr float kExp2C5 = 0.001326460062432698f;
// Inputs below this give 2^x = 0 (below the smallest fp32 subnormal); clamping there keeps
// −inf finite so that 0 · x stays 0 instead of NaN.
constexpr float kExp2Min = -151.0f;
// The top of VecF::exp2's domain (the AVX2 version's scaling: 2^(n+32) must stay finite).
constexpr float kExp2Max = 95.0f;

inline float exp2_scalar(float x) {
  if (std::isnan(x)) return x;  // before fmax, which would return the non-NaN operand
  x = std::fmax(x, kExp2Min);
  const float n = std::nearbyint(x);
  const float r = x - n;
  float p = kExp2C5;
  p = std::fma(p, r, kExp2C4);
  p = std::fma(p, r, kExp2C3);
  p = std::fma(p, r, kExp2C2);
  p = std::fma(p, r, kExp2C1);
  p = std::fma(p, r, 1.0f);
  return std::ldexp(p, int(n));
}

// The polynomial of exp2_scalar in a vector type V (V::set1, V::fma), for VecF::exp2.
template <typename V>
V exp2_poly(V r);

#if defined(__AVX512F__)

struct VecF {
  static constexpr int size = 16;
  __m512 v;
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const uint16_t* p, BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
#if defined(__AVX512BW__)
    // bf16 i → the high half of float lane i, the low half zeroed: one word permute, where
    // the zero-extension and the shift take two instructions (the fold's inner loop widens
    // every logit, so this is ~1/12 of its instructions)
    const __m512i to_high = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                             7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    return {_mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, to_high, _mm512_castsi256_si512(h)))};
#else
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
#endif
  }
  static VecF load(const uint16_t* p, F16) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static VecF load(const float* p, F32) { return load(p); }
  void store(float* p, F32) const { _mm512_storeu_ps(p, v); }
  void store(uint16_t* p, F16) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(uint16_t* p, BF16) const {
#if defined(__AVX512BF16__)
    // One conversion instruction (round to nearest even) where it gives the integer rounding's
    // bits below: for every float but subnormals (it flushes them to 0) and NaN (it keeps the
    // sign and payload), checked over all 2^32 inputs. A vector holding either, rare in a
    // gradient, takes the integer rounding.
    if (_mm512_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80) == 0) {  // QNaN | denormal | SNaN
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
      return;
    }
#endif
    // Round to nearest even on the integer bits; NaN payloads are quieted.
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  friend VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF fms(VecF a, VecF b, VecF c) { return {_mm512_fmsub_ps(a.v, b.v, c.v)}; }
  static VecF fnma(VecF a, VecF b, VecF c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  // max(a, b) returning b when b is NaN (the x86 max returns its second operand on NaN):
  // callers pass the data as b so NaN logits propagate into the results.
  static VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
  // a where the lane of `keep` is > −inf, else 0.
  static VecF zero_where_neginf(VecF a, VecF keep) {
    __mmask16 m = _mm512_cmp_ps_mask(keep.v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    return {_mm512_maskz_mov_ps(m, a.v)};
  }
  // 2^x for x ≥ kExp2Min (callers clamp: they need the clamped value themselves) or NaN.
  static VecF exp2(VecF x) {
    const __m512 n = _mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 p = exp2_poly(VecF{_mm512_sub_ps(x.v, n)}).v;
    return {_mm512_scalef_ps(p, n)};  // p · 2^n in one instruction, underflowing to 0
  }
  // exp2 (the AVX2 build's shorter-latency variant; scalef is one instruction here).
  static VecF exp2_short(VecF x) { return exp2(x); }
  // Bit i set where lane i ≥ t (false for NaN lanes).
  uint32_t ge_mask(VecF t) const { return _mm512_cmp_ps_mask(v, t.v, _CMP_GE_OQ); }
  // a where a ≥ t, else 0.
  static VecF keep_ge(VecF a, VecF t) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, t.v, _CMP_GE_OQ), a.v)};
  }
  // Compaction of the lanes with v ≥ t (stream compaction, in index order): their values to
  // vout and their ids to iout, ids = base + lane (compress_ge) or ids[lane] (compress_ge_ids);
  // returns how many. Always stores 16 of each (the outputs need room for them). Branch-free:
  // the compress runs in registers (a compressing store to memory is microcoded and slow on
  // some x86 cores).
  int compress_ge(VecF t, int32_t base, int32_t* iout, float* vout) const {
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(base),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return compress(_mm512_cmp_ps_mask(v, t.v, _CMP_GE_OQ), ids, iout, vout);
  }
  int compress_ge_ids(VecF t, const int32_t* ids, int32_t* iout, float* vout) const {
    return compress(_mm512_cmp_ps_mask(v, t.v, _CMP_GE_OQ), _mm512_loadu_si512(ids), iout, vout);
  }
  int compress(__mmask16 m, __m512i ids, int32_t* iout, float* vout) const {
    if (__builtin_expect(m == 0, 1)) return 0;
    _mm512_storeu_si512(iout, _mm512_maskz_compress_epi32(m, ids));
    _mm512_storeu_ps(vout, _mm512_maskz_compress_ps(m, v));
    return __builtin_popcount(m);
  }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
};

#elif defined(__AVX2__) && defined(__FMA__)

#define RLKERN_VECF_STORE2_BF16 1  // VecF::store2(p, a, b, BF16): store_pair below

struct VecF {
  static constexpr int size = 8;
  __m256 v;
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const uint16_t* p, BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static VecF load(const uint16_t* p, F16) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static VecF load(const float* p, F32) { return load(p); }
  void store(float* p, F32) const { _mm256_storeu_ps(p, v); }
  void store(uint16_t* p, F16) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // float_to_bf16 on the 8 lanes at once (AVX2 has no bf16 conversion): round to nearest
  // even on the bits, a NaN's top bits with the quiet bit set.
  void store(uint16_t* p, BF16) const {
    // 32 → 16 bits: packus works within each 128-bit half ([h0..h3 h0..h3 | h4..h7 h4..h7]);
    // the low 64 bits of each half are the 8 results in order
    const __m256i h = bf16_bits();
    const __m256i packed = _mm256_packus_epi32(h, h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_unpacklo_epi64(_mm256_castsi256_si128(packed),
                                        _mm256_extracti128_si256(packed, 1)));
  }
  // a then b (16 values) as store(p, BF16) and store(p + 8, BF16) write them: one pack and
  // one 32-byte store for both.
  static void store2(uint16_t* p, VecF a, VecF b, BF16) {
    // packus interleaves the 128-bit halves ([a0..3 b0..3 | a4..7 b4..7]); 0xD8 reorders
    // the 64-bit quarters to [a0..3 a4..7 | b0..3 b4..7]
    const __m256i packed = _mm256_packus_epi32(a.bf16_bits(), b.bf16_bits());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  // Each lane's bf16 bits in its low 16 bits (the high 16 zero: packus does not saturate).
  __m256i bf16_bits() const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i top = _mm256_srli_epi32(bits, 16);
    const __m256i odd = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i nan = _mm256_cmpgt_epi32(  // signed compare: both sides are ≥ 0
        _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
  }
  friend VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF fms(VecF a, VecF b, VecF c) { return {_mm256_fmsub_ps(a.v, b.v, c.v)}; }
  static VecF fnma(VecF a, VecF b, VecF c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
  static VecF zero_where_neginf(VecF a, VecF keep) {
    __m256 m = _mm256_cmp_ps(keep.v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    return {_mm256_and_ps(a.v, m)};
  }
  // 2^x for x ∈ [kExp2Min, kExp2Max] (callers clamp below: they need the clamped value
  // themselves; every caller's x is ≤ 0 up to rounding) or NaN; exp2_scalar's bits.
  static VecF exp2(VecF x) {
    const Exp2Parts e = exp2_parts(x);
    return exp2_scale(e.p, e.n_exp);
  }
  // exp2's bits, for loops bound by latency rather than by the multiply pipes: where every
  // lane's n ≥ −125 (x > −125.5; false for NaN), p ∈ [2^-0.5, 2^0.5] has a biased exponent of
  // 126 or 127, so p · 2^n is normal and exact, and adding n to p's exponent field is that
  // product, one integer add where exp2 chains two multiplies.
  static VecF exp2_short(VecF x) {
    const Exp2Parts e = exp2_parts(x);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(-125.5f),
                                                          _CMP_GT_OQ)) == 0xff, 1))
      return {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e.p), e.n_exp))};
    return exp2_scale(e.p, e.n_exp);
  }
  // exp2's reduction: p = 2^(x − n) by the polynomial and n = round-to-nearest-even(x) in the
  // exponent field's bits. n comes from the 1.5·2^23 shifter: t = x + shifter holds n in its
  // low mantissa bits, so t's bits shifted left by 23 are n's exponent-field bits (the
  // shifter's own bits leave).
  struct Exp2Parts {
    __m256 p;
    __m256i n_exp;
  };
  static Exp2Parts exp2_parts(VecF x) {
    const __m256 shifter = _mm256_set1_ps(12582912.0f);
    const __m256 t = _mm256_add_ps(x.v, shifter);
    const __m256 n = _mm256_sub_ps(t, shifter);
    return {exp2_poly(VecF{_mm256_sub_ps(x.v, n)}).v,
            _mm256_slli_epi32(_mm256_castps_si256(t), 23)};
  }
  // p · 2^n as (p · 2^(n+32)) · 2^-32: the first product is exact and normal for n ≥ −151,
  // and the second rounds once, so subnormal results underflow as one correctly rounded
  // multiply would. Two instructions fewer than forming 2^n in two halves.
  static VecF exp2_scale(__m256 p, __m256i n_exp) {
    const __m256i scale = _mm256_add_epi32(n_exp, _mm256_set1_epi32((127 + 32) << 23));
    return {_mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), _mm256_set1_ps(0x1p-32f))};
  }
  uint32_t ge_mask(VecF t) const {
    return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, t.v, _CMP_GE_OQ)));
  }
  static VecF keep_ge(VecF a, VecF t) {
    return {_mm256_and_ps(a.v, _mm256_cmp_ps(a.v, t.v, _CMP_GE_OQ))};
  }
  // The mask first: in the fold's sweep nearly every vector selects nothing, and the spill
  // of v for the lane loop would otherwise cost a store every vector.
  int compress_ge(VecF t, int32_t base, int32_t* iout, float* vout) const {
    uint32_t m = ge_mask(t);
    if (__builtin_expect(m == 0, 1)) return 0;
    alignas(32) float x[8];
    _mm256_store_ps(x, v);
    int n = 0;
    for (; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      iout[n] = base + l;
      vout[n++] = x[l];
    }
    return n;
  }
  int compress_ge_ids(VecF t, const int32_t* ids, int32_t* iout, float* vout) const {
    uint32_t m = ge_mask(t);
    if (__builtin_expect(m == 0, 1)) return 0;
    alignas(32) float x[8];
    _mm256_store_ps(x, v);
    int n = 0;
    for (; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      iout[n] = ids[l];
      vout[n++] = x[l];
    }
    return n;
  }
  float reduce_add() const {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
  }
  float reduce_max() const {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_max_ps(lo, hi);
    lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_max_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
  }
};

#else  // portable fallback: the AVX2 build's eight lanes as an array, lane by lane

// Eight lanes, so that the portable build sums in the AVX2 build's order (eight partial sums,
// reduce_add's tree), not along one chain: one chain of 4,096 float additions a block is
// several times less accurate. The compiler vectorises the loops where the target allows.
struct VecF {
  static constexpr int size = 8;
  float v[8];
  template <typename F>
  static VecF map(F f) {
    VecF r;
    for (int i = 0; i < size; ++i) r.v[i] = f(i);
    return r;
  }
  static VecF set1(float x) { return map([&](int) { return x; }); }
  static VecF load(const float* p) { return map([&](int i) { return p[i]; }); }
  static VecF load(const uint16_t* p, BF16) {
    return map([&](int i) { return bf16_to_float(p[i]); });
  }
  static VecF load(const uint16_t* p, F16) {
    return map([&](int i) { return f16_to_float(p[i]); });
  }
  static VecF load(const float* p, F32) { return load(p); }
  void store(float* p, F32) const {
    for (int i = 0; i < size; ++i) p[i] = v[i];
  }
  void store(uint16_t* p, F16) const {
    for (int i = 0; i < size; ++i) p[i] = float_to_f16(v[i]);
  }
  void store(uint16_t* p, BF16) const {
    for (int i = 0; i < size; ++i) p[i] = float_to_bf16(v[i]);
  }
  friend VecF operator+(VecF a, VecF b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  friend VecF operator-(VecF a, VecF b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  friend VecF operator*(VecF a, VecF b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static VecF fma(VecF a, VecF b, VecF c) {
    return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); });
  }
  static VecF fms(VecF a, VecF b, VecF c) {
    return map([&](int i) { return std::fma(a.v[i], b.v[i], -c.v[i]); });
  }
  static VecF fnma(VecF a, VecF b, VecF c) {
    return map([&](int i) { return std::fma(-a.v[i], b.v[i], c.v[i]); });
  }
  // x86's max: a > b ? a : b, so b when either is NaN (callers pass the data as b)
  static float max1(float a, float b) { return a > b ? a : b; }
  static VecF max(VecF a, VecF b) { return map([&](int i) { return max1(a.v[i], b.v[i]); }); }
  static VecF zero_where_neginf(VecF a, VecF keep) {
    return map([&](int i) {
      return keep.v[i] == -std::numeric_limits<float>::infinity() ? 0.0f : a.v[i];
    });
  }
  static VecF exp2(VecF x) { return map([&](int i) { return exp2_scalar(x.v[i]); }); }
  static VecF exp2_short(VecF x) { return exp2(x); }  // as the AVX-512 build's
  uint32_t ge_mask(VecF t) const {
    uint32_t m = 0;
    for (int i = 0; i < size; ++i) m |= uint32_t(v[i] >= t.v[i]) << i;
    return m;
  }
  static VecF keep_ge(VecF a, VecF t) {
    return map([&](int i) { return a.v[i] >= t.v[i] ? a.v[i] : 0.0f; });
  }
  int compress_ge(VecF t, int32_t base, int32_t* iout, float* vout) const {
    int n = 0;
    for (int i = 0; i < size; ++i)
      if (v[i] >= t.v[i]) {
        iout[n] = base + i;
        vout[n++] = v[i];
      }
    return n;
  }
  int compress_ge_ids(VecF t, const int32_t* ids, int32_t* iout, float* vout) const {
    int n = 0;
    for (int i = 0; i < size; ++i)
      if (v[i] >= t.v[i]) {
        iout[n] = ids[i];
        vout[n++] = v[i];
      }
    return n;
  }
  // The AVX2 build's trees: lanes i and i + 4, then i and i + 2, then the two left.
  float reduce_add() const {
    float h[4];
    for (int i = 0; i < 4; ++i) h[i] = v[i] + v[i + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
  }
  float reduce_max() const {
    float h[4];
    for (int i = 0; i < 4; ++i) h[i] = max1(v[i], v[i + 4]);
    return max1(max1(h[0], h[2]), max1(h[1], h[3]));
  }
};

#endif

// a then b at p (2 · VecF::size values of Tag), as a.store(p) and b.store(p + size) write
// them: on AVX2 bf16 in one pack and one 32-byte store (VecF::store2), else the two stores.
template <typename Tag>
inline void store_pair(typename Tag::storage* p, VecF a, VecF b) {
#if defined(RLKERN_VECF_STORE2_BF16)
  if constexpr (std::is_same_v<Tag, BF16>) {
    VecF::store2(p, a, b, Tag{});
    return;
  }
#endif
  a.store(p, Tag{});
  b.store(p + VecF::size, Tag{});
}

template <typename V>
inline V exp2_poly(V r) {
  V p = V::set1(kExp2C5);
  p = V::fma(p, r, V::set1(kExp2C4));
  p = V::fma(p, r, V::set1(kExp2C3));
  p = V::fma(p, r, V::set1(kExp2C2));
  p = V::fma(p, r, V::set1(kExp2C1));
  return V::fma(p, r, V::set1(1.0f));
}

}  // namespace rlkern::cpu
