// Grouping rows by arbitrary 64-bit ids (or id pairs) on the CPU: an open-addressing hash
// table that numbers the groups densely in order of first appearance and accumulates each
// group's shifted sums (rlkern/group_stats.h) in the same cache line as its key.
//
// Why a hash table and not a sort: the ids are arbitrary int64 in any order (verl shuffles
// rows; uids are hashed to integers) and groups are small (8–64 rows). A sort costs
// O(N log N) over several passes; the table costs one pass with one random access per row
// into ~2 slots per group (16 MiB for 131k groups), kept in huge pages (workspace.h) and
// prefetched a few rows ahead so that the misses of independent rows overlap. Rows are visited
// in row order, so each group's accumulation order — hence its sums, to double rounding — is
// fixed by the input, never by the thread count.
//
// Torch-free apart from at::parallel_for.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/simd.h"
#include "cpu/workspace.h"
#include "rlkern/group_stats.h"

namespace rlkern::cpu {

// splitmix64's finaliser: a bijective mix so that consecutive or strided ids spread out.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// One slot: key, dense group number and, when kAcc, the group's accumulator (with one key
// word: one 64-byte line). Without it a slot is 16 bytes, and the table 4× smaller.
struct NoSums {};

template <int kWords, bool kAcc>
struct alignas(kWords == 1 && kAcc ? 64 : 16) Slot {
  int64_t key[kWords];
  uint32_t gen;  // occupied iff gen == the table's generation (no clearing between calls)
  int32_t group;
  std::conditional_t<kAcc, ShiftedSums, NoSums> acc;
};

template <int kWords, bool kAcc = true>
class GroupTable {
 public:
  using SlotT = Slot<kWords, kAcc>;

  // Start a new grouping expecting about `expected_groups` groups (the table grows if needed).
  void reset(int64_t expected_groups) {
    group_slot_.clear();
    size_t cap = 1024;
    while (double(cap) * kMaxLoad < double(expected_groups)) cap <<= 1;
    if (cap > capacity_ || ++gen_ == 0) {  // a new (zeroed) buffer, or the generation wrapped
      slots_ = store_.get(cap, /*zero=*/true);
      capacity_ = pow2_floor(store_.capacity());  // ≥ cap; probing masks with capacity − 1
      gen_ = 1;
    }
    mask_ = capacity_ - 1;
  }

  static uint64_t hash(const int64_t* key) {
    uint64_t h = mix64(uint64_t(key[0]));
    if (kWords == 2) h = mix64(h ^ (uint64_t(key[kWords - 1]) + 0x9e3779b97f4a7c15ULL));
    return h;
  }

  void prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & mask_], 1, 1); }

  // The slot of `key` (hash h); a new key gets the next group number and an empty accumulator.
  SlotT* find_or_insert(const int64_t* key, uint64_t h) {
    uint64_t i = h & mask_;
    for (;;) {
      SlotT& s = slots_[i];
      if (s.gen != gen_) {
        if (double(group_slot_.size() + 1) > kMaxLoad * double(capacity_)) {
          grow();
          return find_or_insert(key, h);
        }
        std::memcpy(s.key, key, sizeof(s.key));
        s.gen = gen_;
        s.group = int32_t(group_slot_.size());
        if constexpr (kAcc) s.acc = shifted_empty();
        group_slot_.push_back(uint32_t(i));
        return &s;
      }
      if (same_key(s.key, key)) return &s;
      i = (i + 1) & mask_;
    }
  }

  int64_t size() const { return int64_t(group_slot_.size()); }
  const SlotT& group(int64_t g) const { return slots_[group_slot_[g]]; }

 private:
  static constexpr double kMaxLoad = 0.6;

  static size_t pow2_floor(size_t x) {
    size_t p = 1;
    while (p * 2 <= x) p *= 2;
    return p;
  }

  static bool same_key(const int64_t* a, const int64_t* b) {
    for (int w = 0; w < kWords; ++w)
      if (a[w] != b[w]) return false;
    return true;
  }

  void grow() {  // rare: more groups than expected; rehash into a table twice as large
    std::vector<SlotT> old(group_slot_.size());
    for (size_t g = 0; g < old.size(); ++g) old[g] = slots_[group_slot_[g]];
    slots_ = store_.get(capacity_ * 2, /*zero=*/true);
    capacity_ = pow2_floor(store_.capacity());
    mask_ = capacity_ - 1;
    gen_ = 1;
    for (size_t g = 0; g < old.size(); ++g) {
      old[g].gen = gen_;
      uint64_t i = hash(old[g].key) & mask_;
      while (slots_[i].gen == gen_) i = (i + 1) & mask_;
      slots_[i] = old[g];
      group_slot_[g] = uint32_t(i);
    }
  }

  Workspace<SlotT> store_;
  SlotT* slots_ = nullptr;
  size_t capacity_ = 0;
  std::vector<uint32_t> group_slot_;  // dense group → slot
  uint64_t mask_ = 0;
  uint32_t gen_ = 0;
};

