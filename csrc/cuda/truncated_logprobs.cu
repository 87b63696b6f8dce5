// CUDA token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4, §1): one
// 256-thread block per (b, l) row. The kept set K and the kept mass come from the CUDA
// sampler's own per-row code (rlkern/cuda_sample_row.cuh: filter_row, the same passes in the
// same order), and the log-prob from its processed log-prob expression (kept_logprob), so
//
//   logprobs = log q_y,  q_v = [v ∈ K] w_v / Σ_K w,  w = exp(z), z = (x − max x)/T
//              (−inf for a label outside K; bitwise csrc/cuda/sample.cu's processed log-prob)
//   entropy  = log Σ_K w − Σ_K w z / Σ_K w           (the entropy of q)
//   lse      = max x / T + log Σ_v w_v               (the whole row's, as the sampler's)
//
// Backward (K fixed: it is piecewise constant in x), with E = Σ_K q z:
//   ∂/∂x_v = ( g_lse p_v + [v ∈ K] q_v (g_ent (E − z_v) − g_lp') + [v = y] g_lp' ) / T,
//   g_lp' = g_lp when y ∈ K, else 0 (a −inf log-prob is constant);
// the formula of csrc/cpu/truncated_logprobs.cpp (bwd_row) and of the float64 reference. The
// backward runs the filters again (nothing of size (N, V) is saved by the forward).
//
// __launch_bounds__(256, 2) as the sampler's: the threshold searches hold several 64-bit values
// per thread; with 2 resident blocks ptxas may use up to 128 registers and does not spill
// (tests/test_cuda_compile.py). The same source runs on the CPU in the CUDA emulator
// (tests/test_truncated_logprobs_cuda_emulation.py).
//
// Declarations: csrc/include/rlkern/cuda_launchers.h; torch glue:
// csrc/cuda/truncated_logprobs_ops.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "rlkern/cuda_dtype.h"
#include "rlkern/cuda_launchers.h"
#include "rlkern/cuda_sample_row.cuh"
#include "rlkern/truncated_logprobs.h"

namespace {

using namespace rlkern::cuda_sampler;

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

using rlkern::truncated_logprobs::Rows;

// Row r of the logits, filtered by the sampler's code with the row's temperature and filters.
template <typename T>
__device__ __forceinline__ Filtered<T> filter(const T* logits, const Rows& a, int64_t r,
                                              double* part) {
  const T* x = logits + (r / a.L) * a.stride_0 + (r % a.L) * a.stride_1;
  return filter_row(x, a.V, a.temperature[r], a.top_k ? a.top_k[r] : a.V,
                    a.top_p ? a.top_p[r] : 1.0, a.min_p ? a.min_p[r] : 0.0, a.joint, part);
}

// Σ_K w (z − m) of a filtered row, block-wide (the same value in every thread).
template <typename T>
__device__ __forceinline__ double kept_moment(const Filtered<T>& f, double* part) {
  double e = 0.0;
  for (int64_t v = threadIdx.x; v < f.row.V; v += kThreads) {
    const float z = f.row.z(v);
    const double w = f.kept.w(z, v, kZMax);
    if (w > 0.0) e += w * double(z - kZMax);  // w = 0 (outside K, or z = −inf): nothing
  }
  return block_sum(e, part);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) truncated_fwd_kernel(
    const T* __restrict__ logits, const Rows a) {
  __shared__ double part[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t y = a.labels[r];
  float* const logprobs = a.logprobs;
  float* const entropy = a.entropy;
  float* const lse = a.lse;
  if (y == a.ignore_index) {  // uniform: the row's logits are not read
    if (threadIdx.x == 0) {
      logprobs[r] = lse[r] = 0.0f;
      if (entropy) entropy[r] = 0.0f;
    }
    return;
  }
  const Filtered<T> f = filter(logits, a, r, part);
  if (!f.ok) {  // NaN or +inf logits (lse NaN), or all −inf (lse −inf), as the sampler flags
    if (threadIdx.x == 0) {
      const float nan = __int_as_float(0x7fc00000);
      logprobs[r] = nan;
      if (entropy) entropy[r] = nan;
      lse[r] = (f.s == 0.0) ? -INFINITY : nan;
    }
    return;
  }
  const double moment = entropy ? kept_moment(f, part) : 0.0;  // entropy: uniform
  if (threadIdx.x == 0) {
    lse[r] = float(double(f.xmax) / a.temperature[r] + f.log_s);
    // An out-of-range label (checks off) gives NaN, never a read outside the row.
    logprobs[r] = (y >= 0 && y < a.V) ? kept_logprob(f, y) : __int_as_float(0x7fc00000);
    if (entropy) entropy[r] = float(log(f.s_kept) - moment / f.s_kept);
  }
}

// grad_logits: contiguous (N, V) of the logits' dtype, row r at r·V.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) truncated_bwd_kernel(
    const T* __restrict__ logits, const Rows a) {
  __shared__ double part[kWarps];
  const int64_t r = blockIdx.x, V = a.V;
  const int64_t y = a.labels[r];
  T* g = static_cast<T*>(a.grad_logits) + r * V;
  if (y == a.ignore_index) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) store(g + v, 0.0f);
    return;
  }
  const Filtered<T> f = filter(logits, a, r, part);
  if (!f.ok) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) store(g + v, __int_as_float(0x7fc00000));
    return;
  }
  const double g_lp_in = a.grad_logprobs ? double(a.grad_logprobs[r]) : 0.0;
  const double g_ent = a.grad_entropy ? double(a.grad_entropy[r]) : 0.0;
  const double g_lse = a.grad_lse ? double(a.grad_lse[r]) : 0.0;
  // a kept label whose weight underflowed to 0 still has a finite log-prob (kept_logprob)
  bool y_kept = false;
  if (y >= 0 && y < V) {
    const float zy = f.row.z(y);
    y_kept = f.kept.has(zy, y) && zy > -INFINITY;
  }
  const double g_lp = y_kept ? g_lp_in : 0.0;
  // E = Σ_K q z (uniform branch: g_ent is the row's).
  const double E = g_ent != 0.0 ? kept_moment(f, part) / f.s_kept : 0.0;
  const double inv_t = 1.0 / a.temperature[r];
  const float log_s = float(f.log_s);
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float z = f.row.z(v);
    double d = 0.0;
    if (g_lse != 0.0) d += g_lse * double(__expf(z - log_s));  // p_v of the whole row
    const double w = f.kept.w(z, v, kZMax);
    if (w > 0.0) d += (w / f.s_kept) * (g_ent * (E - double(z)) - g_lp);
    if (v == y) d += g_lp;
    store(g + v, float(d * inv_t));
  }
}

