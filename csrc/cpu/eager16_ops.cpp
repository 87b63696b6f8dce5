// Glue from tensors to the eager16 kernels (eager16.h). The Python layer
// (python/rlkern/ops/eager16.py) validates the user's arguments with friendly messages; these
// checks guard the raw pointers against any other caller.
#include "cpu/eager16_ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/eager16.h"

namespace rlkern {

const char* const kEager16LogSoftmaxStatsOutSchema =
    "eager16_log_softmax_stats_out(Tensor logits, Tensor(a!) shift, Tensor(b!) log_s) -> ()";
const char* const kEager16EntropyTermsOutSchema =
    "eager16_entropy_terms_out(Tensor logits, Tensor shift, Tensor log_s, Tensor(a!) terms) "
    "-> ()";

namespace {

// (rows, V) bf16 / fp16 logits with a contiguous vocab dim, as the kernels read them.
cpu::Eager16Rows rows_of(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a (rows, V) tensor, got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits: expected bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: the vocab dim must be contiguous");
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "logits: rows of no logits (V = 0)");
  return {logits.const_data_ptr(),
          dtype == at::kBFloat16 ? cpu::DType::kBFloat16 : cpu::DType::kFloat16,
          logits.size(0), logits.size(1), logits.stride(0)};
}

void log_softmax_stats_out_cpu(const at::Tensor& logits, const at::Tensor& shift,
                               const at::Tensor& log_s) {
  const cpu::Eager16Rows rows = rows_of(logits);
  checks::array(shift, "shift", rows.rows, at::kFloat, logits);
  checks::array(log_s, "log_s", rows.rows, at::kFloat, logits);
  if (rows.rows == 0) return;
  cpu::log_softmax_stats_16bit(rows, shift.data_ptr<float>(), log_s.data_ptr<float>());
}

void entropy_terms_out_cpu(const at::Tensor& logits, const at::Tensor& shift,
                           const at::Tensor& log_s, const at::Tensor& terms) {
  const cpu::Eager16Rows rows = rows_of(logits);
  checks::array(shift, "shift", rows.rows, at::kFloat, logits);
  checks::array(log_s, "log_s", rows.rows, at::kFloat, logits);
  checks::array(terms, "terms", rows.rows * rows.vocab, logits.scalar_type(), logits);
  if (rows.rows == 0) return;
  cpu::entropy_terms_16bit(rows, shift.const_data_ptr<float>(), log_s.const_data_ptr<float>(),
                           terms.data_ptr());
}

// Fill caller-provided outputs only: on meta tensors there is nothing to compute; a meta
// tensor among CPU ones is an argument on the wrong device, refused by name.
void log_softmax_stats_out_meta(const at::Tensor& logits, const at::Tensor& shift,
                                const at::Tensor& log_s) {
  checks::same_device(shift, "shift", logits);
  checks::same_device(log_s, "log_s", logits);
}

void entropy_terms_out_meta(const at::Tensor& logits, const at::Tensor& shift,
                            const at::Tensor& log_s, const at::Tensor& terms) {
  log_softmax_stats_out_meta(logits, shift, log_s);
  checks::same_device(terms, "terms", logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("eager16_log_softmax_stats_out", &log_softmax_stats_out_meta);
  m.impl("eager16_entropy_terms_out", &entropy_terms_out_meta);
}

void register_eager16_cpu(torch::Library& m) {
  m.impl("eager16_log_softmax_stats_out", &log_softmax_stats_out_cpu);
  m.impl("eager16_entropy_terms_out", &entropy_terms_out_cpu);
}

}  // namespace rlkern
