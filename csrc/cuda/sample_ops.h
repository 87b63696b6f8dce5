// CUDA implementation of the sampler op (schema and checks in csrc/sample_op.h): thin glue from
// tensors and the current stream to the launcher of csrc/cuda/sample.cu.
#pragma once

#include <torch/library.h>

namespace rlkern::cuda {

// m.impl() of sample_out and sample_n_out (inside TORCH_LIBRARY_IMPL(rlkern, CUDA)).
void impl_sample_ops(torch::Library& m);

}  // namespace rlkern::cuda
