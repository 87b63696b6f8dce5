// CPU implementations of the policy-loss ops (see policy_loss_ops.h): the shared op bodies of
// csrc/policy_loss_checks.h with the kernels of cpu/policy_loss.h. The Python layer
// (python/rlkern/ops/policy_loss/) validates the user's arguments with friendly messages; the
// checks guard the raw pointers against any other caller.
#include "cpu/policy_loss_ops.h"

#include "cpu/policy_loss.h"
#include "policy_loss_checks.h"

namespace rlkern {

// `Tensor?[] inputs`: the optional inputs by slot of policy_loss.h enum Input.
const char* const kPolicyLossFwdOutSchema =
    "policy_loss_fwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor?[] inputs, int[] flags, float[] hparams, Tensor(a!) row_stats) -> ()";
const char* const kPolicyLossBwdOutSchema =
    "policy_loss_bwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor?[] inputs, Tensor row_stats, Tensor grad_rows, int[] flags, float[] hparams, "
    "Tensor(a!) grad_logprobs, Tensor(b!)? grad_entropy) -> ()";
const char* const kKlPenaltyFwdOutSchema =
    "kl_penalty_fwd_out(Tensor logprobs, Tensor ref_logprobs, int kind, bool straight_through, "
    "float log_clamp, float value_clamp, Tensor(a!) out) -> ()";
const char* const kKlPenaltyBwdOutSchema =
    "kl_penalty_bwd_out(Tensor logprobs, Tensor ref_logprobs, Tensor grad, int kind, "
    "bool straight_through, float log_clamp, float value_clamp, Tensor(a!) out) -> ()";

namespace {

struct CpuKernels {
  static constexpr policy_loss::Backend kBackend{c10::DeviceType::CPU, /*takes_f64=*/true};
  static void fwd(const policy_loss::Args& a, const at::Tensor&) { cpu::policy_loss_fwd(a); }
  static void bwd(const policy_loss::Args& a, const at::Tensor&) { cpu::policy_loss_bwd(a); }
  static void kl(const policy_loss::KlArgs& a, const at::Tensor&) { cpu::kl_penalty(a); }
};

}  // namespace

void impl_policy_loss_cpu(torch::Library& m) { policy_loss::impl_ops<CpuKernels>(m); }

}  // namespace rlkern
