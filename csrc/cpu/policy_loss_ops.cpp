// Glue from tensors to the policy-loss CPU kernels (see policy_loss_ops.h). The Python layer
// (python/rlkern/ops/policy_loss.py) validates the user's arguments with friendly messages;
// the checks here guard the raw pointers against any other caller.
#include "cpu/policy_loss_ops.h"

#include <c10/util/Exception.h>

#include "cpu/policy_loss.h"

namespace rlkern {

const char* const kPolicyLossFwdOutSchema =
    "policy_loss_fwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor? ref_logprobs, Tensor? rollout_logprobs, Tensor? entropy, Tensor? token_weights, "
    "Tensor? entropy_threshold, int[] flags, float[] hparams, Tensor(a!) row_stats) -> ()";
const char* const kPolicyLossBwdOutSchema =
    "policy_loss_bwd_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor? ref_logprobs, Tensor? rollout_logprobs, Tensor? entropy, Tensor? token_weights, "
    "Tensor? entropy_threshold, Tensor row_stats, Tensor grad_rows, int[] flags, "
    "float[] hparams, Tensor(a!) grad_logprobs, Tensor(b!)? grad_entropy) -> ()";
const char* const kKlPenaltyFwdOutSchema =
    "kl_penalty_fwd_out(Tensor logprobs, Tensor ref_logprobs, int kind, bool straight_through, "
    "float log_clamp, float value_clamp, Tensor(a!) out) -> ()";
const char* const kKlPenaltyBwdOutSchema =
    "kl_penalty_bwd_out(Tensor logprobs, Tensor ref_logprobs, Tensor grad, int kind, "
    "bool straight_through, float log_clamp, float value_clamp, Tensor(a!) out) -> ()";

namespace {

namespace pl = rlkern::policy_loss;

bool compute_f64(const at::Tensor& logprobs) {
  TORCH_CHECK_TYPE(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kDouble,
                   "logprobs: expected float32 or float64, got ", logprobs.scalar_type());
  return logprobs.scalar_type() == at::kDouble;
}

void check_bt(const at::Tensor& t, const char* name, int64_t B, int64_t T,
              at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name, ": expected shape (", B,
              ", ", T, "), got ", t.sizes());
  TORCH_CHECK(T <= 1 || t.stride(1) == 1, name, ": expected unit stride along T, got ",
              t.stride(1));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ",
                   t.scalar_type());
}

cpu::RowArray row_array(const std::optional<at::Tensor>& t, const char* name, int64_t B,
                        int64_t T, at::ScalarType dtype) {
  if (!t.has_value()) return {nullptr, 0};
  check_bt(*t, name, B, T, dtype);
  return {t->const_data_ptr(), t->stride(0)};
}

