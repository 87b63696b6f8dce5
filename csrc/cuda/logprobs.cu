// CUDA kernels for token log-probabilities, entropy and their gradient (ALGORITHMS.md §1).
//
// Torch-free (DESIGN.md style rule 1): the launchers at the bottom take raw pointers, sizes,
// strides and a cudaStream_t and return an error code; csrc/cuda/logprobs_ops.cpp adapts
// tensors.
// Declarations and the full contract: csrc/include/rlkern/cuda_launchers.h.
//
// Forward (one read of the logits). For a row x (length V) with label y and z = x / T:
//   lse = m/T + log s,  logp = (x_y − m)/T − log s,  entropy = log s − t / s,
//   self_certainty = log s − Σ(x − m) / (T V),  Σp² = u / s²
// with the streaming statistics (m, s, t, u, Σ(x − m)) of rlkern/online_softmax.h (the online
// normaliser of Milakov & Gimelshein 2018, "Online normalizer calculation for softmax",
// extended with the shifted first and second moments), m being the max of the raw logits:
// everything is shifted before 1/T scales it, so finite rows stay finite at any magnitude and
// temperature. Each thread summarises a fixed set of vocab chunks; the summaries are merged
// with softmax_stats_merge, first across the lanes of a warp (shuffles), then across the
// warps of the block (shared memory).
//
// Backward (one read and one write of the logits, nothing of size V saved by the forward):
//   grad_v = [ p_v (g_ent (E_p[z'] − z'_v) + g_lse − g_lp) + 1[v = y] g_lp ] / T,
//   p_v = exp(z'_v − ref),  z'_v = (x_v − shift)/T.
// A row with a moderate lse (|lse| < kBwdLseBound) takes shift = 0, ref = lse, E_p[z] =
// lse − entropy; any other one recomputes its max M and normaliser (each warp of the row on
// its own, so no barrier is needed) and takes shift = M, ref = log s, E_p[z'] = t / s: exact
// where the rounded lse would move p by up to e^1000 (huge logits, a tiny T).
//
// Batch invariance: which thread reads which element, the order in which a thread
// accumulates, and the merge tree all depend only on V and the dtype (the launch shape is a
// function of V only), never on B, L, the row index or the row's memory alignment; so a row's
// outputs are bitwise independent of the rest of the batch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rlkern/cuda_dtype.h"
#include "rlkern/cuda_launchers.h"
#include "rlkern/logprobs.h"
#include "rlkern/online_softmax.h"

namespace rlkern {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFwdMaxThreads = 512;      // threads per block (and per row) in the forward
constexpr int kFwdChunksPerThread = 4;   // forward: widen a row's threads while each owns more
constexpr int kBwdMaxThreads = 256;      // threads per block in the backward
constexpr int kBwdUnroll = 4;            // backward: 16-byte vectors in flight per thread
constexpr int kBwdMinBlocks = 4;         // backward: ≥ 4 resident blocks/SM, i.e. ≤ 64 registers
constexpr float kLowestFloat = -3.402823466e38f;  // lowest finite float

// -------------------------------------------------------------------------------------------
// Element types. A "chunk" is kVec consecutive elements = 16 bytes, the widest global load.

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: size mismatch");
  To to;
  memcpy(&to, &from, sizeof(To));  // compiles to a register move
  return to;
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&x)[kVec]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kVec]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&x)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(bit_cast<__half2>(w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kVec]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bit_cast<uint32_t>(__floats2half2_rn(x[2 * i], x[2 * i + 1]));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  // bf16 is the top half of a float32, so widening is exact bit surgery on each 32-bit word:
  // the low element is `w << 16`, the high element is `w & 0xffff0000` (no cvt instructions).
  static __device__ __forceinline__ void unpack(const uint4& r, float (&x)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kVec]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = bit_cast<uint32_t>(__floats2bfloat162_rn(x[2 * i], x[2 * i + 1]));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Row r = b * L + l of a (B, L, V) view starts at element b * stride_0 + l * stride_1.
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t L, int64_t stride_0,
                                              int64_t stride_1) {
  const int64_t b = row / L;
  return b * stride_0 + (row - b * L) * stride_1;
}

// -------------------------------------------------------------------------------------------
// Forward

