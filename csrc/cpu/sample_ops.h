// CPU implementation of the sampler op (schema below, registered in csrc/ops.cpp): thin glue
// from tensors to the torch-free kernel of cpu/sample.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

extern const char* const kSampleOutSchema;

void sample_out_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& indices,
                    const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
                    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
                    const at::Tensor& seeds, const at::Tensor& steps, bool joint,
                    bool raw_temperature, const at::Tensor& tokens, const at::Tensor& raw_logprobs,
                    const at::Tensor& processed_logprobs, const std::optional<at::Tensor>& entropy,
                    const at::Tensor& lse);

}  // namespace rlkern
