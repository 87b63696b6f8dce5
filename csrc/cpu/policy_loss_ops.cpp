// CPU implementations of the policy-loss ops (see policy_loss_ops.h): the shared op bodies of
// csrc/policy_loss_checks.h with the kernels of cpu/policy_loss.h. The Python layer
// (python/rlkern/ops/policy_loss/) validates the user's arguments with friendly messages; the
// checks guard the raw pointers against any other caller.
#include "cpu/policy_loss_ops.h"

#include "cpu/policy_loss.h"
#include "policy_loss_checks.h"

namespace rlkern {

// `Tensor?[] inputs`: the optional inputs by slot of policy_loss.h enum Input.
const char* const kPolicyLossFwdOutSchema =
    "policy_loss_fwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor?[] inputs, int[] flags, float[] hparams, Tensor(a!) row_stats) -> ()";
const char* const kPolicyLossBwdOutSchema =
    "policy_loss_bwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor?[] inputs, Tensor row_stats, Tensor grad_rows, int[] flags, float[] hparams, "
    "Tensor(a!) grad_logprobs, Tensor(b!)? grad_entropy) -> ()";
// CPU only: the fused path (policy_loss_fused_ok): the forward also fills token_grad (and,
// with a KL term, token_grad_kl), (B, T) each; the backward scales them in place into the
// gradient, which it leaves in token_grad. Given grad_rows (the backward's coefficients, known
// before the forward), the forward writes that gradient into token_grad itself (no
// token_grad_kl; bitwise policy_loss_bwd_out's, the entropy's gradient aside) and no backward
// op is needed.
const char* const kPolicyLossFusedFwdOutSchema =
    "policy_loss_fused_fwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
    "Tensor mask, Tensor?[] inputs, int[] flags, float[] hparams, Tensor(a!) row_stats, "
    "Tensor(b!) token_grad, Tensor(c!)? token_grad_kl, Tensor? grad_rows=None) -> ()";
const char* const kPolicyLossFusedBwdSchema =
    "policy_loss_fused_bwd_(Tensor mask, Tensor grad_rows, int[] flags, Tensor(a!) token_grad, "
    "Tensor? token_grad_kl) -> ()";
// CPU only: lens[b] = the number of nonzero mask[b, :] (float64, as row_stats' len row): what
// the aggregation weights need before a forward that writes the gradient.
const char* const kPolicyLossLensOutSchema =
    "policy_loss_lens_out(Tensor mask, Tensor(a!) lens) -> ()";
const char* const kKlPenaltyFwdOutSchema =
    "kl_penalty_fwd_out(Tensor logprobs, Tensor ref_logprobs, int kind, bool straight_through, "
    "float log_clamp, float value_clamp, Tensor(a!) out) -> ()";
const char* const kKlPenaltyBwdOutSchema =
    "kl_penalty_bwd_out(Tensor logprobs, Tensor ref_logprobs, Tensor grad, int kind, "
    "bool straight_through, float log_clamp, float value_clamp, Tensor(a!) out) -> ()";

namespace {

struct CpuKernels {
  static constexpr policy_loss::Backend kBackend{c10::DeviceType::CPU, /*takes_f64=*/true};
  static void fwd(const policy_loss::Args& a, const at::Tensor&) { cpu::policy_loss_fwd(a); }
  static void bwd(const policy_loss::Args& a, const at::Tensor&) { cpu::policy_loss_bwd(a); }
  static void kl(const policy_loss::KlArgs& a, const at::Tensor&) { cpu::kl_penalty(a); }
};

// The factors' buffers: (B, T) contiguous of the compute dtype each, token_grad_kl exactly
// when there is a KL term (and the factors, not the gradient, are written: to_grad false).
void check_token_grad(const policy_loss::Flags& f, int64_t B, int64_t T, at::ScalarType dtype,
                      const at::Tensor& token_grad,
                      const std::optional<at::Tensor>& token_grad_kl, const at::Tensor& like,
                      bool to_grad = false) {
  TORCH_CHECK(policy_loss::fused_ok(f),
              "the fused policy loss needs the token ratio mode and a token-level kind (not "
              "gmpo or vespo)");
  checks::array(token_grad, "token_grad", B * T, dtype, like);
  const bool kl = f.kl_kind != policy_loss::kKlNone && !to_grad;
  TORCH_CHECK(kl == token_grad_kl.has_value(), "token_grad_kl: ",
              to_grad ? "not with grad_rows (the KL part is added to token_grad)"
              : kl    ? "required with a KL term"
                      : "only with a KL term");
  if (kl) checks::array(*token_grad_kl, "token_grad_kl", B * T, dtype, like);
}

void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

void fused_bwd(const at::Tensor& mask, const at::Tensor& grad_rows, at::IntArrayRef flags,
               const at::Tensor& token_grad, const std::optional<at::Tensor>& token_grad_kl) {
  TORCH_CHECK(mask.dim() == 2, "mask: expected (B, T), got shape ", mask.sizes());
  checks::rows(mask, "mask", mask.size(0), mask.size(1), at::kBool, token_grad);
  TORCH_CHECK(static_cast<int64_t>(flags.size()) == policy_loss::kNumFlags, "flags: expected ",
              policy_loss::kNumFlags, " values");
  policy_loss::Args a{};
  a.flags = policy_loss::from_fields<policy_loss::Flags>(flags.data());
  a.in.B = mask.size(0);
  a.in.T = mask.size(1);
  const at::ScalarType dtype = token_grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "token_grad: expected float32 or float64, got ", dtype);
  a.in.f64 = dtype == at::kDouble;
  check_token_grad(a.flags, a.in.B, a.in.T, dtype, token_grad, token_grad_kl, mask);
  checks::array(grad_rows, "grad_rows", policy_loss::kNumRowGrads * a.in.B, at::kDouble, mask);
  a.in.mask = {mask.const_data_ptr(), mask.stride(0)};
  a.grad_rows = grad_rows.const_data_ptr<double>();
  a.token_grad = token_grad.data_ptr();
  a.token_grad_kl = data_or_null(token_grad_kl);
  if (a.in.B > 0 && a.in.T > 0) cpu::policy_loss_fused_bwd(a);
}

}  // namespace

