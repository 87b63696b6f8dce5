// Glue from tensors to the advantage kernels (see advantages_ops.h). The Python layer
// (python/rlkern/ops/advantages.py, token_advantages.py) validates the user's arguments with
// friendly messages and builds the codes (python/rlkern/config/advantages.py); the checks here
// (csrc/advantages_checks.h, shared with the CUDA glue) guard the raw pointers against any
// other caller.
#include "cpu/advantages_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "advantages_checks.h"
#include "cpu/advantages.h"
#include "cpu/token_advantages.h"

namespace rlkern {

namespace chk = checks::advantages;

const char* const kGroupAdvantagesOutSchema =
    "group_advantages_out(Tensor scores, Tensor? group_ids, int group_size, Tensor? weights, "
    "Tensor? loglik, int[] flags, float[] hparams, Tensor(a!) advantages, "
    "Tensor(b!) group_mean, Tensor(c!) group_std, Tensor(d!) zero_variance_mask) -> ()";
const char* const kGroupMomentsOutSchema =
    "group_moments_out(Tensor scores, Tensor? group_ids, int group_size, int[] flags, "
    "Tensor(a!) keys, Tensor(b!) moments, Tensor(c!) num_groups) -> ()";
const char* const kGroupFinishOutSchema =
    "group_finish_out(Tensor scores, Tensor row_group, Tensor moments, int[] flags, "
    "float[] hparams, Tensor(a!) advantages, Tensor(b!) group_mean, Tensor(c!) group_std, "
    "Tensor(d!) zero_variance_mask) -> ()";
const char* const kGroupMomentsMergeOutSchema =
    "group_moments_merge_out(Tensor a, Tensor b, Tensor(a!) out) -> ()";
const char* const kDiscountedReturnsOutSchema =
    "discounted_returns_out(Tensor rewards, Tensor? reset, float gamma, Tensor(a!) out) -> ()";
const char* const kGaeOutSchema =
    "gae_out(Tensor rewards, Tensor? values, Tensor mask, float gamma, float lam, "
    "Tensor(a!) advantages, Tensor(b!) returns) -> ()";
const char* const kMaskedWhitenOutSchema =
    "masked_whiten_out(Tensor x, Tensor mask, bool count_f64, Tensor(a!) out) -> ()";
const char* const kPositionBaselineOutSchema =
    "position_baseline_out(Tensor returns, Tensor mask, Tensor? group_ids, int group_size, "
    "Tensor(a!) out) -> ()";
const char* const kGtpoWeightsOutSchema =
    "gtpo_weights_out(Tensor entropy, Tensor mask, Tensor? group_ids, int group_size, float eps, "
    "Tensor(a!) weight, Tensor(b!) inverse_weight) -> ()";
const char* const kGigpoAdvantagesOutSchema =
    "gigpo_advantages_out(Tensor episode_returns, Tensor step_returns, Tensor state_keys, "
    "Tensor group_ids, float omega, int episode_mode, int step_mode, float eps, "
    "Tensor(a!) advantages, Tensor(b!) episode_advantages, Tensor(c!) step_advantages) -> ()";
const char* const kEmpgModulateOutSchema =
    "empg_modulate_out(Tensor advantages, Tensor step_entropy, Tensor next_step_entropy, "
    "float k, float k_f, float zeta, Tensor(a!) out) -> ()";
// CUDA only (csrc/cuda/advantages_ops.cpp): the two passes of the GPU pipeline
// (python/rlkern/ops/advantages_segmented.py).
const char* const kGroupSegmentStatsOutSchema =
    "group_segment_stats_out(Tensor scores, Tensor? perm, Tensor? offsets, int group_size, "
    "int num_groups, Tensor? weights, Tensor? loglik, Tensor params, bool unlikely, "
    "bool weighted, bool with_loglik, bool top, Tensor(a!) ms, Tensor(b!)? mx, Tensor(c!)? ext, "
    "Tensor(d!)? xr) -> ()";
const char* const kGroupRowsFinishOutSchema =
    "group_rows_finish_out(Tensor scores, Tensor? xr, Tensor? loglik, Tensor? row_group, "
    "int group_size, Tensor ms, Tensor mx, Tensor? ext, Tensor params, int[] flags, "
    "Tensor(a!) advantages, Tensor(b!) group_mean, Tensor(c!) group_std, "
    "Tensor(d!) zero_variance_mask) -> ()";

namespace {

using MaybeTensor = std::optional<at::Tensor>;

void raise_status(const cpu::Status& st, const char* what) {
  TORCH_CHECK_VALUE(st.code != cpu::Status::kInvalidScore, what, ": row ", st.row,
                    " is NaN or infinite (nan_policy='raise'; nan_policy='omit' leaves such rows "
                    "out of their group's statistics and gives them an advantage of 0)");
  TORCH_CHECK_VALUE(st.code != cpu::Status::kPasskSingleton, "grpo_passk: the group of row ",
                    st.row, " has a single valid response; pass@k needs at least 2 (verl raises "
                    "too; singleton='zero' gives such groups 0)");
}

cpu::ScoreRows score_rows(const at::Tensor& scores, const MaybeTensor& group_ids,
                          int64_t group_size) {
  const int64_t n = scores.numel();
  const bool f64 = chk::float_array(scores, "scores", n, scores);
  return {scores.const_data_ptr(), f64, n, chk::grouping(group_ids, n, group_size, scores),
          group_size};
}

cpu::RowOutputs row_outputs(const at::Tensor& adv, const at::Tensor& mean, const at::Tensor& sd,
                            const at::Tensor& zv, const at::Tensor& scores) {
  const chk::RowOuts o = chk::row_outputs(adv, mean, sd, zv, scores.numel(), scores);
  return {o.advantages, o.group_mean, o.group_std, o.zero_variance, o.f64};
}

const uint8_t* bytes_of_mask(const at::Tensor& mask, const char* name, const at::Tensor& like) {
  checks::array(mask, name, like.numel(), at::kBool, like);
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

// A (N, T) float32 / float64 input; returns whether it is float64.
bool float_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": expected a (N, T) tensor, got shape ", x.sizes());
  return chk::float_array(x, name, x.numel(), x);
}

void group_advantages_out_cpu(const at::Tensor& scores, const MaybeTensor& group_ids,
                              int64_t group_size, const MaybeTensor& weights,
                              const MaybeTensor& loglik, at::IntArrayRef flags,
                              at::ArrayRef<double> hparams, const at::Tensor& advantages,
                              const at::Tensor& group_mean, const at::Tensor& group_std,
                              const at::Tensor& zero_variance_mask) {
  cpu::GroupAdvantagesArgs a{};
  a.rows = score_rows(scores, group_ids, group_size);
  a.params = chk::params(flags, hparams);
  const int64_t n = a.rows.n;
  a.weights = checks::maybe_array<double>(weights, "weights", n, at::kDouble, scores);
  a.loglik = checks::maybe_array<double>(loglik, "loglik", n, at::kDouble, scores);
  const int e = a.params.estimator;
  TORCH_CHECK_VALUE(a.weights != nullptr || e != kOpo, "weights: opo needs the response lengths");
  TORCH_CHECK_VALUE(a.loglik != nullptr || (e != kUnlikely && e != kXrpo),
                    "loglik: required by unlikely and xrpo");
  // unlikely sorts by ŝ and xrpo averages it: a NaN would break the sort's strict weak order.
  // rlkern.group_advantages applies nan_policy to such rows first (config.loglik_policy).
  for (int64_t i = 0; a.loglik != nullptr && i < n; ++i)
    TORCH_CHECK_VALUE(score_is_valid(a.loglik[i]), "loglik: row ", i,
                      " is NaN or infinite (rlkern.group_advantages applies nan_policy to it)");
  a.out = row_outputs(advantages, group_mean, group_std, zero_variance_mask, scores);
  raise_status(cpu::group_advantages(a), "scores");
}

void group_moments_out_cpu(const at::Tensor& scores, const MaybeTensor& group_ids,
                           int64_t group_size, at::IntArrayRef flags, const at::Tensor& keys,
                           const at::Tensor& moments, const at::Tensor& num_groups) {
  const cpu::ScoreRows rows = score_rows(scores, group_ids, group_size);
  chk::flags(flags);
  checks::array(keys, "keys", rows.n, at::kLong, scores);
  checks::array(moments, "moments", rows.n * kNumMoments, at::kDouble, scores);
  checks::array(num_groups, "num_groups", 1, at::kLong, scores);
  int64_t k = 0;
  raise_status(cpu::group_moments(rows, flags[kFlagNanPolicy] == kNanOmit,
                                  keys.data_ptr<int64_t>(),
                                  reinterpret_cast<GroupMoments*>(moments.data_ptr<double>()), &k),
               "scores");
  *num_groups.data_ptr<int64_t>() = k;
}

void group_finish_out_cpu(const at::Tensor& scores, const at::Tensor& row_group,
                          const at::Tensor& moments, at::IntArrayRef flags,
                          at::ArrayRef<double> hparams, const at::Tensor& advantages,
                          const at::Tensor& group_mean, const at::Tensor& group_std,
                          const at::Tensor& zero_variance_mask) {
  cpu::GroupFinishArgs a{};
  a.rows = score_rows(scores, std::nullopt, 1);
  a.params = chk::params(flags, hparams);
  const int e = a.params.estimator;
  TORCH_CHECK_VALUE(e == kGrpo || e == kDrGrpo || e == kRloo || e == kGpg || e == kNgrpo,
                    "flags: advantages from group statistics support grpo, dr_grpo, rloo, gpg and "
                    "ngrpo, got ", rlkern::advantages::kEstimatorNames[e]);
  a.num_groups = chk::moments(moments, "moments", scores);
  checks::array(row_group, "row_group", a.rows.n, at::kLong, scores);
  a.row_group = row_group.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < a.rows.n; ++i)
    TORCH_CHECK_INDEX(a.row_group[i] >= 0 && a.row_group[i] < a.num_groups, "row_group: row ", i,
                      " names group ", a.row_group[i], " outside [0, ", a.num_groups, ")");
  a.moments = reinterpret_cast<const GroupMoments*>(moments.const_data_ptr<double>());
  a.out = row_outputs(advantages, group_mean, group_std, zero_variance_mask, scores);
  raise_status(cpu::group_finish(a), "scores");
}

