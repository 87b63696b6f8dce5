// CUDA sampler (ALGORITHMS.md §4): one 256-thread block per source row, the algorithm of the
// Triton kernel (kernels/sample.py): max / normaliser / entropy passes, filters as the length
// of a prefix of the order "value descending, index ascending" with thresholds from a
// bit-by-bit search over the 32-bit order key of z (block-wide counts / masses per probe; no
// sort), then an inverse-CDF draw in vocabulary order with the row's Philox uniform
// (rlkern/philox.h, bit-identical to the CPU and Triton backends). With num_samples = G the
// filtering runs once per row and the draw G times (draw j: Philox index j).
//
// The per-row filtering (rlkern/cuda_sample_row.cuh) is shared with the truncated token
// log-probs (csrc/cuda/truncated_logprobs.cu), so processed log-probs equal those bit for bit.
// Block reductions and the scan of the draw are written with warp shuffles and one small
// shared array (no CUB): the reduction order is fixed (so a row's result never depends on the
// grid or on the other rows) and the shared footprint is 64 bytes. __launch_bounds__(256, 2):
// with the block size alone ptxas aims at 64 registers (4 blocks/SM) and spills (an older
// CUB-based version spilled 28 bytes on sm_90); asking for 2 resident blocks lets it use up to
// 128 registers with no spill — 16 warps per SM are plenty for a kernel whose passes stream a
// row from L2 (tests/test_cuda_compile.py asserts 0 spill bytes on sm_80 and sm_90). The same
// source runs on the CPU in the CUDA emulator (tests/test_sample_cuda_emulation.py).
//
// Declarations: csrc/include/rlkern/cuda_launchers.h; torch glue: csrc/cuda/sample_ops.cpp
// (registered as the CUDA implementation of rlkern::sample_out and rlkern::sample_n_out).
#include <cuda_runtime.h>

#include <cstdint>

#include "rlkern/cuda_dtype.h"
#include "rlkern/cuda_launchers.h"
#include "rlkern/cuda_sample_row.cuh"
#include "rlkern/philox.h"

namespace {

using namespace rlkern::cuda_sampler;

// Inverse-CDF draw in vocabulary order: the first kept token whose cumulative weight exceeds
// target = u · S_kept (the same token in every thread). Thread j of a chunk owns tokens
// [base + j·kItems, base + (j + 1)·kItems).
template <typename T>
__device__ __forceinline__ int64_t draw(const Row<T>& row, const Kept& kept, double target,
                                        double* part) {
  const float m = kZMax;
  const int64_t V = row.V;
  double acc = 0.0;  // kept mass before the chunk (same value in every thread)
  int64_t tok = V, limit = V;  // limit: the fallback below looks at tokens before it
  for (int64_t base = 0; base < V; base += int64_t(kThreads) * kItems) {
    const int64_t v0 = base + int64_t(threadIdx.x) * kItems;
    double mine = 0.0;
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (v0 + k < V) mine += kept.w(row.z(v0 + k), v0 + k, m);
    double total;
    const double incl = block_inclusive_sum(mine, part, &total);
    if (acc + total > target) {  // the token is in this chunk (a uniform branch)
      // The owner is the first thread whose prefix crosses the target and that holds kept
      // mass (a thread with none has the same prefix as the one before it). It walks its
      // tokens; if rounding keeps its walk from crossing, its last kept token is the answer.
      int64_t hit = V;
      if (mine > 0.0 && acc + incl > target) {
        double c = acc + (incl - mine);
        for (int k = 0; k < kItems && v0 + k < V; ++k) {
          const double w = kept.w(row.z(v0 + k), v0 + k, m);
          if (w <= 0.0) continue;
          c += w;
          hit = v0 + k;
          if (c > target) break;
        }
      }
      tok = int64_t(-block_max(-double(hit), part));  // the smallest owner's token
      limit = base + int64_t(kThreads) * kItems < V ? base + int64_t(kThreads) * kItems : V;
      break;
    }
    acc += total;
  }
  if (tok >= V) {
    // No owner: rounding left u · S_kept at or above every prefix (of the row, or of the
    // chunk whose total crossed it, when the scan's prefixes round below its total). The last
    // kept token before `limit` is the answer, as on the CPU.
    double last = -1.0;
    for (int64_t v = threadIdx.x; v < limit; v += kThreads)
      if (kept.w(row.z(v), v, m) > 0.0) last = fmax(last, double(v));
    tok = int64_t(block_max(last, part));
  }
  return tok;
}

// Block i filters source row i (logits row indices ? indices[i] : i) once and draws G tokens
// from it: draw j (Philox index j) goes to output row i·G + j (G = 1: the one-draw sampler).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(
    const T* __restrict__ logits, int64_t V, int64_t stride_row, int64_t G,
    const int64_t* __restrict__ indices, const double* __restrict__ temperature,
    const int64_t* __restrict__ top_k, const double* __restrict__ top_p,
    const double* __restrict__ min_p, const int64_t* __restrict__ seeds,
    const int64_t* __restrict__ steps, int joint, int raw_temperature,
    int64_t* __restrict__ tokens, float* __restrict__ raw, float* __restrict__ proc,
    float* __restrict__ entropy, float* __restrict__ lse) {
  __shared__ double part[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t r = indices ? indices[i] : i;
  const Filtered<T> f = filter_row(logits + r * stride_row, V, temperature[i],
                                   top_k ? top_k[i] : V, top_p ? top_p[i] : 1.0,
                                   min_p ? min_p[i] : 0.0, joint != 0, part);
  const int64_t o0 = i * G;  // the row's first output
  // Rows that cannot be sampled (NaN / +inf logits, all −inf) are flagged through token −1
  // and lse (−inf for all −inf, else NaN), as the CPU kernel does (the Python layer raises).
  if (!f.ok) {
    if (threadIdx.x == 0) {
      const float nan = __int_as_float(0x7fc00000);
      for (int64_t o = o0; o < o0 + G; ++o) {
        tokens[o] = -1;
        raw[o] = proc[o] = nan;
        if (entropy) entropy[o] = nan;
        lse[o] = (f.s == 0.0) ? -INFINITY : nan;
      }
    }
    return;  // uniform across the block: no barrier is left waiting
  }
  const Row<T>& row = f.row;
  // vLLM-style raw logprobs of the untempered logits: two more passes, once per row.
  float mrf = 0.f;
  double log_sr = 0.0;
  if (!raw_temperature) {
    double mr = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) mr = fmax(mr, double(to_f(row.x[v])));
    mrf = float(block_max(mr, part));
    double sr = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) sr += __expf(to_f(row.x[v]) - mrf);
    log_sr = log(block_sum(sr, part));
  }
  for (int64_t j = 0; j < G; ++j) {
    const double target = rlkern::philox_uniform(seeds[i], steps[i], uint32_t(j)) * f.s_kept;
    const int64_t tok = draw(row, f.kept, target, part);
    if (threadIdx.x == 0) {
      const int64_t o = o0 + j;
      tokens[o] = tok;
      lse[o] = float(double(f.xmax) / temperature[i] + f.log_s);
      if (entropy) entropy[o] = float(f.log_s - f.t / f.s);
      proc[o] = kept_logprob(f, tok);
      raw[o] = raw_temperature ? float(double(row.z(tok) - kZMax) - f.log_s)
                               : float(double(to_f(row.x[tok]) - mrf) - log_sr);
    }
  }
}

