// CUDA implementations of the rlkern ops: the TORCH_LIBRARY_IMPL(rlkern, CUDA) block. The
// schemas are defined once (ops.cpp registers them); each family's glue — thin, from tensors
// and the current stream to the torch-free launchers of csrc/cuda/*.cu (declared in
// rlkern/cuda_launchers.h) — lives in cuda/<family>_ops.cpp, with the argument checks it shares
// with the CPU glue. Built only when RLKERN_WITH_CUDA (a CUDA toolkit and a CUDA build of torch).
//
// The launchers re-check sizes and pointers and return an error code, turned into an exception
// by cuda::check_launch (cuda/glue.h).
#include <torch/library.h>

#include "cuda/advantages_ops.h"
#include "cuda/logprobs_ops.h"
#include "cuda/policy_loss_ops.h"
#include "cuda/sample_ops.h"
#include "cuda/truncated_logprobs_ops.h"

namespace rlkern {

TORCH_LIBRARY_IMPL(rlkern, CUDA, m) {
  cuda::impl_logprobs_ops(m);
  register_advantages_cuda(m);  // cuda/advantages_ops.cpp
  impl_policy_loss_cuda(m);     // policy_loss_{fwd,bwd}_out, kl_penalty_{fwd,bwd}_out
  cuda::impl_sample_ops(m);
  cuda::impl_truncated_logprobs_ops(m);
}

}  // namespace rlkern
