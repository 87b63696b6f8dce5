// CUDA kernels of the policy-loss family (ALGORITHMS.md §3): one pass forward, one backward.
//
// Torch-free (DESIGN.md style rule 1): the launchers at the bottom take raw pointers, sizes,
// row strides, the flags / hyperparameters and a cudaStream_t and return an error code;
// csrc/cuda/policy_loss_ops.cpp adapts tensors. The per-token math is rlkern/policy_loss.h,
// shared with the CPU kernels; contract in rlkern/cuda_launchers.h.
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

using pl::Args;  // float32 inputs and gradients

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
  const float* opt[pl::kNumInputs];  // the optional (B, T) inputs by slot (nullptr: absent)
};

// Row b of a required input / of an optional one (nullptr when absent).
template <typename E = float>
__device__ __forceinline__ const E* row_at(const pl::RowArray& a, int64_t b) {
  return static_cast<const E*>(a.p) + b * a.stride;
}
template <typename E = float>
__device__ __forceinline__ const E* row_of(const pl::RowArray& a, int64_t b) {
  return a.p ? row_at<E>(a, b) : nullptr;
}

__device__ __forceinline__ RowPtrs row_ptrs(const pl::Inputs& in, int64_t b) {
  RowPtrs r;
  r.lp = row_at(in.logp, b);
  r.old = row_at(in.old, b);
  r.adv = row_at(in.adv, b);
  r.m = row_at<uint8_t>(in.mask, b);
#pragma unroll
  for (int k = 0; k < pl::kNumInputs; ++k)
    r.opt[k] = pl::input_shape(k) == pl::kRows ? row_of(in.opt[k], b) : nullptr;
  return r;
}

// The entropy mask's threshold (0 when there is none: then it is not read).
__device__ __forceinline__ float entropy_threshold(const pl::Inputs& in) {
  const void* p = in.opt[pl::kInEntropyThreshold].p;
  return p ? __ldg(static_cast<const float*>(p)) : 0.f;
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
  float wp;        // the rollout weight as it multiplies the policy term (w; vespo: 1)
  float vespo_lw;  // vespo: the token's rollout term of S (0 without a rollout correction)
};

__device__ __forceinline__ Mult load_mult(const Args& a, const RowPtrs& r, const Token& k,
                                          int64_t t, float seq_w, float thr) {
  Mult u{1.f, 1.f, 0.f, 1.f, 1.f, 0.f};
  if (a.flags.rollout_level == pl::kRolloutToken) {
    const float d = k.v ? k.old - __ldg(r.opt[pl::kInRollout] + t) : 0.f;
    u.w = pl::rollout_weight<float>(d, a.hp, a.flags.rollout_mask != 0);
    if (a.flags.loss_kind == pl::kVespo) {
      // vespo folds the weight into its sequence weight instead of multiplying by it
      u.vespo_lw = pl::vespo_log_rollout<float>(d, a.hp, a.flags.rollout_mask != 0);
    }
  } else if (a.flags.rollout_level == pl::kRolloutSeq) {
    u.w = seq_w;
  }
  if (a.flags.loss_kind != pl::kVespo) u.wp = u.w;
  if (r.opt[pl::kInEntropy]) {
    u.h = k.v ? __ldg(r.opt[pl::kInEntropy] + t) : 0.f;
    if (a.in.opt[pl::kInEntropyThreshold].p) u.em = u.h >= thr ? 1.f : 0.f;
  }
  if (r.opt[pl::kInTokenWeights]) u.wt = k.v ? __ldg(r.opt[pl::kInTokenWeights] + t) : 0.f;
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
  c.r_seq = float(pl::seq_log_ratio(lp_sum, len, a.hp.seq_log_ratio_max, &pass));
  c.pass_seq = pass;
  c.seq_w = a.flags.rollout_level == pl::kRolloutSeq
                ? float(pl::rollout_weight<double>(roll_sum, a.hp, a.flags.rollout_mask != 0))
                : 1.f;
  return c;
}

// The token loss at token t of row r (clip_cov / kl_cov read the token's cov_select value).
__device__ __forceinline__ pl::TokenLoss<float> loss_at(const Args& a, const RowPtrs& r,
                                                        int64_t t, float rho, const Token& k) {
  const int kind = a.flags.loss_kind;
  const float cov = (kind == pl::kClipCov || kind == pl::kKlCov) && k.v
                        ? __ldg(r.opt[pl::kInCovSelect] + t) : 0.f;
  return pl::token_loss<float>(kind, rho, k.a, k.lp, k.old, cov, a.hp);
}