cpu::PolicyLossArgs make_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                              const at::Tensor& advantages, const at::Tensor& mask,
                              const std::optional<at::Tensor>& ref_logprobs,
                              const std::optional<at::Tensor>& rollout_logprobs,
                              const std::optional<at::Tensor>& entropy,
                              const std::optional<at::Tensor>& token_weights,
                              const std::optional<at::Tensor>& entropy_threshold,
                              at::IntArrayRef flags, at::ArrayRef<double> hparams) {
  const bool f64 = compute_f64(logprobs);
  const auto dtype = logprobs.scalar_type();
  TORCH_CHECK(logprobs.dim() == 2, "logprobs: expected (B, T), got ", logprobs.sizes());
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  cpu::PolicyLossArgs a{};
  a.B = B;
  a.T = T;
  a.f64 = f64;
  a.logp = row_array(logprobs, "logprobs", B, T, dtype);
  a.old = row_array(old_logprobs, "old_logprobs", B, T, dtype);
  a.ref = row_array(ref_logprobs, "ref_logprobs", B, T, dtype);
  a.rollout = row_array(rollout_logprobs, "rollout_logprobs", B, T, dtype);
  a.entropy = row_array(entropy, "entropy", B, T, dtype);
  a.token_weights = row_array(token_weights, "token_weights", B, T, dtype);
  TORCH_CHECK_TYPE(advantages.scalar_type() == dtype, "advantages: expected ", dtype);
  if (advantages.dim() == 2) {
    check_bt(advantages, "advantages", B, T, dtype);
    a.adv_per_token = true;
    a.adv_stride = advantages.stride(0);
  } else {
    TORCH_CHECK(advantages.dim() == 1 && advantages.size(0) == B && advantages.is_contiguous(),
                "advantages: expected a contiguous (B,) or a (B, T) tensor, got ",
                advantages.sizes());
    a.adv_per_token = false;
  }
  a.adv = advantages.const_data_ptr();
  check_bt(mask, "mask", B, T, at::kBool);
  a.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  a.mask_stride = mask.stride(0);
  if (entropy_threshold.has_value()) {
    TORCH_CHECK(entropy_threshold->numel() == 1 && entropy_threshold->scalar_type() == dtype &&
                    entropy_threshold->device().is_cpu(),
                "entropy_threshold: expected one ", dtype, " value");
    TORCH_CHECK(entropy.has_value(), "entropy: required with entropy_threshold");
    a.entropy_threshold = entropy_threshold->const_data_ptr();
  }
  TORCH_CHECK(static_cast<int>(flags.size()) == pl::kNumFlags, "flags: expected ",
              pl::kNumFlags, " values, got ", flags.size());
  TORCH_CHECK(static_cast<int>(hparams.size()) == pl::kNumHParams, "hparams: expected ",
              pl::kNumHParams, " values, got ", hparams.size());
  // Field order = the order of struct Flags / struct HParams (python: FLAG_FIELDS, HPARAM_FIELDS).
  const auto fl = [&](int i) { return static_cast<int>(flags[i]); };
  a.flags = pl::Flags{fl(0), fl(1), fl(2), fl(3), fl(4), fl(5), fl(6)};
  a.hp = pl::HParams{hparams[0], hparams[1], hparams[2], hparams[3],  hparams[4],
                     hparams[5], hparams[6], hparams[7], hparams[8],  hparams[9],
                     hparams[10], hparams[11], hparams[12]};
  TORCH_CHECK(a.flags.loss_kind >= pl::kPpo && a.flags.loss_kind <= pl::kGvpo,
              "flags: unknown loss kind ", a.flags.loss_kind);
  TORCH_CHECK(a.flags.ratio_mode >= 0 && a.flags.ratio_mode <= pl::kRatioSeqFull,
              "flags: unknown ratio mode ", a.flags.ratio_mode);
  TORCH_CHECK(a.flags.kl_kind >= pl::kKlNone && a.flags.kl_kind <= pl::kKlAbs,
              "flags: unknown KL kind ", a.flags.kl_kind);
  TORCH_CHECK(a.flags.kl_kind == pl::kKlNone || a.ref.p, "ref_logprobs: required for the KL term");
  TORCH_CHECK(a.flags.rollout_level == pl::kRolloutNone || a.rollout.p,
              "rollout_logprobs: required for the rollout correction");
  TORCH_CHECK(a.flags.rollout_level >= 0 && a.flags.rollout_level <= pl::kRolloutSeq,
              "flags: unknown rollout level ", a.flags.rollout_level);
  return a;
}

void check_f64_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() &&
                  t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              name, ": expected a contiguous float64 (", rows, ", ", cols, ") CPU tensor, got ",
              t.sizes(), " ", t.scalar_type());
}

}  // namespace

void policy_loss_fwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                             const at::Tensor& advantages, const at::Tensor& mask,
                             const std::optional<at::Tensor>& ref_logprobs,
                             const std::optional<at::Tensor>& rollout_logprobs,
                             const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& token_weights,
                             const std::optional<at::Tensor>& entropy_threshold,
                             at::IntArrayRef flags, at::ArrayRef<double> hparams,
                             const at::Tensor& row_stats) {
  cpu::PolicyLossArgs a =
      make_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
                entropy, token_weights, entropy_threshold, flags, hparams);
  check_f64_matrix(row_stats, "row_stats", pl::kNumRowStats, a.B);
  a.row_stats = row_stats.data_ptr<double>();
  if (a.B == 0) return;
  cpu::policy_loss_fwd(a);
}

