// Glue from tensors to the CUDA truncated log-probs (see truncated_logprobs_ops.h): the checks
// and the op signatures are truncated_logprobs_op.h's, shared with the CPU glue. Label values
// are not read here (that would synchronise the stream): the Python layer checks them, and the
// kernels never read through an out-of-range label (its row gets NaN).
#include "cuda/truncated_logprobs_ops.h"

#include <c10/cuda/CUDAGuard.h>

#include "cuda/glue.h"
#include "truncated_logprobs_op.h"

namespace rlkern::cuda {
namespace {

using truncated_logprobs::Rows;

// Checks the logits and runs `launcher(dtype)` on their device's current stream.
template <typename Launcher>
void on_device(const at::Tensor& logits, const char* op, const Launcher& launcher) {
  check_cuda(logits, "logits");
  const int dtype = dtype_of(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(launcher(dtype), op);
}

void launch_fwd(const at::Tensor& logits, const Rows& r) {
  on_device(logits, "rlkern::truncated_logprobs_fwd_out", [&](int dtype) {
    return rlkern_truncated_logprobs_fwd_cuda(
        logits.const_data_ptr(), dtype, r.B, r.L, r.V, r.stride_0, r.stride_1, r.labels,
        r.ignore_index, r.temperature, r.top_k, r.top_p, r.min_p, r.joint ? 1 : 0, r.logprobs,
        r.entropy, r.lse, current_stream());
  });
}

void launch_bwd(const at::Tensor& logits, const Rows& r) {
  on_device(logits, "rlkern::truncated_logprobs_bwd_out", [&](int dtype) {
    return rlkern_truncated_logprobs_bwd_cuda(
        logits.const_data_ptr(), dtype, r.B, r.L, r.V, r.stride_0, r.stride_1, r.labels,
        r.ignore_index, r.temperature, r.top_k, r.top_p, r.min_p, r.joint ? 1 : 0,
        r.grad_logprobs, r.grad_entropy, r.grad_lse, r.grad_logits, current_stream());
  });
}

}  // namespace

void impl_truncated_logprobs_ops(torch::Library& m) {
  m.impl(truncated_logprobs::kFwdOut.name, &truncated_logprobs::fwd_out<&launch_fwd>);
  m.impl(truncated_logprobs::kBwdOut.name, &truncated_logprobs::bwd_out<&launch_bwd>);
}

}  // namespace rlkern::cuda
