// The policy-loss family's op bodies, shared by the CPU glue (cpu/policy_loss_ops.cpp) and the
// CUDA glue (cuda/policy_loss_ops.cpp): one set of argument checks (csrc/checks.h plus the
// family's own) turns the tensors into the torch-free arguments of rlkern/policy_loss.h, then a
// backend's kernels run. A backend is a type with
//
//   static constexpr Backend kBackend;                         // device, dtypes it takes
//   static void fwd(const policy_loss::Args&, const at::Tensor& like);
//   static void bwd(const policy_loss::Args&, const at::Tensor& like);
//   static void kl(const policy_loss::KlArgs&, const at::Tensor& like);
//
// (`like`: a tensor on the device, for the device guard and the stream); impl_ops<It>(m)
// registers fwd_out<It>, bwd_out<It>, kl_fwd_out<It>, kl_bwd_out<It> for the schemas of
// cpu/policy_loss_ops.cpp. The optional inputs travel as one `Tensor?[] inputs` list indexed by
// enum Input: the checks loop over its slots.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "rlkern/policy_loss.h"

namespace rlkern::policy_loss {

using InputList = c10::List<std::optional<at::Tensor>>;

// What a backend's kernels accept.
struct Backend {
  c10::DeviceType device;
  bool takes_f64;  // float64 inputs (else float32 only)
};

// A given input's pointer is never null, even for an empty tensor (which may have no storage):
// null means absent (policy_loss.h check_call). An empty input is never read.
inline const void* given_ptr(const at::Tensor& t) {
  static const double kEmpty = 0.0;
  return t.numel() ? t.const_data_ptr() : &kEmpty;
}

inline RowArray row_array(const at::Tensor& t) { return {given_ptr(t), t.stride(0)}; }

// The compute dtype of a call (the dtype of logprobs, which every float input shares).
inline at::ScalarType compute_dtype(const Backend& be, const at::Tensor& logprobs) {
  TORCH_CHECK(logprobs.device().type() == be.device, "logprobs: expected a ", be.device,
              " tensor, got one on ", logprobs.device());
  const at::ScalarType dtype = logprobs.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || (be.takes_f64 && dtype == at::kDouble),
                   "logprobs: expected float32", be.takes_f64 ? " or float64" : "", ", got ",
                   dtype, be.takes_f64 ? "" : " (for float64 use backend='triton' or 'torch')");
  return dtype;
}

// The tensors of one call: (B, T) logprobs / old_logprobs / mask, (B,) or (B, T) advantages,
// and the optional inputs by slot (kRows: (B, T); kOne: one value), all on logprobs' device.
inline Inputs check_inputs(const Backend& be, const at::Tensor& logprobs,
                           const at::Tensor& old_logprobs, const at::Tensor& advantages,
                           const at::Tensor& mask, const InputList& inputs) {
  const at::ScalarType dtype = compute_dtype(be, logprobs);
  TORCH_CHECK(logprobs.dim() == 2, "logprobs: expected (B, T), got ", logprobs.sizes());
  Inputs in{};
  in.B = logprobs.size(0);
  in.T = logprobs.size(1);
  in.f64 = dtype == at::kDouble;
  checks::rows(logprobs, "logprobs", in.B, in.T, dtype, logprobs);
  checks::rows(old_logprobs, "old_logprobs", in.B, in.T, dtype, logprobs);
  checks::rows(mask, "mask", in.B, in.T, at::kBool, logprobs);
  in.logp = row_array(logprobs);
  in.old = row_array(old_logprobs);
  in.mask = row_array(mask);
  if (advantages.dim() == 2) {
    checks::rows(advantages, "advantages", in.B, in.T, dtype, logprobs);
    in.adv_per_token = 1;
    in.adv = row_array(advantages);
  } else {
    checks::array(advantages, "advantages", in.B, dtype, logprobs);
    in.adv = {advantages.const_data_ptr(), 1};
  }
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == kNumInputs, "inputs: expected ",
              kNumInputs, " optional tensors (one per slot of policy_loss.h enum Input), got ",
              inputs.size());
  for (int k = 0; k < kNumInputs; ++k) {
    const std::optional<at::Tensor> t = inputs.get(k);
    if (!t.has_value()) continue;
    if (input_shape(k) == kRows) {
      checks::rows(*t, kInputNames[k], in.B, in.T, dtype, logprobs);
      in.opt[k] = row_array(*t);
    } else {
      checks::array(*t, kInputNames[k], 1, dtype, logprobs);
      in.opt[k] = {given_ptr(*t), 0};
    }
  }
  return in;
}

// Inputs, codes and hyperparameters of a forward / backward call (no outputs yet).
inline Args check_args(const Backend& be, const at::Tensor& logprobs,
                       const at::Tensor& old_logprobs, const at::Tensor& advantages,
                       const at::Tensor& mask, const InputList& inputs, at::IntArrayRef flags,
                       at::ArrayRef<double> hparams) {
  Args a{};
  a.in = check_inputs(be, logprobs, old_logprobs, advantages, mask, inputs);
  TORCH_CHECK(static_cast<int64_t>(flags.size()) == kNumFlags, "flags: expected ", kNumFlags,
              " values (struct Flags), got ", flags.size());
  TORCH_CHECK(static_cast<int64_t>(hparams.size()) == kNumHParams, "hparams: expected ",
              kNumHParams, " values (struct HParams), got ", hparams.size());
  a.flags = from_fields<Flags>(flags.data());
  a.hp = from_fields<HParams>(hparams.data());
  const Problem problem = check_call(a.flags, a.in);
  TORCH_CHECK(problem.what == nullptr, problem.what);
  return a;
}

