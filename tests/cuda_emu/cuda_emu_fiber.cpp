// Execution contexts of the emulated threads: the stack switch, context start, fiber stacks
// (cuda_emu_fiber.h).
#include "cuda_emu_fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#if CUDA_EMU_ASM_SWITCH
// void cuda_emu_switch_stack(void** save_sp, void* next_sp). (The SysV ABI also makes MXCSR
// and the x87 control word callee-saved; no kernel changes them, so they are not switched.)
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch_stack
  .hidden cuda_emu_switch_stack
  .type cuda_emu_switch_stack, @function
cuda_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch_stack, .-cuda_emu_switch_stack
  .section .note.GNU-stack,"",@progbits
)");
#endif

namespace cuda_emu {
namespace runtime {

void start_context(Context& c, char* stack, void (*entry)()) {
#if CUDA_EMU_ASM_SWITCH
  // A stack that cuda_emu_switch_stack "returns" into entry with: six zeroed registers, the
  // return address, and a pad slot, so that entry starts with rsp ≡ 8 (mod 16) as after a
  // call.
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

namespace {
std::mutex g_stack_mutex;
std::vector<char*> g_free_stacks;
size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
}  // namespace

char* acquire_stack() {
  {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    if (!g_free_stacks.empty()) {
      char* s = g_free_stacks.back();
      g_free_stacks.pop_back();
      return s;
    }
  }
  const size_t guard = page_size();
  void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(p, guard, PROT_NONE);
  return static_cast<char*>(p) + guard;  // usable: [s, s + kStackBytes)
}

void release_stack(char* s) {
  std::lock_guard<std::mutex> lock(g_stack_mutex);
  g_free_stacks.push_back(s);
}

}  // namespace runtime
}  // namespace cuda_emu
