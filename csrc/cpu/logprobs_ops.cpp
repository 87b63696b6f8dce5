// Glue from tensors to the CPU logprobs kernels (see logprobs_ops.h): the checks and the op
// signatures are logprobs_op.h's, shared with the CUDA glue; this file fills the kernel
// arguments. The Python layer (python/rlkern/ops/logprobs.py) validates the user's arguments
// with friendly messages; the checks guard the raw pointers against any other caller.
#include "cpu/logprobs_ops.h"

#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/logprobs.h"
#include "logprobs_op.h"

namespace rlkern::cpu {
namespace {

using namespace rlkern::logprobs;

void set_rows(LogitsRows& a, const at::Tensor& logits, const at::Tensor& labels,
              double temperature, int64_t ignore_index) {
  static_cast<LogitsLayout&>(a) = logits_layout(logits);
  a.labels = labels.const_data_ptr<int64_t>();
  a.temperature = temperature;
  a.ignore_index = ignore_index;
}

void launch_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                int64_t ignore_index, const RowPointers& outputs) {
  LogprobsFwdArgs a{};
  set_rows(a, logits, labels, temperature, ignore_index);
  a.outputs = outputs;
  logprobs_fwd(a);
}

void launch_bwd(const at::Tensor& logits, const at::Tensor& labels, const GradInputs& in,
                double temperature, int64_t ignore_index, const at::Tensor& grad_logits) {
  LogprobsBwdArgs a{};
  set_rows(a, logits, labels, temperature, ignore_index);
  a.in = in;
  a.grad_logits = grad_logits.data_ptr();
  // a fresh (N, V) gradient (the out-of-place backward): fault it in 2 MiB pages
  if (grad_logits.data_ptr() != logits.data_ptr())
    advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  a.grad_stride_0 = grad_logits.stride(0);
  a.grad_stride_1 = grad_logits.stride(1);
  logprobs_bwd(a);
}

}  // namespace

void impl_logprobs_ops(torch::Library& m) {
  m.impl(kFwdOut.name, &fwd_out<&launch_fwd>);
  m.impl(kBwdOut.name, &bwd_out<&launch_bwd>);
}

}  // namespace rlkern::cpu
