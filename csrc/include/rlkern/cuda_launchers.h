// C-style launchers of the CUDA kernels in csrc/cuda/*.cu (DESIGN.md style rule 1).
//
// Raw pointers, sizes, strides and a stream in; an int error code out. No torch and no CUDA
// headers here: cudaStream_t is forward-declared exactly as the CUDA runtime declares it
// (`typedef struct CUstream_st* cudaStream_t;` — a repeated identical typedef is legal C/C++),
// so a host compiler can include this header without a CUDA toolkit, and a translation unit
// may include it before or after <cuda_runtime.h>.
//
// Error codes: 0 = success (RLKERN_CUDA_OK); a positive value is a cudaError_t (a failed
// launch); a negative value is one of the RLKERN_CUDA_ERR_* codes below (invalid arguments,
// detected before anything is launched). rlkern_cuda_error_string() names any of them.
//
// All launches are asynchronous on `stream`; the launchers never synchronise.
#pragma once

#include <stdint.h>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#ifdef __cplusplus
extern "C" {
#endif

// Element type of `logits` / `grad_logits` (the `dtype` argument).
enum {
  RLKERN_DTYPE_FP32 = 0,
  RLKERN_DTYPE_FP16 = 1,
  RLKERN_DTYPE_BF16 = 2,
};

enum {
  RLKERN_CUDA_OK = 0,
  RLKERN_CUDA_ERR_DTYPE = -1,             // dtype is not one of RLKERN_DTYPE_*
  RLKERN_CUDA_ERR_INVALID_ARGUMENT = -2,  // negative size, V > 2^30, temperature not > 0, ...
  RLKERN_CUDA_ERR_NULL_POINTER = -3,      // a required pointer is null
};

// Token log-probabilities, lse and optional entropy / self-certainty / Σp² (ALGORITHMS.md §1).
//
// Rows are the (b, l) pairs of a (B, L, V) view: row r = b * L + l starts at element
// b * stride_logits_0 + l * stride_logits_1 of `logits` (64-bit offsets); the vocab dim is
// contiguous; V ≤ 2^30 (offsets inside a row are 32-bit, B·L·V and row offsets 64-bit).
// `labels` and every output are contiguous arrays of B * L (int64 / float32).
// With z = x / temperature and y = labels[r]:
//   lse = log Σ_v exp(z_v),  logprobs = z_y − lse,  entropy = lse − Σ_v p_v z_v,
//   self_certainty = lse − mean_v z_v,  sum_p_sq = Σ_v p_v².
// entropy, self_certainty and sum_p_sq are optional (nullptr: not computed, not written).
// Rows with y == ignore_index get 0 in every output and their logits are not read. A label
// outside [0, V) that is not ignore_index is never read through: its row gets logprobs = NaN
// (the other outputs are still computed). A row of all −inf logits gets lse = −inf.
// Each row's results are bitwise independent of B, L and the other rows.
int rlkern_logprobs_fwd_cuda(const void* logits, int dtype, int64_t B, int64_t L, int64_t V,
                             int64_t stride_logits_0, int64_t stride_logits_1,
                             const int64_t* labels, float temperature, int64_t ignore_index,
                             float* logprobs, float* lse, float* entropy, float* self_certainty,
                             float* sum_p_sq, cudaStream_t stream);

// Gradient wrt the logits of  Σ_r g_lp[r]·logprobs[r] + g_ent[r]·entropy[r] + g_lse[r]·lse[r]:
//   grad_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) + g_lse p_v ] / T,
//   p_v = exp(z_v − lse),  E_p[z] = lse − entropy.
// `lse` (and `entropy` when grad_entropy is given) are the forward's per-row outputs; each of
// grad_logprobs / grad_entropy / grad_lse may be nullptr (treated as 0). grad_logits is a
// (B, L, V) array of the logits' dtype, row (b, l) at b * stride_grad_0 + l * stride_grad_1,
// vocab contiguous; it may alias `logits` exactly (in-place backward: each element is read
// and then overwritten by the same thread). Ignored rows get a zero gradient row; −inf logits
// get 0. Accumulation is float32.
int rlkern_logprobs_bwd_cuda(const void* logits, int dtype, int64_t B, int64_t L, int64_t V,
                             int64_t stride_logits_0, int64_t stride_logits_1,
                             const int64_t* labels, const float* lse, const float* entropy,
                             const float* grad_logprobs, const float* grad_entropy,
                             const float* grad_lse, float temperature, int64_t ignore_index,
                             void* grad_logits, int64_t stride_grad_0, int64_t stride_grad_1,
                             cudaStream_t stream);

// Human-readable text for a code returned by the launchers above (never null).
const char* rlkern_cuda_error_string(int code);

#ifdef __cplusplus
}  // extern "C"
#endif
