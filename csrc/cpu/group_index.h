// Grouping rows by arbitrary 64-bit ids (or id pairs) on the CPU: an open-addressing hash
// table that numbers the groups densely in order of first appearance; the callers accumulate
// each group's shifted sums (rlkern/group_stats.h) in a dense array indexed by that number.
//
// Why a hash table and not a sort: the ids are arbitrary int64 in any order (verl shuffles
// rows; uids are hashed to integers) and groups are small (8–64 rows). A sort costs
// O(N log N) over several passes; the table costs one pass with one random access per row
// into a 16-byte slot (32 for id pairs), prefetched a few rows ahead so that the misses of
// independent rows overlap. Rows are visited in row order, so each group's accumulation
// order — hence its sums, to double rounding — is fixed by the input, never by the thread
// count.
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
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/compress_avx2.h"
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

// Numbers keys of kWords int64 words densely, in order of first appearance: linear probing
// over slots holding the key and its number (one slot a probe, 16 bytes for one word).
//
// The load stays at most 1/4. On the machines this runs on a numbering at load 1/2 costs
// ~4× more per row than at 1/4 (65,536 rows in 8,192 groups: 5.5 against 1.5 ns a row): at
// 1/2 half the first probes land on another key, so the probe loop's exit branch is a coin
// flip and the chains are longer; at 1/4 nearly every lookup ends at its first slot.
//
// No key value is reserved: a slot is empty when its group is −1. A new numbering empties
// the previous one's slots through their list (slot_of_), ~8 bytes written a group, instead
// of clearing the whole table.
//
// Cache-line aligned: the tables of different threads (group_by_ids_parallel) are written on
// every insert (their counts) and read on every row (their masks); sharing a line, the two
// threads of a 2-core machine took 1.8× longer together than one of them alone.
template <int kWords>
class alignas(64) KeyTable {
 public:
  struct alignas(kWords == 1 ? 16 : 32) Slot {
    int64_t key[kWords];
    int32_t group;  // −1: empty
  };

  // A new numbering of up to max_groups groups, about expected_groups of them. The previous
  // numbering's count (capped by max_groups) raises the estimate: batches of one workload have
  // similar counts, and growing the table within a call rehashes every key.
  void reset(int64_t expected_groups, int64_t max_groups) {
    const int64_t expected = std::max(expected_groups, std::min(groups_, max_groups));
    for (int64_t g = 0; g < groups_; ++g) slots_[slot_of_[g]].group = -1;
    groups_ = 0;
    size_t cap = 1024;
    while (cap < kLoadInverse * size_t(expected)) cap <<= 1;
    if (cap > store_.capacity()) fresh(cap);
    set_capacity(cap);  // a smaller mask on a larger (all empty) buffer is fine
  }

  static uint64_t hash(const int64_t* key) {
    return hash_words(key[0], kWords == 2 ? key[kWords - 1] : 0);
  }
  // The same from the key's words (the second ignored for one-word keys): a form the block
  // loops vectorise, with no key copied through memory.
  static uint64_t hash_words(int64_t w0, int64_t w1) {
    uint64_t h = mix64(uint64_t(w0));
    if (kWords == 2) h = mix64(h ^ (uint64_t(w1) + 0x9e3779b97f4a7c15ULL));
    return h;
  }

  void prefetch(uint64_t h) const { prefetch_l1_for_write(&slots_[h & mask_]); }

  // The group number of `key` (hash h); a new key gets the next number.
  int32_t number(const int64_t* key, uint64_t h) {
    size_t j = size_t(h & mask_);
    while (slots_[j].group >= 0 && !same_key(slots_[j].key, key)) j = (j + 1) & mask_;
    Slot& s = slots_[j];
    if (__builtin_expect(s.group >= 0, 1)) return s.group;
    // A new key. The insert stays this small (no call, no allocation: slot_of_ has room for
    // every group the load allows) so that the probe loop keeps its registers: with a
    // push_back here the whole numbering ran ~1.35× slower.
    const int32_t g = int32_t(groups_++);
    slot_of_[g] = uint32_t(j);
    std::memcpy(s.key, key, sizeof(s.key));
    s.group = g;
    if (__builtin_expect(size_t(groups_) * kLoadInverse > capacity_, 0)) grow();
    return g;
  }

