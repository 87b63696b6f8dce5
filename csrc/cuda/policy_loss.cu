// CUDA kernels of the policy-loss family (ALGORITHMS.md §3): one pass forward, one backward.
//
// Torch-free (DESIGN.md style rule 1): the launchers at the bottom take raw pointers, sizes,
// row strides, the flags / hyperparameters and a cudaStream_t and return an error code;
// csrc/cuda_ops.cpp adapts tensors. The per-token math is rlkern/policy_loss.h, shared with
// the CPU kernels; contract in rlkern/cuda_launchers.h.
//
// One warp per row (sequence), kRowsPerBlock rows per block. Lane i reads tokens i, i + 32,
// ... (coalesced 128-byte loads per warp) and accumulates per-lane float partial sums; the
// row's sums are formed by a butterfly of warp shuffles, so every lane ends with the same
// totals (no shared memory, no block barrier). A row's results depend only on the row:
// the token → lane assignment and the reduction tree are fixed by T alone.
//
//   forward:  [prefix: Σ m, Σ m·Δ, Σ m·(old − rollout) when a sequence quantity needs them]
//             then one loop: per-token loss, KL, entropy and metric terms → row_stats.
//   backward: [for the exact gradient of the sequence mean: a first loop for Σ m·∂ℓ/∂r]
//             then one loop writing ∂loss/∂logp (and ∂loss/∂entropy).
//
// Flags are runtime values (uniform across the warp, so their branches do not diverge);
// float32 only (the fp64 path is the Triton / torch backends').
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "rlkern/cuda_launchers.h"
#include "rlkern/policy_loss.h"

