// CPU kernels of eager16.h.
#include "cpu/eager16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

// torch's vector kernels compute exp and log of widened 16-bit values with Sleef's *_u10
// functions, which libtorch_cpu exports. Weak references: a torch without them leaves them
// null, and the kernels take std::exp / std::log instead.
#if defined(__AVX512F__)
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
extern "C" __m512 Sleef_logf16_u10(__m512) __attribute__((weak));
#elif defined(__AVX2__) && defined(__FMA__)
extern "C" __m256 Sleef_expf8_u10(__m256) __attribute__((weak));
extern "C" __m256 Sleef_logf8_u10(__m256) __attribute__((weak));
#endif

namespace rlkern::cpu {
namespace {

// The float lanes of torch's vectors: its reductions' order depends on them. A build without
// AVX assumes torch's AVX-512 kernels.
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 16;
#endif
constexpr int kBlock = 2 * kLanes;  // one vector of 16-bit values: two float vectors

// exp (or log) of kLanes floats in place, as torch's Vectorized<float> computes it.
template <bool kLog>
void sleef_lanes(float* a) {
#if defined(__AVX512F__)
  auto* f = kLog ? Sleef_logf16_u10 : Sleef_expf16_u10;
  if (f != nullptr) {
    _mm512_storeu_ps(a, f(_mm512_loadu_ps(a)));
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  auto* f = kLog ? Sleef_logf8_u10 : Sleef_expf8_u10;
  if (f != nullptr) {
    _mm256_storeu_ps(a, f(_mm256_loadu_ps(a)));
    return;
  }
#endif
  for (int i = 0; i < kLanes; ++i) a[i] = kLog ? std::log(a[i]) : std::exp(a[i]);
}

template <typename Tag>
float round16(float v) {
  typename Tag::storage s;
  store_scalar<Tag>(&s, v);
  return load_scalar<Tag>(&s);
}

// exp(x_v − m) of `count` logits from x into the two float vectors f0, f1 (kBlock lanes), the
// lanes past `count` loaded as 0 (torch's partial loadu), as their exps.
template <typename Tag>
void exp_block(const typename Tag::storage* x, int64_t count, float m, float* f) {
  for (int i = 0; i < kBlock; ++i) f[i] = (i < count ? load_scalar<Tag>(x + i) : 0.0f) - m;
  sleef_lanes<false>(f);
  sleef_lanes<false>(f + kLanes);
}

// S = Σ exp(x_v − m) in the order of torch's vec::map_reduce_all for 16-bit data
// (functional_bfloat16.h): see eager16.h.
template <typename Tag>
float sum_exp_like_torch(const typename Tag::storage* x, int64_t n, float m) {
  alignas(64) float f[kBlock];
  if (n < kBlock) {
    exp_block<Tag>(x, n, m, f);
    int64_t lanes = n;
    if (n > kLanes) {  // the second vector's lanes blended into the first, then all lanes
      for (int64_t i = 0; i < n - kLanes; ++i) f[i] = f[i] + f[kLanes + i];
      lanes = kLanes;
    }
    float s = f[0];
    for (int64_t i = 1; i < lanes; ++i) s = s + f[i];
    return s;
  }
  alignas(64) float acc[kBlock];
  exp_block<Tag>(x, kBlock, m, acc);
  const int64_t full = n - n % kBlock;
  int64_t d = kBlock;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  static_assert(VecF::size == kLanes);
  {  // the whole blocks in registers: the same operations, lane for lane
    const VecF vm = VecF::set1(m);
    VecF acc0 = VecF::load(acc), acc1 = VecF::load(acc + kLanes);
    alignas(64) float lanes[kBlock];
    for (; d < full; d += kBlock) {
      (VecF::load(x + d, Tag{}) - vm).store(lanes, F32{});
      (VecF::load(x + d + kLanes, Tag{}) - vm).store(lanes + kLanes, F32{});
      sleef_lanes<false>(lanes);
      sleef_lanes<false>(lanes + kLanes);
      acc0 = acc0 + VecF::load(lanes);
      acc1 = acc1 + VecF::load(lanes + kLanes);
    }
    acc0.store(acc, F32{});
    acc1.store(acc + kLanes, F32{});
  }
#endif
  for (; d < full; d += kBlock) {
    exp_block<Tag>(x + d, kBlock, m, f);
    for (int i = 0; i < kBlock; ++i) acc[i] = acc[i] + f[i];
  }
  if (const int64_t rest = n - d; rest > 0) {
    exp_block<Tag>(x + d, rest, m, f);
    // lanes past the tail keep the accumulator (torch's Vectorized::set)
    for (int64_t i = 0; i < rest; ++i) acc[i] = acc[i] + f[i];
  }
  for (int i = 0; i < kLanes; ++i) acc[i] = acc[i] + acc[kLanes + i];
  // the horizontal sum: a butterfly, lane i plus lane i ^ dist for dist = kLanes/2 … 1
  for (int dist = kLanes / 2; dist >= 1; dist /= 2) {
    alignas(64) float next[kLanes];
    for (int i = 0; i < kLanes; ++i) next[i] = acc[i] + acc[i ^ dist];
    std::copy(next, next + kLanes, acc);
  }
  return acc[0];
}

template <typename Tag>
void stats_rows(const LogitsLayout& a, float* shift, float* log_s, int64_t begin, int64_t end) {
  using S = typename Tag::storage;
  for (int64_t r = begin; r < end; ++r) {
    const S* x = row_start<S>(a, r);
    float m = -std::numeric_limits<float>::infinity();
    int64_t v = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    // the max has no order to keep; a NaN logit may be lost here (the x86 max returns its
    // second operand), but it makes S NaN, and with it log_s and the whole row, as in torch
    VecF vmax = VecF::set1(m);
    for (; v + VecF::size <= a.V; v += VecF::size) vmax = VecF::max(vmax, VecF::load(x + v, Tag{}));
    alignas(64) float lanes[VecF::size];
    vmax.store(lanes, F32{});
    for (float l : lanes) m = (l > m || std::isnan(l)) && !std::isnan(m) ? l : m;
#endif
    for (; v < a.V; ++v) {
      const float xv = load_scalar<Tag>(x + v);
      if (xv > m || std::isnan(xv)) m = std::isnan(m) ? m : xv;  // NaN propagates, as torch's
    }
    alignas(64) float s[kLanes];
    std::fill(s, s + kLanes, round16<Tag>(sum_exp_like_torch<Tag>(x, a.V, m)));
    sleef_lanes<true>(s);
    shift[r] = m;
    log_s[r] = round16<Tag>(s[0]);
  }
}

// A term is a function of lp's 16 bits alone: t(lp) = round16(round16(exp(lp)) · lp). One table
// of all 65,536 (128 KiB, built once a dtype with Sleef's exp, torch's) replaces the exp, two
// roundings and the product of every logit by a lookup.
template <typename Tag>
const uint16_t* term_table() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> t(1 << 16);
    alignas(64) float lp[kLanes], e[kLanes];
    for (int i0 = 0; i0 < (1 << 16); i0 += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const uint16_t bits = uint16_t(i0 + j);
        lp[j] = e[j] = load_scalar<Tag>(&bits);
      }
      sleef_lanes<false>(e);
      for (int j = 0; j < kLanes; ++j) store_scalar<Tag>(&t[i0 + j], round16<Tag>(e[j]) * lp[j]);
    }
    return t;
  }();
  return table.data();
}