  int64_t size() const { return groups_; }
  // The first key word of group g.
  int64_t first_word(int64_t g) const { return slots_[slot_of_[g]].key[0]; }

 private:
  static constexpr size_t kLoadInverse = 4;

  static bool same_key(const int64_t* a, const int64_t* b) {
    for (int w = 0; w < kWords; ++w)
      if (a[w] != b[w]) return false;
    return true;
  }

  // An all-empty buffer of at least cap slots (the old contents are lost).
  void fresh(size_t cap) {
    slots_ = store_.get(cap);
    std::memset(static_cast<void*>(slots_), 0xff, store_.capacity() * sizeof(Slot));
  }

  // Probing masks with cap − 1; slot_of_ gets room for the cap / kLoadInverse + 1 groups the
  // table holds before it grows (its contents are lost when it is reallocated).
  void set_capacity(size_t cap) {
    capacity_ = cap;
    mask_ = cap - 1;
    slot_of_ = slot_store_.get(cap / kLoadInverse + 1);
  }

  // Rare: more groups than expected; rehash into a table twice as large.
  __attribute__((noinline, cold)) void grow() {
    const int64_t count = groups_;
    std::vector<Slot> old(static_cast<size_t>(count));
    for (int64_t g = 0; g < count; ++g) old[g] = slots_[slot_of_[g]];
    // Should an allocation below throw, the next reset must not touch the released buffers.
    groups_ = 0;
    const size_t cap = capacity_ * 2;
    if (cap > store_.capacity()) {
      fresh(cap);
    } else {
      for (int64_t g = 0; g < count; ++g) slots_[slot_of_[g]].group = -1;
    }
    set_capacity(cap);
    groups_ = count;
    for (int64_t g = 0; g < count; ++g) {
      size_t j = size_t(hash(old[g].key) & mask_);
      while (slots_[j].group >= 0) j = (j + 1) & mask_;
      slots_[j] = old[g];
      slot_of_[g] = uint32_t(j);
    }
  }

  Workspace<Slot> store_;
  Workspace<uint32_t> slot_store_;
  Slot* slots_ = nullptr;
  uint32_t* slot_of_ = nullptr;  // group → slot
  size_t capacity_ = 0;
  uint64_t mask_ = 0;
  int64_t groups_ = 0;
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

// The thread (of nt) that owns the groups of hash h: a multiply-shift of its high half.
inline int hash_owner(uint64_t h, int nt) {
  return int((uint64_t(uint32_t(h >> 32)) * uint64_t(nt)) >> 32);
}

// Packs the m (hash, row) pairs whose hash thread t of nt owns to the front of the arrays, in
// order; returns how many. With AVX-512 eight at a time (a compress), which matters: every
// thread filters every row, so a scalar append (~0.6 ns a row, a dependent store address)
// cost about what the thread saved by probing only its share.
inline int64_t keep_owned(uint64_t* hashes, int64_t* rows, int64_t m, int t, int nt) {
  int64_t kept = 0, j = 0;
#if defined(__AVX512F__)
  const __m512i vnt = _mm512_set1_epi64(nt), vt = _mm512_set1_epi64(t);
  for (; j + 8 <= m; j += 8) {
    const __m512i h = _mm512_loadu_si512(hashes + j);
    const __m512i r = _mm512_loadu_si512(rows + j);
    // hash_owner: (high 32 bits × nt) >> 32, in 64-bit lanes.
    const __m512i owner = _mm512_srli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(h, 32), vnt), 32);
    const __mmask8 mine = _mm512_cmpeq_epi64_mask(owner, vt);
    // Compressed in registers, stored whole (a compress straight to memory is microcoded
    // and slow on Zen 4): the store covers [kept, kept + 8) ⊆ [0, j + 8), lanes already read.
    _mm512_storeu_si512(hashes + kept, _mm512_maskz_compress_epi64(mine, h));
    _mm512_storeu_si512(rows + kept, _mm512_maskz_compress_epi64(mine, r));
    kept += __builtin_popcount(unsigned(mine));
  }
