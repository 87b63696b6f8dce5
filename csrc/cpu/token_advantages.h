// CPU kernels for the token-, step- and turn-level helpers of ALGORITHMS.md §2.1: discounted
// returns with resets, GAE, the position-wise group baseline (IGPO), GTPO entropy weights, GiGPO's
// two-level advantages and EMPG's entropy modulation. Torch-free interface.
//
// Float arrays are float32 or float64 (`f64`), outputs of the same type; (N, T) arrays are
// contiguous, row-major. `valid` masks are bytes (0 = padding).
#pragma once

#include <cstdint>

#include "cpu/advantages.h"

namespace rlkern::cpu {

// G[i,t] = r[i,t] + γ·G[i,t+1], the carry dropped where reset[i,t] (position t ends a segment).
void discounted_returns(const void* rewards, bool f64, int64_t n, int64_t t, const uint8_t* reset,
                        double gamma, void* out);

// GAE with verl's carry over masked tokens (rlkern/group_stats.h, gae_step), one reverse scan
// per row: advantages[i,t] = the row's last_gae after position t, returns = advantages + V.
// values may be null (V = 0); valid bytes (0 = observation / padding token).
void gae(const void* rewards, const void* values, bool f64, int64_t n, int64_t t,
         const uint8_t* valid, double gamma, double lam, void* advantages, void* returns);

// The element type of a mask whose values are weights (masked_whiten reads it as it is).
enum class WeightType { kFloat32, kFloat64, kBool, kInt32, kInt64 };

// verl's masked_whiten(x, mask) (shift_mean=True) over n elements, weights w = the mask's
// values (of type `wt`; a float64 mask only with float64 x): with c = Σ w, mean = Σ_{w≠0} x·w / (c + 1e-8), var = Σ_{w≠0} (x − mean)²·w / (c + 1e-8)
// · c / (c − 1), out = (x − mean) · rsqrt(var + 1e-8) at every element. The sums are float64
// over fixed blocks (deterministic); everything else is verl's arithmetic in verl's types: x's
// for the values, and for c + 1e-8 and c / (c − 1) the type of torch's mask.sum() (the mask's
// float type, the default float type for an integer mask): `count_f64` (float32 otherwise; a
// float32 x takes float32 only). c = 0 or c = 1 (verl's two errors) return false with *count
// set, writing nothing.
bool masked_whiten(const void* x, const void* w, WeightType wt, bool f64, bool count_f64,
                   int64_t n, void* out, double* count);

// Rows grouped by ids (non-null) or contiguously by group_size.
struct TokenGrouping {
  const int64_t* group_ids;
  int64_t group_size;
};

// A[i,t] = (G[i,t] − mean_{j∈g, valid[j,t]} G[j,t]) · valid[i,t].
void position_baseline(const void* returns, bool f64, int64_t n, int64_t t, const uint8_t* valid,
                       TokenGrouping grouping, void* out);

// w[i,t] = H[i,t] / Σ_{k∈g, valid} H[k,t];  w_inv[i,t] = h[i,t] / Σ h[k,t], h = 1/max(H, eps).
// Both 0 at padding and where the denominator is 0.
void gtpo_weights(const void* entropy, bool f64, int64_t n, int64_t t, const uint8_t* valid,
                  TokenGrouping grouping, double eps, void* weight, void* inverse_weight);

// GiGPO over S steps: episode part normalised within prompt groups (group_ids), step part within
// step groups (group_ids, state_keys); singletons get 0. mode / step_mode: true = divide by σ.
struct GigpoArgs {
  const void* episode_returns;
  const void* step_returns;
  bool f64;
  int64_t n;
  const int64_t* group_ids;
  const int64_t* state_keys;
  double omega;
  bool episode_std;
  bool step_std;
  double eps;
  void* advantages;
  void* episode_advantages;
  void* step_advantages;
};

Status gigpo_advantages(const GigpoArgs& args);

// A_mod = g(H)·A + ζ·f(H_next), Ĥ min–max normalised over step_entropy, g = e^{−kĤ}/mean e^{−kĤ},
// f = e^{−k_f Ĥ_next} (0 where next_step_entropy is NaN: no next step).
void empg_modulate(const void* advantages, const void* step_entropy,
                   const void* next_step_entropy, bool f64, int64_t n, double k, double k_f,
                   double zeta, void* out);

}  // namespace rlkern::cpu
