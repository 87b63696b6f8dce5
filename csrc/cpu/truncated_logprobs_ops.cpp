// Glue from tensors to the CPU truncated log-probs (schemas and checks in
// truncated_logprobs_op.h). The Python layer (python/rlkern/ops/truncated_logprobs.py)
// validates the user's arguments with friendly messages; these checks guard the raw pointers
// against any other caller.
#include "cpu/truncated_logprobs_ops.h"

#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/truncated_logprobs.h"

namespace rlkern::cpu {
namespace {

TruncatedLogprobsArgs kernel_args(const at::Tensor& logits, const truncated_logprobs::Rows& r) {
  TruncatedLogprobsArgs a{};
  static_cast<truncated_logprobs::Rows&>(a) = r;
  a.logits = logits.const_data_ptr();
  a.dtype = dtype_of(logits, "logits");
  return a;
}

void launch_fwd(const at::Tensor& logits, const truncated_logprobs::Rows& r) {
  truncated_logprobs_fwd(kernel_args(logits, r));
}

void launch_bwd(const at::Tensor& logits, const truncated_logprobs::Rows& r) {
  // a fresh (B·L, V) gradient (not one written over the logits): fault it in 2 MiB pages, as
  // logprobs_ops.cpp does
  if (r.grad_logits != logits.const_data_ptr())
    advise_huge_pages(r.grad_logits, size_t(r.B * r.L * r.V) * logits.element_size());
  truncated_logprobs_bwd(kernel_args(logits, r));
}

}  // namespace

void impl_truncated_logprobs_ops(torch::Library& m) {
  m.impl(truncated_logprobs::kFwdOut.name, &truncated_logprobs::fwd_out<&launch_fwd>);
  m.impl(truncated_logprobs::kBwdOut.name, &truncated_logprobs::bwd_out<&launch_bwd>);
}

}  // namespace rlkern::cpu
