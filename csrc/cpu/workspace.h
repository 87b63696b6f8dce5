// Scratch memory for the segmented-reduction kernels, kept across calls (one set per thread).
//
// Two costs this avoids, both large on a virtual machine:
//   * first-touch page faults: a fresh multi-MiB allocation (glibc serves it with mmap and
//     unmaps it on free) faults once per 4 KiB page on every call;
//   * TLB misses: the hash table and the per-group records are read at random; in 4 KiB pages
//     nearly every access is a TLB miss and a (two-dimensional, under virtualisation) page
//     walk. The buffers are 2 MiB aligned and advised as transparent huge pages.
// The memory is held until the thread exits; it grows to the largest batch seen.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "cpu/huge_pages.h"

namespace rlkern::cpu {

template <typename T>
class Workspace {
  static_assert(std::is_trivially_copyable_v<T>, "Workspace holds plain data only");

 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { std::free(data_); }

  // At least n elements; contents are unspecified unless `zero` (then all bytes are 0).
  T* get(size_t n, bool zero = false) {
    if (n > capacity_) {
      std::free(data_);
      data_ = nullptr;  // should the allocation below throw, the next call allocates again
      capacity_ = 0;
      // Small buffers (< 2 MiB) are cache-line aligned and sized exactly; large ones are
      // rounded up to whole huge pages.
      const bool huge = n * sizeof(T) >= kHugePage;
      const size_t align = huge ? kHugePage : 64;
      const size_t bytes = (std::max<size_t>(n * sizeof(T), 64) + align - 1) / align * align;
      data_ = static_cast<T*>(std::aligned_alloc(align, bytes));
      if (data_ == nullptr) throw std::bad_alloc();
      if (huge) advise_huge_pages(data_, bytes);
      capacity_ = bytes / sizeof(T);
      zero = true;  // also touches the pages once, here
    }
    if (zero) std::memset(static_cast<void*>(data_), 0, capacity_ * sizeof(T));
    return data_;
  }

  size_t capacity() const { return capacity_; }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace rlkern::cpu
