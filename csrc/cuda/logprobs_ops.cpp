// Glue from tensors to the CUDA logprobs launchers (see logprobs_ops.h): the checks and the op
// signatures are logprobs_op.h's, shared with the CPU glue; this file adds the CUDA kernels' own
// limits (a CUDA device, no float64 logits, float32 rows) and launches on the current stream.
// The launchers re-check sizes and pointers and return an error code.
#include "cuda/logprobs_ops.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cfloat>

#include "cuda/glue.h"
#include "logprobs_op.h"

namespace rlkern::cuda {
namespace {

using namespace rlkern::logprobs;

// The launchers take the temperature as a float: one beyond the float range (T = 1e300) acts
// as the largest float (the kernels then see a uniform softmax, as T = 1e300 gives), one below
// it as the smallest normal float (the kernels shift by the max first, so nothing overflows).
float launch_temperature(double temperature) {
  return static_cast<float>(std::clamp(temperature, double(FLT_MIN), double(FLT_MAX)));
}

void launch_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                int64_t ignore_index, const RowPointers& out) {
  check_cuda(logits, "logits");
  const int dtype = dtype_of(logits, "logits");
  auto row = [&](Output o) { return static_cast<float*>(out[o]); };
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(
      rlkern_logprobs_fwd_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                               logits.size(2), logits.stride(0), logits.stride(1),
                               labels.const_data_ptr<int64_t>(), launch_temperature(temperature),
                               ignore_index, row(kLogprobs), row(kLse), row(kEntropy),
                               row(kSelfCertainty), row(kSumPSq), current_stream()),
      "rlkern::logprobs_fwd_out");
}

void launch_bwd(const at::Tensor& logits, const at::Tensor& labels, const GradInputs& in,
                double temperature, int64_t ignore_index, const at::Tensor& grad_logits) {
  check_cuda(logits, "logits");
  const int dtype = dtype_of(logits, "logits");
  auto row = [](const void* p) { return static_cast<const float*>(p); };
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(
      rlkern_logprobs_bwd_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                               logits.size(2), logits.stride(0), logits.stride(1),
                               labels.const_data_ptr<int64_t>(), row(in.lse), row(in.entropy),
                               row(in.grad_logprobs), row(in.grad_entropy), row(in.grad_lse),
                               launch_temperature(temperature), ignore_index,
                               grad_logits.data_ptr(), grad_logits.stride(0),
                               grad_logits.stride(1), current_stream()),
      "rlkern::logprobs_bwd_out");
}

}  // namespace

void impl_logprobs_ops(torch::Library& m) {
  m.impl(kFwdOut.name, &fwd_out<&launch_fwd>);
  m.impl(kBwdOut.name, &bwd_out<&launch_bwd>);
}

}  // namespace rlkern::cuda
