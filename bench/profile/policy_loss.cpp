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

#include <cstdio>
#include <cstdlib>

#include "median.h"
#include "policy_loss_rows.h"

using rlkern::probe::Rows;
namespace pl = rlkern::policy_loss;

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
