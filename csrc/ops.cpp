// Op schemas of the rlkern namespace and their CPU implementations (thin glue from tensors to
// the torch-free kernels in cpu/). CUDA implementations live in cuda_ops.cpp.
//
// Ops fill caller-provided outputs (`Tensor(a!)`); the allocating wrappers, autograd and fake
// implementations are in python/rlkern/ops/.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/advantages_ops.h"
#include "cpu/linear_logprobs.h"
#include "cpu/logprobs.h"
#include "cpu/policy_loss_ops.h"
#include "cpu/sample_ops.h"

namespace rlkern {
namespace {

cpu::DType cpu_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kDouble: return cpu::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "logits: expected bfloat16, float16, float32 or float64, got ",
                              t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows_out(const at::Tensor& out, const char* name, int64_t rows, at::ScalarType dtype,
                    const at::Tensor& logits) {
  TORCH_CHECK(out.numel() == rows && out.is_contiguous(), name, ": expected a contiguous tensor of ",
              rows, " elements, got shape ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                   out.scalar_type());
  TORCH_CHECK(out.device() == logits.device(), name, ": expected device ", logits.device());
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected a (B, L, V) view, got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1,
              "logits: the vocab (last) dim must be contiguous, got stride ", logits.stride(2));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels: expected int64, got ",
                   labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous() && labels.numel() == logits.size(0) * logits.size(1),
              "labels: expected a contiguous (B, L) tensor matching logits ", logits.sizes());
}

void logprobs_fwd_out_cpu(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                          int64_t ignore_index, const at::Tensor& logprobs, const at::Tensor& lse,
                          const std::optional<at::Tensor>& entropy,
                          const std::optional<at::Tensor>& self_certainty,
                          const std::optional<at::Tensor>& sum_p_sq) {
  check_logits(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  TORCH_CHECK(self_certainty.has_value() == sum_p_sq.has_value(),
              "self_certainty and sum_p_sq are computed together: pass both or neither");
  const int64_t rows = logits.size(0) * logits.size(1);
  const auto acc = acc_type(logits);
  check_rows_out(logprobs, "logprobs", rows, acc, logits);
  check_rows_out(lse, "lse", rows, acc, logits);
  if (entropy) check_rows_out(*entropy, "entropy", rows, acc, logits);
  if (self_certainty) check_rows_out(*self_certainty, "self_certainty", rows, acc, logits);
  if (sum_p_sq) check_rows_out(*sum_p_sq, "sum_p_sq", rows, acc, logits);
  if (rows == 0) return;
  cpu::LogprobsFwdArgs a{};
  a.logits = logits.const_data_ptr();
  a.dtype = cpu_dtype(logits);
  a.B = logits.size(0);
  a.L = logits.size(1);
  a.V = logits.size(2);
  a.stride_0 = logits.stride(0);
  a.stride_1 = logits.stride(1);
  a.labels = labels.const_data_ptr<int64_t>();
  a.temperature = temperature;
  a.ignore_index = ignore_index;
  a.logprobs = logprobs.data_ptr();
  a.lse = lse.data_ptr();
  a.entropy = entropy ? entropy->data_ptr() : nullptr;
  a.self_certainty = self_certainty ? self_certainty->data_ptr() : nullptr;
  a.sum_p_sq = sum_p_sq ? sum_p_sq->data_ptr() : nullptr;
  cpu::logprobs_fwd(a);
}

const void* maybe_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t rows,
                      at::ScalarType dtype, const at::Tensor& logits) {
  if (!t.has_value()) return nullptr;
  check_rows_out(*t, name, rows, dtype, logits);
  return t->const_data_ptr();
}

void logprobs_bwd_out_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                          const std::optional<at::Tensor>& entropy,
                          const std::optional<at::Tensor>& grad_logprobs,
                          const std::optional<at::Tensor>& grad_entropy,
                          const std::optional<at::Tensor>& grad_lse, double temperature,
                          int64_t ignore_index, const at::Tensor& grad_logits) {
  check_logits(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ",
              logits.sizes(), ", got ", grad_logits.sizes());
  TORCH_CHECK_TYPE(grad_logits.scalar_type() == logits.scalar_type(),
                   "grad_logits: expected dtype ", logits.scalar_type());
  TORCH_CHECK(grad_logits.size(2) <= 1 || grad_logits.stride(2) == 1,
              "grad_logits: the vocab (last) dim must be contiguous");
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(),
              "entropy: required when grad_entropy is given");
  const int64_t rows = logits.size(0) * logits.size(1);
  if (rows == 0) return;
  const auto acc = acc_type(logits);
  cpu::LogprobsBwdArgs a{};
  a.logits = logits.const_data_ptr();
  a.dtype = cpu_dtype(logits);
  a.B = logits.size(0);
  a.L = logits.size(1);
  a.V = logits.size(2);
  a.stride_0 = logits.stride(0);
  a.stride_1 = logits.stride(1);
  a.labels = labels.const_data_ptr<int64_t>();
  a.lse = maybe_ptr(lse, "lse", rows, acc, logits);
  a.entropy = maybe_ptr(entropy, "entropy", rows, acc, logits);
  a.grad_logprobs = maybe_ptr(grad_logprobs, "grad_logprobs", rows, acc, logits);
  a.grad_entropy = maybe_ptr(grad_entropy, "grad_entropy", rows, acc, logits);
  a.grad_lse = maybe_ptr(grad_lse, "grad_lse", rows, acc, logits);
  a.temperature = temperature;
  a.ignore_index = ignore_index;
  a.grad_logits = grad_logits.data_ptr();
  a.grad_stride_0 = grad_logits.stride(0);
  a.grad_stride_1 = grad_logits.stride(1);
  cpu::logprobs_bwd(a);
}

