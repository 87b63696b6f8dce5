// Glue from tensors to the CPU logprobs kernels (see logprobs_ops.h): the checks and the op
// signatures are logprobs_op.h's, shared with the CUDA glue; this file fills the kernel
// arguments. The Python layer (python/rlkern/ops/logprobs.py) validates the user's arguments
// with friendly messages; the checks guard the raw pointers against any other caller.
// logprobs_fwd_cpu / logprobs_bwd_cpu are the CPU backend's whole calls (logprobs_op.h): they
// also do the layout, the allocations and the data checks that the Python layer does for the
// other backends, with its messages.
#include "cpu/logprobs_ops.h"

#include <ATen/ops/empty.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/logits_args.h"
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
    bool with_entropy, bool with_stats, bool check_data) {
  const at::Tensor logits3 = rows3d(logits);
  const int64_t rows = logits3.size(0) * logits3.size(1), V = logits3.size(2);
  const at::Tensor labels1 = label_array(labels, rows);
  check_logits(logits3, labels1.view({logits3.size(0), logits3.size(1)}));
  check_temperature(temperature);
  TORCH_CHECK_VALUE(V > 0 || rows == 0, "logits: an empty vocab dim (V = 0) with ", rows,
                    " labels");
  const int64_t* y = labels1.const_data_ptr<int64_t>();
  if (check_data) check_label_range(y, rows, V, ignore_index);
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  const at::TensorOptions acc = logits.options().dtype(checks::acc_dtype(logits));
  std::array<at::Tensor, kNumOutputs> outs;
  RowPointers ptr{};
  for (int o = 0; o < kNumOutputs; ++o) {
    const bool wanted = o == kEntropy ? with_entropy
                        : (o == kSelfCertainty || o == kSumPSq) ? with_stats
                                                                 : true;
    outs[o] = wanted ? at::empty(lead, acc) : at::empty({0}, acc.dtype(at::kFloat));
    if (wanted) ptr[o] = outs[o].data_ptr();
  }
  if (rows > 0) {
    launch_fwd(logits3, labels1, temperature, ignore_index, ptr);
    if (check_data) {
      auto check = [&](auto acc_zero) {  // the outputs' element type, float or double
        using Acc = decltype(acc_zero);
        check_neginf_rows(outs[kLse].const_data_ptr<Acc>(), outs[kLogprobs].const_data_ptr<Acc>(),
                          y, rows, ignore_index);
      };
      if (logits.scalar_type() == at::kDouble) check(0.0);
      else check(0.0f);
    }
  }
  static_assert(kNumOutputs == 5, "the schema returns five tensors");
  return {outs[0], outs[1], outs[2], outs[3], outs[4]};
}

void bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
             const std::optional<at::Tensor>& entropy,
             const std::optional<at::Tensor>& grad_logprobs,
             const std::optional<at::Tensor>& grad_entropy,
             const std::optional<at::Tensor>& grad_lse, double temperature, int64_t ignore_index,
             const at::Tensor& grad_logits) {
  const at::Tensor logits3 = rows3d(logits);
  TORCH_CHECK_VALUE(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ",
                    logits.sizes(), ", got ", grad_logits.sizes());
  const at::Tensor grad3 = rows3d(grad_logits);
  check_grad_logits(grad3, logits3);
  check_temperature(temperature);
  const int64_t rows = logits3.size(0) * logits3.size(1);
  if (rows == 0 || logits3.size(2) == 0) return;
  const at::ScalarType acc = checks::acc_dtype(logits);
  const at::Tensor labels1 = label_array(labels, rows);
  const at::Tensor lse1 = row_array(lse, "lse", rows, acc);
  const auto entropy1 = row_array(entropy, "entropy", rows, acc);
  const auto g_lp = row_array(grad_logprobs, "grad_logprobs", rows, acc);
  const auto g_ent = row_array(grad_entropy, "grad_entropy", rows, acc);
  const auto g_lse = row_array(grad_lse, "grad_lse", rows, acc);
  auto ptr = [](const std::optional<at::Tensor>& t) -> const void* {
    return t.has_value() ? t->const_data_ptr() : nullptr;
  };
  const GradInputs in{lse1.const_data_ptr(), ptr(entropy1), ptr(g_lp), ptr(g_ent), ptr(g_lse)};
  check_grad_inputs(in);
  launch_bwd(logits3, labels1, in, temperature, ignore_index, grad3);
}

}  // namespace

void impl_logprobs_ops(torch::Library& m) {
  m.impl(kFwdOut.name, &fwd_out<&launch_fwd>);
  m.impl(kBwdOut.name, &bwd_out<&launch_bwd>);
  m.impl(kFwdCpu.name, &fwd_cpu);
  m.impl(kBwdCpu.name, &bwd_cpu);
}

}  // namespace rlkern::cpu
