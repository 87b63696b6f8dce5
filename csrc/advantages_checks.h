// Argument checks of the advantages family, shared by the CPU glue (csrc/cpu/advantages_ops.cpp)
// and the CUDA glue (csrc/cuda/advantages_ops.cpp) on top of the generic ones of checks.h, so
// that both backends reject the same inputs with the same messages. The codes and layouts they
// check are those of rlkern/group_stats.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"
#include "rlkern/group_stats.h"

namespace rlkern::checks::advantages {

// Scores (or returns, rewards, entropies): float32 or float64, the kernels' two score types.
// Returns whether they are float64.
inline bool float_kind(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   ": expected float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kDouble;
}

// A contiguous float32 / float64 array of `numel` elements (its own dtype); returns whether
// it is float64.
inline bool float_array(const at::Tensor& t, const char* name, int64_t numel,
                        const at::Tensor& like) {
  const bool f64 = float_kind(t, name);
  array(t, name, numel, t.scalar_type(), like);
  return f64;
}

// `value` is a code of `table` (rlkern/group_stats.h).
inline void code(int64_t value, const char* name, const LayoutTable& table) {
  TORCH_CHECK_VALUE(value >= 0 && value < table.size, name, ": ", value, " is not a code of the ",
                    table.table, " table (0 = ", table.names[0], " .. ", table.size - 1, " = ",
                    table.names[table.size - 1], ")");
}

// `int[] flags` (enum Flag order), every code checked.
inline void flags(at::IntArrayRef flags) {
  TORCH_CHECK_VALUE(flags.size() == size_t(kNumFlags), "flags: expected ", int(kNumFlags),
                    " codes (rlkern._C.LAYOUTS['advantages']['flags']), got ", flags.size());
  for (int f = 0; f < kNumFlags; ++f)
    code(flags[f], rlkern::advantages::kFlagNames[f], rlkern::advantages::kFlagTables[f]);
}

// The options of an op from its `int[] flags` and `float[] hparams` (the first kNumHParams
// entries of enum Param).
inline AdvantageParams params(at::IntArrayRef flag_codes, at::ArrayRef<double> hparams) {
  flags(flag_codes);
  TORCH_CHECK_VALUE(hparams.size() == size_t(kNumHParams), "hparams: expected ",
                    int(kNumHParams), " values (rlkern._C.LAYOUTS['advantages']['hparams']), got ",
                    hparams.size());
  return advantage_params(flag_codes.data(), hparams.data(), kNumHParams);
}

// Group ids (int64, one per score) or a group size that divides n; returns the ids or nullptr.
inline const int64_t* grouping(const std::optional<at::Tensor>& ids, int64_t n,
                               int64_t group_size, const at::Tensor& like) {
  if (ids.has_value()) {
    array(*ids, "group_ids", n, at::kLong, like);
    return ids->const_data_ptr<int64_t>();
  }
  TORCH_CHECK_VALUE(group_size > 0 && n % group_size == 0, "group_size: expected a positive "
                    "divisor of N = ", n, ", got ", group_size);
  return nullptr;
}

// A (K, kNumMoments) float64 moments table; returns K.
inline int64_t moments(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == kNumMoments, name, ": expected (K, ",
              int(kNumMoments), "), got ", t.sizes());
  array(t, name, t.numel(), at::kDouble, like);
  return t.size(0);
}

// The four per-row outputs of group_advantages and its passes: (n,) float32 / float64 arrays
// of one dtype and a bool mask.
struct RowOuts {
  void* advantages;
  void* group_mean;
  void* group_std;
  bool* zero_variance;
  bool f64;
};

inline RowOuts row_outputs(const at::Tensor& adv, const at::Tensor& mean, const at::Tensor& sd,
                           const at::Tensor& zv, int64_t n, const at::Tensor& like) {
  const bool f64 = float_array(adv, "advantages", n, like);
  array(mean, "group_mean", n, adv.scalar_type(), like);
  array(sd, "group_std", n, adv.scalar_type(), like);
  array(zv, "zero_variance_mask", n, at::kBool, like);
  return {adv.data_ptr(), mean.data_ptr(), sd.data_ptr(), zv.data_ptr<bool>(), f64};
}

}  // namespace rlkern::checks::advantages
