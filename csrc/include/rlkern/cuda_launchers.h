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

// Group advantages (ALGORITHMS.md §2), csrc/cuda/advantages.cu; the codes and table layouts
// are those of rlkern/group_stats.h. The caller orders the rows group after group: group g is
// rows perm[offsets[g] .. offsets[g + 1]) (row order within a group; for unlikely,
// (log-likelihood, row) order), or, with perm == nullptr, contiguous rows
// [g·group_size, (g + 1)·group_size). `scores` is float64 when scores_f64 else float32.
// Writes the moments row ms[g] (kNumMoments columns) of the valid (finite) scores; with
// `unlikely`, xr[row] = r' and mx[g] its moments; with any of weighted / with_loglik / top, the
// extras row ext[g] (kNumExtras columns). `params` (device, kNumParams doubles, enum Param:
// the hparams, then the batch constants). One warp per group.
int rlkern_group_segment_stats_cuda(const void* scores, int scores_f64, const int64_t* perm,
                                    const int64_t* offsets, int64_t group_size,
                                    int64_t num_groups, const double* weights,
                                    const double* loglik, const double* params, int unlikely,
                                    int weighted, int with_loglik, int top, double* ms,
                                    double* mx, double* ext, double* xr, cudaStream_t stream);

// The per-row pass: row i of group row_group[i] (or i / group_size) gets the advantage of
// rlkern/group_stats.h for the options `flags` (host array, enum Flag order: an invalid code is
// RLKERN_CUDA_ERR_INVALID_ARGUMENT), and its group's mean, std and zero-variance flag (0/1
// bytes). Outputs are float64 when out_f64 else float32.
int rlkern_group_rows_finish_cuda(const void* scores, int scores_f64, const double* xr,
                                  const double* loglik, const int64_t* row_group,
                                  int64_t group_size, int64_t n, const double* ms,
                                  const double* mx, const double* ext, const double* params,
                                  const int32_t* flags, void* advantages, void* group_mean,
                                  void* group_std, uint8_t* zero_variance, int out_f64,
                                  cudaStream_t stream);

// out[g] = Chan's merge of the moments rows a[g] and b[g], g < k (GroupStats).
int rlkern_group_moments_merge_cuda(const double* a, const double* b, double* out, int64_t k,
                                    cudaStream_t stream);

// Discounted returns of contiguous (n, t_len) rewards (float64 when f64 else float32):
// G[t] = r[t] + gamma·G[t + 1], the carry dropped where reset[t] != 0 (nullable bytes).
// One warp per row.
int rlkern_discounted_returns_cuda(const void* rewards, int f64, int64_t n, int64_t t_len,
                                   const uint8_t* reset, double gamma, void* out,
                                   cudaStream_t stream);

// GAE with verl's carry over masked tokens (gae_step of rlkern/group_stats.h) for contiguous
// (n, t_len) rewards and values (float64 when f64 else float32; values nullable: V = 0) and
// valid bytes (0 = masked): advantages = the carried last GAE, returns = advantages + V.
// One thread per row.
int rlkern_gae_cuda(const void* rewards, const void* values, int f64, int64_t n, int64_t t_len,
                    const uint8_t* valid, double gamma, double lam, void* advantages,
                    void* returns, cudaStream_t stream);

// Policy losses (ALGORITHMS.md §3; per-token math, argument structs and codes in
// rlkern/policy_loss.h). float32 only (in->f64 = 0). `in` holds the (B, T) inputs (unit stride
// along T, `stride` elements between rows), adv (B,) or (B, T), the bool-byte mask and the
// optional inputs by slot of enum Input (null: absent; entropy_threshold: a device pointer to
// one float). `flags` / `hparams` are host structs (the same bytes as int32[kNumFlags] /
// double[kNumHParams] in field order). Masked tokens are never read into a result.
namespace rlkern::policy_loss {
struct Inputs;
struct Flags;
struct HParams;
}  // namespace rlkern::policy_loss
typedef rlkern::policy_loss::Inputs RlkernPolicyLossInputs;

// Forward: row_stats (kNumRowStats, B) float64, statistic-major (enum RowStat).
int rlkern_policy_loss_fwd_cuda(const RlkernPolicyLossInputs* in,
                                const rlkern::policy_loss::Flags* flags,
                                const rlkern::policy_loss::HParams* hparams, double* row_stats,
                                cudaStream_t stream);

