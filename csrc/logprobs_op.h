// The logprobs family as the binding layer sees it — token_logprobs' logprobs_fwd_out /
// logprobs_bwd_out and the CPU epilogues of the fused linear form (linear_logprobs_*): the op
// schemas and the argument checks, shared by the CPU glue (cpu/logprobs_ops.cpp,
// cpu/linear_logprobs_ops.cpp) and the CUDA glue (cuda/logprobs_ops.cpp), so that both backends
// accept the same arguments and reject the rest with the same messages.
//
// The per-row outputs travel as ONE list, `Tensor?[] outputs`, indexed by
// rlkern::logprobs::Output (rlkern/logprobs.h); a backward takes the forward's `outputs` and
// their upstream gradients `grad_outputs`, indexed the same way. Every entry is a contiguous
// array of one value per row in the accumulation dtype (float32; float64 for float64 logits).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>

#include "checks.h"
#include "op_schema.h"
#include "rlkern/logprobs.h"

namespace rlkern::logprobs {

inline constexpr OpSchema kFwdOut{
    "logprobs_fwd_out",
    "logprobs_fwd_out(Tensor logits, Tensor labels, float temperature, int ignore_index, "
    "Tensor(a!)?[] outputs) -> ()"};
// grad_logits may be logits itself (in-place backward).
inline constexpr OpSchema kBwdOut{
    "logprobs_bwd_out",
    "logprobs_bwd_out(Tensor logits, Tensor labels, Tensor?[] outputs, Tensor?[] grad_outputs, "
    "float temperature, int ignore_index, Tensor(a!) grad_logits) -> ()"};
// The fused linear form (CPU): fold a logits tile into the running `stats`, turn them into the
// outputs, and turn a recomputed tile into its gradient (grad_tile may be tile itself).
// `softcap` c > 0: the logits are z = c·tanh(x/c) of the tile's x (0: z = x); the backward's
// grad_tile is then ∂L/∂x = ∂L/∂z · (1 − tanh²(x/c)).
inline constexpr OpSchema kLinearTileFwd{
    "linear_logprobs_tile_fwd_",
    "linear_logprobs_tile_fwd_(Tensor tile, Tensor labels, int vocab_offset, float temperature, "
    "int ignore_index, bool with_entropy, Tensor(a!) stats, float softcap=0.0) -> ()"};
inline constexpr OpSchema kLinearFinishOut{
    "linear_logprobs_finish_out",
    "linear_logprobs_finish_out(Tensor stats, Tensor labels, float temperature, "
    "int ignore_index, Tensor(a!)?[] outputs) -> ()"};
// `stats` (optional): complete row summaries (the (n, kNumStats) float64 state after every
// tile); rows whose m is not NaN take their gradient from it, exactly, rather than from the
// forward's rounded lse — the caller passes it for rows whose |lse| ≥ kBwdLseBound.
inline constexpr OpSchema kLinearTileBwd{
    "linear_logprobs_tile_bwd_",
    "linear_logprobs_tile_bwd_(Tensor tile, Tensor labels, int vocab_offset, Tensor?[] outputs, "
    "Tensor?[] grad_outputs, float temperature, int ignore_index, Tensor(a!) grad_tile, "
    "Tensor? stats=None, float softcap=0.0) -> ()"};

// The CPU backend's forward and backward as single calls, for python/rlkern/ops/logprobs.py's
// CPU path: a call of token_logprobs' size is dominated by its fixed cost at small N, which
// these keep in C++ (docs/logprobs.md, "Fixed cost of a call"). They take the user's tensors:
// logits (..., V) with a contiguous vocab dim and any other strides, labels of
// logits.shape[:-1] (int32 or int64), per-row tensors of that shape with any strides.
// logprobs_fwd_cpu allocates the outputs (in the order of Output, shape logits.shape[:-1];
// those not asked for are empty float32) and, with check_data, raises ValueError for a label
// outside [0, V) that is not ignore_index and for a row of all −inf logits.
// logprobs_bwd_cpu writes the gradient into grad_logits (logits' shape; may be logits itself).
inline constexpr OpSchema kFwdCpu{
    "logprobs_fwd_cpu",
    "logprobs_fwd_cpu(Tensor logits, Tensor labels, float temperature, int ignore_index, "
    "bool with_entropy, bool with_stats, bool check_data) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"};
inline constexpr OpSchema kBwdCpu{
    "logprobs_bwd_cpu",
    "logprobs_bwd_cpu(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, "
    "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, float temperature, "
    "int ignore_index, Tensor(a!) grad_logits) -> ()"};

inline constexpr OpSchema kOps[] = {kFwdOut,        kBwdOut,          kLinearTileFwd,
                                    kLinearFinishOut, kLinearTileBwd, kFwdCpu, kBwdCpu};

// A `Tensor?[]` argument.
using TensorList = c10::List<std::optional<at::Tensor>>;
// The data pointers of a list indexed by Output (nullptr where the entry is absent).
using RowPointers = std::array<void*, kNumOutputs>;

// "logprobs, lse, ...": the entries of a list indexed by Output, for messages.
inline std::string output_names() {
  std::string names;
  for (int o = 0; o < kNumOutputs; ++o) names += std::string(o ? ", " : "") + kOutputNames[o];
  return names;
}

// Checks a list indexed by Output — its length, and every given entry a contiguous array of
// `rows` elements of `acc` on `like`'s device — and returns its data pointers (`written`: the
// op writes the entries; read-only entries are not made writable). Messages name the entry
// (`prefix` + output name, e.g. "grad_entropy").
inline RowPointers row_pointers(const TensorList& list, const char* what, const char* prefix,
                                int64_t rows, at::ScalarType acc, const at::Tensor& like,
                                bool written) {
  TORCH_CHECK(list.size() == static_cast<size_t>(kNumOutputs), what, ": expected ",
              int(kNumOutputs), " entries (", output_names(), "), got ", list.size());
  RowPointers ptr{};
  for (int o = 0; o < kNumOutputs; ++o) {
    const std::optional<at::Tensor> t = list.get(o);
    if (!t.has_value()) continue;
    const std::string name = std::string(prefix) + kOutputNames[o];
    checks::array(*t, name.c_str(), rows, acc, like);
    ptr[o] = written ? t->data_ptr() : const_cast<void*>(t->const_data_ptr());
  }
  return ptr;
}

// The forward's `outputs`: logprobs and lse always; entropy optional; self_certainty and
// sum_p_sq together or not at all (`with_stats`: whether the op can compute them).
inline RowPointers fwd_outputs(const TensorList& outputs, int64_t rows, at::ScalarType acc,
                               const at::Tensor& like, bool with_stats = true) {
  const RowPointers out = row_pointers(outputs, "outputs", "", rows, acc, like, true);
  TORCH_CHECK(out[kLogprobs] != nullptr && out[kLse] != nullptr,
              "outputs: logprobs and lse are required");
  TORCH_CHECK((out[kSelfCertainty] == nullptr) == (out[kSumPSq] == nullptr),
              "self_certainty and sum_p_sq are computed together: pass both or neither");
  TORCH_CHECK(with_stats || out[kSelfCertainty] == nullptr,
              "outputs: self_certainty and sum_p_sq are not computed by this op");
  return out;
}

// A backward's per-row inputs hold what it reads: the forward's lse always, its entropy for an
// entropy gradient (bwd_rows below; logprobs_bwd_cpu).
inline void check_grad_inputs(const GradInputs& in) {
  TORCH_CHECK(in.lse != nullptr, "lse: the forward's lse is required by the backward");
  TORCH_CHECK(in.grad_entropy == nullptr || in.entropy != nullptr,
              "entropy: required when grad_entropy is given");
}

// What a backward reads per row (rlkern/logprobs.h GradInputs), from the forward's `outputs`
// (lse; entropy for an entropy gradient) and the upstream `grad_outputs` of the
// differentiable outputs.
inline GradInputs bwd_rows(const TensorList& outputs, const TensorList& grad_outputs,
                           int64_t rows, at::ScalarType acc, const at::Tensor& like) {
  const RowPointers out = row_pointers(outputs, "outputs", "", rows, acc, like, false);
  const RowPointers grad =
      row_pointers(grad_outputs, "grad_outputs", "grad_", rows, acc, like, false);
  for (int o = 0; o < kNumOutputs; ++o) {
    TORCH_CHECK(differentiable(o) || grad[o] == nullptr, "grad_", kOutputNames[o], ": ",
                kOutputNames[o], " is not differentiable");
  }
  const GradInputs in{out[kLse], out[kEntropy], grad[kLogprobs], grad[kEntropy], grad[kLse]};
  check_grad_inputs(in);
  return in;
}

inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
}