namespace rlkern {
namespace {

namespace pl = rlkern::policy_loss;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowsPerBlock = 4;  // warps per block; one row per warp

struct Args {
  RlkernPolicyLossInputs in;
  pl::Flags f;
  pl::HParams h;
  double* row_stats;        // (kNumRowStats, B) forward output
  const double* stats_in;   // (kNumRowStats, B) backward input
  const double* grad_rows;  // (kNumRowGrads, B)
  float* grad_logp;         // (B, T) contiguous
  float* grad_entropy;      // (B, T) contiguous, nullable
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

struct RowPtrs {
  const float* lp;
  const float* old;
  const float* adv;  // row start, or the row's scalar
  const uint8_t* m;
  const float* ref;
  const float* roll;
  const float* ent;
  const float* tw;
};

__device__ __forceinline__ RowPtrs row_ptrs(const RlkernPolicyLossInputs& in, int64_t b) {
  RowPtrs r;
  r.lp = in.logp + b * in.stride_logp;
  r.old = in.old + b * in.stride_old;
  r.adv = in.adv + (in.adv_per_token ? b * in.stride_adv : b);
  r.m = in.mask + b * in.stride_mask;
  r.ref = in.ref ? in.ref + b * in.stride_ref : nullptr;
  r.roll = in.rollout ? in.rollout + b * in.stride_rollout : nullptr;
  r.ent = in.entropy ? in.entropy + b * in.stride_entropy : nullptr;
  r.tw = in.token_weights ? in.token_weights + b * in.stride_token_weights : nullptr;
  return r;
}

struct Token {
  bool v;
  float lp, old, a, lp_raw, old_raw, a_raw;
};

__device__ __forceinline__ Token load_token(const RowPtrs& r, bool adv_tok, int64_t t) {
  Token k;
  k.v = r.m[t] != 0;
  k.lp_raw = __ldg(r.lp + t);
  k.old_raw = __ldg(r.old + t);
  k.a_raw = adv_tok ? __ldg(r.adv + t) : __ldg(r.adv);
  k.lp = k.v ? k.lp_raw : 0.f;
  k.old = k.v ? k.old_raw : 0.f;
  k.a = k.v ? k.a_raw : 0.f;
  return k;
}

// Multipliers of the policy term at one token: rollout weight, entropy mask, entropy, token
// weight (valid tokens only; callers zero masked tokens).
struct Mult {
  float w, em, h, wt;
};

__device__ __forceinline__ Mult load_mult(const Args& a, const RowPtrs& r, const Token& k,
                                          int64_t t, float seq_w, float thr) {
  Mult u{1.f, 1.f, 0.f, 1.f};
  if (a.f.rollout_level == pl::kRolloutToken)
    u.w = pl::rollout_weight<float>(k.v ? k.old - __ldg(r.roll + t) : 0.f, a.h,
                                    a.f.rollout_mask != 0);
  else if (a.f.rollout_level == pl::kRolloutSeq)
    u.w = seq_w;
  if (r.ent) {
    u.h = k.v ? __ldg(r.ent + t) : 0.f;
    if (a.in.entropy_threshold) u.em = u.h >= thr ? 1.f : 0.f;
  }
  if (r.tw) u.wt = k.v ? __ldg(r.tw + t) : 0.f;
  return u;
}

// Sequence quantities of a row from its sums (double, as on the CPU).
struct SeqConst {
  float r_seq;
  bool pass_seq;
  float seq_w;
};

__device__ __forceinline__ SeqConst seq_const(const Args& a, double len, double lp_sum,
                                              double roll_sum) {
  SeqConst c;
  bool pass = true;
  c.r_seq = float(pl::seq_log_ratio(lp_sum, len, a.h.seq_log_ratio_max, &pass));
  c.pass_seq = pass;
  c.seq_w = a.f.rollout_level == pl::kRolloutSeq
                ? float(pl::rollout_weight<double>(roll_sum, a.h, a.f.rollout_mask != 0))
                : 1.f;
  return c;
}

__device__ __forceinline__ pl::TokenLoss<float> loss_at(const Args& a, float rho,
                                                        const Token& k) {
  return pl::token_loss<float>(a.f.loss_kind, rho, k.a, k.lp, a.h);
}

// ------------------------------------------------------------------------------------ forward

__global__ void __launch_bounds__(kWarpSize * kRowsPerBlock)
    policy_loss_fwd_kernel(const Args a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t B = a.in.B, T = a.in.T;
  const bool adv_tok = a.in.adv_per_token != 0;
  const float C = float(a.h.log_ratio_clamp);
  const float thr = a.in.entropy_threshold ? __ldg(a.in.entropy_threshold) : 0.f;
  const bool gmpo = a.f.loss_kind == pl::kGmpo;
  const bool seq_ratio = a.f.ratio_mode != pl::kRatioToken;
  for (int64_t b = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; b < B;
       b += int64_t(gridDim.x) * kRowsPerBlock) {
    const RowPtrs r = row_ptrs(a.in, b);
    // prefix
    float len = 0.f, lps = 0.f, rs = 0.f;
    for (int64_t t = lane; t < T; t += kWarpSize) {
      const bool v = r.m[t] != 0;
      if (!v) continue;
      const float old = __ldg(r.old + t);
      len += 1.f;
      lps += __ldg(r.lp + t) - old;
      if (a.f.rollout_level == pl::kRolloutSeq) {
        const float d = old - __ldg(r.roll + t);
        rs += d == d ? d : 0.f;
      }
    }
    const double n = warp_sum(len), lp_sum = warp_sum(lps), roll_sum = warp_sum(rs);
    const SeqConst c = seq_const(a, n, lp_sum, roll_sum);

    float pg = 0.f, kl = 0.f, ent = 0.f, ent_n = 0.f, ent_valid = 0.f, clip = 0.f, clo = 0.f;
    float chi = 0.f, dual = 0.f, nlr = 0.f, rsum = 0.f, adv = 0.f, wsum = 0.f, check = 0.f;
    float sdc = 0.f, slogw = 0.f;
    float rmin = INFINITY, rmax = -INFINITY;
    for (int64_t t = lane; t < T; t += kWarpSize) {
      const Token k = load_token(r, adv_tok, t);
      if (!k.v) continue;
      const float d = k.lp - k.old;
      const float dc = pl::clampv(d, -C, C);
      const Mult u = load_mult(a, r, k, t, c.seq_w, thr);
      float rho = 1.f;
      if (gmpo) {
        const pl::GmpoClip<float> g =
            pl::gmpo_clip<float>(d, k.a, float(a.h.clip_lo), float(a.h.clip_hi));
        sdc += g.dc;
        clip += g.clipped;
        clo += k.a < 0.f ? g.clipped : 0.f;
        chi += k.a > 0.f ? g.clipped : 0.f;
        if (a.f.rollout_level != pl::kRolloutNone) slogw += logf(u.w + 1e-10f);
      } else {
        rho = pl::expv(seq_ratio ? c.r_seq : dc);
        const pl::TokenLoss<float> L = loss_at(a, rho, k);
        pg += u.w * u.em * u.wt * L.loss;
        clip += L.clipped;
        clo += L.clip_low;
        chi += L.clip_high;
        dual += L.dual;
        rsum += rho;
        rmin = fminf(rmin, rho);
        rmax = fmaxf(rmax, rho);
      }
      if (a.f.kl_kind != pl::kKlNone) {
        const float ref_raw = __ldg(r.ref + t);
        float val = pl::kl_term<float>(a.f.kl_kind, false, k.lp, ref_raw,
                                       float(a.h.kl_log_clamp), float(a.h.kl_value_clamp))
                        .value;
        if (a.f.kl_bias_correction) val *= rho;
        kl += val;
        check += ref_raw;
      }
      if (r.ent) {
        ent += u.em * u.h;
        ent_n += u.em;
        ent_valid += u.h;
      }
      if (r.tw) check += u.wt;
      wsum += u.w;
      nlr -= dc;
      adv += k.a;
    }
    double s_pg = warp_sum(pg), s_rsum = warp_sum(rsum);
    double s_rmin = warp_min(rmin), s_rmax = warp_max(rmax);
    const double s_adv = warp_sum(adv), s_ent_valid = warp_sum(ent_valid);
    // NaN policy: a non-finite input at a valid token makes the row's input sums non-finite.
    const double s_check = double(warp_sum(check)) + s_ent_valid + s_adv + lp_sum;
    double seq_r = seq_ratio ? double(c.r_seq) : 0.0, seq_w = c.seq_w;
    if (gmpo) {
      const double len1 = n > 1 ? n : 1.0;
      seq_r = double(warp_sum(sdc)) / len1;
      const double rho_i = exp(seq_r);
      seq_w = a.f.rollout_level != pl::kRolloutNone ? exp(double(warp_sum(slogw)) / len1) : 1.0;
      s_pg = -(s_adv / len1) * rho_i * seq_w;
      s_rsum = n * rho_i;
      s_rmin = n > 0 ? rho_i : double(INFINITY);
      s_rmax = n > 0 ? rho_i : -double(INFINITY);
    }
    const double vals[pl::kNumRowStats] = {
        n, s_pg, warp_sum(kl), warp_sum(ent), lp_sum, warp_sum(ent_n), seq_r, seq_w, s_adv,
        warp_sum(clip), warp_sum(clo), warp_sum(chi), warp_sum(dual), warp_sum(nlr), s_rsum,
        s_rmin, s_rmax, s_ent_valid,
        a.f.rollout_level != pl::kRolloutNone ? double(warp_sum(wsum)) : 0.0,
        s_check - s_check == 0.0 ? 0.0 : 1.0};
    if (lane < pl::kNumRowStats) {
      double out = 0.0;
#pragma unroll
      for (int k = 0; k < pl::kNumRowStats; ++k) out = lane == k ? vals[k] : out;
      a.row_stats[int64_t(lane) * B + b] = out;
    }
  }
}

// ----------------------------------------------------------------------------------- backward

__global__ void __launch_bounds__(kWarpSize * kRowsPerBlock)
    policy_loss_bwd_kernel(const Args a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t B = a.in.B, T = a.in.T;
  const bool adv_tok = a.in.adv_per_token != 0;
  const float C = float(a.h.log_ratio_clamp);
  const float thr = a.in.entropy_threshold ? __ldg(a.in.entropy_threshold) : 0.f;
  const int mode = a.f.ratio_mode;
  const bool gmpo = a.f.loss_kind == pl::kGmpo;
  const bool has_kl = a.f.kl_kind != pl::kKlNone, bias = a.f.kl_bias_correction != 0;
  const float Ck = float(a.h.kl_log_clamp), Cv = float(a.h.kl_value_clamp);
  for (int64_t b = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; b < B;
       b += int64_t(gridDim.x) * kRowsPerBlock) {
    const RowPtrs r = row_ptrs(a.in, b);
    const double n = a.stats_in[pl::kLen * B + b];
    const SeqConst c0 = seq_const(a, n, a.stats_in[pl::kLpSum * B + b], 0.0);
    // The sequence rollout weight is the forward's (its log-ratio sum is not saved).
    const float seq_w = float(a.stats_in[pl::kSeqWeight * B + b]);
    const float g_pg = float(a.grad_rows[pl::kGradPg * B + b]);
    const float g_kl = float(a.grad_rows[pl::kGradKl * B + b]);
    const float g_ent = float(a.grad_rows[pl::kGradEnt * B + b]);
    const float g_lp = float(a.grad_rows[pl::kGradLp * B + b]);
    const double len1 = n > 1 ? n : 1.0;
    const float gmpo_coef = float(double(g_pg) * a.stats_in[pl::kPgSum * B + b] / len1);
    const float rho_seq = pl::expv(c0.r_seq);

    float G = 0.f;  // Σ_t m·∂(loss terms)/∂r, spread over the row (exact sequence gradient)
    if (mode == pl::kRatioSeqFull) {
      float acc = 0.f;
      for (int64_t t = lane; t < T; t += kWarpSize) {
        const Token k = load_token(r, adv_tok, t);
        if (!k.v) continue;
        const Mult u = load_mult(a, r, k, t, seq_w, thr);
        acc += g_pg * (u.w * u.em * u.wt) * loss_at(a, rho_seq, k).d_r;
        if (has_kl && bias)
          acc += g_kl * rho_seq *
                 pl::kl_term<float>(a.f.kl_kind, false, k.lp, __ldg(r.ref + t), Ck, Cv).value;
      }
      G = c0.pass_seq ? float(double(warp_sum(acc)) / len1) : 0.f;
    }

    float* g_row = a.grad_logp + b * T;
    float* ge_row = a.grad_entropy ? a.grad_entropy + b * T : nullptr;
    for (int64_t t = lane; t < T; t += kWarpSize) {
      const Token k = load_token(r, adv_tok, t);
      if (!k.v) {
        g_row[t] = 0.f;
        if (ge_row) ge_row[t] = 0.f;
        continue;
      }
      const float d = k.lp - k.old;
      const Mult u = load_mult(a, r, k, t, seq_w, thr);
      float g, rho = 1.f, pass = 0.f;
      if (gmpo) {
        g = gmpo_coef * pl::gmpo_clip<float>(d, k.a, float(a.h.clip_lo), float(a.h.clip_hi)).d;
      } else {
        if (mode == pl::kRatioToken) {
          rho = pl::expv(pl::clampv(d, -C, C));
          pass = pl::in_closed(d, -C, C) ? 1.f : 0.f;
        } else {
          rho = rho_seq;
          pass = c0.pass_seq ? 1.f : 0.f;
        }
        const pl::TokenLoss<float> L = loss_at(a, rho, k);
        const float w = g_pg * (u.w * u.em * u.wt);
        g = w * L.d_logp;
        if (mode != pl::kRatioSeqFull) g += w * L.d_r * pass;
      }
      if (has_kl) {
        const pl::KlTerm<float> kt =
            pl::kl_term<float>(a.f.kl_kind, a.f.kl_straight_through != 0, k.lp,
                               __ldg(r.ref + t), Ck, Cv);
        if (bias) {
          g += g_kl * kt.d_logp * rho;
          if (mode != pl::kRatioSeqFull) g += g_kl * kt.value * rho * pass;
        } else {
          g += g_kl * kt.d_logp;
        }
      }
      g_row[t] = g + g_lp + G;
      if (ge_row) ge_row[t] = g_ent * u.em;
    }
  }
}

// ------------------------------------------------------------------------------- KL estimator

__global__ void kl_penalty_kernel(const float* __restrict__ logp, const float* __restrict__ ref,
                                  const float* __restrict__ grad, float* __restrict__ out,
                                  int64_t n, int kind, int straight_through, float log_clamp,
                                  float value_clamp) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const pl::KlTerm<float> k = pl::kl_term<float>(kind, straight_through != 0, __ldg(logp + i),
                                                   __ldg(ref + i), log_clamp, value_clamp);
    out[i] = grad ? __ldg(grad + i) * k.d_logp : k.value;
  }
}

int check_inputs(const RlkernPolicyLossInputs* in, const int32_t* flags,
                 const double* hparams) {
  if (!in || !flags || !hparams) return RLKERN_CUDA_ERR_NULL_POINTER;
  if (in->B < 0 || in->T < 0) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (in->B > 0 && in->T > 0 && (!in->logp || !in->old || !in->adv || !in->mask))
    return RLKERN_CUDA_ERR_NULL_POINTER;
  if (flags[0] < pl::kPpo || flags[0] > pl::kGvpo || flags[1] < 0 ||
      flags[1] > pl::kRatioSeqFull || flags[2] < pl::kKlNone || flags[2] > pl::kKlAbs ||
      flags[5] < pl::kRolloutNone || flags[5] > pl::kRolloutSeq)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (flags[2] != pl::kKlNone && !in->ref) return RLKERN_CUDA_ERR_NULL_POINTER;
  if (flags[5] != pl::kRolloutNone && !in->rollout) return RLKERN_CUDA_ERR_NULL_POINTER;
  if (in->entropy_threshold && !in->entropy) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  return RLKERN_CUDA_OK;
}

Args make_args(const RlkernPolicyLossInputs* in, const int32_t* flags, const double* hp) {
  Args a{};
  a.in = *in;
  a.f = pl::Flags{flags[0], flags[1], flags[2], flags[3], flags[4], flags[5], flags[6]};
  a.h = pl::HParams{hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6],
                    hp[7], hp[8], hp[9], hp[10], hp[11], hp[12]};
  return a;
}