void check_tile(const at::Tensor& tile, const at::Tensor& labels, const char* name) {
  TORCH_CHECK(tile.dim() == 2 && (tile.size(1) <= 1 || tile.stride(1) == 1), name,
              ": expected a 2-D tile with contiguous columns, got sizes ", tile.sizes(),
              " strides ", tile.strides());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                       labels.numel() == tile.size(0),
                   "labels: expected a contiguous int64 tensor of ", tile.size(0), " elements");
}

void linear_logprobs_tile_fwd_cpu(const at::Tensor& tile, const at::Tensor& labels,
                                  int64_t vocab_offset, double temperature, int64_t ignore_index,
                                  bool with_entropy, const at::Tensor& stats) {
  check_tile(tile, labels, "tile");
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                  stats.dim() == 2 && stats.size(0) == tile.size(0) &&
                  stats.size(1) == cpu::kLinearStatsWidth,
              "stats: expected a contiguous float64 (n, 4) tensor, got ", stats.sizes());
  if (tile.numel() == 0) return;
  cpu::LinearTileArgs a{};
  a.tile = tile.const_data_ptr();
  a.dtype = cpu_dtype(tile);
  a.n = tile.size(0);
  a.vt = tile.size(1);
  a.stride_row = tile.stride(0);
  a.vocab_offset = vocab_offset;
  a.labels = labels.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  a.with_entropy = with_entropy;
  a.stats = stats.data_ptr<double>();
  cpu::linear_logprobs_tile_fwd(a);
}

void linear_logprobs_finish_out_cpu(const at::Tensor& stats, const at::Tensor& labels,
                                    double temperature, int64_t ignore_index,
                                    const at::Tensor& logprobs, const at::Tensor& lse,
                                    const std::optional<at::Tensor>& entropy) {
  const int64_t n = labels.numel();
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                  stats.numel() == n * cpu::kLinearStatsWidth,
              "stats: expected a contiguous float64 (n, 4) tensor");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && labels.is_contiguous(),
                   "labels: expected contiguous int64");
  const auto dtype = logprobs.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "logprobs: expected float32/64");
  check_rows_out(logprobs, "logprobs", n, dtype, stats);
  check_rows_out(lse, "lse", n, dtype, stats);
  if (entropy) check_rows_out(*entropy, "entropy", n, dtype, stats);
  cpu::linear_logprobs_finish(stats.const_data_ptr<double>(), labels.const_data_ptr<int64_t>(), n,
                              ignore_index, temperature, dtype == at::kDouble,
                              logprobs.data_ptr(), lse.data_ptr(),
                              entropy ? entropy->data_ptr() : nullptr);
}

