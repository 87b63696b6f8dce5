// CPU implementations of the fused linear form's epilogue ops (schemas and checks in
// csrc/logprobs_op.h): thin glue from tensors to the torch-free kernels of
// cpu/linear_logprobs.h. python/rlkern/ops/linear_logprobs_cpu.py drives them tile by tile.
#pragma once

#include <torch/library.h>

namespace rlkern::cpu {

// m.impl() of linear_logprobs_tile_fwd_, linear_logprobs_finish_out and
// linear_logprobs_tile_bwd_ (inside TORCH_LIBRARY_IMPL(rlkern, CPU)).
void impl_linear_logprobs_ops(torch::Library& m);

}  // namespace rlkern::cpu
