// One side of bench/profile/policy_loss_ab.sh: compiled twice, each time against another source
// tree and with rlkern renamed (-Drlkern=rlkern_a / rlkern_b, -DSIDE=a / b), so that the two
// builds of the policy loss live in one process. policy_loss_ab.cpp calls them through these
// C functions.
#include "policy_loss_rows.h"

#define RLKERN_AB_CAT2(a, b) a##b
#define RLKERN_AB_CAT(a, b) RLKERN_AB_CAT2(a, b)
#define RLKERN_AB(name) RLKERN_AB_CAT(name##_, SIDE)

namespace {
rlkern::probe::Rows* sets[2];  // [0] streamed, [1] in L2
}  // namespace

// The streamed rows (B of them) and the rows in L2 (16); a hole every `holes` tokens (0: none).
extern "C" void RLKERN_AB(ab_setup)(long B, long holes) {
  sets[0] = new rlkern::probe::Rows(B, 1024, 1);
  sets[1] = new rlkern::probe::Rows(16, 1024, 2);
  if (holes > 0)
    for (auto* s : sets) s->punch_holes(holes);
}
extern "C" long RLKERN_AB(ab_valid)(int set) { return long(sets[set]->valid); }
// form 0: the forward alone, 1: the written gradient, 2: the factors (policy_loss.cpp's three),
// 3: the written gradient with verl's KL loss, 4: the two-pass backward (after form 2's
// forward, whose row statistics it reads), 5: the two-pass backward with the KL loss (after
// form 3's forward)
extern "C" void RLKERN_AB(ab_call)(int form, int set) {
  if (form >= 4) rlkern::cpu::policy_loss_bwd(sets[set]->bwd_args(form == 5));
  else rlkern::cpu::policy_loss_fwd(sets[set]->args(form > 0, form == 1 || form == 3, form == 3));
}
extern "C" const float* RLKERN_AB(ab_grad)(int set) { return sets[set]->grad.data(); }
extern "C" const double* RLKERN_AB(ab_stats)(int set, long* n) {
  *n = long(sets[set]->row_stats.size());
  return sets[set]->row_stats.data();
}
