// CPU implementation of the sampler op (schema and checks in csrc/sample_op.h): thin glue from
// tensors to the torch-free kernel of cpu/sample.h.
#pragma once

#include <torch/library.h>

namespace rlkern::cpu {

// m.impl() of sample_out (inside TORCH_LIBRARY_IMPL(rlkern, CPU)).
void impl_sample_ops(torch::Library& m);

}  // namespace rlkern::cpu
