// Glue from tensors to the CPU truncated log-probs (schemas and checks in
// truncated_logprobs_op.h). The Python layer (python/rlkern/ops/truncated_logprobs.py)
// validates the user's arguments with friendly messages; these checks guard the raw pointers
// against any other caller.
#include "cpu/truncated_logprobs_ops.h"

#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/logits_args.h"
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

// The kernel computes in fp32 (the sampler's scratch row); float64 logits get their outputs
// converted, as the caller-output op's Python caller does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
    const std::optional<at::Tensor>& min_p, bool joint, int64_t ignore_index, bool with_entropy,
    bool check_data) {
  const int64_t N = labels.numel();
  const at::Tensor y = label_array(labels, N);
  truncated_logprobs::Rows a = truncated_logprobs::check_rows(logits, y, temperature, top_k,
                                                              top_p, min_p, joint, ignore_index);
  if (check_data) check_label_range(a.labels, N, a.V, ignore_index);
  const at::TensorOptions f32 = logits.options().dtype(at::kFloat);
  const at::Tensor logprobs = at::empty(labels.sizes(), f32), lse = at::empty(labels.sizes(), f32);
  const at::Tensor entropy = at::empty(with_entropy ? labels.sizes() : at::IntArrayRef{0}, f32);
  a.logprobs = logprobs.data_ptr<float>();
  a.entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  a.lse = lse.data_ptr<float>();
  if (N > 0) {
    launch_fwd(logits, a);
    if (check_data)
      check_neginf_rows(a.lse, static_cast<const float*>(a.logprobs), a.labels, N, ignore_index);
  }
  const at::ScalarType acc = checks::acc_dtype(logits);
  return {logprobs.to(acc), entropy.to(acc), lse.to(acc)};
}

}  // namespace

void impl_truncated_logprobs_ops(torch::Library& m) {
  m.impl(truncated_logprobs::kFwdOut.name, &truncated_logprobs::fwd_out<&launch_fwd>);
  m.impl(truncated_logprobs::kBwdOut.name, &truncated_logprobs::bwd_out<&launch_bwd>);
  m.impl(truncated_logprobs::kFwdCpu.name, &fwd_cpu);
}

}  // namespace rlkern::cpu