// The bits of −inf in the storage type: such a logit's term is 0, the limit of p·log p (the
// table holds torch's 0 · (−inf) = NaN, which a finite logit gives where Σ exp overflows fp16).
template <typename Tag>
constexpr uint16_t kNegInfBits = std::is_same_v<Tag, BF16> ? 0xff80 : 0xfc00;

template <typename Tag>
void term_rows(const LogitsLayout& a, int64_t first, const float* shift, const float* log_s,
               void* terms, int64_t begin, int64_t end) {
  using S = typename Tag::storage;
  const uint16_t* table = term_table<Tag>();
  const int64_t n = a.V;
  for (int64_t r = begin; r < end; ++r) {  // r counts from `first`
    const S* x = row_start<S>(a, first + r);
    S* t = static_cast<S*>(terms) + r * n;
    const float m = shift[r], ls = log_s[r];
    int64_t v = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    const VecF vm = VecF::set1(m), vls = VecF::set1(ls);
    alignas(64) uint16_t lp[VecF::size];
    for (; v + VecF::size <= n; v += VecF::size) {
      ((VecF::load(x + v, Tag{}) - vm) - vls).store(lp, Tag{});  // lp's 16 bits
      for (int j = 0; j < VecF::size; ++j)
        t[v + j] = x[v + j] == kNegInfBits<Tag> ? uint16_t(0) : table[lp[j]];
    }
#endif
    for (; v < n; ++v) {
      S lp;
      store_scalar<Tag>(&lp, (load_scalar<Tag>(x + v) - m) - ls);
      t[v] = x[v] == kNegInfBits<Tag> ? uint16_t(0) : table[lp];
    }
  }
}

// ~64K logits a task: short rows are grouped, long rows go one a task.
int64_t grain(int64_t vocab) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1));
}

}  // namespace

void log_softmax_stats_16bit(const LogitsLayout& a, float* shift, float* log_s) {
  at::parallel_for(0, a.B * a.L, grain(a.V), [&](int64_t begin, int64_t end) {
    if (a.dtype == DType::kBFloat16) stats_rows<BF16>(a, shift, log_s, begin, end);
    else stats_rows<F16>(a, shift, log_s, begin, end);
  });
}

void entropy_terms_16bit(const LogitsLayout& a, int64_t first, int64_t count,
                         const float* shift, const float* log_s, void* terms) {
  at::parallel_for(0, count, grain(a.V), [&](int64_t begin, int64_t end) {
    if (a.dtype == DType::kBFloat16) term_rows<BF16>(a, first, shift, log_s, terms, begin, end);
    else term_rows<F16>(a, first, shift, log_s, terms, begin, end);
  });
}

}  // namespace rlkern::cpu
