// AVX2 stand-ins for AVX-512's compress (vpcompressd / vpcompressq): the selected lanes of a
// vector packed to its front, in lane order, through one lane permute whose indices come from
// a table indexed by the selection mask. The ids paths filter rows with it (advantages_ids.h,
// group_index.h); a branch-free scalar append costs a dependent store address per row.
//
// The tables are 2 KiB (eight 32-bit lanes: one byte an index) and 128 bytes (four 64-bit
// lanes), built at compile time. Lanes past the selected ones hold unselected lanes' values:
// callers store the whole vector and advance by the popcount, so those slots are overwritten
// or never read.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>

namespace rlkern::cpu::compress {

struct Table8 {
  uint64_t idx[256];  // byte j of idx[mask]: the lane that goes to position j
};

constexpr Table8 make_table8() {
  Table8 t{};
  for (unsigned mask = 0; mask < 256; ++mask) {
    uint64_t packed = 0;
    int pos = 0;
    for (int lane = 0; lane < 8; ++lane)
      if (mask & (1u << lane)) packed |= uint64_t(lane) << (8 * pos++);
    for (; pos < 8; ++pos) packed |= uint64_t(7) << (8 * pos);  // filler: any lane will do
    t.idx[mask] = packed;
  }
  return t;
}

inline constexpr Table8 kTable8 = make_table8();

// Indices for _mm256_permutevar8x32_* that pack the 32-bit lanes selected by mask (bit l:
// lane l) to the front.
inline __m256i lanes32(unsigned mask) {
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(kTable8.idx[mask & 0xffu])));
}

// Indices (in 32-bit lanes) that pack the 64-bit lanes selected by mask (bit l: lane l of
// four) to the front: 64-bit lane l is 32-bit lanes 2l and 2l + 1.
inline __m256i lanes64(unsigned mask) {
  // The 32-bit table's entry for the mask with each 64-bit lane's bit doubled gives lane
  // pairs (2l, 2l + 1) in order.
  unsigned m32 = 0;
  for (int l = 0; l < 4; ++l)
    if (mask & (1u << l)) m32 |= 3u << (2 * l);
  return lanes32(m32);
}

}  // namespace rlkern::cpu::compress

#endif  // AVX2 without AVX-512F