void group_moments_merge_out_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  const int64_t k = chk::moments(a, "a", a);
  checks::array(b, "b", a.numel(), at::kDouble, a);
  checks::array(out, "out", a.numel(), at::kDouble, a);
  cpu::moments_merge_rows(reinterpret_cast<const GroupMoments*>(a.const_data_ptr<double>()),
                          reinterpret_cast<const GroupMoments*>(b.const_data_ptr<double>()), k,
                          reinterpret_cast<GroupMoments*>(out.data_ptr<double>()));
}

void discounted_returns_out_cpu(const at::Tensor& rewards, const MaybeTensor& reset,
                                double gamma, const at::Tensor& out) {
  const bool f64 = float_rows(rewards, "rewards");
  checks::array(out, "out", rewards.numel(), rewards.scalar_type(), rewards);
  const uint8_t* r = reset.has_value() ? bytes_of_mask(*reset, "reset", rewards) : nullptr;
  cpu::discounted_returns(rewards.const_data_ptr(), f64, rewards.size(0), rewards.size(1), r, gamma,
                          out.data_ptr());
}

void gae_out_cpu(const at::Tensor& rewards, const MaybeTensor& values, const at::Tensor& mask,
                 double gamma, double lam, const at::Tensor& advantages,
                 const at::Tensor& returns) {
  const bool f64 = float_rows(rewards, "rewards");
  const void* v = checks::maybe_array<void>(values, "values", rewards.numel(),
                                            rewards.scalar_type(), rewards);
  checks::array(advantages, "advantages", rewards.numel(), rewards.scalar_type(), rewards);
  checks::array(returns, "returns", rewards.numel(), rewards.scalar_type(), rewards);
  cpu::gae(rewards.const_data_ptr(), v, f64, rewards.size(0), rewards.size(1),
           bytes_of_mask(mask, "mask", rewards), gamma, lam, advantages.data_ptr(),
           returns.data_ptr());
}

