// Glue from tensors to the advantage kernels (see advantages_ops.h). The Python layer
// (python/rlkern/ops/advantages.py, token_advantages.py) validates the user's arguments with
// friendly messages; the checks here guard the raw pointers against any other caller.
#include "cpu/advantages_ops.h"

#include <c10/util/Exception.h>

#include <string>

#include "cpu/advantages.h"
#include "cpu/token_advantages.h"

namespace rlkern {

const char* const kGroupAdvantagesOutSchema =
    "group_advantages_out(Tensor scores, Tensor? group_ids, int group_size, Tensor? weights, "
    "Tensor? loglik, str estimator, float eps, str std, str std_scope, str singleton, "
    "str nan_policy, float r_max, float lam, float kappa, Tensor(a!) advantages, "
    "Tensor(b!) group_mean, Tensor(c!) group_std, Tensor(d!) zero_variance_mask) -> ()";
const char* const kGroupMomentsOutSchema =
    "group_moments_out(Tensor scores, Tensor? group_ids, int group_size, str nan_policy, "
    "Tensor(a!) keys, Tensor(b!) moments, Tensor(c!) num_groups) -> ()";
const char* const kGroupFinishOutSchema =
    "group_finish_out(Tensor scores, Tensor row_group, Tensor moments, str estimator, float eps, "
    "str std, str std_scope, str singleton, str nan_policy, float r_max, float batch_std, "
    "float gpg_alpha, Tensor(a!) advantages, Tensor(b!) group_mean, Tensor(c!) group_std, "
    "Tensor(d!) zero_variance_mask) -> ()";
const char* const kDiscountedReturnsOutSchema =
    "discounted_returns_out(Tensor rewards, Tensor? reset, float gamma, Tensor(a!) out) -> ()";
const char* const kPositionBaselineOutSchema =
    "position_baseline_out(Tensor returns, Tensor mask, Tensor? group_ids, int group_size, "
    "Tensor(a!) out) -> ()";
const char* const kGtpoWeightsOutSchema =
    "gtpo_weights_out(Tensor entropy, Tensor mask, Tensor? group_ids, int group_size, float eps, "
    "Tensor(a!) weight, Tensor(b!) inverse_weight) -> ()";
const char* const kGigpoAdvantagesOutSchema =
    "gigpo_advantages_out(Tensor episode_returns, Tensor step_returns, Tensor state_keys, "
    "Tensor group_ids, float omega, str episode_mode, str step_mode, float eps, "
    "Tensor(a!) advantages, "
    "Tensor(b!) episode_advantages, Tensor(c!) step_advantages) -> ()";
// CUDA only (csrc/cuda_ops.cpp): the two passes of the GPU pipeline
// (python/rlkern/ops/advantages_segmented.py).
const char* const kGroupSegmentStatsOutSchema =
    "group_segment_stats_out(Tensor scores, Tensor? perm, Tensor? offsets, int group_size, "
    "int num_groups, Tensor? weights, Tensor? loglik, Tensor params, bool unlikely, "
    "bool weighted, bool with_loglik, bool top, Tensor(a!) ms, Tensor(b!)? mx, Tensor(c!)? ext, "
    "Tensor(d!)? xr) -> ()";
const char* const kGroupRowsFinishOutSchema =
    "group_rows_finish_out(Tensor scores, Tensor? xr, Tensor? loglik, Tensor? row_group, "
    "int group_size, Tensor ms, Tensor mx, Tensor? ext, Tensor params, int estimator, "
    "int std_mode, bool batch_scope, bool singleton_verl, Tensor(a!) advantages, "
    "Tensor(b!) group_mean, Tensor(c!) group_std, Tensor(d!) zero_variance_mask) -> ()";
const char* const kEmpgModulateOutSchema =
    "empg_modulate_out(Tensor advantages, Tensor step_entropy, Tensor next_step_entropy, "
    "float k, float k_f, float zeta, Tensor(a!) out) -> ()";

namespace {

int estimator_code(std::string_view name) {
  static const std::pair<const char*, int> table[] = {
      {"grpo", kGrpo},         {"dr_grpo", kDrGrpo},       {"rloo", kRloo},
      {"opo", kOpo},           {"gpg", kGpg},              {"grpo_passk", kGrpoPassk},
      {"ngrpo", kNgrpo},       {"unlikely", kUnlikely},    {"xrpo", kXrpo},
      {"reinforce_pp_baseline", kReinforcePPBaseline},
  };
  for (const auto& [key, code] : table)
    if (name == key) return code;
  TORCH_CHECK_VALUE(false, "estimator: unknown estimator '", std::string(name), "'");
  return -1;
}

int std_code(std::string_view name) {
  if (name == "unbiased") return kStdUnbiased;
  if (name == "biased") return kStdBiased;
  if (name == "none") return kStdNone;
  TORCH_CHECK_VALUE(false, "std: expected 'unbiased', 'biased' or 'none', got '",
                    std::string(name), "'");
  return -1;
}

bool choice(std::string_view value, const char* name, const char* off, const char* on) {
  if (value == off) return false;
  if (value == on) return true;
  TORCH_CHECK_VALUE(false, name, ": expected '", off, "' or '", on, "', got '", std::string(value),
                    "'");
  return false;
}

bool is_f64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   ": expected float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kDouble;
}

void check_array(const at::Tensor& t, const char* name, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, name, ": expected a contiguous tensor of ",
              numel, " elements, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ",
                   t.scalar_type());
}

