// Glue from tensors to the optimal-token-baseline kernel (token_baseline.h). The Python layer
// (python/rlkern/ops/token_baseline.py) validates the user's arguments with friendly messages;
// these checks guard the raw pointers against any other caller.
#include "cpu/token_baseline_ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "advantages_checks.h"
#include "checks.h"
#include "cpu/token_baseline.h"

namespace rlkern {

const char* const kOptimalTokenBaselineOutSchema =
    "optimal_token_baseline_out(Tensor rewards, Tensor mask, Tensor logprobs, "
    "Tensor sum_pi_squared, Tensor? is_weights, Tensor? group_ids, int group_size, "
    "bool multi_turn, bool zero_tail, float eps, Tensor(a!) advantages, Tensor(b!) returns) -> ()";

namespace {

namespace chk = checks::advantages;
using MaybeTensor = std::optional<at::Tensor>;

void optimal_token_baseline_out_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                    const at::Tensor& logprobs, const at::Tensor& sum_pi_squared,
                                    const MaybeTensor& is_weights, const MaybeTensor& group_ids,
                                    int64_t group_size, bool multi_turn, bool zero_tail,
                                    double eps, const at::Tensor& advantages,
                                    const at::Tensor& returns) {
  TORCH_CHECK(rewards.dim() == 2, "rewards: expected a (N, T) tensor, got shape ",
              rewards.sizes());
  const int64_t numel = rewards.numel();
  const bool f64 = chk::float_array(rewards, "rewards", numel, rewards);
  const auto dtype = rewards.scalar_type();
  checks::array(mask, "mask", numel, at::kBool, rewards);
  checks::array(logprobs, "logprobs", numel, dtype, rewards);
  checks::array(sum_pi_squared, "sum_pi_squared", numel, dtype, rewards);
  const void* rho = checks::maybe_array<void>(is_weights, "is_weights", numel, dtype, rewards);
  checks::array(advantages, "advantages", numel, dtype, rewards);
  checks::array(returns, "returns", numel, dtype, rewards);
  const int64_t n = rewards.size(0);
  cpu::TokenBaselineArgs a{};
  a.rewards = rewards.const_data_ptr();
  a.valid = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  a.logprobs = logprobs.const_data_ptr();
  a.sum_pi_squared = sum_pi_squared.const_data_ptr();
  a.is_weights = rho;
  a.f64 = f64;
  a.n = n;
  a.t = rewards.size(1);
  a.grouping = cpu::TokenGrouping{chk::grouping(group_ids, n, group_size, rewards), group_size};
  a.multi_turn = multi_turn;
  a.zero_tail = zero_tail;
  a.eps = eps;
  a.advantages = advantages.data_ptr();
  a.returns = returns.data_ptr();
  cpu::optimal_token_baseline(a);
}

// Fills caller-provided outputs only: on meta tensors there is nothing to compute. A meta
// tensor among CPU (or CUDA) ones also dispatches here: it is an argument on the wrong device
// and is refused by name, as the CPU glue refuses any other device (never a silent no-op that
// would leave the outputs uninitialised).
void optimal_token_baseline_out_meta(const at::Tensor& rewards, const at::Tensor& mask,
                                     const at::Tensor& logprobs, const at::Tensor& sum_pi_squared,
                                     const MaybeTensor& is_weights, const MaybeTensor& group_ids,
                                     int64_t, bool, bool, double, const at::Tensor& advantages,
                                     const at::Tensor& returns) {
  checks::same_device(mask, "mask", rewards);
  checks::same_device(logprobs, "logprobs", rewards);
  checks::same_device(sum_pi_squared, "sum_pi_squared", rewards);
  if (is_weights.has_value()) checks::same_device(*is_weights, "is_weights", rewards);
  if (group_ids.has_value()) checks::same_device(*group_ids, "group_ids", rewards);
  checks::same_device(advantages, "advantages", rewards);
  checks::same_device(returns, "returns", rewards);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("optimal_token_baseline_out", &optimal_token_baseline_out_meta);
}

void register_token_baseline_cpu(torch::Library& m) {
  m.impl("optimal_token_baseline_out", &optimal_token_baseline_out_cpu);
}

}  // namespace rlkern
