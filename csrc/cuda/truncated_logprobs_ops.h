// CUDA implementation of the truncated token log-probs ops (schemas and checks in
// csrc/truncated_logprobs_op.h): thin glue from tensors and the current stream to the
// launchers of csrc/cuda/truncated_logprobs.cu.
#pragma once

#include <torch/library.h>

namespace rlkern::cuda {

// m.impl() of truncated_logprobs_{fwd,bwd}_out (inside TORCH_LIBRARY_IMPL(rlkern, CUDA)).
void impl_truncated_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cuda
