// CPU epilogues of the fused linear logprobs op (ALGORITHMS.md §1, "Fused linear form").
//
// The matmul of a tile of logits, x = h Wᵀ (+ b), is done by ATen (oneDNN, AMX on bf16);
// these functions fold one tile (n rows × vt vocab columns, columns [vocab_offset,
// vocab_offset + vt) of the full vocabulary) into the per-row running statistics, finish the
// statistics into logprobs / lse / entropy, and turn a recomputed tile into its gradient in
// place. Torch-free interface: raw pointers, sizes and strides.
#pragma once

#include <cstdint>

#include "cpu/logprobs.h"

namespace rlkern::cpu {

// Per-row running state, 4 doubles: m (running max of z, natural units), s = Σexp(z − m),
// t = Σexp(z − m)(z − m), and the raw label logit x_y once its tile has been seen (NaN before).
constexpr int kLinearStatsWidth = 4;

struct LinearTileArgs {
  const void* tile;  // (n, vt), column stride 1, row stride `stride_row`
  void* grad_tile;   // backward: where dZ goes (may alias tile)
  DType dtype;
  int64_t n, vt, stride_row, grad_stride_row;
  int64_t vocab_offset;  // global vocab index of column 0
  const int64_t* labels;  // (n,) global vocab ids or ignore_index
  int64_t ignore_index;
  double temperature;
  bool with_entropy;
  double* stats;  // forward: (n, 4) running state, updated in place
  // backward (per-row, (n,), float32 or float64 like the outputs; nullable grads)
  const void* lse;
  const void* entropy;
  const void* grad_logprobs;
  const void* grad_entropy;
  const void* grad_lse;
};

void linear_logprobs_tile_fwd(const LinearTileArgs& a);
void linear_logprobs_tile_bwd(const LinearTileArgs& a);

// stats (n, 4) → logprobs, lse, entropy (nullable); float32 outputs, or float64 when `f64`.
void linear_logprobs_finish(const double* stats, const int64_t* labels, int64_t n,
                            int64_t ignore_index, double temperature, bool f64, void* logprobs,
                            void* lse, void* entropy);

}  // namespace rlkern::cpu