// mask: the weights as verl's trainer passes them (bool, int32, int64, float32, float64: read
// in place, no converted copy); count_f64: the dtype of verl's mask.sum() (token_advantages.h).
void masked_whiten_out_cpu(const at::Tensor& x, const at::Tensor& mask, bool count_f64,
                           const at::Tensor& out) {
  const int64_t n = x.numel();
  const bool f64 = chk::float_array(x, "x", n, x);
  TORCH_CHECK_VALUE(f64 || !count_f64, "masked_whiten_out: a float64 count needs float64 x");
  const at::ScalarType mt = mask.scalar_type();
  cpu::WeightType wt = cpu::WeightType::kBool;
  switch (mt) {
    case at::kFloat: wt = cpu::WeightType::kFloat32; break;
    case at::kDouble: wt = cpu::WeightType::kFloat64; break;
    case at::kBool: wt = cpu::WeightType::kBool; break;
    case at::kInt: wt = cpu::WeightType::kInt32; break;
    case at::kLong: wt = cpu::WeightType::kInt64; break;
    default:
      TORCH_CHECK_TYPE(false, "masked_whiten_out: mask must be bool, int32, int64, float32 or "
                       "float64, got ", mt);
  }
  TORCH_CHECK_VALUE(f64 || mt != at::kDouble, "masked_whiten_out: a float64 mask needs float64 x");
  checks::array(mask, "mask", n, mt, x);
  checks::array(out, "out", n, x.scalar_type(), x);
  double count = 0.0;
  if (!cpu::masked_whiten(x.const_data_ptr(), mask.const_data_ptr(), wt, f64, count_f64, n,
                          out.data_ptr(), &count)) {
    // verl's messages (verl.utils.torch_functional.masked_var)
    TORCH_CHECK_VALUE(count != 0.0, "At least one element in the mask has to be 1.");
    TORCH_CHECK_VALUE(false, "The sum of the mask is one, which can cause a division by zero.");
  }
}