#elif defined(__AVX2__)
  const __m256i vnt = _mm256_set1_epi64x(nt), vt = _mm256_set1_epi64x(t);
  for (; j + 4 <= m; j += 4) {  // the same four at a time, packed by compress::lanes64
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hashes + j));
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j));
    const __m256i owner = _mm256_srli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(h, 32), vnt), 32);
    const unsigned mine =
        unsigned(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(owner, vt))));
    const __m256i at = compress::lanes64(mine);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hashes + kept),
                        _mm256_permutevar8x32_epi32(h, at));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + kept),
                        _mm256_permutevar8x32_epi32(r, at));
    kept += __builtin_popcount(mine);
  }
#endif
  for (; j < m; ++j) {
    const uint64_t h = hashes[j];
    const int64_t r = rows[j];
    hashes[kept] = h;
    rows[kept] = r;
    kept += hash_owner(h, nt) == t;
  }
  return kept;
}

// Numbers the rows of [0, n) that thread t of nt owns (all of them when nt == 1) with `table`,
// in row order: row_group[i] = local · nt + t. With `acc` (emptied by the caller), also pushes
// each valid value into its group's shifted sums, acc[local]. Rows go in blocks: the block's
// hashes (a loop the compiler vectorises), the owned rows of them (a branch-free append), their
// numbers with each slot prefetched kAhead rows ahead, then their values into the accumulators,
// each prefetched the same way once its group is known.
template <int kWords, typename T>
void number_rows(KeyTable<kWords>& table, const int64_t* ids, const int64_t* ids2, int64_t n,
                 int t, int nt, int32_t* row_group, const T* values,
                 std::vector<ShiftedSums>* acc) {
  constexpr int64_t kBlock = 1024, kAhead = 16;
  uint64_t hashes[kBlock];
  int64_t rows[kBlock];
  int32_t group[kBlock];
  int64_t key[kWords];
  auto load_key = [&](int64_t i) {
    key[0] = ids[i];
    if (kWords == 2) key[kWords - 1] = ids2[i];
  };
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    int64_t m = b1 - b0;
    for (int64_t i = b0; i < b1; ++i)
      hashes[i - b0] = KeyTable<kWords>::hash_words(ids[i], kWords == 2 ? ids2[i] : 0);
    for (int64_t i = b0; i < b1; ++i) rows[i - b0] = i;
    if (nt > 1) m = keep_owned(hashes, rows, b1 - b0, t, nt);
    for (int64_t j = 0; j < std::min(m, kAhead); ++j) table.prefetch(hashes[j]);
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) table.prefetch(hashes[j + kAhead]);
      const int64_t i = rows[j];
      load_key(i);
      group[j] = table.number(key, hashes[j]);
      row_group[i] = group[j] * nt + t;
    }
    if (acc == nullptr) continue;
    acc->resize(size_t(table.size()), shifted_empty());
    ShiftedSums* a = acc->data();
    for (int64_t j = 0; j < std::min(m, kAhead); ++j) prefetch_l1_for_write(a + group[j]);
    for (int64_t j = 0; j < m; ++j) {
      if (j + kAhead < m) prefetch_l1_for_write(a + group[j + kAhead]);
      const double x = double(values[rows[j]]);
      if (score_is_valid(x)) shifted_push(a[group[j]], x);
    }
  }
}