// Numbering only (no accumulators), for one int64 key a row: keys and group numbers in two
// arrays, probed a window of eight keys at a time. Linear probing puts a key before the first
// empty slot of its probe sequence, so the first slot of the window that holds the key or is
// empty answers the lookup: one vector compare, no probe loop and none of its mispredicted
// branches (only the insert of a new key branches). The load stays ≤ 1/2, so a window without
// either is rare (a scalar probe then). Empty slots hold kEmpty; the rows whose key is kEmpty
// itself are numbered aside. The table is cleared at each reset (8 bytes a slot), which is
// cheaper than the generation tags of GroupTable at these sizes.
class KeyTable {
 public:
  static constexpr int64_t kEmpty = INT64_MIN;
  static constexpr size_t kWindow = 8;

  // A new numbering of up to max_groups groups, about expected_groups of them. The previous
  // numbering's count (capped by max_groups) raises the estimate: batches of one workload have
  // similar counts, and growing the table within a call rehashes every key.
  void reset(int64_t expected_groups, int64_t max_groups) {
    const int64_t expected = std::max(expected_groups, std::min(groups_, max_groups));
    size_t cap = 1024;
    while (cap < 2 * size_t(expected)) cap <<= 1;
    allocate(cap);
    groups_ = 0;
    empty_key_group_ = -1;
  }

  static uint64_t hash(const int64_t* key) { return mix64(uint64_t(*key)); }
  void prefetch(uint64_t h) const {
    prefetch_l1_for_write(&keys_[h & mask_]);
    prefetch_l1(&group_[h & mask_]);
  }

  // The group number of `key` (hash h); a new key gets the next number.
  int32_t number(int64_t key, uint64_t h) {
    const size_t i = size_t(h & mask_);
    size_t j = i;
#if defined(__AVX512F__)
    const __m512i w = _mm512_loadu_si512(keys_ + i);
    const __mmask8 hit = _mm512_cmpeq_epi64_mask(w, _mm512_set1_epi64(key));
    const __mmask8 open = _mm512_cmpeq_epi64_mask(w, _mm512_set1_epi64(kEmpty));
    const unsigned any = unsigned(hit | open);
    if (__builtin_expect(any != 0 && key != kEmpty, 1)) {
      const unsigned k = unsigned(__builtin_ctz(any));
      j = i + k;
      if ((hit >> k) & 1u) return group_[j];
      return insert(j, key);
    }
#endif
    return slow(key, j);
  }

  int64_t size() const { return groups_; }

 private:
  void allocate(size_t cap) {
    // kWindow − 1 slots past the end so that a window starting at the last slot stays inside;
    // probes wrap only in the scalar path.
    keys_ = key_store_.get(cap + kWindow);
    group_ = group_store_.get(cap + kWindow);
    std::fill(keys_, keys_ + cap + kWindow, kEmpty);
    capacity_ = cap;
    mask_ = cap - 1;
  }

  int32_t insert(size_t j, int64_t key) {
    keys_[j] = key;
    group_[j] = int32_t(groups_);
    const int32_t g = int32_t(groups_++);
    if (size_t(groups_) * 2 > capacity_) grow();
    return g;
  }

  int32_t slow(int64_t key, size_t j) {
    if (key == kEmpty) {
      if (empty_key_group_ < 0) {
        empty_key_group_ = int32_t(groups_++);
        if (size_t(groups_) * 2 > capacity_) grow();
      }
      return empty_key_group_;
    }
    const size_t end = capacity_ + kWindow;
    for (;; j = j + 1 == end ? 0 : j + 1) {
      if (keys_[j] == key) return group_[j];
      if (keys_[j] == kEmpty) return insert(j, key);
    }
  }

  void grow() {  // rare: more groups than expected; rehash into a table twice as large
    std::vector<std::pair<int64_t, int32_t>> old;
    old.reserve(size_t(groups_));
    for (size_t j = 0; j < capacity_ + kWindow; ++j)
      if (keys_[j] != kEmpty) old.emplace_back(keys_[j], group_[j]);
    allocate(capacity_ * 2);
    const size_t end = capacity_ + kWindow;
    for (const auto& [key, g] : old) {
      size_t j = size_t(hash(&key) & mask_);
      while (keys_[j] != kEmpty) j = j + 1 == end ? 0 : j + 1;
      keys_[j] = key;
      group_[j] = g;
    }
  }

