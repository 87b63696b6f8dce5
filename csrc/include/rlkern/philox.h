// Counter-based random numbers for the samplers (ALGORITHMS.md §4), shared by CPU and CUDA.
//
// Philox-4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as
// 1, 2, 3"): a keyed bijection of a 128-bit counter, so the numbers for (seed, step, index) are
// a pure function of those three values — no generator state, no dependence on the batch.
//
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (index, 0, step mod 2^32, step >> 32)
//
// The sampler uses index 0 for the row's uniform (inverse-CDF sampling needs one uniform per
// row); other indices are free for per-token draws. Torch-free so nvcc and the host compiler
// both include it; the Triton kernel and the torch reference implement the same rounds.
#pragma once

#include <cstdint>

#include "rlkern/host_device.h"

namespace rlkern {

struct Philox4 {
  uint32_t x[4];
};

RLKERN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = uint64_t(kM0) * c0;
    const uint64_t p1 = uint64_t(kM1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform in [0, 1) with 53 random bits from the first two words of the block for
// (seed, step, index): u = (x0 >> 5 · 2^26 + x1 >> 6) · 2^-53.
RLKERN_HOST_DEVICE double philox_uniform(int64_t seed, int64_t step, uint32_t index) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  const Philox4 r = philox4x32_10(index, 0u, uint32_t(t), uint32_t(t >> 32), uint32_t(s),
                                  uint32_t(s >> 32));
  const uint64_t bits = (uint64_t(r.x[0] >> 5) << 26) | uint64_t(r.x[1] >> 6);
  return double(bits) * (1.0 / 9007199254740992.0);
}

}  // namespace rlkern