// What both kernels read of the rows: the (B, L, V) view of the logits, labels and options.
struct RowArgs {
  const void* logits;
  int64_t rows, L;
  int V;  // in-row offsets are 32-bit (V < 2^31); row offsets are 64-bit
  int64_t stride_0, stride_1;
  const int64_t* labels;
  float inv_t;  // 1 / T: the scale of lse = m / T + log s
  float k;      // 1 / T kept normal and finite: the scale of x − m (see row_args)
  int64_t ignore_index;
};

// 1/T scales x − m, which is ≤ 0: it is kept normal (a temperature so large that 1/T is
// denormal or 0 would make −inf · 0 = NaN) and finite, as the CPU and Triton kernels do.
RowArgs row_args(const void* logits, int64_t B, int64_t L, int64_t V, int64_t stride_0,
                 int64_t stride_1, const int64_t* labels, float temperature,
                 int64_t ignore_index) {
  const float inv_t = 1.f / temperature;
  const float k = fminf(fmaxf(inv_t, 1.17549435e-38f), 3.40282347e38f);
  return {logits, B * L, L, static_cast<int>(V), stride_0, stride_1, labels, inv_t, k,
          ignore_index};
}

struct FwdArgs : RowArgs {
  float* logprobs;
  float* lse;
  float* entropy;         // nullable
  float* self_certainty;  // nullable
  float* sum_p_sq;        // nullable
};

// Load chunk k (elements [k·kVec, (k+1)·kVec)) of a row as floats. The chunk → thread
// assignment is the same whether or not the row is 16-byte aligned (so the reduction order,
// hence the result, does not depend on where the row sits in memory); only the load width
// changes: one 16-byte load, or kVec scalar loads for a misaligned row (e.g. an odd V).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ x, int k, bool vec_ok,
                                           float (&out)[Elem<T>::kVec]) {
  constexpr int kVec = Elem<T>::kVec;
  if (vec_ok) {
    Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(x) + k), out);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = Elem<T>::to_float(x[k * kVec + i]);
  }
}

// Add the first n (≤ N) logits of a chunk to a thread's running summary `st` (reference max
// st.m of the raw logits, k = 1/T; with kStats also Σ(x − c), c the row's constant).
//
// Tricks:
//  * one max per chunk: the reference moves at most once per chunk, so the rescale (one exp,
//    via softmax_stats_rescale) is paid per chunk at most, not per element as in the
//    textbook online softmax — and, once the row max has been seen, almost never;
//  * the shift comes before the scale, (x − m)·k, so neither huge logits nor a tiny T
//    overflow or lose their differences; exp is the fast __expf (ex2.approx with a log2(e)
//    prescale, ~2 ulp), the accumulation is float32;
//  * −inf logits give e = 0; their t term would be 0 · (−inf) = NaN, so (x − m)·k is clamped
//    to the lowest finite float there (0 · finite = 0). NaN logits (and +inf ones, for which
//    x − m = inf − inf) still make s (and every result) NaN.
template <int N, bool kEntropy, bool kStats>
__device__ __forceinline__ void accumulate_chunk(SoftmaxStats<float>& st, const float (&x)[N],
                                                 int n, float k, float c) {
  float xmax = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) xmax = fmaxf(xmax, x[i]);
  if (xmax > st.m) softmax_stats_rescale(st, xmax, k);
  // While only −inf (or NaN) has been seen the reference is −inf; shift by 0 instead so that
  // x − m is −inf (e = 0) rather than −inf − (−inf) = NaN.
  const float m = softmax_stats_ref(st.m);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float r = x[i] - m;
    const float d = r * k;
    const float e = __expf(d);
    st.s += e;
    if constexpr (kEntropy) st.t = fmaf(e, fmaxf(d, kLowestFloat), st.t);
    if constexpr (kStats) {
      st.u = fmaf(e, e, st.u);
      st.zsum += i < n ? x[i] - c : 0.f;  // padding of a partial chunk is −inf: keep it out
    }
  }
}