const int64_t* maybe_ids(const std::optional<at::Tensor>& ids, int64_t n, int64_t group_size) {
  if (ids.has_value()) {
    check_array(*ids, "group_ids", n, at::kLong);
    return ids->const_data_ptr<int64_t>();
  }
  TORCH_CHECK_VALUE(group_size > 0 && n % group_size == 0, "group_size: expected a positive "
                    "divisor of N = ", n, ", got ", group_size);
  return nullptr;
}

const double* maybe_f64(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_array(*t, name, n, at::kDouble);
  return t->const_data_ptr<double>();
}

void raise_status(const cpu::Status& st, const char* what) {
  TORCH_CHECK_VALUE(st.code != cpu::Status::kInvalidScore, what, ": row ", st.row,
                    " is NaN or infinite (nan_policy='raise'; nan_policy='omit' leaves such rows "
                    "out of their group's statistics and gives them an advantage of 0)");
  TORCH_CHECK_VALUE(st.code != cpu::Status::kPasskSingleton, "grpo_passk: the group of row ",
                    st.row, " has a single valid response; pass@k needs at least 2 (verl raises "
                    "too; singleton='zero' gives such groups 0)");
}

struct RowOuts {
  void* advantages;
  void* group_mean;
  void* group_std;
  bool* zero_variance;
  bool f64;
};

RowOuts row_outputs(const at::Tensor& adv, const at::Tensor& mean, const at::Tensor& sd,
                    const at::Tensor& zv, int64_t n) {
  const bool f64 = is_f64(adv, "advantages");
  const auto dtype = adv.scalar_type();
  check_array(adv, "advantages", n, dtype);
  check_array(mean, "group_mean", n, dtype);
  check_array(sd, "group_std", n, dtype);
  check_array(zv, "zero_variance_mask", n, at::kBool);
  return {adv.data_ptr(), mean.data_ptr(), sd.data_ptr(), zv.data_ptr<bool>(), f64};
}

AdvantageParams make_params(std::string_view estimator, double eps, std::string_view std,
                            std::string_view std_scope, std::string_view singleton, double r_max) {
  AdvantageParams p{};
  p.estimator = estimator_code(estimator);
  p.std_mode = std_code(std);
  p.batch_scope = choice(std_scope, "std_scope", "group", "batch");
  p.singleton_verl = choice(singleton, "singleton", "zero", "verl");
  p.eps = eps;
  p.r_max = r_max;
  p.white_rstd = 1.0;
  return p;
}

const uint8_t* bytes_of_mask(const at::Tensor& mask, const char* name, int64_t numel) {
  check_array(mask, name, numel, at::kBool);
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

void check_2d(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": expected a (N, T) tensor, got shape ", x.sizes());
}

}  // namespace

