// Argument checks shared by the CPU glue (csrc/cpu/*_ops.cpp) and the CUDA glue
// (csrc/cuda/*_ops.cpp), so that both backends reject the same inputs with the same messages.
// The Python layer validates the user's arguments first, with friendlier messages; these checks
// guard the raw pointers handed to the kernels against any other caller of torch.ops.rlkern.
// Every message starts with the argument's name.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace rlkern::checks {

// The accumulation dtype of an op whose floating inputs have `t`'s dtype (DESIGN.md: float64
// inputs accumulate in float64, bf16 / fp16 / fp32 in float32).
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ",
              t.device());
}

inline void dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, ": expected ", want, ", got ",
                   t.scalar_type());
}

// A contiguous tensor of `numel` elements of `want` on `like`'s device (outputs, per-row
// statistics, flat inputs).
inline void array(const at::Tensor& t, const char* name, int64_t numel, at::ScalarType want,
                  const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, name, ": expected a contiguous tensor of ",
              numel, " elements, got shape ", t.sizes());
  dtype(t, name, want);
  same_device(t, name, like);
}

// A (B, T) tensor with unit stride along T (rows may be strided), of `want`, on `like`'s device.
inline void rows(const at::Tensor& t, const char* name, int64_t B, int64_t T,
                 at::ScalarType want, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name, ": expected shape (", B,
              ", ", T, "), got ", t.sizes());
  TORCH_CHECK(T <= 1 || t.stride(1) == 1, name, ": expected unit stride along T, got ",
              t.stride(1));
  dtype(t, name, want);
  same_device(t, name, like);
}

// The data pointer of an optional array input (nullptr when absent), after array().
template <typename T>
const T* maybe_array(const std::optional<at::Tensor>& t, const char* name, int64_t numel,
                     at::ScalarType want, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  array(*t, name, numel, want, like);
  return static_cast<const T*>(t->const_data_ptr());
}

template <typename T>
T* maybe_out(const std::optional<at::Tensor>& t, const char* name, int64_t numel,
             at::ScalarType want, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  array(*t, name, numel, want, like);
  return static_cast<T*>(t->data_ptr());
}

}  // namespace rlkern::checks