// Groups the rows by `ids` (with kWords == 2, by the pairs (ids[i], ids2[i])) into
// `row_group` (n entries, caller's storage). With `values`, also accumulates the moments of each
// group's valid values (score_is_valid; others are skipped) into `moments` (resized to K).
// `keys` (optional) receives each group's first id word. Single-threaded on purpose (see the
// top of this file); independent groupings may run on different threads, each owning a table.
template <int kWords, typename T>
Grouping group_by_keys(const int64_t* ids, const int64_t* ids2, int64_t n, const T* values,
                       int32_t* row_group, std::vector<GroupMoments>* moments,
                       std::vector<int64_t>* keys = nullptr) {
  static thread_local KeyTable<kWords> table;
  static thread_local std::vector<ShiftedSums> acc;
  table.reset(n / 8 + 1, n);
  acc.clear();
  number_rows<kWords, T>(table, ids, ids2, n, 0, 1, row_group, values,
                         values != nullptr ? &acc : nullptr);
  Grouping out;
  out.num_groups = table.size();
  out.row_group = row_group;
  if (moments != nullptr) {
    moments->resize(size_t(out.num_groups));
    for (int64_t g = 0; g < out.num_groups; ++g)
      (*moments)[g] = shifted_moments(values != nullptr ? acc[g] : shifted_empty());
  }
  if (keys != nullptr) {
    keys->resize(size_t(out.num_groups));
    for (int64_t g = 0; g < out.num_groups; ++g) (*keys)[g] = table.first_word(g);
  }
  return out;
}

// How many threads group_by_ids_parallel splits n rows over: from 2^15 rows a thread (at
// 65,536 shuffled rows in groups of 8, two threads number in ~115 µs against ~155 µs for one:
// every thread hashes and filters all rows).
inline int grouping_threads(int64_t n) {
  constexpr int64_t kMinRowsPerThread = 1 << 15;
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                    n / kMinRowsPerThread)));
}

// Multi-threaded grouping by ids (kWords == 2: by the pairs (ids[i], ids2[i])): thread t of nt
// owns a table of its own and the keys whose hash falls in its share, so each group is still
// accumulated by exactly one thread, in row order (results do not depend on nt). Group numbers
// interleave, g = local·nt + t, so up to nt − 1 numbers per thread stay unused: those "holes"
// have n = 0 and no rows. With kAcc the moments of the valid values are accumulated too;
// without, only the numbering is done and `moments` is untouched.
template <typename T, bool kAcc, int kWords = 1>
Grouping group_by_ids_parallel(const int64_t* ids, int64_t n, const T* values,
                               int32_t* row_group, std::vector<GroupMoments>* moments,
                               const int64_t* ids2 = nullptr) {
  const int nt = grouping_threads(n);
  struct PerThread {  // a thread's table and accumulators, on lines of their own
    KeyTable<kWords> table;
    alignas(64) std::vector<ShiftedSums> acc;
  };
  static thread_local std::vector<std::unique_ptr<PerThread>> state_tl;
  auto& state = state_tl;  // bound here: the workers must use this thread's tables
  while (int(state.size()) < nt) state.push_back(std::make_unique<PerThread>());
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      PerThread& s = *state[t];
      s.table.reset(n / 8 / nt + 1, n);
      s.acc.clear();
      number_rows<kWords, T>(s.table, ids, ids2, n, int(t), nt, row_group, values,
                             kAcc ? &s.acc : nullptr);
    }
  });
  int64_t per_thread = 0;
  for (int t = 0; t < nt; ++t) per_thread = std::max(per_thread, state[t]->table.size());
  Grouping out;
  out.num_groups = per_thread * nt;
  out.row_group = row_group;
  if constexpr (kAcc) {
    moments->assign(size_t(out.num_groups), moments_empty());
    for (int t = 0; t < nt; ++t)
      for (int64_t g = 0; g < state[t]->table.size(); ++g)
        (*moments)[g * nt + t] = shifted_moments(state[t]->acc[g]);
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

// Where a row's group number comes from: an array of them (the hash numbering's output), or
// id − min, read straight from nearly dense ids. The second writes no array: for 65,536 rows
// that array's 256 KiB, fetched for ownership line by line before being written, cost ~25 µs,
// more than reading the 8-byte ids in the passes that follow.
struct GroupArray {
  const int32_t* rg;
  int32_t operator[](int64_t i) const { return rg[i]; }
#if defined(__AVX512F__)
  __m512i load16(int64_t i) const { return _mm512_loadu_si512(rg + i); }
#elif defined(__AVX2__)
  __m256i load8(int64_t i) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rg + i));
  }