// Butterfly merge of the 32 lanes' summaries: after it every lane holds the warp's summary.
// The tree (xor distances 16, 8, 4, 2, 1) is fixed; fields the outputs do not need are not
// shuffled (they stay 0 in the partner's copy and their merged value is dead code).
template <bool kEntropy, bool kStats>
__device__ __forceinline__ SoftmaxStats<float> warp_merge(SoftmaxStats<float> st, float k) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    SoftmaxStats<float> other;
    other.m = __shfl_xor_sync(kFullMask, st.m, off);
    other.s = __shfl_xor_sync(kFullMask, st.s, off);
    other.t = kEntropy ? __shfl_xor_sync(kFullMask, st.t, off) : 0.f;
    other.u = kStats ? __shfl_xor_sync(kFullMask, st.u, off) : 0.f;
    other.zsum = kStats ? __shfl_xor_sync(kFullMask, st.zsum, off) : 0.f;
    st = softmax_stats_merge(st, other, k);
  }
  return st;
}

// One row per blockDim.x threads; blockDim.y rows per block (blockDim.y > 1 only when
// blockDim.x == 32, i.e. one warp per row, for small V). Requires blockDim.x a multiple of 32
// and ≤ kFwdMaxThreads.
template <typename T, bool kEntropy, bool kStats>
__global__ void __launch_bounds__(kFwdMaxThreads)
    logprobs_fwd_kernel(const FwdArgs a) {
  constexpr int kVec = Elem<T>::kVec;
  __shared__ SoftmaxStats<float> warp_stats[kFwdMaxThreads / kWarpSize];

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int nfull = a.V / kVec;        // full chunks
  const int rem = a.V - nfull * kVec;  // elements of the partial chunk

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t y = a.labels[row];
    if (y == a.ignore_index) {  // uniform over the row's threads: nothing is read
      if (tid == 0) {
        a.logprobs[row] = 0.f;
        a.lse[row] = 0.f;
        if (kEntropy && a.entropy) a.entropy[row] = 0.f;
        if (kStats && a.self_certainty) a.self_certainty[row] = 0.f;
        if (kStats && a.sum_p_sq) a.sum_p_sq[row] = 0.f;
      }
      continue;
    }
    const T* __restrict__ x =
        static_cast<const T*>(a.logits) + row_offset(row, a.L, a.stride_0, a.stride_1);
    const bool label_ok = y >= 0 && y < a.V;
    // Thread 0 issues the load of x[y] now, so its latency hides under the sweep instead of
    // sitting after the reduction. An out-of-range label is never dereferenced.
    float x_y = 0.f;
    if (tid == 0 && label_ok) x_y = Elem<T>::to_float(x[y]);

    const bool vec_ok = is_aligned16(x);
    SoftmaxStats<float> st = softmax_stats_empty<float>();
    // zsum's constant: the row's first logit (0 unless finite), the same for every thread.
    float c = 0.f;
    if (kStats && a.V > 0) {
      c = Elem<T>::to_float(x[0]);
      c = isfinite(c) ? c : 0.f;
    }
    // Thread tid owns chunks tid, tid + nthreads, ... and accumulates them in that order.
    // Two chunks are loaded before either is accumulated (two 16-byte loads in flight per
    // thread); the accumulation order is unchanged, so the result equals the plain loop's.
    int k = tid;
    for (; k + nthreads < nfull; k += 2 * nthreads) {
      float c0[kVec], c1[kVec];
      load_chunk(x, k, vec_ok, c0);
      load_chunk(x, k + nthreads, vec_ok, c1);
      accumulate_chunk<kVec, kEntropy, kStats>(st, c0, kVec, a.k, c);
      accumulate_chunk<kVec, kEntropy, kStats>(st, c1, kVec, a.k, c);
    }
    if (k < nfull) {
      float c0[kVec];
      load_chunk(x, k, vec_ok, c0);
      accumulate_chunk<kVec, kEntropy, kStats>(st, c0, kVec, a.k, c);
      k += nthreads;
    }
    if (rem > 0 && k == nfull) {  // the partial last chunk, owned like any other chunk
      float c0[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        c0[i] = i < rem ? Elem<T>::to_float(x[nfull * kVec + i]) : neg_inf<float>();
      }
      accumulate_chunk<kVec, kEntropy, kStats>(st, c0, rem, a.k, c);
    }

    // Merge: lanes → warp (shuffles), then warps → row (shared memory, read by warp 0).
    st = warp_merge<kEntropy, kStats>(st, a.k);
    if (nthreads > kWarpSize) {  // uniform: blockDim.y == 1 on this path
      if (lane == 0) warp_stats[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < nthreads / kWarpSize ? warp_stats[lane] : softmax_stats_empty<float>();
        st = warp_merge<kEntropy, kStats>(st, a.k);
      }
      __syncthreads();  // warp_stats is reused by this block's next row
    }

    if (tid == 0) {
      const RowResult<float> r = softmax_stats_finish(st, a.V, a.k, c);
      const float m = softmax_stats_ref(st.m);
      a.lse[row] = fmaf(m, a.inv_t, r.log_s);
      // logp = (x_y − m)/T − log s: the max cancels before any rounding of lse enters.
      a.logprobs[row] = label_ok ? fmaf(x_y - m, a.k, -r.log_s) : __int_as_float(0x7fc00000);
      if (kEntropy && a.entropy) a.entropy[row] = r.entropy;
      if (kStats && a.self_certainty) a.self_certainty[row] = r.self_certainty;
      if (kStats && a.sum_p_sq) a.sum_p_sq[row] = r.sum_p_sq;
    }
  }
}

