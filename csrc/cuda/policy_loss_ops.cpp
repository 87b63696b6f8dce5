// CUDA implementations of the policy-loss ops (see policy_loss_ops.h): the checks and op
// bodies are csrc/policy_loss_checks.h's, shared with the CPU glue; this file only launches the
// torch-free kernels of csrc/cuda/policy_loss.cu on the current stream. float32 only.
#include "cuda/policy_loss_ops.h"

#include <c10/cuda/CUDAGuard.h>

#include "cuda/glue.h"
#include "policy_loss_checks.h"
#include "rlkern/cuda_launchers.h"

namespace rlkern {
namespace {

namespace pl = rlkern::policy_loss;
using cuda::check_launch;
using cuda::current_stream;

struct CudaKernels {
  static constexpr pl::Backend kBackend{c10::DeviceType::CUDA, /*takes_f64=*/false};

  static void fwd(const pl::Args& a, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    check_launch(rlkern_policy_loss_fwd_cuda(&a.in, &a.flags, &a.hp, a.row_stats,
                                             current_stream()),
                 "rlkern::policy_loss_fwd_out");
  }

  static void bwd(const pl::Args& a, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    check_launch(rlkern_policy_loss_bwd_cuda(&a.in, &a.flags, &a.hp, a.row_stats, a.grad_rows,
                                             static_cast<float*>(a.grad_logp),
                                             static_cast<float*>(a.grad_entropy),
                                             current_stream()),
                 "rlkern::policy_loss_bwd_out");
  }

  static void kl(const pl::KlArgs& a, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    check_launch(rlkern_kl_penalty_cuda(static_cast<const float*>(a.logp),
                                        static_cast<const float*>(a.ref),
                                        static_cast<const float*>(a.grad),
                                        static_cast<float*>(a.out), a.n, a.kind,
                                        a.straight_through, a.log_clamp, a.value_clamp,
                                        current_stream()),
                 a.grad ? "rlkern::kl_penalty_bwd_out" : "rlkern::kl_penalty_fwd_out");
  }
};

}  // namespace

void impl_policy_loss_cuda(torch::Library& m) { pl::impl_ops<CudaKernels>(m); }

}  // namespace rlkern
