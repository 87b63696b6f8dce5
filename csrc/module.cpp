// The Python module rlkern._C. Importing it runs the static op registrations of ops.cpp (and
// cuda_ops.cpp when built with CUDA); the module itself only reports how it was built.
#include <pybind11/pybind11.h>

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
}