// logits: a (B, L, V) view with a contiguous vocab dim (any other strides); labels: contiguous
// int64 (B, L) on the same device.
inline void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected a (B, L, V) view, got ", logits.dim(),
              " dims");
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1,
              "logits: the vocab (last) dim must be contiguous, got stride ", logits.stride(2));
  checks::array(labels, "labels", logits.size(0) * logits.size(1), at::kLong, logits);
}

// grad_logits: the logits' shape and dtype, on their device, vocab dim contiguous.
inline void check_grad_logits(const at::Tensor& grad_logits, const at::Tensor& logits) {
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits: expected shape ",
              logits.sizes(), ", got ", grad_logits.sizes());
  checks::dtype(grad_logits, "grad_logits", logits.scalar_type());
  checks::same_device(grad_logits, "grad_logits", logits);
  TORCH_CHECK(grad_logits.size(2) <= 1 || grad_logits.stride(2) == 1,
              "grad_logits: the vocab (last) dim must be contiguous");
}

// A (n, vt) logits tile with contiguous columns and its n contiguous int64 labels.
inline void check_tile(const at::Tensor& tile, const at::Tensor& labels, const char* name) {
  TORCH_CHECK(tile.dim() == 2 && (tile.size(1) <= 1 || tile.stride(1) == 1), name,
              ": expected a 2-D tile with contiguous columns, got sizes ", tile.sizes(),
              " strides ", tile.strides());
  checks::array(labels, "labels", tile.size(0), at::kLong, tile);
}

