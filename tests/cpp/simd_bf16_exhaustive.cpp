// Every bf16 conversion of csrc/cpu/simd.h's VecF against its specification, over every input:
//   load:  all 2^16 bf16 values → float bits = value << 16;
//   store: all 2^32 float bit patterns → round to nearest even on the bits; a NaN → 0x7fc0
//          on AVX-512 (the integer rounding VecF::store uses where its conversion instruction
//          would not give these bits: subnormals, which the instruction flushes, and NaN), or
//          the NaN's own top bits with the quiet bit set on the AVX2 and scalar builds (their
//          store is float_to_bf16's);
//   pair:  store_pair<BF16> (two vectors at once: one pack and one store on AVX2) against the
//          same specification, on the same inputs.
// Prints the mismatch counts and exits 1 on any. Built and run by tests/test_simd_exhaustive.py.
#include <cstdio>
#include <cstring>

#include "cpu/simd.h"

using namespace rlkern::cpu;

static uint16_t spec_store(uint32_t bits) {
#if defined(__AVX512F__)
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
#else
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
#endif
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

int main() {
  constexpr int W = VecF::size;
  uint64_t bad_load = 0, bad_store = 0;
  alignas(64) uint16_t h[W];
  alignas(64) float f[W];
  for (uint32_t base = 0; base < 65536; base += W) {
    for (int j = 0; j < W; ++j) h[j] = uint16_t(base + j);
    VecF::load(h, BF16{}).store(f, F32{});
    for (int j = 0; j < W; ++j) {
      uint32_t b;
      std::memcpy(&b, &f[j], 4);
      bad_load += b != (uint32_t(h[j]) << 16);
    }
  }
  uint64_t bad_pair = 0;
  alignas(64) uint32_t in[2 * W];
  alignas(64) float f2[2 * W];
  alignas(64) uint16_t h2[2 * W];
  for (uint64_t base = 0; base < (uint64_t{1} << 32); base += 2 * W) {
    // an odd multiplier permutes the 2^32 patterns (each is still tested once) and gives the
    // lanes of a vector unrelated top bits, so a lane stored in the wrong place shows
    for (int j = 0; j < 2 * W; ++j) in[j] = uint32_t(base + j) * 0x9E3779B1u;
    std::memcpy(f2, in, sizeof in);
    for (int half = 0; half < 2; ++half) {
      VecF::load(f2 + half * W).store(h, BF16{});
      for (int j = 0; j < W; ++j) bad_store += h[j] != spec_store(in[half * W + j]);
    }
    store_pair<BF16>(h2, VecF::load(f2), VecF::load(f2 + W));
    for (int j = 0; j < 2 * W; ++j) bad_pair += h2[j] != spec_store(in[j]);
  }
  std::printf("load mismatches %llu, store mismatches %llu, pair mismatches %llu\n",
              static_cast<unsigned long long>(bad_load),
              static_cast<unsigned long long>(bad_store),
              static_cast<unsigned long long>(bad_pair));
  return bad_load == 0 && bad_store == 0 && bad_pair == 0 ? 0 : 1;
}