// -------------------------------------------------------------------------------------------
// Backward

struct BwdArgs : RowArgs {
  const float* lse;
  const float* entropy;        // read only when grad_entropy is given
  const float* grad_logprobs;  // nullable
  const float* grad_entropy;   // nullable
  const float* grad_lse;       // nullable
  void* grad;                  // may equal logits (in-place backward)
  int64_t grad_stride_0, grad_stride_1;
};

// Per-row constants of the gradient.
struct BwdRow {
  float shift;  // subtracted from every logit: 0, or the row max (exact path)
  float ref;    // log Σ exp((x − shift)/T): lse, or log s (exact path); NaN: no gradient
  float e_z;    // E_p[z'], z' = (x − shift)/T
  float c;      // g_lse − g_lp
  float g_lp;   // added at the label
  float g_ent;  // coefficient of p_v (E_p[z'] − z'_v)
};

// grad_v · T = p_v (g_ent (e_z − z'_v) + c) + label_term, p_v = exp(z'_v − ref),
// z'_v = (x − shift)/T. e_z − z'_v is formed first, so it cancels exactly where it should (a
// row of one logit: 0). A −inf logit (or one whose p underflows) has p = 0 and contributes
// exactly 0: the select avoids 0 · ∞ = NaN, but keeps 0 · NaN = NaN for a NaN coefficient (as
// the CPU and Triton kernels do). NaN logits give NaN. (ALGORITHMS.md §1; reference: the
// p > 0 `where`.)
__device__ __forceinline__ float grad_elem(float x, const BwdRow& r, float label_term,
                                           float k, float inv_t) {
  const float z = (x - r.shift) * k;
  const float p = __expf(z - r.ref);
  const float pg = p == 0.f ? p * (r.g_ent + r.c) : p * fmaf(r.g_ent, r.e_z - z, r.c);
  return (pg + label_term) * inv_t;
}

// The max M of a row's raw logits and, relative to it, s = Σ exp((x − M) k) and
// t = Σ exp(·)·(x − M) k, computed by one warp on its own (lanes stride the row, butterflies
// merge them): the rows of the exact backward path, where no barrier can be assumed. Every
// warp of a row gets the same bits (same code, same order).
template <typename T>
__device__ void warp_row_stats(const T* x, int V, float k, float& m, float& s, float& t) {
  const int lane = threadIdx.x % kWarpSize;
  float mx = neg_inf<float>();
  for (int v = lane; v < V; v += kWarpSize) mx = fmaxf(mx, Elem<T>::to_float(x[v]));
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  }
  const float ref = softmax_stats_ref(mx);
  float ss = 0.f, tt = 0.f;
  for (int v = lane; v < V; v += kWarpSize) {
    const float d = (Elem<T>::to_float(x[v]) - ref) * k;
    const float e = __expf(d);
    ss += e;
    tt = fmaf(e, fmaxf(d, kLowestFloat), tt);
  }
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    ss += __shfl_xor_sync(kFullMask, ss, off);
    tt += __shfl_xor_sync(kFullMask, tt, off);
  }
  m = mx;
  s = ss;
  t = tt;
}

