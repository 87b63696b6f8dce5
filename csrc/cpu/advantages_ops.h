// The advantage ops' schemas and their CPU implementations (registered by csrc/ops.cpp): thin
// glue from tensors to the torch-free kernels of advantages.h and token_advantages.h. Each
// `*_out` op checks its tensors, fills caller-provided outputs, and turns a kernel Status into a
// ValueError. Options travel as `int[] flags` / `float[] hparams` in the layout of
// rlkern/group_stats.h.
#pragma once

namespace torch {
class Library;
}  // namespace torch

namespace rlkern {

// Schemas, one per op, so ops.cpp and the implementations cannot drift apart.
extern const char* const kGroupAdvantagesOutSchema;
extern const char* const kGroupMomentsOutSchema;
extern const char* const kGroupFinishOutSchema;
extern const char* const kGroupMomentsMergeOutSchema;
extern const char* const kDiscountedReturnsOutSchema;
extern const char* const kGaeOutSchema;
extern const char* const kMaskedWhitenOutSchema;
extern const char* const kPositionBaselineOutSchema;
extern const char* const kGtpoWeightsOutSchema;
extern const char* const kGigpoAdvantagesOutSchema;
extern const char* const kEmpgModulateOutSchema;
extern const char* const kGroupSegmentStatsOutSchema;  // CUDA only
extern const char* const kGroupRowsFinishOutSchema;    // CUDA only

// The CPU implementations of the ops above (not the CUDA-only ones), for csrc/ops.cpp's
// TORCH_LIBRARY_IMPL(rlkern, CPU, m) block.
void register_advantages_cpu(torch::Library& m);

}  // namespace rlkern
