// The sampler as the binding layer sees it (rlkern::sample_out): its schema and the argument
// checks, shared by the CPU glue (cpu/sample_ops.cpp) and the CUDA glue (cuda/sample_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"
#include "op_schema.h"
#include "rlkern/sample.h"

namespace rlkern::sample {

// `joint` is filter_order == kJoint (rlkern/sample.h); per-row filters are None when off.
inline constexpr OpSchema kSampleOut{
    "sample_out",
    "sample_out(Tensor logits, Tensor? indices, Tensor temperature, Tensor? top_k, "
    "Tensor? top_p, Tensor? min_p, Tensor seeds, Tensor steps, bool joint, bool raw_temperature, "
    "Tensor(a!) tokens, Tensor(b!) raw_logprobs, Tensor(c!) processed_logprobs, "
    "Tensor(d!)? entropy, Tensor(e!) lse) -> ()"};

// sample_out with G = num_samples draws per row from one filtering pass: the per-row inputs
// have n entries, the outputs n·G (row i, draw j at i·G + j; draw j uses Philox index j).
inline constexpr OpSchema kSampleNOut{
    "sample_n_out",
    "sample_n_out(Tensor logits, Tensor? indices, Tensor temperature, Tensor? top_k, "
    "Tensor? top_p, Tensor? min_p, Tensor seeds, Tensor steps, bool joint, bool raw_temperature, "
    "int num_samples, Tensor(a!) tokens, Tensor(b!) raw_logprobs, "
    "Tensor(c!) processed_logprobs, Tensor(d!)? entropy, Tensor(e!) lse) -> ()"};

inline constexpr OpSchema kOps[] = {kSampleOut, kSampleNOut};

// Sizes of a sampler call: logits (R, V) with row stride `stride_row`, N output rows, G draws
// per source row (N / G source rows).
struct Shape {
  int64_t R, V, stride_row, N;
  int64_t G = 1;
};

// Checks every argument of sample_out but the values of `indices` (a host read: the CPU glue
// range-checks them, the CUDA glue leaves it to the Python layer, where it costs one sync) and
// returns the shape and the row arrays.
inline Shape check_sample(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                          const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                          const std::optional<at::Tensor>& top_p,
                          const std::optional<at::Tensor>& min_p, const at::Tensor& seeds,
                          const at::Tensor& steps, const at::Tensor& tokens,
                          const at::Tensor& raw_logprobs, const at::Tensor& processed_logprobs,
                          const std::optional<at::Tensor>& entropy, const at::Tensor& lse,
                          RowArrays& rows, int64_t G = 1) {
  TORCH_CHECK(G >= 1, "num_samples: expected >= 1, got ", G);
  TORCH_CHECK(logits.dim() == 2, "logits: expected (R, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: the vocab (last) dim must be contiguous");
  const int64_t R = logits.size(0), V = logits.size(1), N = tokens.numel();
  TORCH_CHECK(V > 0 || N == 0, "logits: empty vocabulary");
  TORCH_CHECK(N % G == 0, "tokens: ", N, " rows is not a multiple of num_samples = ", G);
  const int64_t n = N / G;  // source rows
  TORCH_CHECK(indices.has_value() || n == R, "tokens: expected ", R * G,
              " rows without indices, got ", N);
  checks::array(tokens, "tokens", N, at::kLong, logits);
  checks::array(raw_logprobs, "raw_logprobs", N, at::kFloat, logits);
  checks::array(processed_logprobs, "processed_logprobs", N, at::kFloat, logits);
  checks::array(lse, "lse", N, at::kFloat, logits);
  checks::array(temperature, "temperature", n, at::kDouble, logits);
  checks::array(seeds, "seeds", n, at::kLong, logits);
  checks::array(steps, "steps", n, at::kLong, logits);
  rows.indices = checks::maybe_array<int64_t>(indices, "indices", n, at::kLong, logits);
  rows.temperature = temperature.const_data_ptr<double>();
  rows.top_k = checks::maybe_array<int64_t>(top_k, "top_k", n, at::kLong, logits);
  rows.top_p = checks::maybe_array<double>(top_p, "top_p", n, at::kDouble, logits);
  rows.min_p = checks::maybe_array<double>(min_p, "min_p", n, at::kDouble, logits);
  rows.seeds = seeds.const_data_ptr<int64_t>();
  rows.steps = steps.const_data_ptr<int64_t>();
  rows.tokens = tokens.data_ptr<int64_t>();
  rows.raw_logprobs = raw_logprobs.data_ptr<float>();
  rows.processed_logprobs = processed_logprobs.data_ptr<float>();
  rows.entropy = checks::maybe_out<float>(entropy, "entropy", N, at::kFloat, logits);
  rows.lse = lse.data_ptr<float>();
  // A single row may have any stride: it is never used to step to another row.
  return {R, V, R > 1 ? logits.stride(0) : V, N, G};
}

// The C++ signature of sample_out, written once for both backends: the shared checks, then
//   Launch(logits, const Shape&, const RowArrays&, joint, raw_temperature)
// with the backend's part (registered as m.impl(kSampleOut.name, &sample_out<&launch>)).
template <auto Launch>
void sample_out(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
                const at::Tensor& seeds, const at::Tensor& steps, bool joint,
                bool raw_temperature, const at::Tensor& tokens, const at::Tensor& raw_logprobs,
                const at::Tensor& processed_logprobs, const std::optional<at::Tensor>& entropy,
                const at::Tensor& lse) {
  RowArrays rows{};
  const Shape shape = check_sample(logits, indices, temperature, top_k, top_p, min_p, seeds,
                                   steps, tokens, raw_logprobs, processed_logprobs, entropy, lse,
                                   rows);
  Launch(logits, shape, rows, joint, raw_temperature);
}

// sample_n_out: sample_out's arguments with num_samples before the outputs.
template <auto Launch>
void sample_n_out(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                  const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                  const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
                  const at::Tensor& seeds, const at::Tensor& steps, bool joint,
                  bool raw_temperature, int64_t num_samples, const at::Tensor& tokens,
                  const at::Tensor& raw_logprobs, const at::Tensor& processed_logprobs,
                  const std::optional<at::Tensor>& entropy, const at::Tensor& lse) {
  RowArrays rows{};
  const Shape shape = check_sample(logits, indices, temperature, top_k, top_p, min_p, seeds,
                                   steps, tokens, raw_logprobs, processed_logprobs, entropy, lse,
                                   rows, num_samples);
  Launch(logits, shape, rows, joint, raw_temperature);
}

}  // namespace rlkern::sample
