// CPU kernels for group advantages (ALGORITHMS.md §2) and the group statistics behind them.
// Torch-free interface: raw pointers and sizes; csrc/ops.cpp adapts tensors to it.
#pragma once

#include <cstdint>

#include "rlkern/group_stats.h"

namespace rlkern::cpu {

// How a kernel reports bad data it found (the glue turns it into a ValueError).
struct Status {
  enum Code { kOk = 0, kInvalidScore = 1, kPasskSingleton = 2 } code = kOk;
  int64_t row = -1;  // the first offending row
};

// Rows are grouped by `group_ids` (n arbitrary int64, any order) when it is non-null, else
// contiguously by `group_size` (which divides n). Scores are float32 or float64 (`scores_f64`);
// outputs likewise (`out_f64`), each a contiguous array of n.
struct GroupAdvantagesArgs {
  const void* scores;
  bool scores_f64;
  int64_t n;
  const int64_t* group_ids;  // nullable
  int64_t group_size;
  const double* weights;  // opo: response lengths; reinforce_pp_baseline: token counts (nullable)
  const double* loglik;   // unlikely / xrpo: per-response mean old log-probability (nullable)
  AdvantageParams params;  // estimator, std, options; the batch-level fields are filled here
  bool nan_omit;           // false: a non-finite score is an error (Status::kInvalidScore)
  double unlikely_lam;     // unlikely's λ
  void* advantages;
  void* group_mean;
  void* group_std;
  bool* zero_variance;
  bool out_f64;
};

Status group_advantages(const GroupAdvantagesArgs& args);

// Per-group moments of the valid scores, groups numbered in order of first appearance (ids
// path) or contiguously. The outputs have capacity n (≥ the number of groups K); the first K
// entries are written and K is returned in *num_groups.
struct GroupMomentsArgs {
  const void* scores;
  bool scores_f64;
  int64_t n;
  const int64_t* group_ids;  // nullable
  int64_t group_size;
  bool nan_omit;
  int64_t* keys;          // the group's id (ids path) or its index (contiguous)
  GroupMoments* moments;  // n, mean, M2, min, max per group
};

// A non-finite score under nan_omit == false gives Status::kInvalidScore.
Status group_moments(const GroupMomentsArgs& args, int64_t* num_groups);

// Advantages from given group moments (streaming statistics): row i belongs to group
// row_group[i] of the K moments. Estimators: grpo, dr_grpo, rloo, gpg, ngrpo (no extras); the
// batch-level params (batch_std, gpg_alpha) are the caller's.
struct GroupFinishArgs {
  const void* scores;
  bool scores_f64;
  int64_t n;
  const int64_t* row_group;
  const GroupMoments* moments;
  int64_t num_groups;  // K
  AdvantageParams params;
  bool nan_omit;
  void* advantages;
  void* group_mean;
  void* group_std;
  bool* zero_variance;
  bool out_f64;
};

Status group_finish(const GroupFinishArgs& args);

}  // namespace rlkern::cpu
