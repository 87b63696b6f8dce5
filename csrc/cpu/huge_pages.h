// Transparent huge pages for large buffers the CPU kernels write.
//
// A fresh multi-MiB allocation (glibc serves it with mmap) is mapped on first touch, one 4 KiB
// page at a time: on a virtual machine the faults can cost several times writing the same
// bytes into memory already mapped (a (4096, 151936) bf16 gradient: ~300,000 faults;
// docs/benchmarks.md, "The backward"). Advised as huge pages, its 2 MiB-aligned interior
// faults in 2 MiB pieces instead. The advice is a hint: where the kernel has none (transparent huge
// pages "never", or none free) the pages stay small, and nothing else changes.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlkern::cpu {

constexpr size_t kHugePage = size_t(2) << 20;

// Advises the whole 2 MiB pages inside [p, p + bytes) as huge pages (MADV_HUGEPAGE), for
// before they are first written (a buffer holding no whole one is left alone). Errors are
// ignored: advice only.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace rlkern::cpu
