// The Python module rlkern._C. Importing it runs the static op registrations of ops.cpp (and
// the CUDA glue when built with CUDA); the module itself reports how it was built and exports
// the layout tables of the op families (rlkern/layout.h), which python/rlkern/config/layout.py
// reads so that Python and Triton use the C++ headers' numbering.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "cpu/huge_pages.h"

#include "rlkern/group_stats.h"
#include "rlkern/layout.h"
#include "rlkern/logprobs.h"
#include "rlkern/policy_loss.h"
#include "rlkern/sample.h"

namespace py = pybind11;

namespace {

// {table name: [entry names in index order]} for one family.
py::dict family(std::initializer_list<rlkern::LayoutTable> tables) {
  py::dict out;
  for (const auto& t : tables) {
    py::list names;
    for (int i = 0; i < t.size; ++i) names.append(t.names[i]);
    out[t.table] = names;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlkern compiled kernels (ops are registered under torch.ops.rlkern)";
#ifdef RLKERN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#if defined(__AVX512F__)
  m.attr("CPU_ISA") = "avx512";
#elif defined(__AVX2__)
  m.attr("CPU_ISA") = "avx2";
#else
  m.attr("CPU_ISA") = "scalar";
#endif
  py::dict layouts;
  // One line per op family; each family's header defines its tables (rlkern/layout.h).
  layouts["advantages"] = family(rlkern::advantages::kLayout);
  layouts["logprobs"] = family(rlkern::logprobs::kLayout);
  layouts["linear_logprobs"] = family(rlkern::linear_logprobs::kLayout);
  layouts["sample"] = family(rlkern::sample::kLayout);
  layouts["policy_loss"] = family(rlkern::policy_loss::kLayout);
  m.attr("LAYOUTS") = layouts;
  // For Python-allocated buffers the kernels fill (the bench's floors): the CPU backward's
  // huge-page advice for its fresh gradients (cpu/huge_pages.h), on [address, address + n).
  m.def(
      "advise_huge_pages",
      [](uintptr_t address, size_t n) {
        rlkern::cpu::advise_huge_pages(reinterpret_cast<void*>(address), n);
      },
      py::arg("address"), py::arg("nbytes"),
      "Advise the whole 2 MiB pages inside [address, address + nbytes) as transparent huge "
      "pages (Linux; a hint, errors ignored).");
}