// The C++ signatures of logprobs_fwd_out / logprobs_bwd_out, written once for both backends:
// the shared checks, then `Launch` with the checked pointers, which does the backend's part
// (registered as m.impl(kFwdOut.name, &fwd_out<&launch>)). Nothing is launched for empty
// inputs.
//   Launch(logits, labels, temperature, ignore_index, const RowPointers& outputs)
template <auto Launch>
void fwd_out(const at::Tensor& logits, const at::Tensor& labels, double temperature,
             int64_t ignore_index, const TensorList& outputs) {
  check_logits(logits, labels);
  check_temperature(temperature);
  const RowPointers out = fwd_outputs(outputs, labels.numel(), checks::acc_dtype(logits), logits);
  if (labels.numel() > 0) Launch(logits, labels, temperature, ignore_index, out);
}

//   Launch(logits, labels, const GradInputs& in, temperature, ignore_index, grad_logits);
// grad_logits may be logits itself (in-place backward).
template <auto Launch>
void bwd_out(const at::Tensor& logits, const at::Tensor& labels, const TensorList& outputs,
             const TensorList& grad_outputs, double temperature, int64_t ignore_index,
             const at::Tensor& grad_logits) {
  check_logits(logits, labels);
  check_temperature(temperature);
  check_grad_logits(grad_logits, logits);
  const GradInputs in =
      bwd_rows(outputs, grad_outputs, labels.numel(), checks::acc_dtype(logits), logits);
  if (labels.numel() > 0 && logits.size(2) > 0) {
    Launch(logits, labels, in, temperature, ignore_index, grad_logits);
  }
}

// The fused linear op's running state: a contiguous float64 (n, kNumStats) tensor.
inline void check_stats(const at::Tensor& stats, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == linear_logprobs::kNumStats, "stats: expected ",
              "a (n, ", int(linear_logprobs::kNumStats), ") tensor, got ", stats.sizes());
  checks::array(stats, "stats", n * linear_logprobs::kNumStats, at::kDouble, like);
}

}  // namespace rlkern::logprobs
