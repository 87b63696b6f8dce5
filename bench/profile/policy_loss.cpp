// Per-token cost of the policy loss's CPU forward on one thread (csrc/cpu/policy_loss.cpp):
// verl's vanilla loss (PPO clip 0.2, dual clip c = 3, |Δ| clamped to 20, one advantage per
// response), as `rlkern bench --op policy_loss` runs it, in its three forms:
//
//   fwd        the forward alone (no gradient: `torch.no_grad()`);
//   fwd+grad   the fused forward writing the gradient itself (the row coefficients known up
//              front: what a backward with the expected upstream gradient hands over);
//   fwd+factor the fused forward writing each token's factor (the backward then scales it).
//
// Each on two sets of rows: streamed (B rows of T = 1,024 tokens, 52 MB of inputs at the
// default B = 4,096, beyond the last-level cache) and in L2 (16 rows, 208 KB), the second
// measuring the token loop's arithmetic alone. Lengths are uniform in [T/2, T] (the bench's
// responses: about 3/4 of the positions valid); the gradient buffer is written once before any
// timing (no page faults are timed). Prints ns per valid token, the median of the calls
// (median.h). Built and run by bench/profile/policy_loss.sh; docs/policy_loss.md quotes it.
//
//   policy_loss [B=4096]
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "cpu/policy_loss.h"
#include "median.h"

namespace pl = rlkern::policy_loss;

namespace {

struct Rows {
  int64_t B, T, valid = 0;
  std::vector<float> lp, old, adv, grad;
  std::vector<uint8_t> mask;
  std::vector<double> row_stats, grad_rows;

  Rows(int64_t b, int64_t t, uint32_t seed)
      : B(b), T(t), lp(b * t), old(b * t), adv(b), grad(b * t, 1.0f), mask(b * t),
        row_stats(size_t(pl::kNumRowStats) * b), grad_rows(size_t(pl::kNumRowGrads) * b, 0.0) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-3.0f, 0.0f);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::uniform_int_distribution<int64_t> len(t / 2, t);
    for (int64_t i = 0; i < b * t; ++i) {
      lp[i] = u(gen);
      old[i] = lp[i] + 0.1f * n(gen);  // a few percent of the tokens clipped
    }
    for (int64_t r = 0; r < b; ++r) {
      adv[r] = n(gen);
      const int64_t l = len(gen);
      for (int64_t i = 0; i < t; ++i) mask[r * t + i] = i < l;
      valid += l;
    }
    // token-mean: ∂loss/∂pg_sum of every row is 1 / (valid tokens)
    for (int64_t r = 0; r < b; ++r) grad_rows[size_t(pl::kGradPg) * b + r] = 1.0 / double(valid);
  }

  pl::Args args(bool token_grad, bool written) {
    pl::Args a{};
    a.in.B = B;
    a.in.T = T;
    a.in.logp = {lp.data(), T};
    a.in.old = {old.data(), T};
    a.in.adv = {adv.data(), 1};
    a.in.mask = {mask.data(), T};
    a.flags = pl::Flags{};  // ppo, token ratios, no KL, no rollout correction
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
};

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  const int64_t B = argc > 1 ? std::atol(argv[1]) : 4096;
  Rows streamed(B, 1024, 1), cached(16, 1024, 2);
  struct Form {
    const char* name;
    bool token_grad, written;
  };
  const Form forms[] = {{"fwd", false, false}, {"fwd+grad", true, true}, {"fwd+factor", true, false}};
  std::printf("%-11s %18s %18s\n", "form", "streamed ns/token", "in L2 ns/token");
  for (const Form& f : forms) {
    double ns[2];
    int i = 0;
    for (Rows* r : {&streamed, &cached}) {
      const pl::Args a = r->args(f.token_grad, f.written);
      rlkern::cpu::policy_loss_fwd(a);  // warm up
      const int calls = r == &cached ? 400 : 15;
      ns[i++] = median_us([&] { rlkern::cpu::policy_loss_fwd(a); }, calls) * 1e3 /
                double(r->valid);
    }
    std::printf("%-11s %18.3f %18.3f\n", f.name, ns[0], ns[1]);
  }
  return 0;
}