// Backward: given the forward's row_stats and grad_rows (kNumRowGrads, B) float64 (∂loss/∂ of
// the differentiable statistics per row, enum RowGrad), write grad_logp (B, T) contiguous and,
// when not null, grad_entropy (B, T) contiguous.
int rlkern_policy_loss_bwd_cuda(const RlkernPolicyLossInputs* in,
                                const rlkern::policy_loss::Flags* flags,
                                const rlkern::policy_loss::HParams* hparams,
                                const double* row_stats, const double* grad_rows,
                                float* grad_logp, float* grad_entropy, cudaStream_t stream);

// Elementwise KL estimator (kind: enum KlKind, not kKlNone) over n contiguous floats: the
// value, or grad · ∂value/∂logp when grad is not null. ±inf disables a clamp.
int rlkern_kl_penalty_cuda(const float* logp, const float* ref, const float* grad, float* out,
                           int64_t n, int kind, int straight_through, double log_clamp,
                           double value_clamp, cudaStream_t stream);

// Human-readable text for a code returned by the launchers above (never null).
const char* rlkern_cuda_error_string(int code);

// Sampler (ALGORITHMS.md §4; csrc/cuda/sample.cu): output row i draws from logits row
// indices ? indices[i] : i (row start = r · stride_row elements, vocab contiguous). Per-row
// arrays have N entries; top_k / top_p / min_p / indices / entropy may be null (off; without
// indices N ≤ R). Outputs: tokens (int64), raw / processed logprobs, entropy and lse (fp32; a
// row that cannot be sampled gets token −1 and lse NaN, or −inf when all its logits are −inf).
int rlkern_sample_cuda(const void* logits, int dtype, int64_t R, int64_t V, int64_t stride_row,
                       int64_t N, const int64_t* indices, const double* temperature,
                       const int64_t* top_k, const double* top_p, const double* min_p,
                       const int64_t* seeds, const int64_t* steps, int joint,
                       int raw_temperature, int64_t* tokens, float* raw_logprobs,
                       float* processed_logprobs, float* entropy, float* lse,
                       cudaStream_t stream);

// The sampler with num_samples = G draws per source row from one filtering pass: n source
// rows (per-row arrays of n entries; without indices n ≤ R), outputs of n·G entries (row i,
// draw j at i·G + j; draw j uses Philox index j, so draw 0 is rlkern_sample_cuda's token).
int rlkern_sample_n_cuda(const void* logits, int dtype, int64_t R, int64_t V, int64_t stride_row,
                         int64_t n, int64_t num_samples, const int64_t* indices,
                         const double* temperature, const int64_t* top_k, const double* top_p,
                         const double* min_p, const int64_t* seeds, const int64_t* steps,
                         int joint, int raw_temperature, int64_t* tokens, float* raw_logprobs,
                         float* processed_logprobs, float* entropy, float* lse,
                         cudaStream_t stream);

// Token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4, §1;
// csrc/cuda/truncated_logprobs.cu): the kept set K of the sampler's filters (per-row arrays of
// B·L entries: temperature, and top_k / top_p / min_p nullable = off; joint = filter_order
// joint), rows laid out as in rlkern_logprobs_fwd_cuda, labels B·L int64:
//   logprobs = log q_y (q: the renormalised distribution on K; −inf for y ∉ K; bitwise the
//   sampler's processed log-prob), entropy = H(q) (nullable), lse = the whole row's.
// Rows with y == ignore_index get 0 and are not read; an out-of-range label gets NaN; a row
// with NaN / +inf logits gets NaN (lse NaN), an all −inf row NaN with lse = −inf.
int rlkern_truncated_logprobs_fwd_cuda(const void* logits, int dtype, int64_t B, int64_t L,
                                       int64_t V, int64_t stride_0, int64_t stride_1,
                                       const int64_t* labels, int64_t ignore_index,
                                       const double* temperature, const int64_t* top_k,
                                       const double* top_p, const double* min_p, int joint,
                                       float* logprobs, float* entropy, float* lse,
                                       cudaStream_t stream);

// The gradient wrt the logits of Σ g_lp·logprobs + g_ent·entropy + g_lse·lse with K held fixed
// (each upstream gradient nullable = 0): grad_logits is a contiguous (B·L, V) array of the
// logits' dtype; ignored rows get 0, unsampleable rows NaN.
int rlkern_truncated_logprobs_bwd_cuda(const void* logits, int dtype, int64_t B, int64_t L,
                                       int64_t V, int64_t stride_0, int64_t stride_1,
                                       const int64_t* labels, int64_t ignore_index,
                                       const double* temperature, const int64_t* top_k,
                                       const double* top_p, const double* min_p, int joint,
                                       const float* grad_logprobs, const float* grad_entropy,
                                       const float* grad_lse, void* grad_logits,
                                       cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