void position_baseline_out_cpu(const at::Tensor& returns, const at::Tensor& mask,
                               const MaybeTensor& group_ids, int64_t group_size,
                               const at::Tensor& out) {
  const bool f64 = float_rows(returns, "returns");
  checks::array(out, "out", returns.numel(), returns.scalar_type(), returns);
  const int64_t n = returns.size(0);
  const cpu::TokenGrouping g{chk::grouping(group_ids, n, group_size, returns), group_size};
  cpu::position_baseline(returns.const_data_ptr(), f64, n, returns.size(1),
                         bytes_of_mask(mask, "mask", returns), g, out.data_ptr());
}

void gtpo_weights_out_cpu(const at::Tensor& entropy, const at::Tensor& mask,
                          const MaybeTensor& group_ids, int64_t group_size,
                          double eps, const at::Tensor& weight, const at::Tensor& inverse_weight) {
  const bool f64 = float_rows(entropy, "entropy");
  checks::array(weight, "weight", entropy.numel(), entropy.scalar_type(), entropy);
  checks::array(inverse_weight, "inverse_weight", entropy.numel(), entropy.scalar_type(), entropy);
  const int64_t n = entropy.size(0);
  const cpu::TokenGrouping g{chk::grouping(group_ids, n, group_size, entropy), group_size};
  cpu::gtpo_weights(entropy.const_data_ptr(), f64, n, entropy.size(1),
                    bytes_of_mask(mask, "mask", entropy), g, eps, weight.data_ptr(),
                    inverse_weight.data_ptr());
}

