// The policy-loss CPU kernels' vector exp (csrc/cpu/policy_loss_simd.h: expv, and expv_clamped
// where |x| ≤ kExpClampedMax) against the scalar exp_host_f32 of rlkern/policy_loss.h: the lane
// policies promise the scalar path's per-token bits, and a token's ratio is its exp. A NaN must
// stay a NaN (its payload is not compared). Checked on every 7th float bit pattern and on every
// pattern within 2^21 of the range ends (±kMax, kMin, ±kExpClampedMax) and of ±0; with
// `all` as argument, on all 2^32 (~1 min per lane set on this machine's cores).
// Prints the mismatch counts and exits 1 on any. Built and run by tests/test_simd_exhaustive.py
// with -march=native, so it checks the lane policy this machine's build uses (Avx512F, Avx2F,
// or the scalar one), and with -ffp-contract=off, as CMakeLists.txt compiles the policy loss.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cpu/policy_loss_simd.h"

using namespace rlkern::cpu::plsimd;
namespace pl = rlkern::policy_loss;
using pl::expv;  // the scalar lanes' (float); the SIMD overloads are plsimd's
using pl::expv_clamped;

static bool same(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

int main(int argc, char** argv) {
  using P = FloatLanes;
  constexpr int W = P::L;
  uint64_t bad_exp = 0, bad_clamped = 0, checked = 0;
  alignas(64) uint32_t in[W];
  alignas(64) float x[W], e[W], c[W];
  const auto all = P::lanes(W);
  // W patterns from `first`, `step` apart
  auto check = [&](uint64_t first, uint64_t step) {
    for (int j = 0; j < W; ++j) in[j] = uint32_t(first + uint64_t(j) * step);
    std::memcpy(x, in, sizeof in);
    const auto v = P::load(x, all);
    P::store(e, expv(v), all);
    P::store(c, expv_clamped(v), all);
    for (int j = 0; j < W; ++j) {
      const float want = pl::exp_host_f32(x[j]);
      bad_exp += !same(e[j], want);
      if (std::fabs(x[j]) <= pl::kExpClampedMax || std::isnan(x[j]))
        bad_clamped += !same(c[j], want);
    }
    checked += W;
  };
  const uint64_t stride = argc > 1 && std::strcmp(argv[1], "all") == 0 ? 1 : 7;
  for (uint64_t base = 0; base + W * stride <= (uint64_t{1} << 32); base += W * stride)
    check(base, stride);
  const float ends[] = {pl::exp_f32::kMax, pl::exp_f32::kMin, pl::kExpClampedMax, 0.0f};
  for (float end : ends)
    for (float sign : {1.0f, -1.0f}) {
      uint32_t b;
      const float at = sign * end;
      std::memcpy(&b, &at, 4);
      for (uint64_t d = 0; d < (uint64_t{1} << 22); d += W) check(uint64_t(b) - (1u << 21) + d, 1);
    }
  std::printf("lanes %d, %llu checked, expv mismatches %llu, expv_clamped mismatches %llu\n", W,
              static_cast<unsigned long long>(checked), static_cast<unsigned long long>(bad_exp),
              static_cast<unsigned long long>(bad_clamped));
  return bad_exp == 0 && bad_clamped == 0 ? 0 : 1;
}