  Workspace<int64_t> key_store_;
  Workspace<int32_t> group_store_;
  int64_t* keys_ = nullptr;
  int32_t* group_ = nullptr;
  size_t capacity_ = 0;
  uint64_t mask_ = 0;
  int64_t groups_ = 0;
  int32_t empty_key_group_ = -1;
};

// Rows grouped either contiguously (group_size > 0) or by a dense per-row group number.
struct Grouping {
  int64_t num_groups = 0;
  int64_t group_size = 0;              // > 0: row i belongs to group i / group_size
  const int32_t* row_group = nullptr;  // otherwise: the group of each row

  int64_t group_of(int64_t i) const { return group_size > 0 ? i / group_size : row_group[i]; }
};

inline Grouping contiguous_grouping(int64_t n, int64_t group_size) {
  Grouping g;
  g.group_size = group_size;
  g.num_groups = group_size > 0 ? n / group_size : 0;
  return g;
}

// Rows of each group, in row order (a counting sort): rows[offsets[g] .. offsets[g + 1]).
struct GroupRows {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
};

GroupRows group_rows(const Grouping& grouping, int64_t n);

// Groups the rows by `ids` (with kWords == 2, by the pairs (ids[i], ids2[i])) into
// `row_group` (n entries, caller's storage). With `values`, also accumulates the moments of each
// group's valid values (score_is_valid; others are skipped) into `moments` (resized to K).
// `keys` (optional) receives each group's first id word. Single-threaded on purpose (see the
// top of this file); independent groupings may run on different threads, each owning a table.
template <int kWords, typename T>
Grouping group_by_keys(const int64_t* ids, const int64_t* ids2, int64_t n, const T* values,
                       int32_t* row_group, std::vector<GroupMoments>* moments,
                       std::vector<int64_t>* keys = nullptr) {
  static thread_local GroupTable<kWords> table;
  table.reset(n / 8 + 1);
  // The slot of row i + kAhead is prefetched while row i is processed.
  constexpr int64_t kAhead = 16;
  uint64_t ring[kAhead];
  int64_t key[kWords];
  auto load_key = [&](int64_t i) {
    key[0] = ids[i];
    if (kWords == 2) key[kWords - 1] = ids2[i];
  };
  for (int64_t i = 0; i < n && i < kAhead; ++i) {
    load_key(i);
    ring[i] = table.hash(key);
    table.prefetch(ring[i]);
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = ring[i % kAhead];
    if (i + kAhead < n) {
      load_key(i + kAhead);
      const uint64_t ha = table.hash(key);
      ring[(i + kAhead) % kAhead] = ha;
      table.prefetch(ha);
    }
    load_key(i);
    auto* slot = table.find_or_insert(key, h);
    row_group[i] = slot->group;
    if (values != nullptr) {
      const double x = double(values[i]);
      if (score_is_valid(x)) shifted_push(slot->acc, x);
    }
  }
  Grouping out;
  out.num_groups = table.size();
  out.row_group = row_group;
  if (moments != nullptr) {
    moments->resize(size_t(out.num_groups));
    for (int64_t g = 0; g < out.num_groups; ++g) (*moments)[g] = shifted_moments(table.group(g).acc);
  }
  if (keys != nullptr) {
    keys->resize(size_t(out.num_groups));
    for (int64_t g = 0; g < out.num_groups; ++g) (*keys)[g] = table.group(g).key[0];
  }
  return out;
}

