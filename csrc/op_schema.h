// One registered op of the rlkern namespace: its name and its schema, stated once per op in
// the family's table (e.g. rlkern::logprobs::kOps in logprobs_op.h). csrc/ops.cpp defines every
// schema of a table (TORCH_LIBRARY), and each backend's glue registers its kernels under the
// same names (TORCH_LIBRARY_IMPL), so a name is never typed twice.
#pragma once

#include <torch/library.h>

#include <cstddef>

namespace rlkern {

struct OpSchema {
  const char* name;    // the op's name, as in torch.ops.rlkern.<name>
  const char* schema;  // "<name>(args) -> ()": outputs are caller-provided `Tensor(a!)`
};

// m.def() of every schema of a family's table.
template <std::size_t N>
void define_ops(torch::Library& m, const OpSchema (&ops)[N]) {
  for (const OpSchema& op : ops) m.def(op.schema);
}

}  // namespace rlkern
