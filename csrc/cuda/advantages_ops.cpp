// CUDA glue of the advantage ops (see advantages_ops.h). The checks are the CPU glue's
// (csrc/advantages_checks.h, checks.h); the launchers re-check sizes and pointers and return an
// error code, turned into an exception here. Built only when RLKERN_WITH_CUDA.
#include "cuda/advantages_ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "advantages_checks.h"
#include "rlkern/cuda_launchers.h"

namespace rlkern {

namespace {

namespace chk = checks::advantages;
using MaybeTensor = std::optional<at::Tensor>;

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == RLKERN_CUDA_OK, op, " (CUDA) failed: ", rlkern_cuda_error_string(code));
}

cudaStream_t stream_of(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "expected CUDA tensors, got a tensor on ", t.device());
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void group_segment_stats_out_cuda(const at::Tensor& scores, const MaybeTensor& perm,
                                  const MaybeTensor& offsets, int64_t group_size,
                                  int64_t num_groups, const MaybeTensor& weights,
                                  const MaybeTensor& loglik, const at::Tensor& params,
                                  bool unlikely, bool weighted, bool with_loglik, bool top,
                                  const at::Tensor& ms, const MaybeTensor& mx,
                                  const MaybeTensor& ext, const MaybeTensor& xr) {
  const int64_t n = scores.numel();
  const bool f64 = chk::float_array(scores, "scores", n, scores);
  checks::array(params, "params", kNumParams, at::kDouble, scores);
  checks::array(ms, "ms", num_groups * kNumMoments, at::kDouble, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  check_launch(
      rlkern_group_segment_stats_cuda(
          scores.const_data_ptr(), f64,
          checks::maybe_array<int64_t>(perm, "perm", n, at::kLong, scores),
          checks::maybe_array<int64_t>(offsets, "offsets", num_groups + 1, at::kLong, scores),
          group_size, num_groups,
          checks::maybe_array<double>(weights, "weights", n, at::kDouble, scores),
          checks::maybe_array<double>(loglik, "loglik", n, at::kDouble, scores),
          params.const_data_ptr<double>(), unlikely, weighted, with_loglik, top,
          ms.data_ptr<double>(),
          checks::maybe_out<double>(mx, "mx", num_groups * kNumMoments, at::kDouble, scores),
          checks::maybe_out<double>(ext, "ext", num_groups * kNumExtras, at::kDouble, scores),
          checks::maybe_out<double>(xr, "xr", n, at::kDouble, scores), stream_of(scores)),
      "rlkern::group_segment_stats_out");
}

void group_rows_finish_out_cuda(const at::Tensor& scores, const MaybeTensor& xr,
                                const MaybeTensor& loglik, const MaybeTensor& row_group,
                                int64_t group_size, const at::Tensor& ms, const at::Tensor& mx,
                                const MaybeTensor& ext, const at::Tensor& params,
                                at::IntArrayRef flags, const at::Tensor& advantages,
                                const at::Tensor& group_mean, const at::Tensor& group_std,
                                const at::Tensor& zero_variance_mask) {
  const int64_t n = scores.numel();
  const bool f64 = chk::float_array(scores, "scores", n, scores);
  chk::flags(flags);
  std::array<int32_t, kNumFlags> codes{};
  for (int f = 0; f < kNumFlags; ++f) codes[f] = static_cast<int32_t>(flags[f]);
  const chk::RowOuts o =
      chk::row_outputs(advantages, group_mean, group_std, zero_variance_mask, n, scores);
  checks::array(params, "params", kNumParams, at::kDouble, scores);
  const int64_t k = chk::moments(ms, "ms", scores);
  TORCH_CHECK(mx.sizes() == ms.sizes(), "mx: expected the shape of ms ", ms.sizes(), ", got ",
              mx.sizes());
  chk::moments(mx, "mx", scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  check_launch(
      rlkern_group_rows_finish_cuda(
          scores.const_data_ptr(), f64,
          checks::maybe_array<double>(xr, "xr", n, at::kDouble, scores),
          checks::maybe_array<double>(loglik, "loglik", n, at::kDouble, scores),
          checks::maybe_array<int64_t>(row_group, "row_group", n, at::kLong, scores), group_size,
          n, ms.const_data_ptr<double>(), mx.const_data_ptr<double>(),
          checks::maybe_array<double>(ext, "ext", k * kNumExtras, at::kDouble, scores),
          params.const_data_ptr<double>(), codes.data(), o.advantages, o.group_mean,
          o.group_std, reinterpret_cast<uint8_t*>(o.zero_variance), o.f64, stream_of(scores)),
      "rlkern::group_rows_finish_out");
}

void group_moments_merge_out_cuda(const at::Tensor& a, const at::Tensor& b,
                                  const at::Tensor& out) {
  const int64_t k = chk::moments(a, "a", a);
  checks::array(b, "b", a.numel(), at::kDouble, a);
  checks::array(out, "out", a.numel(), at::kDouble, a);
  const c10::cuda::CUDAGuard guard(a.device());
  check_launch(rlkern_group_moments_merge_cuda(a.const_data_ptr<double>(),
                                               b.const_data_ptr<double>(),
                                               out.data_ptr<double>(), k, stream_of(a)),
               "rlkern::group_moments_merge_out");
}

void discounted_returns_out_cuda(const at::Tensor& rewards, const MaybeTensor& reset,
                                 double gamma, const at::Tensor& out) {
  TORCH_CHECK(rewards.dim() == 2, "rewards: expected a (N, T) tensor, got shape ",
              rewards.sizes());
  const bool f64 = chk::float_array(rewards, "rewards", rewards.numel(), rewards);
  checks::array(out, "out", rewards.numel(), rewards.scalar_type(), rewards);
  const bool* r = checks::maybe_array<bool>(reset, "reset", rewards.numel(), at::kBool, rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_launch(rlkern_discounted_returns_cuda(rewards.const_data_ptr(), f64, rewards.size(0),
                                              rewards.size(1),
                                              reinterpret_cast<const uint8_t*>(r), gamma,
                                              out.data_ptr(), stream_of(rewards)),
               "rlkern::discounted_returns_out");
}

void gae_out_cuda(const at::Tensor& rewards, const MaybeTensor& values, const at::Tensor& mask,
                  double gamma, double lam, const at::Tensor& advantages,
                  const at::Tensor& returns) {
  TORCH_CHECK(rewards.dim() == 2, "rewards: expected a (N, T) tensor, got shape ",
              rewards.sizes());
  const int64_t numel = rewards.numel();
  const bool f64 = chk::float_array(rewards, "rewards", numel, rewards);
  const void* v =
      checks::maybe_array<void>(values, "values", numel, rewards.scalar_type(), rewards);
  checks::array(mask, "mask", numel, at::kBool, rewards);
  checks::array(advantages, "advantages", numel, rewards.scalar_type(), rewards);
  checks::array(returns, "returns", numel, rewards.scalar_type(), rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_launch(rlkern_gae_cuda(rewards.const_data_ptr(), v, f64, rewards.size(0), rewards.size(1),
                               reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()),
                               gamma, lam, advantages.data_ptr(), returns.data_ptr(),
                               stream_of(rewards)),
               "rlkern::gae_out");
}

}  // namespace

void register_advantages_cuda(torch::Library& m) {
  // Each op by its name, implemented by <name>_cuda.
#define IMPL(op) m.impl(#op, &op##_cuda)
  IMPL(group_segment_stats_out); IMPL(group_rows_finish_out); IMPL(group_moments_merge_out);
  IMPL(discounted_returns_out); IMPL(gae_out);
#undef IMPL
}

}  // namespace rlkern
