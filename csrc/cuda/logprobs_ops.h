// CUDA implementations of token_logprobs' ops (schemas and checks in csrc/logprobs_op.h): thin
// glue from tensors and the current stream to the launchers of csrc/cuda/logprobs.cu. The fused
// linear form has no CUDA C++ kernels (its GPU path is Triton).
#pragma once

#include <torch/library.h>

namespace rlkern::cuda {

// m.impl() of logprobs_fwd_out and logprobs_bwd_out (inside TORCH_LIBRARY_IMPL(rlkern, CUDA)).
void impl_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cuda
