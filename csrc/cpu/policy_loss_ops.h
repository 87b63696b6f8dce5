// The policy-loss ops (ALGORITHMS.md §3): their schemas (defined once, here; TORCH_LIBRARY in
// csrc/ops.cpp) and their CPU implementations (csrc/policy_loss_checks.h bodies running the
// torch-free kernels of cpu/policy_loss.h).
#pragma once

namespace torch {
class Library;
}

namespace rlkern {

extern const char* const kPolicyLossFwdOutSchema;
extern const char* const kPolicyLossBwdOutSchema;
extern const char* const kPolicyLossFusedFwdOutSchema;
extern const char* const kPolicyLossFusedBwdSchema;
extern const char* const kPolicyLossLensOutSchema;
extern const char* const kKlPenaltyFwdOutSchema;
extern const char* const kKlPenaltyBwdOutSchema;

// m.impl(...) of the family's CPU kernels, inside TORCH_LIBRARY_IMPL(rlkern, CPU, m).
void impl_policy_loss_cpu(torch::Library& m);

}  // namespace rlkern
