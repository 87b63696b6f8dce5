// Glue from tensors to the CUDA sampler (see sample_ops.h): the checks and the op signature are
// sample_op.h's, shared with the CPU glue, except the range of `indices`: reading them here
// would synchronise the stream, so the Python layer checks them.
#include "cuda/sample_ops.h"

#include <c10/cuda/CUDAGuard.h>

#include "cuda/glue.h"
#include "sample_op.h"

namespace rlkern::cuda {
namespace {

void launch_sample(const at::Tensor& logits, const sample::Shape& s,
                   const sample::RowArrays& r, bool joint, bool raw_temperature) {
  check_cuda(logits, "logits");
  const int dtype = dtype_of(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  // s.N output rows, s.G draws per source row (sample_out: G = 1).
  check_launch(rlkern_sample_n_cuda(logits.const_data_ptr(), dtype, s.R, s.V, s.stride_row,
                                    s.N / s.G, s.G, r.indices, r.temperature, r.top_k, r.top_p,
                                    r.min_p, r.seeds, r.steps, joint ? 1 : 0,
                                    raw_temperature ? 1 : 0, r.tokens, r.raw_logprobs,
                                    r.processed_logprobs, r.entropy, r.lse, current_stream()),
               s.G == 1 ? "rlkern::sample_out" : "rlkern::sample_n_out");
}

}  // namespace

void impl_sample_ops(torch::Library& m) {
  m.impl(sample::kSampleOut.name, &sample::sample_out<&launch_sample>);
  m.impl(sample::kSampleNOut.name, &sample::sample_n_out<&launch_sample>);
}

}  // namespace rlkern::cuda
