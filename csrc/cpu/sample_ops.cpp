// Glue from tensors to the CPU sampler (see sample_ops.h): the checks and the op signature are
// sample_op.h's, shared with the CUDA glue; this file range-checks the indices (host memory)
// and fills the kernel arguments.
#include "cpu/sample_ops.h"

#include "cpu/glue.h"
#include "cpu/sample.h"
#include "sample_op.h"

namespace rlkern::cpu {
namespace {

void launch_sample(const at::Tensor& logits, const sample::Shape& shape,
                   const sample::RowArrays& rows, bool joint, bool raw_temperature) {
  // The indices are checked here, before any row is read through them.
  for (int64_t i = 0; rows.indices != nullptr && i < shape.N / shape.G; ++i) {
    TORCH_CHECK_INDEX(rows.indices[i] >= 0 && rows.indices[i] < shape.R, "indices: value ",
                      rows.indices[i], " at ", i, " is outside [0, ", shape.R, ")");
  }
  SampleArgs a{};
  static_cast<sample::RowArrays&>(a) = rows;
  a.logits = logits.const_data_ptr();
  a.dtype = dtype_of(logits, "logits");
  a.R = shape.R;
  a.V = shape.V;
  a.stride_row = shape.stride_row;
  a.N = shape.N;
  a.num_samples = shape.G;
  a.joint = joint;
  a.raw_temperature = raw_temperature;
  cpu::sample(a);
}

}  // namespace

void impl_sample_ops(torch::Library& m) {
  m.impl(sample::kSampleOut.name, &sample::sample_out<&launch_sample>);
  m.impl(sample::kSampleNOut.name, &sample::sample_n_out<&launch_sample>);
}

}  // namespace rlkern::cpu
