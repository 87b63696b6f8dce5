// Glue from tensors to the eager16 kernels (eager16.h). The Python layer
// (python/rlkern/ops/eager16.py) validates the user's arguments with friendly messages; these
// checks guard the raw pointers against any other caller.
#include "cpu/eager16_ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/eager16.h"
#include "cpu/glue.h"
#include "cpu/logits_args.h"

namespace rlkern {

const char* const kEager16LogSoftmaxStatsOutSchema =
    "eager16_log_softmax_stats_out(Tensor logits, Tensor(a!) shift, Tensor(b!) log_s) -> ()";
const char* const kEager16EntropyTermsOutSchema =
    "eager16_entropy_terms_out(Tensor logits, Tensor shift, Tensor log_s, int first, "
    "Tensor(a!) terms) -> ()";

namespace {

// (N, V) or (B, L, V) bf16 / fp16 logits with a contiguous vocab dim, read in place as the
// fold reads them (cpu::rows3d: strided leading dims too).
cpu::LogitsLayout layout_of(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits: expected bfloat16 or float16, got ", dtype);
  const at::Tensor logits3 = cpu::rows3d(logits);
  TORCH_CHECK(logits3.size(2) <= 1 || logits3.stride(2) == 1,
              "logits: the vocab dim must be contiguous");
  TORCH_CHECK(logits3.size(2) > 0 || logits3.numel() == 0, "logits: rows of no logits (V = 0)");
  return cpu::logits_layout(logits3);
}

void log_softmax_stats_out_cpu(const at::Tensor& logits, const at::Tensor& shift,
                               const at::Tensor& log_s) {
  const cpu::LogitsLayout a = layout_of(logits);
  const int64_t rows = a.B * a.L;
  checks::array(shift, "shift", rows, at::kFloat, logits);
  checks::array(log_s, "log_s", rows, at::kFloat, logits);
  if (rows == 0) return;
  cpu::log_softmax_stats_16bit(a, shift.data_ptr<float>(), log_s.data_ptr<float>());
}

// terms: (count, V), the terms of rows first … first + count − 1.
void entropy_terms_out_cpu(const at::Tensor& logits, const at::Tensor& shift,
                           const at::Tensor& log_s, int64_t first, const at::Tensor& terms) {
  const cpu::LogitsLayout a = layout_of(logits);
  const int64_t rows = a.B * a.L;
  checks::array(shift, "shift", rows, at::kFloat, logits);
  checks::array(log_s, "log_s", rows, at::kFloat, logits);
  TORCH_CHECK(terms.dim() == 2 && terms.size(1) == a.V, "terms: expected shape (count, ", a.V,
              "), got ", terms.sizes());
  const int64_t count = terms.size(0);
  TORCH_CHECK(first >= 0 && first + count <= rows, "terms: rows ", first, " to ",
              first + count, " of ", rows);
  checks::array(terms, "terms", count * a.V, logits.scalar_type(), logits);
  if (count == 0) return;
  cpu::entropy_terms_16bit(a, first, count, shift.const_data_ptr<float>() + first,
                           log_s.const_data_ptr<float>() + first, terms.data_ptr());
}

// Fill caller-provided outputs only: on meta tensors there is nothing to compute; a meta
// tensor among CPU ones is an argument on the wrong device, refused by name.
void log_softmax_stats_out_meta(const at::Tensor& logits, const at::Tensor& shift,
                                const at::Tensor& log_s) {
  checks::same_device(shift, "shift", logits);
  checks::same_device(log_s, "log_s", logits);
}

void entropy_terms_out_meta(const at::Tensor& logits, const at::Tensor& shift,
                            const at::Tensor& log_s, int64_t /*first*/,
                            const at::Tensor& terms) {
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