// Checks shared by both launchers; 0 when the launch may go ahead (or, for N = 0, nothing to
// do: *empty is set).
int check(const void* logits, int dtype, int64_t B, int64_t L, int64_t V, int64_t stride_0,
          int64_t stride_1, const int64_t* labels, const double* temperature, bool* empty) {
  if (!rlkern::valid_dtype(dtype)) return RLKERN_CUDA_ERR_DTYPE;
  if (B < 0 || L < 0 || V < 0 || stride_0 < 0 || stride_1 < 0)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  // One block per row: gridDim.x ≤ 2^31 − 1.
  if (L > 0 && B > 2147483647LL / L) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  const int64_t N = B * L;
  if (N > 0 && V == 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  *empty = N == 0;
  if (*empty) return RLKERN_CUDA_OK;
  if (!logits || !labels || !temperature) return RLKERN_CUDA_ERR_NULL_POINTER;
  return RLKERN_CUDA_OK;
}

// The launchers' arguments as the kernels' Rows (outputs and gradients null unless given).
Rows rows_of(int64_t B, int64_t L, int64_t V, int64_t stride_0, int64_t stride_1,
             const int64_t* labels, int64_t ignore_index, const double* temperature,
             const int64_t* top_k, const double* top_p, const double* min_p, int joint) {
  Rows a{};
  a.B = B;
  a.L = L;
  a.V = V;
  a.stride_0 = stride_0;
  a.stride_1 = stride_1;
  a.labels = labels;
  a.ignore_index = ignore_index;
  a.temperature = temperature;
  a.top_k = top_k;
  a.top_p = top_p;
  a.min_p = min_p;
  a.joint = joint != 0;
  return a;
}

// One block per row of `a`: the forward, or the backward, kernel of the logits' type.
int launch(bool forward, const void* logits, int dtype, const Rows& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B * a.L));
  return rlkern::dispatch_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    const T* x = static_cast<const T*>(logits);
    if (forward) truncated_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(x, a);
    else truncated_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(x, a);
    return int(cudaGetLastError());
  });
}

}  // namespace

extern "C" int rlkern_truncated_logprobs_fwd_cuda(
    const void* logits, int dtype, int64_t B, int64_t L, int64_t V, int64_t stride_0,
    int64_t stride_1, const int64_t* labels, int64_t ignore_index, const double* temperature,
    const int64_t* top_k, const double* top_p, const double* min_p, int joint, float* logprobs,
    float* entropy, float* lse, cudaStream_t stream) {
  bool empty = false;
  const int rc = check(logits, dtype, B, L, V, stride_0, stride_1, labels, temperature, &empty);
  if (rc != RLKERN_CUDA_OK || empty) return rc;
  if (!logprobs || !lse) return RLKERN_CUDA_ERR_NULL_POINTER;
  Rows a = rows_of(B, L, V, stride_0, stride_1, labels, ignore_index, temperature, top_k, top_p,
                   min_p, joint);
  a.logprobs = logprobs;
  a.entropy = entropy;
  a.lse = lse;
  return launch(true, logits, dtype, a, stream);
}

extern "C" int rlkern_truncated_logprobs_bwd_cuda(
    const void* logits, int dtype, int64_t B, int64_t L, int64_t V, int64_t stride_0,
    int64_t stride_1, const int64_t* labels, int64_t ignore_index, const double* temperature,
    const int64_t* top_k, const double* top_p, const double* min_p, int joint,
    const float* grad_logprobs, const float* grad_entropy, const float* grad_lse,
    void* grad_logits, cudaStream_t stream) {
  bool empty = false;
  const int rc = check(logits, dtype, B, L, V, stride_0, stride_1, labels, temperature, &empty);
  if (rc != RLKERN_CUDA_OK || empty) return rc;
  if (!grad_logits) return RLKERN_CUDA_ERR_NULL_POINTER;
  Rows a = rows_of(B, L, V, stride_0, stride_1, labels, ignore_index, temperature, top_k, top_p,
                   min_p, joint);
  a.grad_logprobs = grad_logprobs;
  a.grad_entropy = grad_entropy;
  a.grad_lse = grad_lse;
  a.grad_logits = grad_logits;
  return launch(false, logits, dtype, a, stream);
}