// The backward is elementwise given the per-row constants, so it needs no fixed thread ↔
// element map: rows are split into column tiles (grid.y) of blockDim.x · kBwdUnroll 16-byte
// vectors, and the row's 16-byte aligned body is read and written with vector accesses
// (kBwdUnroll loads in flight per thread). The few elements before the first aligned address
// (head) and after the last full vector (tail) go through scalar accesses in tile 0. If
// logits and grad are misaligned differently, the row is processed with scalar accesses.
// In-place: every element is loaded and stored by the same thread, load before store; the
// launcher then runs one block per row (grid.y = 1) and the block waits at a barrier between
// the exact path's reads of the whole row and the first write.
template <typename T>
__global__ void __launch_bounds__(kBwdMaxThreads, kBwdMinBlocks) logprobs_bwd_kernel(const BwdArgs a) {
  constexpr int kVec = Elem<T>::kVec;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int tile_vecs = nthreads * kBwdUnroll;
  const int tile_elems = tile_vecs * kVec;
  const int ntiles = static_cast<int>((static_cast<int64_t>(a.V) + tile_elems - 1) / tile_elems);

  // Every thread of the block runs the same number of iterations (rows past the end are
  // inactive), so the barrier below is reached uniformly.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < a.rows;
    const int64_t r_row = active ? row : base;  // inactive threads read a valid row, write none
    const T* x = static_cast<const T*>(a.logits) + row_offset(r_row, a.L, a.stride_0, a.stride_1);
    T* g = static_cast<T*>(a.grad) + row_offset(r_row, a.L, a.grad_stride_0, a.grad_stride_1);
    const int64_t y = a.labels[r_row];
    const bool ignored = y == a.ignore_index;  // uniform over the row: zero row, no reads
    const int col_y = (y >= 0 && y < a.V) ? static_cast<int>(y) : -1;  // −1: no label term

    BwdRow r{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (!ignored) {
      const float lse = a.lse[r_row];
      r.g_lp = a.grad_logprobs ? a.grad_logprobs[r_row] : 0.f;
      r.g_ent = a.grad_entropy ? a.grad_entropy[r_row] : 0.f;
      r.c = (a.grad_lse ? a.grad_lse[r_row] : 0.f) - r.g_lp;
      r.e_z = lse - (a.grad_entropy ? a.entropy[r_row] : 0.f);  // E_p[z]
      r.ref = lse;
      if (!(fabsf(lse) < float(logprobs::kBwdLseBound)) && !isnan(lse)) {
        float m, s_row, t_row;
        warp_row_stats(x, a.V, a.k, m, s_row, t_row);
        r.shift = softmax_stats_ref(m);
        r.ref = s_row > 0.f ? logf(s_row) : __int_as_float(0x7fc00000);  // NaN: no gradient
        r.e_z = t_row / s_row;
      }
    }
    __syncthreads();  // in place: every warp has read its row before any writes it

    // Split [0, V) into head (scalar) | body of 16-byte vectors | tail (scalar).
    const uintptr_t mis_x = reinterpret_cast<uintptr_t>(x) & 15u;
    const uintptr_t mis_g = reinterpret_cast<uintptr_t>(g) & 15u;
    const bool vec_ok = mis_x == mis_g;
    int head = 0, nvec = 0;
    if (vec_ok) {
      head = static_cast<int>(((16u - mis_x) & 15u) / sizeof(T));
      head = head < a.V ? head : a.V;
      nvec = (a.V - head) / kVec;
    }
    const int body_end = head + nvec * kVec;

    auto scalar_elem = [&](int v) {
      float out = 0.f;
      if (!ignored) {
        out = grad_elem(Elem<T>::to_float(x[v]), r, v == col_y ? r.g_lp : 0.f, a.k, a.inv_t);
      }
      g[v] = Elem<T>::from_float(out);
    };

    for (int tile = blockIdx.y; active && tile < ntiles; tile += gridDim.y) {
      if (vec_ok) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + head);
        uint4* gv = reinterpret_cast<uint4*>(g + head);
        uint4 raw[kBwdUnroll] = {};
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {  // all loads first: kBwdUnroll in flight
          const int vi = tile * tile_vecs + u * nthreads + tid;
          if (!ignored && vi < nvec) raw[u] = xv[vi];
        }
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          const int vi = tile * tile_vecs + u * nthreads + tid;
          if (vi >= nvec) continue;
          float v[kVec];
          if (ignored) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) v[i] = 0.f;
          } else {
            Elem<T>::unpack(raw[u], v);
            const int hit = col_y - (head + vi * kVec);  // label's slot in this vector
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              v[i] = grad_elem(v[i], r, i == hit ? r.g_lp : 0.f, a.k, a.inv_t);
            }
          }
          gv[vi] = Elem<T>::pack(v);
        }
        if (tile == 0) {  // head and tail: fewer than kVec elements each
          if (tid < head) scalar_elem(tid);
          if (tid < a.V - body_end) scalar_elem(body_end + tid);
        }
      } else {
        const int begin = tile * tile_elems;
        const int end = a.V - begin > tile_elems ? begin + tile_elems : a.V;
        for (int v = begin + tid; v < end; v += nthreads) scalar_elem(v);
      }
    }
  }
}