dim3 row_grid(int64_t B) {
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  return dim3(static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
}

}  // namespace
}  // namespace rlkern

extern "C" int rlkern_policy_loss_fwd_cuda(const RlkernPolicyLossInputs* in,
                                           const int32_t* flags, const double* hparams,
                                           double* row_stats, cudaStream_t stream) {
  using namespace rlkern;
  const int err = check_inputs(in, flags, hparams);
  if (err != RLKERN_CUDA_OK) return err;
  if (in->B == 0) return RLKERN_CUDA_OK;
  if (!row_stats) return RLKERN_CUDA_ERR_NULL_POINTER;
  Args a = make_args(in, flags, hparams);
  a.row_stats = row_stats;
  policy_loss_fwd_kernel<<<row_grid(in->B), kWarpSize * kRowsPerBlock, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int rlkern_policy_loss_bwd_cuda(const RlkernPolicyLossInputs* in,
                                           const int32_t* flags, const double* hparams,
                                           const double* row_stats, const double* grad_rows,
                                           float* grad_logp, float* grad_entropy,
                                           cudaStream_t stream) {
  using namespace rlkern;
  const int err = check_inputs(in, flags, hparams);
  if (err != RLKERN_CUDA_OK) return err;
  if (grad_entropy && !in->entropy) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (in->B == 0 || in->T == 0) return RLKERN_CUDA_OK;
  if (!row_stats || !grad_rows || !grad_logp) return RLKERN_CUDA_ERR_NULL_POINTER;
  Args a = make_args(in, flags, hparams);
  a.stats_in = row_stats;
  a.grad_rows = grad_rows;
  a.grad_logp = grad_logp;
  a.grad_entropy = grad_entropy;
  policy_loss_bwd_kernel<<<row_grid(in->B), kWarpSize * kRowsPerBlock, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int rlkern_kl_penalty_cuda(const float* logp, const float* ref, const float* grad,
                                      float* out, int64_t n, int kind, int straight_through,
                                      double log_clamp, double value_clamp,
                                      cudaStream_t stream) {
  using namespace rlkern;
  if (n < 0 || kind < policy_loss::kKlK1 || kind > policy_loss::kKlAbs)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (n == 0) return RLKERN_CUDA_OK;
  if (!logp || !ref || !out) return RLKERN_CUDA_ERR_NULL_POINTER;
  const int threads = 256;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  kl_penalty_kernel<<<blocks, threads, 0, stream>>>(logp, ref, grad, out, n, kind,
                                                    straight_through, float(log_clamp),
                                                    float(value_clamp));
  return static_cast<int>(cudaGetLastError());
}
