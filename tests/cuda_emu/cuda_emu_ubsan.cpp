// Undefined-behaviour checks of the emulated kernels. They are compiled with
// -fsanitize=alignment,bounds,... (build.py) but linked without the sanitizer runtime: these
// handlers (same ABI as GCC's and Clang's libubsan) turn each report into a launch failure
// naming the source line (cuda_emu::kernel_error).
#include "cuda_emu.h"

#include <string>

extern "C" {

struct UbsanLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanType {
  uint16_t kind;  // 0: integer, 1: float
  uint16_t info;  // integer: log2(bit width) << 1 | signed
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanLocation loc;
  const UbsanType* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
struct UbsanOutOfBounds {
  UbsanLocation loc;
  const UbsanType* array_type;
  const UbsanType* index_type;
};
struct UbsanOverflow {
  UbsanLocation loc;
  const UbsanType* type;
};
struct UbsanShift {
  UbsanLocation loc;
  const UbsanType* lhs_type;
  const UbsanType* rhs_type;
};

static std::string ubsan_value(const UbsanType* t, uintptr_t v) {
  if (t->kind == 0 && (t->info >> 1) <= 6) {
    const unsigned bits = 1u << (t->info >> 1);
    if (t->info & 1) {
      const int64_t s = bits == 64 ? static_cast<int64_t>(v)
                                   : static_cast<int64_t>(v << (64 - bits)) >> (64 - bits);
      return std::to_string(s);
    }
    return std::to_string(bits == 64 ? uint64_t(v) : uint64_t(v) & ((uint64_t(1) << bits) - 1));
  }
  return "?";
}

#define CUDA_EMU_UB(loc, ...) \
  cuda_emu::kernel_error((loc).file, static_cast<int>((loc).line), __VA_ARGS__)

void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t ptr) {
  static const char* const kKinds[] = {"load of", "store to", "reference binding to",
                                       "member access within", "member call on",
                                       "constructor call on", "downcast of", "downcast of",
                                       "upcast of", "cast to virtual base of",
                                       "_Nonnull binding to", "dynamic operation on"};
  const char* kind = d->check_kind < 12 ? kKinds[d->check_kind] : "access to";
  const uintptr_t align = uintptr_t(1) << d->log_alignment;
  if (ptr == 0) {
    CUDA_EMU_UB(d->loc, "%s null pointer of type %s", kind, d->type->name);
  } else if (ptr & (align - 1)) {
    CUDA_EMU_UB(d->loc, "%s misaligned address 0x%lx for type %s, which requires %lu-byte "
                "alignment (a GPU raises cudaErrorMisalignedAddress)", kind,
                static_cast<unsigned long>(ptr), d->type->name,
                static_cast<unsigned long>(align));
  } else {
    CUDA_EMU_UB(d->loc, "%s address 0x%lx with insufficient space for type %s", kind,
                static_cast<unsigned long>(ptr), d->type->name);
  }
}

void __ubsan_handle_out_of_bounds(UbsanOutOfBounds* d, uintptr_t index) {
  CUDA_EMU_UB(d->loc, "index %s out of bounds for type %s",
              ubsan_value(d->index_type, index).c_str(), d->array_type->name);
}

static void ubsan_overflow(UbsanOverflow* d, uintptr_t a, uintptr_t b, const char* op) {
  CUDA_EMU_UB(d->loc, "signed integer overflow: %s %s %s cannot be represented in type %s",
              ubsan_value(d->type, a).c_str(), op, ubsan_value(d->type, b).c_str(),
              d->type->name);
}
void __ubsan_handle_add_overflow(UbsanOverflow* d, uintptr_t a, uintptr_t b) {
  ubsan_overflow(d, a, b, "+");
}
void __ubsan_handle_sub_overflow(UbsanOverflow* d, uintptr_t a, uintptr_t b) {
  ubsan_overflow(d, a, b, "-");
}
void __ubsan_handle_mul_overflow(UbsanOverflow* d, uintptr_t a, uintptr_t b) {
  ubsan_overflow(d, a, b, "*");
}
void __ubsan_handle_negate_overflow(UbsanOverflow* d, uintptr_t a) {
  CUDA_EMU_UB(d->loc, "negation of %s cannot be represented in type %s",
              ubsan_value(d->type, a).c_str(), d->type->name);
}
void __ubsan_handle_divrem_overflow(UbsanOverflow* d, uintptr_t a, uintptr_t b) {
  CUDA_EMU_UB(d->loc, "division %s / %s: division by zero or overflow in type %s",
              ubsan_value(d->type, a).c_str(), ubsan_value(d->type, b).c_str(), d->type->name);
}
void __ubsan_handle_shift_out_of_bounds(UbsanShift* d, uintptr_t a, uintptr_t b) {
  CUDA_EMU_UB(d->loc, "shift %s << or >> %s is out of bounds for type %s",
              ubsan_value(d->lhs_type, a).c_str(), ubsan_value(d->rhs_type, b).c_str(),
              d->lhs_type->name);
}
void __ubsan_handle_vla_bound_not_positive(UbsanOverflow* d, uintptr_t bound) {
  CUDA_EMU_UB(d->loc, "variable-length array bound %s is not positive",
              ubsan_value(d->type, bound).c_str());
}

#undef CUDA_EMU_UB

}  // extern "C"
