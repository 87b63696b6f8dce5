// CPU kernel of verl's optimal token baseline (OTB) and its multi-turn variant (TIR-OTB),
// ALGORITHMS.md §2.1 / docs/advantages.md. Torch-free interface.
//
// Per row i (valid tokens only, mask bytes, 0 = padding / observation):
//   G[i,t] = Σ_{s≥t, valid} r[i,s]                       reward-to-go (the "returns" output)
//   w[i,t] = (1 − 2·exp(logp[i,t]) + Σπ²[i,t]) · ρ[i,t]²  ρ = rollout IS weight (1 when absent)
//   W[i,t] = Σ_{s≤t, valid} w[i,s]                         cumulative path-variance proxy
// Per group g and aligned index k (k = t for OTB; k = rank of t among the row's valid tokens
// for TIR-OTB, rows without valid tokens left out of their group):
//   B[k] = Σ_{j∈g, valid} G·W / (Σ_{j∈g, valid} W + eps),   0 for a group of one row;
//   zero tail: if exactly one row has the longest length L_max and L_max > L_2nd (the next
//   length), that row's B[k ≥ L_2nd] = 0;
//   A[i,t] = (G[i,t] − B[k(t)]) at valid tokens, 0 elsewhere.
// Float arrays are float32 or float64 (`f64`), outputs of the same type, (N, T) contiguous;
// accumulation in double; threads split groups (results do not depend on the thread count).
#pragma once

#include <cstdint>

#include "cpu/token_advantages.h"

namespace rlkern::cpu {

struct TokenBaselineArgs {
  const void* rewards;
  const uint8_t* valid;
  const void* logprobs;        // old log-probabilities of the sampled tokens
  const void* sum_pi_squared;  // Σ_v π_v² per token
  const void* is_weights;      // rollout IS weights ρ, or nullptr
  bool f64;
  int64_t n;
  int64_t t;
  TokenGrouping grouping;
  bool multi_turn;  // TIR-OTB: align the group's rows by valid-token rank, not position
  bool zero_tail;   // verl's handle_zero_tail
  double eps;
  void* advantages;
  void* returns;
};

void optimal_token_baseline(const TokenBaselineArgs& args);

}  // namespace rlkern::cpu
