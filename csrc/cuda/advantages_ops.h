// CUDA implementations of the advantage ops (registered by csrc/cuda_ops.cpp; schemas in
// csrc/cpu/advantages_ops.cpp): the two passes of the GPU pipeline
// (python/rlkern/ops/advantages_segmented.py), Chan's merge of moments tables and the
// discounted returns. Thin glue from tensors and the current stream to the launchers of
// csrc/cuda/advantages.cu, with the family's checks (csrc/advantages_checks.h) shared with the
// CPU glue.
#pragma once

namespace torch {
class Library;
}  // namespace torch

namespace rlkern {

// The CUDA implementations, for csrc/cuda_ops.cpp's TORCH_LIBRARY_IMPL(rlkern, CUDA, m) block.
void register_advantages_cuda(torch::Library& m);

}  // namespace rlkern
