// One side of the sampler's paired A/B (bench/profile/sample_ab.sh): this tree's kept-set
// search and draw (csrc/cpu/kept_set.h, header only) compiled with rlkern renamed, so that two
// trees' builds link into one process. SIDE (a or b) names the entry points.
#include <chrono>
#include <cstdint>
#include <cstring>

#include "cpu/kept_set.h"

using namespace rlkern::cpu;
using namespace rlkern::cpu::sampler;

#define RLKERN_AB_CAT2(x, y) x##y
#define RLKERN_AB_CAT(x, y) RLKERN_AB_CAT2(x, y)
#define RLKERN_AB(name) RLKERN_AB_CAT(name, RLKERN_AB_CAT(_, SIDE))

namespace {

// The filters of sample_ab.cpp's modes, in its order (T = 0.7, as rows.cpp).
RowFilter filter_of(int mode, int64_t V) {
  constexpr double T = 0.7;
  switch (mode) {
    case 1: return {T, 50, 1.0, 0.0, false};   // top-k 50
    case 2: return {T, V, 0.9, 0.0, false};    // top-p 0.9
    case 3: return {T, V, 1.0, 0.05, false};   // min-p 0.05
    case 4: return {T, 50, 0.9, 0.0, false};   // top-k 50 + top-p 0.9
    default: return {T, V, 1.0, 0.0, false};   // no filter
  }
}

}  // namespace

// One pass over R rows of V bf16 logits: each row's kept set and one draw (u = 0.37). Writes
// per row what the two sides must agree on (the token, M, S_kept and the token's processed
// log-prob, as raw bits in out[4 r .. 4 r + 3]); returns the pass's µs per row.
extern "C" double RLKERN_AB(ab_sample)(const uint16_t* x, int64_t R, int64_t V, int mode,
                                        uint64_t* out) {
  static Scratch* s = new Scratch(V);  // per-thread scratch, kept across calls as the op does
  const RowFilter f = filter_of(mode, V);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < R; ++r) {
    const KeptRow k = filter_row(x + r * V, DType::kBFloat16, V, f, *s);
    const int64_t token = draw(*s, k, V, 0.37);
    const float lp = token >= 0 ? kept_logprob(*s, k, token) : 0.0f;
    uint32_t lp_bits;
    std::memcpy(&lp_bits, &lp, sizeof lp_bits);
    uint64_t s_bits;
    std::memcpy(&s_bits, &k.S_kept, sizeof s_bits);
    out[4 * r] = uint64_t(token);
    out[4 * r + 1] = uint64_t(k.M);
    out[4 * r + 2] = s_bits;
    out[4 * r + 3] = lp_bits;
  }
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
             .count() / double(R);
}
