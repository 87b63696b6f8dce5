// Execution contexts of the emulated threads (internal to the runtime, cuda_emu_runtime.h):
// fiber stacks and the switch between a fiber and its worker's scheduler loop.
//
// Fibers switch stacks with a few lines of assembly on x86-64 (about 10 ns a switch);
// elsewhere, or with -DCUDA_EMU_USE_UCONTEXT, with swapcontext (about 1 µs: it makes a system
// call to save the signal mask).
#pragma once

#include <cstddef>

#if defined(__x86_64__) && !defined(CUDA_EMU_USE_UCONTEXT)
#define CUDA_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if CUDA_EMU_ASM_SWITCH
// Push the callee-saved registers, save the stack pointer to *save_sp, load next_sp, pop that
// stack's registers and return into it (cuda_emu_fiber.cpp).
extern "C" void cuda_emu_switch_stack(void** save_sp, void* next_sp)
    __attribute__((visibility("hidden")));
#endif

namespace cuda_emu {
namespace __attribute__((visibility("hidden"))) runtime {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (virtual)

// Where a suspended fiber, or the scheduler loop, resumes.
struct Context {
#if CUDA_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Save the running context into `from` and resume `to`.
inline void switch_context(Context& from, Context& to) {
#if CUDA_EMU_ASM_SWITCH
  cuda_emu_switch_stack(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Make `c` run entry() on the stack [stack, stack + kStackBytes) when first switched to;
// entry must never return.
void start_context(Context& c, char* stack, void (*entry)());

// A fiber stack of kStackBytes: mmap'ed with a guard page below (a stack overflow faults
// instead of corrupting a neighbour), pooled across launches.
char* acquire_stack();
void release_stack(char* stack);

}  // namespace runtime
}  // namespace cuda_emu
