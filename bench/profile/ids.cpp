// Cost of each pass of group_advantages' ids path (csrc/cpu/advantages.cpp) on N float32
// scores in groups of 8, timed one pass at a time over the same headers the extension builds:
// the id range, the hash numbering of arbitrary 63-bit ids (shuffled), the chunked moments,
// and the compact row pass. Median of 300 calls of each; the data stay in the caches between
// calls, so these are the passes' own costs, not a cold call's. Built and run by
// bench/profile/ids.sh; docs/advantages.md ("second round") quotes it.
//
//   ids [N=65536] [threads=2]
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/advantages_ids.h"
#include "cpu/group_index.h"
#include "median.h"

constexpr int kCalls = 300;

using namespace rlkern;
using namespace rlkern::cpu;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 65536;
  at::set_num_threads(argc > 2 ? std::atoi(argv[2]) : 2);
  const int64_t k = n / 8;
  std::mt19937_64 rng(1);
  const size_t rows = static_cast<size_t>(n);
  std::vector<int64_t> keys(static_cast<size_t>(k)), ids(rows), dense(rows);
  for (auto& key : keys) key = int64_t(rng() >> 1);
  for (int64_t i = 0; i < n; ++i) dense[i] = i / 8;
  std::shuffle(dense.begin(), dense.end(), rng);
  for (int64_t i = 0; i < n; ++i) ids[i] = keys[dense[i]];
  std::vector<float> x(rows);
  for (auto& v : x) v = float(rng() & 1);
  std::vector<int32_t> rg(rows);
  std::vector<GroupMoments> ms;
  Grouping g;
  const double t_range = median_us([&] {
    volatile int64_t sink = id_range(ids.data(), n).min;
    (void)sink;
  }, kCalls);
  const double t_number = median_us([&] {
    g = group_by_ids_parallel<float, false>(ids.data(), n, nullptr, rg.data(), nullptr);
  }, kCalls);
  const double t_moments =
      median_us([&] { moments_chunked(x.data(), n, rg.data(), g.num_groups, &ms); }, kCalls);
  std::vector<CompactRecord> rec(static_cast<size_t>(g.num_groups));
  for (int64_t j = 0; j < g.num_groups; ++j)
    rec[j] = compact_record(ms[j].n > 0 ? ms[j].mean : 0.0, 1.0f, 0.5f, false);
  std::vector<float> adv(rows), mean(rows), sd(rows);
  std::vector<uint8_t> zv(rows);
  const double t_rows = median_us([&] {
    at::parallel_for(0, n, int64_t(1) << 15, [&](int64_t b, int64_t e) {
      compact_rows(x.data(), GroupArray{rg.data()}, rec.data(), b, e, adv.data(), mean.data(),
                   sd.data(), reinterpret_cast<bool*>(zv.data()), false);
    });
  }, kCalls);
  std::printf("N = %lld, %lld groups, %d threads: id range %.1f us, numbering %.1f us, "
              "moments %.1f us, compact rows %.1f us\n",
              (long long)n, (long long)g.num_groups, at::get_num_threads(), t_range, t_number,
              t_moments, t_rows);
  return 0;
}