void policy_loss_fused_fwd_out(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               const policy_loss::InputList& inputs, at::IntArrayRef flags,
                               at::ArrayRef<double> hparams, const at::Tensor& row_stats,
                               const at::Tensor& token_grad,
                               const std::optional<at::Tensor>& token_grad_kl,
                               const std::optional<at::Tensor>& grad_rows) {
  policy_loss::Args a = policy_loss::check_args(CpuKernels::kBackend, logprobs, old_logprobs,
                                                advantages, mask, inputs, flags, hparams);
  checks::array(row_stats, "row_stats", policy_loss::kNumRowStats * a.in.B, at::kDouble,
                logprobs);
  a.row_stats = row_stats.data_ptr<double>();
  if (!token_grad.defined()) {  // the forward alone (no factors): the two-pass op's kernel
    TORCH_CHECK(!token_grad_kl.has_value() && !grad_rows.has_value(),
                "token_grad_kl / grad_rows: only with token_grad");
    if (a.in.B > 0) cpu::policy_loss_fwd(a);
    return;
  }
  check_token_grad(a.flags, a.in.B, a.in.T, logprobs.scalar_type(), token_grad, token_grad_kl,
                   logprobs, grad_rows.has_value());
  if (grad_rows.has_value()) {
    checks::array(*grad_rows, "grad_rows", policy_loss::kNumRowGrads * a.in.B, at::kDouble,
                  logprobs);
    a.grad_rows = grad_rows->const_data_ptr<double>();
  }
  a.token_grad = token_grad.data_ptr();
  a.token_grad_kl = data_or_null(token_grad_kl);
  if (a.in.B > 0) cpu::policy_loss_fwd(a);
}

void policy_loss_lens_out(const at::Tensor& mask, const at::Tensor& lens) {
  TORCH_CHECK(mask.dim() == 2, "mask: expected (B, T), got shape ", mask.sizes());
  checks::rows(mask, "mask", mask.size(0), mask.size(1), at::kBool, lens);
  checks::array(lens, "lens", mask.size(0), at::kDouble, mask);
  cpu::policy_loss_lens(static_cast<const uint8_t*>(mask.const_data_ptr()), mask.size(0),
                        mask.size(1), mask.stride(0), lens.data_ptr<double>());
}

void impl_policy_loss_cpu(torch::Library& m) {
  policy_loss::impl_ops<CpuKernels>(m);
  m.impl("policy_loss_fused_fwd_out", &policy_loss_fused_fwd_out);
  m.impl("policy_loss_fused_bwd_", &fused_bwd);
  m.impl("policy_loss_lens_out", &policy_loss_lens_out);
  impl_policy_loss_linear_cpu(m);  // policy_loss_linear.cpp
}

}  // namespace rlkern
