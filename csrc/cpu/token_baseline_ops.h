// The optimal-token-baseline op's schema and CPU implementation (registered by csrc/ops.cpp):
// glue from tensors to the torch-free kernel of token_baseline.h.
#pragma once

namespace torch {
class Library;
}  // namespace torch

namespace rlkern {

extern const char* const kOptimalTokenBaselineOutSchema;

// The CPU implementation (and the meta kernel) of optimal_token_baseline_out.
void register_token_baseline_cpu(torch::Library& m);

}  // namespace rlkern
