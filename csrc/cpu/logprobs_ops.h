// CPU implementations of token_logprobs' ops (schemas and checks in csrc/logprobs_op.h): thin
// glue from tensors to the torch-free kernels of cpu/logprobs.h.
#pragma once

#include <torch/library.h>

namespace rlkern::cpu {

// m.impl() of logprobs_fwd_out and logprobs_bwd_out (inside TORCH_LIBRARY_IMPL(rlkern, CPU)).
void impl_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cpu