void linear_logprobs_tile_bwd_cpu(const at::Tensor& tile, const at::Tensor& labels,
                                  int64_t vocab_offset, const at::Tensor& lse,
                                  const std::optional<at::Tensor>& entropy,
                                  const std::optional<at::Tensor>& grad_logprobs,
                                  const std::optional<at::Tensor>& grad_entropy,
                                  const std::optional<at::Tensor>& grad_lse, double temperature,
                                  int64_t ignore_index, const at::Tensor& grad_tile) {
  check_tile(tile, labels, "tile");
  check_tile(grad_tile, labels, "grad_tile");
  TORCH_CHECK(grad_tile.sizes() == tile.sizes() && grad_tile.scalar_type() == tile.scalar_type(),
              "grad_tile: expected the tile's shape and dtype");
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(),
              "entropy: required when grad_entropy is given");
  const int64_t n = tile.size(0);
  if (tile.numel() == 0) return;
  const auto acc = acc_type(tile);
  cpu::LinearTileArgs a{};
  a.tile = tile.const_data_ptr();
  a.grad_tile = grad_tile.data_ptr();
  a.dtype = cpu_dtype(tile);
  a.n = n;
  a.vt = tile.size(1);
  a.stride_row = tile.stride(0);
  a.grad_stride_row = grad_tile.stride(0);
  a.vocab_offset = vocab_offset;
  a.labels = labels.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  a.lse = maybe_ptr(lse, "lse", n, acc, tile);
  a.entropy = maybe_ptr(entropy, "entropy", n, acc, tile);
  a.grad_logprobs = maybe_ptr(grad_logprobs, "grad_logprobs", n, acc, tile);
  a.grad_entropy = maybe_ptr(grad_entropy, "grad_entropy", n, acc, tile);
  a.grad_lse = maybe_ptr(grad_lse, "grad_lse", n, acc, tile);
  cpu::linear_logprobs_tile_bwd(a);
}

}  // namespace

TORCH_LIBRARY(rlkern, m) {
  m.def(
      "logprobs_fwd_out(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "Tensor(a!) logprobs, Tensor(b!) lse, Tensor(c!)? entropy, Tensor(d!)? self_certainty, "
      "Tensor(e!)? sum_p_sq) -> ()");
  m.def(
      "logprobs_bwd_out(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, float temperature, "
      "int ignore_index, Tensor(a!) grad_logits) -> ()");
  m.def(
      "linear_logprobs_tile_fwd_(Tensor tile, Tensor labels, int vocab_offset, float temperature, "
      "int ignore_index, bool with_entropy, Tensor(a!) stats) -> ()");
  m.def(
      "linear_logprobs_finish_out(Tensor stats, Tensor labels, float temperature, "
      "int ignore_index, Tensor(a!) logprobs, Tensor(b!) lse, Tensor(c!)? entropy) -> ()");
  m.def(
      "linear_logprobs_tile_bwd_(Tensor tile, Tensor labels, int vocab_offset, Tensor lse, "
      "Tensor? entropy, Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, "
      "float temperature, int ignore_index, Tensor(a!) grad_tile) -> ()");
  // Group advantages and the §2.1 helpers (schemas in cpu/advantages_ops.cpp).
  for (const char* schema :
       {kGroupAdvantagesOutSchema, kGroupMomentsOutSchema, kGroupFinishOutSchema,
        kGroupMomentsMergeOutSchema, kDiscountedReturnsOutSchema, kPositionBaselineOutSchema,
        kGtpoWeightsOutSchema, kGigpoAdvantagesOutSchema, kEmpgModulateOutSchema,
        kGroupSegmentStatsOutSchema, kGroupRowsFinishOutSchema})
    m.def(schema);
  // Policy losses and the KL estimators (schemas in cpu/policy_loss_ops.cpp).
  for (const char* schema : {kPolicyLossFwdOutSchema, kPolicyLossBwdOutSchema,
                             kKlPenaltyFwdOutSchema, kKlPenaltyBwdOutSchema})
    m.def(schema);
  // Sampler (schema in cpu/sample_ops.cpp).
  m.def(kSampleOutSchema);
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("logprobs_fwd_out", &logprobs_fwd_out_cpu);
  m.impl("logprobs_bwd_out", &logprobs_bwd_out_cpu);
  m.impl("linear_logprobs_tile_fwd_", &linear_logprobs_tile_fwd_cpu);
  m.impl("linear_logprobs_finish_out", &linear_logprobs_finish_out_cpu);
  m.impl("linear_logprobs_tile_bwd_", &linear_logprobs_tile_bwd_cpu);
  register_advantages_cpu(m);  // cpu/advantages_ops.cpp
  m.impl("policy_loss_fwd_out", &policy_loss_fwd_out_cpu);
  m.impl("policy_loss_bwd_out", &policy_loss_bwd_out_cpu);
  m.impl("kl_penalty_fwd_out", &kl_penalty_fwd_out_cpu);
  m.impl("kl_penalty_bwd_out", &kl_penalty_bwd_out_cpu);
  m.impl("sample_out", &sample_out_cpu);
}

}  // namespace rlkern
