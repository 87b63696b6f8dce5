// CPU kernels for group advantages (ALGORITHMS.md §2) and the group statistics behind them.
// Torch-free interface: raw pointers and sizes; csrc/cpu/advantages_ops.cpp adapts tensors.
#pragma once

#include <cstdint>

#include "rlkern/group_stats.h"

namespace rlkern::cpu {

// How a kernel reports bad data it found (the glue turns it into a ValueError).
struct Status {
  enum Code { kOk = 0, kInvalidScore = 1, kPasskSingleton = 2 } code = kOk;
  int64_t row = -1;  // the first offending row
};

// n scores, float32 or float64 (`f64`), grouped by `group_ids` (n arbitrary int64, any order)
// when it is non-null, else contiguously by `group_size` (which divides n).
struct ScoreRows {
  const void* scores;
  bool f64;
  int64_t n;
  const int64_t* group_ids;  // nullable
  int64_t group_size;
};

// Per-row outputs: contiguous arrays of n, float32 or float64 (`f64`).
struct RowOutputs {
  void* advantages;
  void* group_mean;
  void* group_std;
  bool* zero_variance;
  bool f64;
};

struct GroupAdvantagesArgs {
  ScoreRows rows;
  const double* weights;  // opo: response lengths; reinforce_pp_baseline: token counts (nullable)
  const double* loglik;   // unlikely / xrpo: per-response mean old log-probability (nullable)
  AdvantageParams params;  // the options (nan_omit false: a non-finite score is an error,
                           // Status::kInvalidScore); the batch-level fields are filled here
  RowOutputs out;
};

Status group_advantages(const GroupAdvantagesArgs& args);

// Per-group moments of the valid scores, groups numbered in order of first appearance (ids
// path) or contiguously. The outputs have capacity n (≥ the number of groups K); the first K
// entries are written and K is returned in *num_groups. A non-finite score under
// nan_omit == false gives Status::kInvalidScore.
Status group_moments(const ScoreRows& rows, bool nan_omit, int64_t* keys, GroupMoments* moments,
                     int64_t* num_groups);

// Advantages from given group moments (streaming statistics): row i of `scores` (rows.group_ids
// and rows.group_size unused) belongs to group row_group[i] of the K moments. Estimators:
// grpo, dr_grpo, rloo, gpg, ngrpo (no extras); σ_batch merges the K groups, GPG's α counts
// the given rows.
struct GroupFinishArgs {
  ScoreRows rows;
  const int64_t* row_group;
  const GroupMoments* moments;
  int64_t num_groups;  // K
  AdvantageParams params;
  RowOutputs out;
};

Status group_finish(const GroupFinishArgs& args);

// out[g] = Chan's merge of a[g] and b[g] (moments_merge) for g < k.
void moments_merge_rows(const GroupMoments* a, const GroupMoments* b, int64_t k,
                        GroupMoments* out);

}  // namespace rlkern::cpu
