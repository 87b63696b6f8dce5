#include "cpu/sample_ops.h"

#include <c10/util/Exception.h>

#include "cpu/sample.h"

namespace rlkern {

const char* const kSampleOutSchema =
    "sample_out(Tensor logits, Tensor? indices, Tensor temperature, Tensor? top_k, "
    "Tensor? top_p, Tensor? min_p, Tensor seeds, Tensor steps, bool joint, bool raw_temperature, "
    "Tensor(a!) tokens, Tensor(b!) raw_logprobs, Tensor(c!) processed_logprobs, "
    "Tensor(d!)? entropy, Tensor(e!) lse) -> ()";

namespace {

void check_vec(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.is_contiguous(), name,
              ": expected a contiguous 1-D tensor of ", n, " elements, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t n,
                 at::ScalarType dtype) {
  if (!t.has_value()) return nullptr;
  check_vec(*t, name, n, dtype);
  return t->const_data_ptr<T>();
}

cpu::DType sample_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kDouble: return cpu::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "logits: expected bfloat16, float16, float32 or float64, got ",
                              t.scalar_type());
  }
}

}  // namespace

void sample_out_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                    const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
                    const at::Tensor& seeds, const at::Tensor& steps, bool joint,
                    bool raw_temperature, const at::Tensor& tokens, const at::Tensor& raw_logprobs,
                    const at::Tensor& processed_logprobs, const std::optional<at::Tensor>& entropy,
                    const at::Tensor& lse) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected (R, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: the vocab (last) dim must be contiguous");
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor");
  const int64_t R = logits.size(0), V = logits.size(1);
  const int64_t N = tokens.numel();
  TORCH_CHECK(V > 0 || N == 0, "logits: empty vocabulary");
  check_vec(tokens, "tokens", N, at::kLong);
  check_vec(raw_logprobs, "raw_logprobs", N, at::kFloat);
  check_vec(processed_logprobs, "processed_logprobs", N, at::kFloat);
  check_vec(lse, "lse", N, at::kFloat);
  check_vec(temperature, "temperature", N, at::kDouble);
  check_vec(seeds, "seeds", N, at::kLong);
  check_vec(steps, "steps", N, at::kLong);
  const int64_t* idx = opt_ptr<int64_t>(indices, "indices", N, at::kLong);
  if (idx) {
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < R, "indices: value ", idx[i], " at ", i,
                        " is outside [0, ", R, ")");
  } else {
    TORCH_CHECK(N == R, "tokens: expected ", R, " rows without indices, got ", N);
  }
  cpu::SampleArgs a{};
  a.logits = logits.const_data_ptr();
  a.dtype = sample_dtype(logits);
  a.R = R;
  a.V = V;
  a.stride_row = R > 1 ? logits.stride(0) : V;
  a.N = N;
  a.indices = idx;
  a.temperature = temperature.const_data_ptr<double>();
  a.top_k = opt_ptr<int64_t>(top_k, "top_k", N, at::kLong);
  a.top_p = opt_ptr<double>(top_p, "top_p", N, at::kDouble);
  a.min_p = opt_ptr<double>(min_p, "min_p", N, at::kDouble);
  a.seeds = seeds.const_data_ptr<int64_t>();
  a.steps = steps.const_data_ptr<int64_t>();
  a.joint = joint;
  a.raw_temperature = raw_temperature;
  a.tokens = tokens.data_ptr<int64_t>();
  a.raw_logprobs = raw_logprobs.data_ptr<float>();
  a.processed_logprobs = processed_logprobs.data_ptr<float>();
  a.entropy = nullptr;
  if (entropy.has_value()) {
    check_vec(*entropy, "entropy", N, at::kFloat);
    a.entropy = entropy->data_ptr<float>();
  }
  a.lse = lse.data_ptr<float>();
  cpu::sample(a);
}

}  // namespace rlkern