// -------------------------------------------------------------------------------------------
// Launch configuration (a function of V and the dtype only: see "Batch invariance" above)

// Forward: threads per row grow in powers of two from one warp up to kFwdMaxThreads while
// each thread would own more than kFwdChunksPerThread chunks. Small rows (one warp per row)
// are packed 8 to a block so blocks stay 256 threads wide.
struct FwdLaunch {
  int threads_per_row;
  int rows_per_block;
};

// Threads per row: powers of two from one warp up to max_threads while each thread would own
// more than per_thread chunks (of vec elements) of a row of V.
int row_threads(int64_t V, int vec, int max_threads, int per_thread) {
  const int64_t chunks = (V + vec - 1) / vec;
  int t = kWarpSize;
  while (t < max_threads && static_cast<int64_t>(t) * per_thread < chunks) t *= 2;
  return t;
}

FwdLaunch fwd_launch(int64_t V, int vec) {
  const int t = row_threads(V, vec, kFwdMaxThreads, kFwdChunksPerThread);
  return {t, t == kWarpSize ? 8 : 1};
}

// Backward: a tile of blockDim.x · kBwdUnroll vectors; the block narrows for small V (down to
// one warp) and then holds several rows (blockDim.y) to stay kBwdMaxThreads wide.
struct BwdLaunch {
  int threads_per_row;
  int rows_per_block;
  int64_t tiles;
};

BwdLaunch bwd_launch(int64_t V, int vec) {
  const int t = row_threads(V, vec, kBwdMaxThreads, kBwdUnroll);
  const int64_t tile_elems = static_cast<int64_t>(t) * kBwdUnroll * vec;
  return {t, kBwdMaxThreads / t, (V + tile_elems - 1) / tile_elems};
}

// In-row offsets are 32-bit (fewer registers in the hot loops); any real vocabulary is far
// below this bound, which also keeps `tile * tile_elems` and friends clear of int overflow.
constexpr int64_t kMaxVocab = int64_t(1) << 30;

constexpr int64_t kMaxGridX = 2147483647;  // grid-stride loops cover any excess rows
constexpr int64_t kMaxGridY = 65535;       // and any excess column tiles