void group_advantages_out_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& group_ids,
                              int64_t group_size, const std::optional<at::Tensor>& weights,
                              const std::optional<at::Tensor>& loglik, std::string_view estimator,
                              double eps, std::string_view std, std::string_view std_scope,
                              std::string_view singleton, std::string_view nan_policy,
                              double r_max, double lam, double kappa,
                              const at::Tensor& advantages, const at::Tensor& group_mean,
                              const at::Tensor& group_std, const at::Tensor& zero_variance_mask) {
  const int64_t n = scores.numel();
  const bool f64 = is_f64(scores, "scores");
  check_array(scores, "scores", n, scores.scalar_type());
  cpu::GroupAdvantagesArgs a{};
  a.scores = scores.const_data_ptr();
  a.scores_f64 = f64;
  a.n = n;
  a.group_ids = maybe_ids(group_ids, n, group_size);
  a.group_size = group_size;
  a.weights = maybe_f64(weights, "weights", n);
  a.loglik = maybe_f64(loglik, "loglik", n);
  a.params = make_params(estimator, eps, std, std_scope, singleton, r_max);
  a.params.lam = lam;
  a.params.kappa = kappa;
  a.unlikely_lam = lam;
  a.nan_omit = choice(nan_policy, "nan_policy", "raise", "omit");
  const int e = a.params.estimator;
  TORCH_CHECK_VALUE(a.weights != nullptr || e != kOpo, "weights: opo needs the response lengths");
  TORCH_CHECK_VALUE(a.loglik != nullptr || (e != kUnlikely && e != kXrpo),
                    "loglik: required by unlikely and xrpo");
  const RowOuts o = row_outputs(advantages, group_mean, group_std, zero_variance_mask, n);
  a.advantages = o.advantages;
  a.group_mean = o.group_mean;
  a.group_std = o.group_std;
  a.zero_variance = o.zero_variance;
  a.out_f64 = o.f64;
  raise_status(cpu::group_advantages(a), "scores");
}

void group_moments_out_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& group_ids,
                           int64_t group_size, std::string_view nan_policy,
                           const at::Tensor& keys, const at::Tensor& moments,
                           const at::Tensor& num_groups) {
  const int64_t n = scores.numel();
  cpu::GroupMomentsArgs a{};
  a.scores_f64 = is_f64(scores, "scores");
  check_array(scores, "scores", n, scores.scalar_type());
  a.scores = scores.const_data_ptr();
  a.n = n;
  a.group_ids = maybe_ids(group_ids, n, group_size);
  a.group_size = group_size;
  a.nan_omit = choice(nan_policy, "nan_policy", "raise", "omit");
  check_array(keys, "keys", n, at::kLong);
  check_array(moments, "moments", n * 5, at::kDouble);
  check_array(num_groups, "num_groups", 1, at::kLong);
  a.keys = keys.data_ptr<int64_t>();
  a.moments = reinterpret_cast<GroupMoments*>(moments.data_ptr<double>());
  int64_t k = 0;
  raise_status(cpu::group_moments(a, &k), "scores");
  *num_groups.data_ptr<int64_t>() = k;
}

void group_finish_out_cpu(const at::Tensor& scores, const at::Tensor& row_group,
                          const at::Tensor& moments, std::string_view estimator, double eps,
                          std::string_view std, std::string_view std_scope,
                          std::string_view singleton, std::string_view nan_policy, double r_max,
                          double batch_std, double gpg_alpha, const at::Tensor& advantages,
                          const at::Tensor& group_mean, const at::Tensor& group_std,
                          const at::Tensor& zero_variance_mask) {
  const int64_t n = scores.numel();
  cpu::GroupFinishArgs a{};
  a.scores_f64 = is_f64(scores, "scores");
  check_array(scores, "scores", n, scores.scalar_type());
  check_array(row_group, "row_group", n, at::kLong);
  TORCH_CHECK(moments.dim() == 2 && moments.size(1) == 5, "moments: expected (K, 5), got ",
              moments.sizes());
  check_array(moments, "moments", moments.numel(), at::kDouble);
  const int64_t k = moments.size(0);
  const int64_t* rg = row_group.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(rg[i] >= 0 && rg[i] < k, "row_group: row ", i, " names group ", rg[i],
                      " outside [0, ", k, ")");
  a.scores = scores.const_data_ptr();
  a.n = n;
  a.row_group = rg;
  a.moments = reinterpret_cast<const GroupMoments*>(moments.const_data_ptr<double>());
  a.num_groups = k;
  a.params = make_params(estimator, eps, std, std_scope, singleton, r_max);
  const int e = a.params.estimator;
  TORCH_CHECK_VALUE(e == kGrpo || e == kDrGrpo || e == kRloo || e == kGpg || e == kNgrpo,
                    "estimator: advantages from group statistics support grpo, dr_grpo, rloo, "
                    "gpg and ngrpo, got '", std::string(estimator), "'");
  a.params.batch_std = batch_std;
  a.params.gpg_alpha = gpg_alpha;
  a.nan_omit = choice(nan_policy, "nan_policy", "raise", "omit");
  const RowOuts o = row_outputs(advantages, group_mean, group_std, zero_variance_mask, n);
  a.advantages = o.advantages;
  a.group_mean = o.group_mean;
  a.group_std = o.group_std;
  a.zero_variance = o.zero_variance;
  a.out_f64 = o.f64;
  raise_status(cpu::group_finish(a), "scores");
}

