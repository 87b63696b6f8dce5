// A paired A/B of the sampler's CPU row (bench/profile/sample_ab.sh): two builds of the kept-set
// search and draw (sides a and b, sample_ab_side.cpp) in one process, their passes alternating
// (a then b, then b then a), over the same bf16 rows as rows.cpp (V = 151,936, N(0, 16), T =
// 0.7; one thread). Prints, per filter, each side's median µs a row and the median and
// quartiles of the per-pass ratio b / a, and the rows whose token, kept-set size, kept mass or
// processed log-prob differ in any bit between the sides. Why paired: see policy_loss_ab.cpp.
//
//   sample_ab [rows=128] [passes=30]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bf16_rows.h"
#include "cpu/simd.h"  // float_to_bf16 (side a's tree: not renamed, so no clash)

extern "C" double ab_sample_a(const uint16_t*, int64_t, int64_t, int, uint64_t*);
extern "C" double ab_sample_b(const uint16_t*, int64_t, int64_t, int, uint64_t*);

namespace {

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[size_t(q * double(v.size() - 1) + 0.5)];
}

}  // namespace

int main(int argc, char** argv) {
  constexpr int64_t V = 151936;
  const int64_t R = argc > 1 ? std::atol(argv[1]) : 128;
  const int passes = argc > 2 ? std::atoi(argv[2]) : 30;
  const std::vector<uint16_t> x = normal_bf16_rows(R, V, rlkern::cpu::float_to_bf16);
  std::vector<uint64_t> out_a(4 * R), out_b(4 * R);
  const char* modes[] = {"no filter", "top-k 50", "top-p 0.9", "min-p 0.05", "top-k + top-p"};
  std::printf("%-14s %9s %9s %7s %15s %9s\n", "filter", "a us/row", "b us/row", "b/a",
              "b/a quartiles", "rows off");
  for (int mode = 0; mode < 5; ++mode) {
    ab_sample_a(x.data(), R, V, mode, out_a.data());  // warm both sides' scratch and guesses
    ab_sample_b(x.data(), R, V, mode, out_b.data());
    std::vector<double> ta, tb, ratio;
    for (int p = 0; p < passes; ++p) {
      double a, b;
      if (p % 2 == 0) {
        a = ab_sample_a(x.data(), R, V, mode, out_a.data());
        b = ab_sample_b(x.data(), R, V, mode, out_b.data());
      } else {
        b = ab_sample_b(x.data(), R, V, mode, out_b.data());
        a = ab_sample_a(x.data(), R, V, mode, out_a.data());
      }
      ta.push_back(a);
      tb.push_back(b);
      ratio.push_back(b / a);
    }
    int64_t off = 0;
    for (int64_t r = 0; r < R; ++r)
      off += std::memcmp(&out_a[4 * r], &out_b[4 * r], 4 * sizeof(uint64_t)) != 0;
    std::printf("%-14s %9.1f %9.1f %7.3f   %5.3f-%5.3f %9lld\n", modes[mode], quantile(ta, 0.5),
                quantile(tb, 0.5), quantile(ratio, 0.5), quantile(ratio, 0.25),
                quantile(ratio, 0.75), (long long)off);
  }
  return 0;
}
