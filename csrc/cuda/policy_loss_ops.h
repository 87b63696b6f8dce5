// CUDA implementations of the policy-loss ops (schemas in cpu/policy_loss_ops.cpp): the shared
// op bodies of csrc/policy_loss_checks.h with the launchers of csrc/cuda/policy_loss.cu.
#pragma once

namespace torch {
class Library;
}

namespace rlkern {

// m.impl(...) of the family's CUDA kernels, inside TORCH_LIBRARY_IMPL(rlkern, CUDA, m).
void impl_policy_loss_cuda(torch::Library& m);

}  // namespace rlkern
