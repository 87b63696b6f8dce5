// The op schemas of the rlkern namespace and their CPU implementations. Each family states its
// schemas once, in a table next to its glue (logprobs_op.h, sample_op.h, cpu/*_ops.cpp); the
// glue itself (thin, from tensors to the torch-free kernels) lives in cpu/<family>_ops.cpp,
// the CUDA glue in cuda/<family>_ops.cpp (registered in cuda_ops.cpp).
//
// Ops fill caller-provided outputs (`Tensor(a!)`); the allocating wrappers, autograd and fake
// implementations are in python/rlkern/ops/. The exceptions are CPU-only ops that do a whole
// call where the fixed cost of small torch calls would dominate it (logprobs_fwd_cpu,
// truncated_logprobs_fwd_cpu, policy_loss_fused_linear): they allocate their results, and Python calls them in plain eager
// mode or from a registered op's body.
#include <torch/library.h>

#include "cpu/advantages_ops.h"
#include "cpu/eager16_ops.h"
#include "cpu/linear_logprobs_ops.h"
#include "cpu/logprobs_ops.h"
#include "cpu/policy_loss_ops.h"
#include "cpu/sample_ops.h"
#include "cpu/truncated_logprobs_ops.h"
#include "cpu/token_baseline_ops.h"
#include "logprobs_op.h"
#include "sample_op.h"

namespace rlkern {

TORCH_LIBRARY(rlkern, m) {
  // Token logprobs and the fused linear form's epilogues (logprobs_op.h).
  define_ops(m, logprobs::kOps);
  // Group advantages and the §2.1 helpers (schemas in cpu/advantages_ops.cpp).
  for (const char* schema :
       {kGroupAdvantagesOutSchema, kGroupMomentsOutSchema, kGroupFinishOutSchema,
        kGroupMomentsMergeOutSchema, kDiscountedReturnsOutSchema, kGaeOutSchema,
        kMaskedWhitenOutSchema, kPositionBaselineOutSchema,
        kGtpoWeightsOutSchema, kGigpoAdvantagesOutSchema, kEmpgModulateOutSchema,
        kGroupSegmentStatsOutSchema, kGroupRowsFinishOutSchema})
    m.def(schema);
  // Policy losses and the KL estimators (schemas in cpu/policy_loss_ops.cpp).
  for (const char* schema : {kPolicyLossFwdOutSchema, kPolicyLossBwdOutSchema,
                             kPolicyLossFusedFwdOutSchema, kPolicyLossFusedBwdSchema,
                             kPolicyLossLensOutSchema, kPolicyLossFusedLinearSchema,
                             kPolicyLossLinearGradRowsSchema, kPolicyLossMetricsSchema,
                             kKlPenaltyFwdOutSchema, kKlPenaltyBwdOutSchema})
    m.def(schema);
  // Sampler (sample_op.h).
  define_ops(m, sample::kOps);
  // Token log-probs under the sampler's truncated distribution (truncated_logprobs_op.h).
  define_ops(m, truncated_logprobs::kOps);
  // verl's optimal token baseline (schema in cpu/token_baseline_ops.cpp).
  m.def(kOptimalTokenBaselineOutSchema);
  // torch's eager 16-bit log_softmax statistics and entropy terms (cpu/eager16_ops.cpp).
  m.def(kEager16LogSoftmaxStatsOutSchema);
  m.def(kEager16EntropyTermsOutSchema);
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  cpu::impl_logprobs_ops(m);
  cpu::impl_linear_logprobs_ops(m);
  register_advantages_cpu(m);  // cpu/advantages_ops.cpp
  impl_policy_loss_cpu(m);  // policy_loss_{fwd,bwd}_out, the fused pair, kl_penalty_*
  cpu::impl_sample_ops(m);
  cpu::impl_truncated_logprobs_ops(m);
  register_token_baseline_cpu(m);  // cpu/token_baseline_ops.cpp
  register_eager16_cpu(m);  // cpu/eager16_ops.cpp
}

}  // namespace rlkern
