// Cost of each pass of GiGPO's float32 path (csrc/cpu/token_advantages.cpp) on S steps in
// prompt groups of 64 steps (arbitrary 62-bit ids, shuffled) with `states` distinct state keys
// a group, built over the same sources as the extension: the whole call, then its passes one
// at a time — the prompt numbering, the (prompt id, state key) pair numbering, each grouping's
// chunked float shifted sums — and, for comparison, the pair numbering with each pair hashed
// to one word (16-byte slots, the same group count; wrong groups, a bound on what a 16-byte
// pair slot could save). "Rest" is what the call spends beyond those passes timed alone: the
// non-finite checks, the records, the row pass, and the misses each pass takes on data the
// others pushed out of the caches. Median of 100 calls of each; the data stay in the caches
// between calls of one pass. Built and run by
// bench/profile/gigpo.sh; docs/advantages.md ("GiGPO, fourth round") quotes it.
//
//   gigpo [S=65536] [threads=2] [states=16] [ids=hashed|dense]
//
// ids=dense numbers the prompt groups 0, 1, 2, ... (as the verl integration's uid codes are)
// instead of drawing arbitrary 62-bit ids: the call then reads them as id − min.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cpu/advantages_ids.h"
#include "cpu/group_index.h"
#include "cpu/token_advantages.h"
#include "median.h"

using namespace rlkern;
using namespace rlkern::cpu;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 65536;
  at::set_num_threads(argc > 2 ? std::atoi(argv[2]) : 2);
  const uint64_t states = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 16;
  const bool dense_ids = argc > 4 && std::string(argv[4]) == "dense";
  constexpr int64_t kStepsPerGroup = 64;
  const size_t rows = static_cast<size_t>(n);
  std::mt19937_64 rng(1);
  std::vector<int64_t> prompt_ids(static_cast<size_t>(n / kStepsPerGroup + 1));
  for (size_t g = 0; g < prompt_ids.size(); ++g)
    prompt_ids[g] = dense_ids ? int64_t(g) : int64_t(rng() >> 2);
  std::vector<int64_t> dense(rows), group(rows), keys(rows), pair_word(rows);
  for (int64_t i = 0; i < n; ++i) dense[i] = i / kStepsPerGroup;
  std::shuffle(dense.begin(), dense.end(), rng);
  std::vector<float> episode(rows), step(rows), out(3 * rows);
  for (int64_t i = 0; i < n; ++i) {
    group[i] = prompt_ids[dense[i]];
    keys[i] = int64_t(((rng() % states) * 0x9E3779B97F4A7C15ULL) >> 2);
    pair_word[i] = int64_t(mix64(uint64_t(group[i]) ^ mix64(uint64_t(keys[i]))));
    episode[i] = float(rng() & 1);
    step[i] = episode[i] * std::pow(0.9f, float(rng() % 8));
  }
  const GigpoArgs args{episode.data(), step.data(), false,          n,
                       group.data(),   keys.data(), 1.0,            true,
                       true,           1e-6,        out.data(),     out.data() + n,
                       out.data() + 2 * n};
  const double t_call = median_us([&] { gigpo_advantages(args); });
  std::vector<int32_t> rg_prompt(rows), rg_pair(rows), rg_word(rows);
  Grouping by_prompt, by_pair;
  const double t_prompt = median_us([&] {  // as the call numbers them (dense: id − min)
    const std::optional<IdRange> range = dense_range(group.data(), n);
    by_prompt = range ? dense_numbering(group.data(), n, *range, rg_prompt.data())
                      : group_by_ids_parallel<float, false>(group.data(), n, nullptr,
                                                            rg_prompt.data(), nullptr);
  });
  const double t_pair = median_us([&] {
    by_pair = group_by_ids_parallel<float, false, 2>(group.data(), n, nullptr, rg_pair.data(),
                                                     nullptr, keys.data());
  });
  const double t_word = median_us([&] {
    group_by_ids_parallel<float, false>(pair_word.data(), n, nullptr, rg_word.data(), nullptr);
  });
  auto sums = [&](const float* x, const Grouping& g) {
    return median_us([&] {
      shifted_sums_chunked(x, n, GroupArray{g.row_group}, g.num_groups,
                           [](int64_t, int64_t, const FloatShifted*) {});
    });
  };
  const double t_sums_prompt = sums(episode.data(), by_prompt);
  const double t_sums_pair = sums(step.data(), by_pair);
  std::printf("S = %lld, %s ids, %lld prompt groups, %lld step groups, %d threads: call %.0f us | "
              "numbering: prompts %.0f, pairs %.0f (one-word pairs %.0f) | sums: prompts %.0f, "
              "pairs %.0f | rest %.0f us\n",
              (long long)n, dense_ids ? "dense" : "hashed", (long long)by_prompt.num_groups,
              (long long)by_pair.num_groups,
              at::get_num_threads(), t_call, t_prompt, t_pair, t_word, t_sums_prompt,
              t_sums_pair, t_call - t_prompt - t_pair - t_sums_prompt - t_sums_pair);
  return 0;
}