// Multi-threaded grouping by ids for group_advantages: thread t of nt owns a table of its own
// and the ids whose hash falls in its share, so each group is still accumulated by exactly one
// thread, in row order (results do not depend on nt). Group numbers interleave, g = local·nt + t,
// so up to nt − 1 numbers per thread stay unused: those "holes" have n = 0 and no rows.
// With kAcc the moments of the valid values are accumulated in the slots (one random access
// per row); without, only the numbering is done (a 4× smaller table) and `moments` is untouched.
template <typename T, bool kAcc>
Grouping group_by_ids_parallel(const int64_t* ids, int64_t n, const T* values,
                               int32_t* row_group, std::vector<GroupMoments>* moments) {
  using Table = std::conditional_t<kAcc, GroupTable<1, true>, KeyTable>;
  constexpr int64_t kMinRowsPerThread = 1 << 17;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                            n / kMinRowsPerThread)));
  static thread_local std::vector<std::unique_ptr<Table>> tables_tl;
  auto& tables = tables_tl;  // bound here: the workers must use this thread's tables
  while (int(tables.size()) < nt) tables.push_back(std::make_unique<Table>());
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 1024, kAhead = 32;
    uint64_t hashes[kBlock];
    int64_t rows[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      Table& table = *tables[t];
      if constexpr (kAcc) table.reset(n / 8 / nt + 1);
      else table.reset(n / 8 / nt + 1, n);
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        // The block's hashes (a loop the compiler vectorises), this thread's rows of them
        // (branch-free append; all of them with one thread), then their slots, prefetched.
        const int64_t b1 = std::min(n, b0 + kBlock);
        int64_t m = b1 - b0;
        for (int64_t i = b0; i < b1; ++i) hashes[i - b0] = Table::hash(ids + i);
        for (int64_t i = b0; i < b1; ++i) rows[i - b0] = i;
        if (nt > 1) {
          m = 0;
          for (int64_t i = b0; i < b1; ++i) {
            const uint64_t h = hashes[i - b0];
            hashes[m] = h;
            rows[m] = i;
            m += int64_t((uint64_t(uint32_t(h >> 32)) * uint64_t(nt)) >> 32) == t;
          }
        }
        for (int64_t j = 0; j < std::min(m, kAhead); ++j) table.prefetch(hashes[j]);
        for (int64_t j = 0; j < m; ++j) {
          if (j + kAhead < m) table.prefetch(hashes[j + kAhead]);
          const int64_t i = rows[j];
          if constexpr (kAcc) {
            auto* slot = table.find_or_insert(ids + i, hashes[j]);
            row_group[i] = int32_t(slot->group * nt + t);
            const double x = double(values[i]);
            if (score_is_valid(x)) shifted_push(slot->acc, x);
          } else {
            row_group[i] = table.number(ids[i], hashes[j]) * nt + t;
          }
        }
      }
    }
  });
  int64_t per_thread = 0;
  for (int t = 0; t < nt; ++t) per_thread = std::max(per_thread, tables[t]->size());
  Grouping out;
  out.num_groups = per_thread * nt;
  out.row_group = row_group;
  if constexpr (kAcc) {
    moments->assign(size_t(out.num_groups), moments_empty());
    for (int t = 0; t < nt; ++t)
      for (int64_t g = 0; g < tables[t]->size(); ++g)
        (*moments)[g * nt + t] = shifted_moments(tables[t]->group(g).acc);
  }
  return out;
}

// Ids that are nearly dense (max − min < 2n, e.g. prompt indices) need no hashing: the group
// of a row is id − min, and the accumulators sit in an array of that range (unused numbers
// are empty groups, n = 0, with no rows). Rows are visited in row order, as above.
struct IdRange {
  int64_t min, max;
};

inline IdRange id_range(const int64_t* ids, int64_t n) {
  struct R {
    int64_t lo, hi;
  };
  const R r = at::parallel_reduce(
      0, n, int64_t(1) << 17, R{INT64_MAX, INT64_MIN},
      [&](int64_t b, int64_t e, R acc) {
        for (int64_t i = b; i < e; ++i) {
          acc.lo = std::min(acc.lo, ids[i]);
          acc.hi = std::max(acc.hi, ids[i]);
        }
        return acc;
      },
      [](R a, R b) { return R{std::min(a.lo, b.lo), std::max(a.hi, b.hi)}; });
  return {r.lo, r.hi};
}

inline bool dense_enough(IdRange r, int64_t n) {
  // The subtraction cannot overflow once the difference is known to be small and positive.
  return n > 0 && r.max >= r.min && uint64_t(r.max) - uint64_t(r.min) < uint64_t(2 * n + 1024) &&
         uint64_t(r.max) - uint64_t(r.min) < (uint64_t(1) << 31);
}

// With values == nullptr only row_group is written (and `moments` untouched).
template <typename T>
Grouping group_by_dense_ids(const int64_t* ids, int64_t n, IdRange r, const T* values,
                            int32_t* row_group, std::vector<GroupMoments>* moments) {
  const int64_t k = int64_t(uint64_t(r.max) - uint64_t(r.min)) + 1;
  if (values == nullptr) {
    for (int64_t i = 0; i < n; ++i) row_group[i] = int32_t(uint64_t(ids[i]) - uint64_t(r.min));
    Grouping out;
    out.num_groups = k;
    out.row_group = row_group;
    return out;
  }
  static thread_local Workspace<ShiftedSums> store;
  ShiftedSums* acc = store.get(size_t(k));
  for (int64_t g = 0; g < k; ++g) acc[g] = shifted_empty();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t g = int32_t(uint64_t(ids[i]) - uint64_t(r.min));
    row_group[i] = g;
    if (values != nullptr) {
      const double x = double(values[i]);
      if (score_is_valid(x)) shifted_push(acc[g], x);
    }
  }
  Grouping out;
  out.num_groups = k;
  out.row_group = row_group;
  moments->resize(size_t(k));
  for (int64_t g = 0; g < k; ++g) (*moments)[g] = shifted_moments(acc[g]);
  return out;
}

}  // namespace rlkern::cpu
