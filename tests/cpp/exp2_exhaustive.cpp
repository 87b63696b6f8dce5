// csrc/cpu/simd.h's VecF::exp2 and VecF::exp2_short (its variant with an integer exponent add
// where every lane's result is normal; vectors straddling that bound and below it take exp2)
// against exp2_scalar, its specification, bit for bit: every 5th
// float of its domain [kExp2Min, kExp2Max], and every float where the result is subnormal or
// zero (x < −126) or near either end of the domain; NaN in, NaN out (exp2_scalar's too). Prints
// the mismatch count and exits 1 on any. Built and run by tests/test_simd_exhaustive.py.
#include <cmath>
#include <cstdio>

#include "cpu/simd.h"

using namespace rlkern::cpu;

static uint64_t bad = 0, checked = 0;

// Checks the floats with bit patterns [lo, hi] (one sign) at the given stride.
static void check_bits(uint32_t lo, uint32_t hi, uint32_t stride) {
  constexpr int W = VecF::size;
  alignas(64) float in[W], out[W], out_short[W];
  int k = 0;
  auto flush = [&] {
    VecF::exp2(VecF::load(in)).store(out, F32{});
    VecF::exp2_short(VecF::load(in)).store(out_short, F32{});
    for (int j = 0; j < k; ++j) {
      const float want = exp2_scalar(in[j]);
      for (const float got : {out[j], out_short[j]}) {
        const bool same =
            std::isnan(want) ? std::isnan(got) : float_bits(got) == float_bits(want);
        if (!same && bad++ < 5)
          std::printf("x=%a: got %a want %a\n", double(in[j]), double(got), double(want));
      }
    }
    checked += uint64_t(k);
    k = 0;
  };
  for (uint64_t b = lo; b <= hi; b += stride) {
    in[k++] = bits_float(uint32_t(b));
    if (k == W) flush();
  }
  if (k) {
    for (int j = k; j < W; ++j) in[j] = 0.0f;  // padding: computed, not compared
    flush();
  }
}

int main() {
  const uint32_t neg_end = float_bits(kExp2Min), pos_end = float_bits(kExp2Max);
  check_bits(0x80000000u, neg_end, 5);                 // −0 … kExp2Min
  check_bits(0x00000000u, pos_end, 5);                 // +0 … kExp2Max
  check_bits(float_bits(-126.0f), neg_end, 1);            // subnormal and zero results
  check_bits(pos_end - 100000u, pos_end, 1);           // the top of the domain
  check_bits(0x7fc00000u, 0x7fc00000u, 1);             // NaN
  check_bits(0xffc00001u, 0xffc00001u, 1);
  // NaN in, NaN out, for the specification itself too (the portable build's VecF::exp2 is it)
  for (const uint32_t nan_bits : {0x7fc00000u, 0xffc00001u, 0x7f800001u})
    if (!std::isnan(exp2_scalar(bits_float(nan_bits))) && bad++ < 5)
      std::printf("exp2_scalar(NaN %08x) is not NaN\n", nan_bits);
  std::printf("exp2 checked %llu, mismatches %llu\n", static_cast<unsigned long long>(checked),
              static_cast<unsigned long long>(bad));
  return bad ? 1 : 0;
}