void policy_loss_bwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                             const at::Tensor& advantages, const at::Tensor& mask,
                             const std::optional<at::Tensor>& ref_logprobs,
                             const std::optional<at::Tensor>& rollout_logprobs,
                             const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& token_weights,
                             const std::optional<at::Tensor>& entropy_threshold,
                             const at::Tensor& row_stats, const at::Tensor& grad_rows,
                             at::IntArrayRef flags, at::ArrayRef<double> hparams,
                             const at::Tensor& grad_logprobs,
                             const std::optional<at::Tensor>& grad_entropy) {
  cpu::PolicyLossArgs a =
      make_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs,
                entropy, token_weights, entropy_threshold, flags, hparams);
  check_f64_matrix(row_stats, "row_stats", pl::kNumRowStats, a.B);
  check_f64_matrix(grad_rows, "grad_rows", pl::kNumRowGrads, a.B);
  check_bt(grad_logprobs, "grad_logprobs", a.B, a.T, logprobs.scalar_type());
  TORCH_CHECK(grad_logprobs.is_contiguous(), "grad_logprobs: expected a contiguous tensor");
  a.row_stats = const_cast<double*>(row_stats.const_data_ptr<double>());
  a.grad_rows = grad_rows.const_data_ptr<double>();
  a.grad_logp = grad_logprobs.data_ptr();
  if (grad_entropy.has_value()) {
    TORCH_CHECK(entropy.has_value(), "entropy: required when grad_entropy is given");
    check_bt(*grad_entropy, "grad_entropy", a.B, a.T, logprobs.scalar_type());
    TORCH_CHECK(grad_entropy->is_contiguous(), "grad_entropy: expected a contiguous tensor");
    a.grad_entropy = grad_entropy->data_ptr();
  }
  if (a.B == 0 || a.T == 0) return;
  cpu::policy_loss_bwd(a);
}

namespace {

cpu::KlArgs kl_args(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t kind,
                    bool straight_through, double log_clamp, double value_clamp,
                    const at::Tensor& out) {
  const bool f64 = compute_f64(logprobs);
  for (const auto* t : {&logprobs, &ref_logprobs, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->sizes() == logprobs.sizes() &&
                    t->scalar_type() == logprobs.scalar_type(),
                "kl_penalty: expected contiguous CPU tensors of shape ", logprobs.sizes(),
                " and dtype ", logprobs.scalar_type());
  }
  TORCH_CHECK(kind >= pl::kKlK1 && kind <= pl::kKlAbs, "kind: unknown KL estimator ", kind);
  cpu::KlArgs a{};
  a.n = logprobs.numel();
  a.f64 = f64;
  a.logp = logprobs.const_data_ptr();
  a.ref = ref_logprobs.const_data_ptr();
  a.kind = static_cast<int>(kind);
  a.straight_through = straight_through;
  a.log_clamp = log_clamp;
  a.value_clamp = value_clamp;
  a.out = out.data_ptr();
  return a;
}

}  // namespace

void kl_penalty_fwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                            int64_t kind, bool straight_through, double log_clamp,
                            double value_clamp, const at::Tensor& out) {
  cpu::KlArgs a = kl_args(logprobs, ref_logprobs, kind, straight_through, log_clamp,
                          value_clamp, out);
  if (a.n) cpu::kl_penalty(a);
}

void kl_penalty_bwd_out_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                            const at::Tensor& grad, int64_t kind, bool straight_through,
                            double log_clamp, double value_clamp, const at::Tensor& out) {
  cpu::KlArgs a = kl_args(logprobs, ref_logprobs, kind, straight_through, log_clamp,
                          value_clamp, out);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == logprobs.sizes() &&
                  grad.scalar_type() == logprobs.scalar_type(),
              "grad: expected a contiguous tensor like logprobs");
  a.grad = grad.const_data_ptr();
  if (a.n) cpu::kl_penalty(a);
}

}  // namespace rlkern
