// A paired A/B of the policy loss's CPU forward (bench/profile/policy_loss_ab.sh): two builds
// (sides a and b, policy_loss_ab_side.cpp) in one process, their calls alternating, a then b,
// on the same rows as policy_loss.cpp (one thread unless THREADS). Prints, per form and set,
// each side's median ns per valid token and the median and quartiles of the per-call ratio
// b / a. Why paired: this host's speed drifts by up to 1.5x within a minute, which moves two
// separate runs apart but both calls of a pair together. Also checks that the two builds agree:
// the count of gradient values and row statistics whose bits differ (after each form).
//
//   policy_loss_ab [B=1024] [calls=30] [holes=0]
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define RLKERN_AB_SIDE(s)                                  \
  extern "C" void ab_setup_##s(long, long);                \
  extern "C" long ab_valid_##s(int);                       \
  extern "C" void ab_call_##s(int, int);                   \
  extern "C" const float* ab_grad_##s(int);                \
  extern "C" const double* ab_stats_##s(int, long*);
RLKERN_AB_SIDE(a)
RLKERN_AB_SIDE(b)

namespace {

double seconds(void (*call)(int, int), int form, int set) {
  const auto t0 = std::chrono::steady_clock::now();
  call(form, set);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Values whose bits differ between the sides, in the gradient and in the row statistics.
long mismatches(int set, long n_grad) {
  long n_stats = 0, bad = 0;
  const double *sa = ab_stats_a(set, &n_stats), *sb = ab_stats_b(set, &n_stats);
  for (long i = 0; i < n_stats; ++i) bad += std::memcmp(sa + i, sb + i, sizeof(double)) != 0;
  const float *ga = ab_grad_a(set), *gb = ab_grad_b(set);
  for (long i = 0; i < n_grad; ++i) bad += std::memcmp(ga + i, gb + i, sizeof(float)) != 0;
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(std::getenv("THREADS") ? std::atoi(std::getenv("THREADS")) : 1);
  const long B = argc > 1 ? std::atol(argv[1]) : 1024;
  const int calls = argc > 2 ? std::atoi(argv[2]) : 30;
  const long holes = argc > 3 ? std::atol(argv[3]) : 0;
  ab_setup_a(B, holes);
  ab_setup_b(B, holes);
  const char* forms[] = {"fwd", "fwd+grad", "fwd+factor", "grad+kl", "bwd", "bwd+kl"};
  const char* sets[] = {"streamed", "in L2"};
  std::printf("%-9s %-11s %9s %9s %9s %17s %10s\n", "set", "form", "a ns/tok", "b ns/tok",
              "b/a", "b/a quartiles", "bits off");
  for (int set = 0; set < 2; ++set) {
    const long n_grad = (set ? 16 : B) * 1024;
    const int n = set ? calls * 20 : calls;  // the rows in L2 take ~1/60 of the time a call
    const double valid = double(ab_valid_a(set));
    for (int form = 0; form < 6; ++form) {
      if (form >= 4) {  // a backward reads the row statistics of its forward
        ab_call_a(form == 4 ? 2 : 3, set);
        ab_call_b(form == 4 ? 2 : 3, set);
      }
      ab_call_a(form, set);
      ab_call_b(form, set);
      const long bad = mismatches(set, n_grad);
      std::vector<double> ta, tb, ratio;
      for (int i = 0; i < n; ++i) {
        ta.push_back(seconds(ab_call_a, form, set));
        tb.push_back(seconds(ab_call_b, form, set));
        ratio.push_back(tb.back() / ta.back());
      }
      for (auto* v : {&ta, &tb, &ratio}) std::sort(v->begin(), v->end());
      std::printf("%-9s %-11s %9.3f %9.3f %9.3f %8.3f–%-8.3f %10ld\n", sets[set], forms[form],
                  ta[n / 2] * 1e9 / valid, tb[n / 2] * 1e9 / valid, ratio[n / 2], ratio[n / 4],
                  ratio[3 * n / 4], bad);
    }
  }
  return 0;
}