template <typename T>
int launch(const void* logits, int64_t V, int64_t stride_row, int64_t n, int64_t G,
           const int64_t* indices, const double* temperature, const int64_t* top_k,
           const double* top_p, const double* min_p, const int64_t* seeds, const int64_t* steps,
           int joint, int raw_temperature, int64_t* tokens, float* raw, float* proc,
           float* entropy, float* lse, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n));
  sample_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(logits), V, stride_row, G, indices, temperature, top_k, top_p,
      min_p, seeds, steps, joint, raw_temperature, tokens, raw, proc, entropy, lse);
  return int(cudaGetLastError());
}

// n source rows, G draws each (the checks of both launchers).
int sample_n(const void* logits, int dtype, int64_t R, int64_t V, int64_t stride_row, int64_t n,
             int64_t G, const int64_t* indices, const double* temperature, const int64_t* top_k,
             const double* top_p, const double* min_p, const int64_t* seeds,
             const int64_t* steps, int joint, int raw_temperature, int64_t* tokens,
             float* raw_logprobs, float* processed_logprobs, float* entropy, float* lse,
             cudaStream_t stream) {
  if (!rlkern::valid_dtype(dtype)) return RLKERN_CUDA_ERR_DTYPE;
  // One block per source row: gridDim.x ≤ 2^31 − 1; n·G outputs must not overflow.
  if (n < 0 || V < 0 || R < 0 || G < 1 || (n > 0 && V == 0) || n > 2147483647LL ||
      stride_row < 0 || (n > 0 && G > INT64_MAX / n))
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (indices == nullptr && n > R) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (n == 0) return RLKERN_CUDA_OK;
  if (!logits || !temperature || !seeds || !steps || !tokens || !raw_logprobs ||
      !processed_logprobs || !lse)
    return RLKERN_CUDA_ERR_NULL_POINTER;
  return rlkern::dispatch_dtype(dtype, [&](auto t) {
    return launch<typename decltype(t)::type>(logits, V, stride_row, n, G, indices, temperature,
                                              top_k, top_p, min_p, seeds, steps, joint,
                                              raw_temperature, tokens, raw_logprobs,
                                              processed_logprobs, entropy, lse, stream);
  });
}

}  // namespace

extern "C" int rlkern_sample_cuda(const void* logits, int dtype, int64_t R, int64_t V,
                                  int64_t stride_row, int64_t N, const int64_t* indices,
                                  const double* temperature, const int64_t* top_k,
                                  const double* top_p, const double* min_p, const int64_t* seeds,
                                  const int64_t* steps, int joint, int raw_temperature,
                                  int64_t* tokens, float* raw_logprobs,
                                  float* processed_logprobs, float* entropy, float* lse,
                                  cudaStream_t stream) {
  return sample_n(logits, dtype, R, V, stride_row, N, 1, indices, temperature, top_k, top_p,
                  min_p, seeds, steps, joint, raw_temperature, tokens, raw_logprobs,
                  processed_logprobs, entropy, lse, stream);
}

extern "C" int rlkern_sample_n_cuda(const void* logits, int dtype, int64_t R, int64_t V,
                                    int64_t stride_row, int64_t n, int64_t num_samples,
                                    const int64_t* indices, const double* temperature,
                                    const int64_t* top_k, const double* top_p,
                                    const double* min_p, const int64_t* seeds,
                                    const int64_t* steps, int joint, int raw_temperature,
                                    int64_t* tokens, float* raw_logprobs,
                                    float* processed_logprobs, float* entropy, float* lse,
                                    cudaStream_t stream) {
  return sample_n(logits, dtype, R, V, stride_row, n, num_samples, indices, temperature, top_k,
                  top_p, min_p, seeds, steps, joint, raw_temperature, tokens, raw_logprobs,
                  processed_logprobs, entropy, lse, stream);
}