// What both kernels read once per thread: the lane, the sizes and the row-independent values.
struct Common {
  int lane;
  int64_t B, T;
  bool adv_tok;
  float C;    // log_ratio_clamp
  float thr;  // entropy threshold
  bool gmpo;
};

__device__ __forceinline__ Common common(const Args& a) {
  return Common{int(threadIdx.x % kWarpSize), a.in.B, a.in.T, a.in.adv_per_token != 0,
                float(a.hp.log_ratio_clamp), entropy_threshold(a.in),
                a.flags.loss_kind == pl::kGmpo};
}

// Rows first_row(), first_row() + row_step(), ... are this warp's.
__device__ __forceinline__ int64_t first_row() {
  return int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t row_step() { return int64_t(gridDim.x) * kRowsPerBlock; }

// ------------------------------------------------------------------------------------ forward

__global__ void __launch_bounds__(kWarpSize * kRowsPerBlock)
    policy_loss_fwd_kernel(const Args a) {
  const auto [lane, B, T, adv_tok, C, thr, gmpo] = common(a);
  const bool seq_ratio = a.flags.ratio_mode != pl::kRatioToken;
  for (int64_t b = first_row(); b < B; b += row_step()) {
    const RowPtrs r = row_ptrs(a.in, b);
    // prefix
    float len = 0.f, lps = 0.f, rs = 0.f;
    for (int64_t t = lane; t < T; t += kWarpSize) {
      const bool v = r.m[t] != 0;
      if (!v) continue;
      const float old = __ldg(r.old + t);
      len += 1.f;
      lps += __ldg(r.lp + t) - old;
      if (a.flags.rollout_level == pl::kRolloutSeq) {
        const float d = old - __ldg(r.opt[pl::kInRollout] + t);
        rs += d == d ? d : 0.f;
      }
    }
    const double n = warp_sum(len), lp_sum = warp_sum(lps), roll_sum = warp_sum(rs);
    const SeqConst c = seq_const(a, n, lp_sum, roll_sum);

    float pg = 0.f, kl = 0.f, ent = 0.f, ent_n = 0.f, ent_valid = 0.f, clip = 0.f, clo = 0.f;
    float chi = 0.f, dual = 0.f, nlr = 0.f, rsum = 0.f, adv = 0.f, wsum = 0.f, check = 0.f;
    float sdc = 0.f, slogw = 0.f, pg_neg = 0.f, vespo_s = 0.f, n_pos = 0.f;
    const bool vespo = a.flags.loss_kind == pl::kVespo;
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
            pl::gmpo_clip<float>(d, k.a, float(a.hp.clip_lo), float(a.hp.clip_hi));
        sdc += g.dc;
        clip += g.clipped;
        clo += k.a < 0.f ? g.clipped : 0.f;
        chi += k.a > 0.f ? g.clipped : 0.f;
        if (a.flags.rollout_level != pl::kRolloutNone) slogw += logf(u.w + 1e-10f);
      } else {
        rho = pl::expv(seq_ratio ? c.r_seq : dc);
        const pl::TokenLoss<float> L = loss_at(a, r, t, rho, k);
        const float val = u.wp * u.em * u.wt * L.loss;
        if (vespo && !(k.a >= 0.f)) {  // vespo: split by the sign of A (NaN: A < 0)
          pg_neg += val;
        } else {
          pg += val;
          n_pos += vespo ? 1.f : 0.f;
        }
        if (vespo) {
          const float c20 = float(pl::kVespoLogRatioClamp);
          vespo_s += pl::clampv(d, -c20, c20) + u.vespo_lw;
        }
        clip += L.clipped;
        clo += L.clip_low;
        chi += L.clip_high;
        dual += L.dual;
        rsum += rho;
        rmin = fminf(rmin, rho);
        rmax = fmaxf(rmax, rho);
      }
      if (a.flags.kl_kind != pl::kKlNone) {
        const float ref_raw = __ldg(r.opt[pl::kInRef] + t);
        float val = pl::kl_term<float>(a.flags.kl_kind, false, k.lp, ref_raw,
                                       float(a.hp.kl_log_clamp), float(a.hp.kl_value_clamp))
                        .value;
        if (a.flags.kl_bias_correction) val *= rho;
        kl += val;
        check += ref_raw;
      }
      if (r.opt[pl::kInEntropy]) {
        ent += u.em * u.h;
        ent_n += u.em;
        ent_valid += u.h;
      }
      if (r.opt[pl::kInTokenWeights]) check += u.wt;
      wsum += u.w;
      nlr -= dc;
      adv += k.a;
    }
    double s_pg = warp_sum(pg), s_rsum = warp_sum(rsum);
    double s_rmin = warp_min(rmin), s_rmax = warp_max(rmax);
    const double s_adv = warp_sum(adv), s_ent_valid = warp_sum(ent_valid);
    // NaN policy: a non-finite input at a valid token makes the row's input sums non-finite.
    const double s_check = double(warp_sum(check)) + s_ent_valid + s_adv + lp_sum;
    double seq_r = seq_ratio ? double(c.r_seq) : 0.0, seq_w = c.seq_w, phi_sum = 0.0;
    if (vespo) {
      const pl::VespoPhi phi = pl::vespo_phis(warp_sum(vespo_s), a.hp);
      const double np = warp_sum(n_pos);
      s_pg = phi.pos * s_pg + phi.neg * double(warp_sum(pg_neg));
      phi_sum = phi.pos * np + phi.neg * (n - np);
      seq_r = phi.log_w;
    }
    if (gmpo) {
      const double len1 = n > 1 ? n : 1.0;
      seq_r = double(warp_sum(sdc)) / len1;
      const double rho_i = exp(seq_r);
      seq_w = a.flags.rollout_level != pl::kRolloutNone ? exp(double(warp_sum(slogw)) / len1) : 1.0;
      s_pg = -(s_adv / len1) * rho_i * seq_w;
      s_rsum = n * rho_i;
      s_rmin = n > 0 ? rho_i : double(INFINITY);
      s_rmax = n > 0 ? rho_i : -double(INFINITY);
    }
    double vals[pl::kNumRowStats];  // constant indices: kept in registers
    vals[pl::kLen] = n;
    vals[pl::kPgSum] = s_pg;
    vals[pl::kKlSum] = warp_sum(kl);
    vals[pl::kEntSum] = warp_sum(ent);
    vals[pl::kLpSum] = lp_sum;
    vals[pl::kEntCount] = warp_sum(ent_n);
    vals[pl::kSeqLogRatio] = seq_r;
    vals[pl::kSeqWeight] = seq_w;
    vals[pl::kAdvSum] = s_adv;
    vals[pl::kClip] = warp_sum(clip);
    vals[pl::kClipLow] = warp_sum(clo);
    vals[pl::kClipHigh] = warp_sum(chi);
    vals[pl::kDualClip] = warp_sum(dual);
    vals[pl::kNegLogRatio] = warp_sum(nlr);
    vals[pl::kRatioSum] = s_rsum;
    vals[pl::kRatioMin] = s_rmin;
    vals[pl::kRatioMax] = s_rmax;
    vals[pl::kEntropyValid] = s_ent_valid;
    vals[pl::kRolloutWSum] =
        a.flags.rollout_level != pl::kRolloutNone ? double(warp_sum(wsum)) : 0.0;
    vals[pl::kNonFinite] = s_check - s_check == 0.0 ? 0.0 : 1.0;
    vals[pl::kPhiSum] = phi_sum;
    static_assert(pl::kNumRowStats <= kWarpSize, "one lane stores one statistic");
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
  const auto [lane, B, T, adv_tok, C, thr, gmpo] = common(a);
  const int mode = a.flags.ratio_mode;
  const bool has_kl = a.flags.kl_kind != pl::kKlNone, bias = a.flags.kl_bias_correction != 0;
  const float Ck = float(a.hp.kl_log_clamp), Cv = float(a.hp.kl_value_clamp);
  for (int64_t b = first_row(); b < B; b += row_step()) {
    const RowPtrs r = row_ptrs(a.in, b);
    const double n = a.row_stats[pl::kLen * B + b];
    const SeqConst c0 = seq_const(a, n, a.row_stats[pl::kLpSum * B + b], 0.0);
    // The sequence rollout weight is the forward's (its log-ratio sum is not saved).
    const float seq_w = float(a.row_stats[pl::kSeqWeight * B + b]);
    const float g_pg = float(a.grad_rows[pl::kGradPg * B + b]);
    const float g_kl = float(a.grad_rows[pl::kGradKl * B + b]);
    const float g_ent = float(a.grad_rows[pl::kGradEnt * B + b]);
    const float g_lp = float(a.grad_rows[pl::kGradLp * B + b]);
    const double len1 = n > 1 ? n : 1.0;
    const float gmpo_coef = float(double(g_pg) * a.row_stats[pl::kPgSum * B + b] / len1);
    const float rho_seq = pl::expv(c0.r_seq);
    // vespo: φ from the forward's log w (vespo_phis clamps it again: a no-op); other kinds
    // skip its two exps
    const bool vespo = a.flags.loss_kind == pl::kVespo;
    const pl::VespoPhi phi = vespo ? pl::vespo_phis(a.row_stats[pl::kSeqLogRatio * B + b], a.hp)
                                   : pl::VespoPhi{0.0, 0.0, 0.0};
    const float phi_pos = float(phi.pos), phi_neg = float(phi.neg);

    float G = 0.f;  // Σ_t m·∂(loss terms)/∂r, spread over the row (exact sequence gradient)
    if (mode == pl::kRatioSeqFull) {
      float acc = 0.f;
      for (int64_t t = lane; t < T; t += kWarpSize) {
        const Token k = load_token(r, adv_tok, t);
        if (!k.v) continue;
        const Mult u = load_mult(a, r, k, t, seq_w, thr);
        acc += g_pg * (u.wp * u.em * u.wt) * loss_at(a, r, t, rho_seq, k).d_r;
        if (has_kl && bias) {
          const float ref = __ldg(r.opt[pl::kInRef] + t);
          acc += g_kl * rho_seq *
                 pl::kl_term<float>(a.flags.kl_kind, false, k.lp, ref, Ck, Cv).value;
        }
      }
      G = c0.pass_seq ? float(double(warp_sum(acc)) / len1) : 0.f;
    }

    float* g_row = static_cast<float*>(a.grad_logp) + b * T;
    float* ge_row = a.grad_entropy ? static_cast<float*>(a.grad_entropy) + b * T : nullptr;
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
        g = gmpo_coef * pl::gmpo_clip<float>(d, k.a, float(a.hp.clip_lo), float(a.hp.clip_hi)).d;
      } else {
        if (mode == pl::kRatioToken) {
          rho = pl::expv(pl::clampv(d, -C, C));
          pass = pl::in_closed(d, -C, C) ? 1.f : 0.f;
        } else {
          rho = rho_seq;
          pass = c0.pass_seq ? 1.f : 0.f;
        }
        const pl::TokenLoss<float> L = loss_at(a, r, t, rho, k);
        float w = g_pg * (u.wp * u.em * u.wt);
        if (vespo) w *= k.a >= 0.f ? phi_pos : phi_neg;
        g = w * L.d_logp;
        if (mode != pl::kRatioSeqFull) g += w * L.d_r * pass;
      }
      if (has_kl) {
        const pl::KlTerm<float> kt =
            pl::kl_term<float>(a.flags.kl_kind, a.flags.kl_straight_through != 0, k.lp,
                               __ldg(r.opt[pl::kInRef] + t), Ck, Cv);
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

int check_inputs(const pl::Inputs* in, const pl::Flags* flags, const pl::HParams* hparams) {
  if (!in || !flags || !hparams) return RLKERN_CUDA_ERR_NULL_POINTER;
  if (in->B < 0 || in->T < 0 || in->f64) return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (in->B > 0 && in->T > 0 && (!in->logp.p || !in->old.p || !in->adv.p || !in->mask.p))
    return RLKERN_CUDA_ERR_NULL_POINTER;
  const pl::Problem problem = pl::check_call(*flags, *in);
  if (problem.what)
    return problem.missing ? RLKERN_CUDA_ERR_NULL_POINTER : RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  return RLKERN_CUDA_OK;
}

Args make_args(const pl::Inputs* in, const pl::Flags* flags, const pl::HParams* hp) {
  Args a{};
  a.in = *in;
  a.flags = *flags;
  a.hp = *hp;
  return a;
}

dim3 row_grid(int64_t B) {
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  return dim3(static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
}

}  // namespace
}  // namespace rlkern

extern "C" int rlkern_policy_loss_fwd_cuda(const RlkernPolicyLossInputs* in,
                                           const rlkern::policy_loss::Flags* flags,
                                           const rlkern::policy_loss::HParams* hparams,
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
                                           const rlkern::policy_loss::Flags* flags,
                                           const rlkern::policy_loss::HParams* hparams,
                                           const double* row_stats, const double* grad_rows,
                                           float* grad_logp, float* grad_entropy,
                                           cudaStream_t stream) {
  using namespace rlkern;
  const int err = check_inputs(in, flags, hparams);
  if (err != RLKERN_CUDA_OK) return err;
  if (grad_entropy && !in->opt[policy_loss::kInEntropy].p)
    return RLKERN_CUDA_ERR_INVALID_ARGUMENT;
  if (in->B == 0 || in->T == 0) return RLKERN_CUDA_OK;
  if (!row_stats || !grad_rows || !grad_logp) return RLKERN_CUDA_ERR_NULL_POINTER;
  Args a = make_args(in, flags, hparams);
  a.row_stats = const_cast<double*>(row_stats);  // read only
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
  if (n < 0 || kind <= policy_loss::kKlNone || kind >= policy_loss::kNumKlKinds)
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