void gigpo_advantages_out_cpu(const at::Tensor& episode_returns, const at::Tensor& step_returns,
                              const at::Tensor& state_keys, const at::Tensor& group_ids,
                              double omega, int64_t episode_mode, int64_t step_mode, double eps,
                              const at::Tensor& advantages, const at::Tensor& episode_advantages,
                              const at::Tensor& step_advantages) {
  const at::Tensor& ep = episode_returns;
  const int64_t n = ep.numel();
  const auto dtype = ep.scalar_type();
  const bool f64 = chk::float_array(ep, "episode_returns", n, ep);
  checks::array(step_returns, "step_returns", n, dtype, ep);
  checks::array(state_keys, "state_keys", n, at::kLong, ep);
  checks::array(group_ids, "group_ids", n, at::kLong, ep);
  for (const auto* t : {&advantages, &episode_advantages, &step_advantages})
    checks::array(*t, "advantages", n, dtype, ep);
  const LayoutTable modes = layout_table("gigpo_mode", rlkern::advantages::kGigpoModeNames);
  chk::code(episode_mode, "episode_mode", modes);
  chk::code(step_mode, "step_mode", modes);
  cpu::GigpoArgs a{};
  a.episode_returns = ep.const_data_ptr();
  a.step_returns = step_returns.const_data_ptr();
  a.f64 = f64;
  a.n = n;
  a.group_ids = group_ids.const_data_ptr<int64_t>();
  a.state_keys = state_keys.const_data_ptr<int64_t>();
  a.omega = omega;
  a.episode_std = episode_mode == kGigpoStdNorm;
  a.step_std = step_mode == kGigpoStdNorm;
  a.eps = eps;
  a.advantages = advantages.data_ptr();
  a.episode_advantages = episode_advantages.data_ptr();
  a.step_advantages = step_advantages.data_ptr();
  const cpu::Status st = cpu::gigpo_advantages(a);
  TORCH_CHECK_VALUE(st.code == cpu::Status::kOk, "episode_returns / step_returns: step ", st.row,
                    " is NaN or infinite");
}

void empg_modulate_out_cpu(const at::Tensor& advantages, const at::Tensor& step_entropy,
                           const at::Tensor& next_step_entropy, double k, double k_f, double zeta,
                           const at::Tensor& out) {
  const int64_t n = advantages.numel();
  const bool f64 = chk::float_array(advantages, "advantages", n, advantages);
  const auto dtype = advantages.scalar_type();
  checks::array(step_entropy, "step_entropy", n, dtype, advantages);
  checks::array(next_step_entropy, "next_step_entropy", n, dtype, advantages);
  checks::array(out, "out", n, dtype, advantages);
  cpu::empg_modulate(advantages.const_data_ptr(), step_entropy.const_data_ptr(),
                     next_step_entropy.const_data_ptr(), f64, n, k, k_f, zeta, out.data_ptr());
}

// Meta kernel of every op of the family (they only fill caller-provided outputs). On meta
// tensors there is nothing to compute; a meta tensor among CPU (or CUDA) ones is an argument on
// the wrong device and is refused by name, as the CPU and CUDA glue refuse any other device
// (checks::same_device), instead of the dispatcher's "no Meta kernel" error.
void meta_same_device(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, args.size());
  const at::Tensor* like = nullptr;
  const char* like_name = nullptr;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!inputs[i].isTensor()) continue;  // numbers, lists, absent optionals
    const at::Tensor& t = inputs[i].toTensor();
    if (like == nullptr) {
      like = &t;
      like_name = args[i].name().c_str();
      continue;
    }
    TORCH_CHECK(t.device() == like->device(), args[i].name(), ": expected device ",
                like->device(), " (that of ", like_name, "), got ", t.device());
  }
  torch::jit::drop(*stack, args.size());
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  for (const char* op : {"group_advantages_out", "group_moments_out", "group_finish_out",
                         "group_moments_merge_out", "discounted_returns_out", "gae_out",
                         "masked_whiten_out", "position_baseline_out", "gtpo_weights_out",
                         "gigpo_advantages_out", "empg_modulate_out", "group_segment_stats_out",
                         "group_rows_finish_out"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&meta_same_device>());
}

void register_advantages_cpu(torch::Library& m) {
  // Each op by its name, implemented by <name>_cpu.
#define IMPL(op) m.impl(#op, &op##_cpu)
  IMPL(group_advantages_out); IMPL(group_moments_out); IMPL(group_finish_out);
  IMPL(group_moments_merge_out); IMPL(discounted_returns_out); IMPL(gae_out);
  IMPL(masked_whiten_out); IMPL(position_baseline_out);
  IMPL(gtpo_weights_out); IMPL(gigpo_advantages_out); IMPL(empg_modulate_out);
#undef IMPL
}

}  // namespace rlkern
