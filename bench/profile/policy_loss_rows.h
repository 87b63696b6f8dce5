// The rows the policy-loss probes time (policy_loss.cpp, policy_loss_ab_side.cpp): verl's
// vanilla loss (PPO clip 0.2, dual clip c = 3, |Δ| clamped to 20, one advantage per response) on
// B rows of T tokens, lengths uniform in [T/2, T] (right padding, as the bench's responses), the
// gradient buffer written once before any timing (no page faults are timed); optionally with
// verl's KL loss (low_var_kl: k3, |ref − logp| clamped to 20, |k3| to 10; coefficient 0.001).
#pragma once

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cpu/policy_loss.h"

// In rlkern's namespace, so that the A/B probe's two renamed copies (-Drlkern=…) get one each.
namespace rlkern::probe {

namespace pl = rlkern::policy_loss;

struct Rows {
  int64_t B, T, valid = 0;
  std::vector<float> lp, old, ref, adv, grad;
  std::vector<uint8_t> mask;
  std::vector<double> row_stats, grad_rows;

  Rows(int64_t b, int64_t t, uint32_t seed)
      : B(b), T(t), lp(b * t), old(b * t), ref(b * t), adv(b), grad(b * t, 1.0f), mask(b * t),
        row_stats(size_t(pl::kNumRowStats) * b), grad_rows(size_t(pl::kNumRowGrads) * b, 0.0) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-3.0f, 0.0f);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::uniform_int_distribution<int64_t> len(t / 2, t);
    for (int64_t i = 0; i < b * t; ++i) {
      lp[i] = u(gen);
      old[i] = lp[i] + 0.1f * n(gen);  // a few percent of the tokens clipped
      ref[i] = lp[i] + 0.05f * n(gen);
    }
    for (int64_t r = 0; r < b; ++r) {
      adv[r] = n(gen);
      const int64_t l = len(gen);
      for (int64_t i = 0; i < t; ++i) mask[r * t + i] = i < l;
      valid += l;
    }
    set_grad_rows();
  }

  // token-mean: ∂loss/∂pg_sum of every row is 1 / (valid tokens), ∂loss/∂kl_sum 0.001 times it
  void set_grad_rows() {
    for (int64_t r = 0; r < B; ++r) {
      grad_rows[size_t(pl::kGradPg) * B + r] = 1.0 / double(valid);
      grad_rows[size_t(pl::kGradKl) * B + r] = 0.001 / double(valid);
    }
  }

  // A masked token every `every` positions (holes inside the responses, not only padding).
  void punch_holes(int64_t every) {
    for (size_t i = 0; i < mask.size(); i += size_t(every)) {
      valid -= mask[i];
      mask[i] = 0;
    }
    set_grad_rows();
  }

  pl::Args args(bool token_grad, bool written, bool kl = false) {
    pl::Args a{};
    a.in.B = B;
    a.in.T = T;
    a.in.logp = {lp.data(), T};
    a.in.old = {old.data(), T};
    a.in.adv = {adv.data(), 1};
    a.in.mask = {mask.data(), T};
    a.flags = pl::Flags{};  // ppo, token ratios, no KL, no rollout correction
    if (kl) {
      a.flags.kl_kind = pl::kKlK3;
      a.in.opt[pl::kInRef] = {ref.data(), T};
    }
    // verl's vanilla loss as rlkern.PolicyLossConfig.verl(clip_ratio=0.2, clip_ratio_c=3.0)
    // prepares it (the unused fields at their defaults)
    const double inf = std::numeric_limits<double>::infinity();
    const double hp[pl::kNumHParams] = {0.8, 1.2, 3.0, inf, 20.0, 10.0, 1.0, 1.05, 20.0, 10.0,
                                        20.0, -inf, inf, 2.0, 3.0, 3.0, 2.0, 0.0, 1.0};
    a.hp = pl::from_fields<pl::HParams>(hp);
    a.row_stats = row_stats.data();
    a.token_grad = token_grad ? grad.data() : nullptr;
    a.grad_rows = written ? grad_rows.data() : nullptr;
    return a;
  }

  // The two-pass backward (policy_loss_bwd) into `grad`, from the row statistics of the last
  // forward (of the same KL setting).
  pl::Args bwd_args(bool kl = false) {
    pl::Args a = args(false, true, kl);
    a.grad_logp = grad.data();
    return a;
  }
};

}  // namespace rlkern::probe