// policy_loss_fwd_out: row_stats (kNumRowStats, B) float64.
template <typename K>
void fwd_out(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
             const at::Tensor& advantages, const at::Tensor& mask, const InputList& inputs,
             at::IntArrayRef flags, at::ArrayRef<double> hparams, const at::Tensor& row_stats) {
  Args a = check_args(K::kBackend, logprobs, old_logprobs, advantages, mask, inputs, flags,
                      hparams);
  checks::array(row_stats, "row_stats", kNumRowStats * a.in.B, at::kDouble, logprobs);
  a.row_stats = row_stats.data_ptr<double>();
  if (a.in.B > 0) K::fwd(a, logprobs);
}

// policy_loss_bwd_out: grad_logprobs (and grad_entropy) (B, T) contiguous, from the forward's
// row_stats and grad_rows (kNumRowGrads, B) float64.
template <typename K>
void bwd_out(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
             const at::Tensor& advantages, const at::Tensor& mask, const InputList& inputs,
             const at::Tensor& row_stats, const at::Tensor& grad_rows, at::IntArrayRef flags,
             at::ArrayRef<double> hparams, const at::Tensor& grad_logprobs,
             const std::optional<at::Tensor>& grad_entropy) {
  Args a = check_args(K::kBackend, logprobs, old_logprobs, advantages, mask, inputs, flags,
                      hparams);
  const int64_t B = a.in.B, T = a.in.T;
  checks::array(row_stats, "row_stats", kNumRowStats * B, at::kDouble, logprobs);
  checks::array(grad_rows, "grad_rows", kNumRowGrads * B, at::kDouble, logprobs);
  checks::array(grad_logprobs, "grad_logprobs", B * T, logprobs.scalar_type(), logprobs);
  a.row_stats = const_cast<double*>(row_stats.const_data_ptr<double>());
  a.grad_rows = grad_rows.const_data_ptr<double>();
  a.grad_logp = grad_logprobs.data_ptr();
  if (grad_entropy.has_value()) {
    TORCH_CHECK(a.in.opt[kInEntropy].p, "entropy: required when grad_entropy is given");
    checks::array(*grad_entropy, "grad_entropy", B * T, logprobs.scalar_type(), logprobs);
    a.grad_entropy = grad_entropy->data_ptr();
  }
  if (B > 0 && T > 0) K::bwd(a, logprobs);
}

// kl_penalty_fwd_out / kl_penalty_bwd_out (grad given): elementwise over contiguous tensors of
// logprobs' shape and dtype.
template <typename K>
void kl_out(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
            const at::Tensor* grad, int64_t kind, bool straight_through, double log_clamp,
            double value_clamp, const at::Tensor& out) {
  const at::ScalarType dtype = compute_dtype(K::kBackend, logprobs);
  const int64_t n = logprobs.numel();
  checks::array(logprobs, "logprobs", n, dtype, logprobs);
  checks::array(ref_logprobs, "ref_logprobs", n, dtype, logprobs);
  checks::array(out, "out", n, dtype, logprobs);
  if (grad) checks::array(*grad, "grad", n, dtype, logprobs);
  TORCH_CHECK(kind > kKlNone && kind < kNumKlKinds, "kind: unknown KL estimator ", kind);
  KlArgs a{};
  a.n = n;
  a.f64 = dtype == at::kDouble;
  a.logp = logprobs.const_data_ptr();
  a.ref = ref_logprobs.const_data_ptr();
  a.grad = grad ? grad->const_data_ptr() : nullptr;
  a.kind = static_cast<int32_t>(kind);
  a.straight_through = straight_through;
  a.log_clamp = log_clamp;
  a.value_clamp = value_clamp;
  a.out = out.data_ptr();
  if (n > 0) K::kl(a, logprobs);
}

template <typename K>
void kl_fwd_out(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t kind,
                bool straight_through, double log_clamp, double value_clamp,
                const at::Tensor& out) {
  kl_out<K>(logprobs, ref_logprobs, nullptr, kind, straight_through, log_clamp, value_clamp,
            out);
}

template <typename K>
void kl_bwd_out(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                const at::Tensor& grad, int64_t kind, bool straight_through, double log_clamp,
                double value_clamp, const at::Tensor& out) {
  kl_out<K>(logprobs, ref_logprobs, &grad, kind, straight_through, log_clamp, value_clamp, out);
}

// The family's implementations for backend K, inside a TORCH_LIBRARY_IMPL block.
template <typename K>
void impl_ops(torch::Library& m) {
  m.impl("policy_loss_fwd_out", &fwd_out<K>);
  m.impl("policy_loss_bwd_out", &bwd_out<K>);
  m.impl("kl_penalty_fwd_out", &kl_fwd_out<K>);
  m.impl("kl_penalty_bwd_out", &kl_bwd_out<K>);
}

}  // namespace rlkern::policy_loss
