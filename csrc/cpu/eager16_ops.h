// The schemas and CPU implementations of the eager16 ops (registered by csrc/ops.cpp): glue
// from tensors to the torch-free kernels of eager16.h.
#pragma once

namespace torch {
class Library;
}  // namespace torch

namespace rlkern {

extern const char* const kEager16LogSoftmaxStatsOutSchema;
extern const char* const kEager16EntropyTermsOutSchema;

// The CPU implementations (and the meta kernels) of the eager16 ops.
void register_eager16_cpu(torch::Library& m);

}  // namespace rlkern