unsigned grid_dim(int64_t blocks, int64_t cap) {
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

template <typename T, bool kEntropy, bool kStats>
void launch_fwd_kernel(const FwdArgs& a, dim3 grid, dim3 block, cudaStream_t stream) {
  logprobs_fwd_kernel<T, kEntropy, kStats><<<grid, block, 0, stream>>>(a);
}

template <typename T>
int launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const FwdLaunch cfg = fwd_launch(a.V, Elem<T>::kVec);
  const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
  const dim3 grid(grid_dim((a.rows + cfg.rows_per_block - 1) / cfg.rows_per_block, kMaxGridX));
  const bool entropy = a.entropy != nullptr;
  const bool stats = a.self_certainty != nullptr || a.sum_p_sq != nullptr;
  if (entropy && stats) {
    launch_fwd_kernel<T, true, true>(a, grid, block, stream);
  } else if (entropy) {
    launch_fwd_kernel<T, true, false>(a, grid, block, stream);
  } else if (stats) {
    launch_fwd_kernel<T, false, true>(a, grid, block, stream);
  } else {
    launch_fwd_kernel<T, false, false>(a, grid, block, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  const BwdLaunch cfg = bwd_launch(a.V, Elem<T>::kVec);
  const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
  // In place, one block per row (its tiles in turn): a row on the exact path reads all of
  // its logits first, which another block's tile could have overwritten already.
  const bool in_place = a.grad == a.logits;
  const dim3 grid(grid_dim((a.rows + cfg.rows_per_block - 1) / cfg.rows_per_block, kMaxGridX),
                  in_place ? 1u : grid_dim(cfg.tiles, kMaxGridY));
  logprobs_bwd_kernel<T><<<grid, block, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

// The checks both launchers start with: a known dtype, sizes in range, a valid temperature.
int check_rows(int dtype, int64_t B, int64_t L, int64_t V, float temperature) {
  if (!valid_dtype(dtype)) return RLKERN_CUDA_ERR_DTYPE;
  if (B < 0 || L < 0 || V < 0 || V > kMaxVocab || !std::isfinite(temperature) ||
      !(temperature > 0.f)) {
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  }
  return RLKERN_CUDA_OK;
}

}  // namespace
}  // namespace rlkern

extern "C" int rlkern_logprobs_fwd_cuda(const void* logits, int dtype, int64_t B, int64_t L,
                                        int64_t V, int64_t stride_logits_0,
                                        int64_t stride_logits_1, const int64_t* labels,
                                        float temperature, int64_t ignore_index, float* logprobs,
                                        float* lse, float* entropy, float* self_certainty,
                                        float* sum_p_sq, cudaStream_t stream) {
  using namespace rlkern;
  if (const int bad = check_rows(dtype, B, L, V, temperature)) return bad;
  const int64_t rows = B * L;
  if (rows == 0) return RLKERN_CUDA_OK;
  if (labels == nullptr || logprobs == nullptr || lse == nullptr ||
      (V > 0 && logits == nullptr)) {
    return RLKERN_CUDA_ERR_NULL_POINTER;
  }
  const FwdArgs a{row_args(logits, B, L, V, stride_logits_0, stride_logits_1, labels,
                           temperature, ignore_index),
                  logprobs, lse, entropy, self_certainty, sum_p_sq};
  return dispatch_dtype(dtype, [&](auto t) {
    return launch_fwd<typename decltype(t)::type>(a, stream);
  });
}

extern "C" int rlkern_logprobs_bwd_cuda(const void* logits, int dtype, int64_t B, int64_t L,
                                        int64_t V, int64_t stride_logits_0,
                                        int64_t stride_logits_1, const int64_t* labels,
                                        const float* lse, const float* entropy,
                                        const float* grad_logprobs, const float* grad_entropy,
                                        const float* grad_lse, float temperature,
                                        int64_t ignore_index, void* grad_logits,
                                        int64_t stride_grad_0, int64_t stride_grad_1,
                                        cudaStream_t stream) {
  using namespace rlkern;
  if (const int bad = check_rows(dtype, B, L, V, temperature)) return bad;
  if (grad_entropy != nullptr && entropy == nullptr) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  const int64_t rows = B * L;
  if (rows == 0 || V == 0) return RLKERN_CUDA_OK;
  if (logits == nullptr || labels == nullptr || lse == nullptr || grad_logits == nullptr) {
    return RLKERN_CUDA_ERR_NULL_POINTER;
  }
  const BwdArgs a{row_args(logits, B, L, V, stride_logits_0, stride_logits_1, labels,
                           temperature, ignore_index),
                  lse, entropy, grad_logprobs, grad_entropy, grad_lse,
                  grad_logits, stride_grad_0, stride_grad_1};
  return dispatch_dtype(dtype, [&](auto t) {
    return launch_bwd<typename decltype(t)::type>(a, stream);
  });
}

extern "C" const char* rlkern_cuda_error_string(int code) {
  switch (code) {
    case RLKERN_CUDA_OK: return "no error";
    case RLKERN_CUDA_ERR_DTYPE: return "rlkern: unsupported dtype (expected fp32, fp16 or bf16)";
    case RLKERN_CUDA_ERR_INVALID_ARGUMENT:
      return "rlkern: invalid argument (negative size, V > 2^30, temperature not finite and "
             "> 0, or grad_entropy given without entropy)";
    case RLKERN_CUDA_ERR_NULL_POINTER: return "rlkern: a required pointer is null";
    default: break;
  }
  if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "rlkern: unknown error code";
}
