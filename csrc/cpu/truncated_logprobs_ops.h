// CPU glue of the token log-probs under the sampler's truncated distribution (schemas and
// checks in csrc/truncated_logprobs_op.h, shared with the CUDA glue).
#pragma once

#include <torch/library.h>

#include "truncated_logprobs_op.h"

namespace rlkern::cpu {

// m.impl() of truncated_logprobs_{fwd,bwd}_out (inside TORCH_LIBRARY_IMPL(rlkern, CPU)).
void impl_truncated_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cpu