#endif
};

struct DenseIds {
  const int64_t* ids;
  int64_t min;
  int32_t operator[](int64_t i) const { return int32_t(uint64_t(ids[i]) - uint64_t(min)); }
#if defined(__AVX512F__)
  __m512i load16(int64_t i) const {  // the same truncation to 32 bits (vpmovqd)
    const __m512i m = _mm512_set1_epi64(min);
    const __m256i lo = _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(ids + i), m));
    const __m256i hi =
        _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512(ids + i + 8), m));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
#elif defined(__AVX2__)
  __m256i load8(int64_t i) const {  // the same truncation: the low dwords of eight int64
    const __m256i m = _mm256_set1_epi64x(min);
    const __m256 lo = _mm256_castsi256_ps(
        _mm256_sub_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + i)), m));
    const __m256 hi = _mm256_castsi256_ps(
        _mm256_sub_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + i + 4)), m));
    // dwords 0, 2 of each 128-bit half of lo and hi, then the halves in order
    const __m256 even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(even), _MM_SHUFFLE(3, 1, 2, 0));
  }
#endif
};

// Whether the ids may be nearly dense: false when the first 64 already span too wide a range
// (the whole batch spans at least as wide), so that arbitrary 64-bit ids skip id_range's pass.
inline bool maybe_dense(const int64_t* ids, int64_t n) {
  return dense_enough(id_range(ids, std::min<int64_t>(n, 64)), n);
}

// Nearly dense ids (dense_enough): the group of a row is id − min, threads splitting rows.
inline Grouping dense_numbering(const int64_t* ids, int64_t n, IdRange r, int32_t* row_group) {
  at::parallel_for(0, n, int64_t(1) << 17, [&](int64_t b, int64_t e) {
    const DenseIds group{ids, r.min};
    for (int64_t i = b; i < e; ++i) row_group[i] = group[i];
  });
  Grouping out;
  out.num_groups = int64_t(uint64_t(r.max) - uint64_t(r.min)) + 1;
  out.row_group = row_group;
  return out;
}

// The ids' range when they are nearly dense (dense_enough), else nullopt: arbitrary 64-bit ids
// are told apart by their first 64 (maybe_dense) and skip the range pass.
inline std::optional<IdRange> dense_range(const int64_t* ids, int64_t n) {
  if (!maybe_dense(ids, n)) return std::nullopt;
  const IdRange r = id_range(ids, n);
  return dense_enough(r, n) ? std::optional<IdRange>(r) : std::nullopt;
}

// With values == nullptr only row_group is written (and `moments` untouched).
template <typename T>
Grouping group_by_dense_ids(const int64_t* ids, int64_t n, IdRange r, const T* values,
                            int32_t* row_group, std::vector<GroupMoments>* moments) {
  const int64_t k = int64_t(uint64_t(r.max) - uint64_t(r.min)) + 1;
  if (values == nullptr) {
    const DenseIds group{ids, r.min};
    for (int64_t i = 0; i < n; ++i) row_group[i] = group[i];
    Grouping out;
    out.num_groups = k;
    out.row_group = row_group;
    return out;
  }
  static thread_local Workspace<ShiftedSums> store;
  ShiftedSums* acc = store.get(size_t(k));
  for (int64_t g = 0; g < k; ++g) acc[g] = shifted_empty();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t g = DenseIds{ids, r.min}[i];
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