void discounted_returns_out_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& reset,
                                double gamma, const at::Tensor& out) {
  check_2d(rewards, "rewards");
  const bool f64 = is_f64(rewards, "rewards");
  check_array(rewards, "rewards", rewards.numel(), rewards.scalar_type());
  check_array(out, "out", rewards.numel(), rewards.scalar_type());
  const uint8_t* r = reset.has_value() ? bytes_of_mask(*reset, "reset", rewards.numel()) : nullptr;
  cpu::discounted_returns(rewards.const_data_ptr(), f64, rewards.size(0), rewards.size(1), r, gamma,
                          out.data_ptr());
}

void position_baseline_out_cpu(const at::Tensor& returns, const at::Tensor& mask,
                               const std::optional<at::Tensor>& group_ids, int64_t group_size,
                               const at::Tensor& out) {
  check_2d(returns, "returns");
  const bool f64 = is_f64(returns, "returns");
  check_array(returns, "returns", returns.numel(), returns.scalar_type());
  check_array(out, "out", returns.numel(), returns.scalar_type());
  const int64_t n = returns.size(0);
  const cpu::TokenGrouping g{maybe_ids(group_ids, n, group_size), group_size};
  cpu::position_baseline(returns.const_data_ptr(), f64, n, returns.size(1),
                         bytes_of_mask(mask, "mask", returns.numel()), g, out.data_ptr());
}

void gtpo_weights_out_cpu(const at::Tensor& entropy, const at::Tensor& mask,
                          const std::optional<at::Tensor>& group_ids, int64_t group_size,
                          double eps, const at::Tensor& weight, const at::Tensor& inverse_weight) {
  check_2d(entropy, "entropy");
  const bool f64 = is_f64(entropy, "entropy");
  check_array(entropy, "entropy", entropy.numel(), entropy.scalar_type());
  check_array(weight, "weight", entropy.numel(), entropy.scalar_type());
  check_array(inverse_weight, "inverse_weight", entropy.numel(), entropy.scalar_type());
  const int64_t n = entropy.size(0);
  const cpu::TokenGrouping g{maybe_ids(group_ids, n, group_size), group_size};
  cpu::gtpo_weights(entropy.const_data_ptr(), f64, n, entropy.size(1),
                    bytes_of_mask(mask, "mask", entropy.numel()), g, eps, weight.data_ptr(),
                    inverse_weight.data_ptr());
}

void gigpo_advantages_out_cpu(const at::Tensor& episode_returns, const at::Tensor& step_returns,
                              const at::Tensor& state_keys, const at::Tensor& group_ids,
                              double omega, std::string_view mode, std::string_view step_mode,
                              double eps, const at::Tensor& advantages,
                              const at::Tensor& episode_advantages,
                              const at::Tensor& step_advantages) {
  const int64_t n = episode_returns.numel();
  const bool f64 = is_f64(episode_returns, "episode_returns");
  const auto dtype = episode_returns.scalar_type();
  check_array(episode_returns, "episode_returns", n, dtype);
  check_array(step_returns, "step_returns", n, dtype);
  check_array(state_keys, "state_keys", n, at::kLong);
  check_array(group_ids, "group_ids", n, at::kLong);
  for (const auto* t : {&advantages, &episode_advantages, &step_advantages})
    check_array(*t, "advantages", n, dtype);
  cpu::GigpoArgs a{};
  a.episode_returns = episode_returns.const_data_ptr();
  a.step_returns = step_returns.const_data_ptr();
  a.f64 = f64;
  a.n = n;
  a.group_ids = group_ids.const_data_ptr<int64_t>();
  a.state_keys = state_keys.const_data_ptr<int64_t>();
  a.omega = omega;
  a.episode_std = choice(mode, "mode", "mean_norm", "std_norm");
  a.step_std = choice(step_mode, "step_mode", "mean_norm", "std_norm");
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
  const bool f64 = is_f64(advantages, "advantages");
  const auto dtype = advantages.scalar_type();
  check_array(advantages, "advantages", n, dtype);
  check_array(step_entropy, "step_entropy", n, dtype);
  check_array(next_step_entropy, "next_step_entropy", n, dtype);
  check_array(out, "out", n, dtype);
  cpu::empg_modulate(advantages.const_data_ptr(), step_entropy.const_data_ptr(),
                     next_step_entropy.const_data_ptr(), f64, n, k, k_f, zeta, out.data_ptr());
}

}  // namespace rlkern
