// csrc/cpu/simd.h's max_bits16 (the fold's integer max of 16-bit logits) against the float max,
// for bf16 and fp16 bit patterns: every length 1..300 (so every tail and both unrolled loops),
// random values of every sign and magnitude, with and without ±inf. NaN is left out (the fold
// sends any block holding one to its exact path), and so is a result of ±0 (a +0 / −0 tie is the
// one case the integer max may resolve differently; the fold sends a zero max to its exact path
// too); a zero max is still checked to compare equal. A build without max_bits16 (it is
// AVX-512BW only) prints that and passes. Prints the mismatch count and exits 1 on any. Built
// and run by tests/test_simd_exhaustive.py.
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

using namespace rlkern::cpu;

#if defined(RLKERN_MAX_BITS16)

template <typename Tag>
static bool is_nan16(uint16_t h) {
  return std::isnan(load_scalar<Tag>(&h));
}

template <typename Tag>
static uint64_t check(std::mt19937& gen, uint64_t& cases) {
  uint64_t bad = 0;
  std::uniform_int_distribution<uint32_t> any(0, 0xffff);
  for (int trial = 0; trial < 40; ++trial) {
    for (int64_t n = 1; n <= 300; ++n) {
      std::vector<uint16_t> x(n);
      // trial parity: all values negative (the unsigned-min branch) or mixed signs
      const uint16_t sign = trial % 2 ? 0x8000 : 0;
      for (auto& h : x) {
        do h = uint16_t(any(gen)) | (trial % 2 ? sign : 0);
        while (is_nan16<Tag>(h));
      }
      constexpr uint16_t kInf = std::is_same_v<Tag, BF16> ? 0x7f80 : 0x7c00;
      if (trial % 4 == 2) x[gen() % n] = kInf | 0x8000;  // −inf
      if (trial % 8 == 3) x[gen() % n] = kInf;           // +inf
      float want = -INFINITY;
      for (const uint16_t h : x) want = std::fmax(want, load_scalar<Tag>(&h));
      const uint16_t got_bits = max_bits16(x.data(), n);
      const float got = load_scalar<Tag>(&got_bits);
      uint16_t want_bits = 0;
      for (const uint16_t h : x)
        if (load_scalar<Tag>(&h) == want) want_bits = h;
      ++cases;
      const bool ok = want == 0.0f ? got == 0.0f : got_bits == want_bits;
      if (!ok && bad++ < 5)
        std::printf("n=%lld want %04x got %04x\n", static_cast<long long>(n), want_bits,
                    got_bits);
    }
  }
  return bad;
}

#endif

int main() {
#if defined(RLKERN_MAX_BITS16)
  std::mt19937 gen(20261207);
  uint64_t cases = 0;
  const uint64_t bad = check<BF16>(gen, cases) + check<F16>(gen, cases);
  std::printf("max_bits16 cases %llu, mismatches %llu\n", static_cast<unsigned long long>(cases),
              static_cast<unsigned long long>(bad));
  return bad ? 1 : 0;
#else
  std::printf("max_bits16 not in this build; mismatches 0\n");
  return 0;
#endif
}
