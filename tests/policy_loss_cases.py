"""Shared inputs and configurations of the policy-loss tests (every loss, add-on and mode)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlkern import PolicyLossConfig

C = PolicyLossConfig


@dataclass(frozen=True)
class Case:
    """A configuration and the optional inputs it uses."""

    config: PolicyLossConfig
    ref: bool = False
    rollout: bool = False
    entropy: bool = False
    token_weights: bool = False
    adv_per_token: bool = False
    cov_select: bool = False  # clip_cov / kl_cov: pass the inputs' random selection
    kwargs: dict = field(default_factory=dict)  # num_tokens / num_seqs


CASES: dict[str, Case] = {
    # losses
    "ppo": Case(C()),
    "ppo-clip-higher-dual": Case(C(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)),
    "ppo-delta": Case(C(delta=1.3, log_ratio_clamp=None)),
    "ppo-adv-per-token": Case(C(clip_ratio_c=3.0), adv_per_token=True),
    "gspo": Case(C(policy_loss="gspo", log_ratio_clamp=None,
                   loss_agg_mode="seq-mean-token-mean")),
    "ppo-seq-trl": Case(C(importance_sampling_level="sequence", seq_log_ratio_max=None,
                          log_ratio_clamp=None, loss_agg_mode="seq-mean-token-mean",
                          count_empty_seqs=True)),
    "cispo-verl": Case(C(policy_loss="cispo", clip_ratio_high=0.28)),
    "cispo-trl": Case(C(policy_loss="cispo", ratio_min=-math.inf, ratio_max=1.1,
                        log_ratio_clamp=None)),
    "cispo-seq": Case(C(policy_loss="cispo", importance_sampling_level="sequence")),
    "sapo": Case(C(policy_loss="sapo", loss_agg_mode="seq-mean-token-mean")),
    "sapo-seq": Case(C(policy_loss="sapo", importance_sampling_level="sequence")),
    "gmpo": Case(C(policy_loss="gmpo", log_ratio_clamp=None, clip_ratio_low=0.1,
                   clip_ratio_high=0.2)),
    "gmpo-adv-per-token-rollout": Case(C(policy_loss="gmpo", rollout_correction="token_truncate"),
                                       rollout=True, adv_per_token=True),
    "reinforce": Case(C(policy_loss="reinforce")),
    "gvpo": Case(C(policy_loss="gvpo", group_size=3, gvpo_beta=0.5)),
    "gvpo-sum-kl": Case(C(policy_loss="gvpo", group_size=2, loss_agg_mode="sum", kl_coef=0.1),
                        ref=True),
    "vespo": Case(C(policy_loss="vespo")),
    "vespo-params-adv-per-token": Case(C(policy_loss="vespo", vespo_k_pos=1.5,
                                         vespo_lambda_pos=0.5, vespo_k_neg=4.0,
                                         vespo_lambda_neg=0.0, loss_agg_mode="sum"),
                                       adv_per_token=True),
    "vespo-rollout-truncate": Case(C(policy_loss="vespo", rollout_correction="token_truncate",
                                     rollout_min=0.9, rollout_max=1.1), rollout=True),
    "vespo-rollout-mask-addons": Case(C(policy_loss="vespo", rollout_correction="token_mask",
                                        rollout_min=0.5, rollout_max=2.0, kl_coef=0.1,
                                        kl_bias_correction=True, entropy_coef=0.01,
                                        top_entropy_quantile=0.7),
                                      ref=True, rollout=True, entropy=True, token_weights=True),
    # KL estimators
    **{f"kl-{est}": Case(C(kl_coef=0.05, kl_estimator=est), ref=True)
       for est in ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+", "low_var_kl", "mse")},
    "kl-k3-unclamped-bias": Case(C(kl_coef=0.1, kl_log_clamp=None, kl_value_clamp=None,
                                   kl_bias_correction=True), ref=True),
    "kl-k3-tight-clamps": Case(C(kl_coef=0.1, kl_log_clamp=0.5, kl_value_clamp=0.05), ref=True),
    "kl-bias-seq-full": Case(C(kl_coef=0.1, kl_bias_correction=True,
                               importance_sampling_level="sequence"), ref=True),
    "kl-bias-gspo": Case(C(policy_loss="gspo", kl_coef=0.1, kl_bias_correction=True), ref=True),
    "kl-own-agg": Case(C(kl_coef=0.2, kl_agg_mode="seq-mean-token-sum"), ref=True),
    # entropy bonus and mask
    "entropy-bonus": Case(C(entropy_coef=0.01), entropy=True),
    "entropy-mask": Case(C(entropy_coef=0.02, top_entropy_quantile=0.4), entropy=True),
    "entropy-local-norm": Case(C(entropy_coef=0.05, entropy_agg_mode="token-mean",
                                 entropy_global_norm=False), entropy=True,
                               kwargs={"num_tokens": 40.0}),
    # rollout correction
    **{f"rollout-{mode}": Case(C(rollout_correction=mode, rollout_min=0.8, rollout_max=1.2),
                               rollout=True)
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    "rollout-unclamped": Case(C(rollout_correction="sequence_truncate", rollout_log_clamp=None,
                                rollout_max=None), rollout=True),
    # token weights
    "token-weights": Case(C(clip_ratio_c=2.0), token_weights=True),
    # aggregation
    **{f"agg-{mode}": Case(C(loss_agg_mode=mode))
       for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                    "sum", "token-sum")},
    "agg-norm-max-len": Case(C(loss_agg_mode="seq-mean-token-sum-norm", max_len=64,
                               count_empty_seqs=True)),
    "agg-global-counts": Case(C(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1,
                                kl_agg_mode="token-mean", loss_scale=2.0), ref=True,
                              kwargs={"num_tokens": 123.0, "num_seqs": 17.0}),
    "agg-count-empty": Case(C(loss_agg_mode="seq-mean-token-sum", count_empty_seqs=True)),
    # everything at once
    "all-addons": Case(C(clip_ratio_high=0.28, clip_ratio_c=3.0, kl_coef=0.05,
                         kl_estimator="k3+", entropy_coef=0.01, top_entropy_quantile=0.7,
                         rollout_correction="token_mask", rollout_min=0.5, rollout_max=2.0),
                       ref=True, rollout=True, entropy=True, token_weights=True),
    "verl-preset": Case(C.verl(use_kl_loss=True, entropy_coeff=0.001, rollout_is="sequence"),
                        ref=True, rollout=True, entropy=True),
    "trl-preset": Case(C.trl(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5,
                             entropy_coef=0.01, importance_sampling_level="sequence"),
                       ref=True, rollout=True, entropy=True),
    "trl-preset-vespo": Case(C.trl(loss_type="vespo", beta=0.04, vespo_k_pos=2.5,
                                   vespo_lambda_neg=1.5,
                                   vllm_importance_sampling_mode="token_truncate"),
                             ref=True, rollout=True, entropy=True),
    # verl's rejection sampling (a pre-pass reduces the mask) and batch-normalised weights
    "rollout-rs-token": Case(C(rollout_rs="token_k1,token_k2,token_k3",
                               rollout_rs_threshold="0.85_1.2,0.02,0.02"), rollout=True),
    "rollout-rs-seq-addons": Case(C(rollout_rs="seq_sum_k1,seq_mean_k2,seq_max_k3",
                                    rollout_rs_threshold="0.6_1.6,0.015,0.06",
                                    rollout_correction="sequence_truncate", rollout_max=2.0,
                                    kl_coef=0.1, entropy_coef=0.01,
                                    loss_agg_mode="seq-mean-token-mean"),
                                  ref=True, rollout=True, entropy=True),
    "rollout-rs-batch-norm": Case(C(rollout_correction="token_mask", rollout_min=0.8,
                                    rollout_max=1.2, rollout_batch_normalize=True,
                                    rollout_rs="seq_sum_k2,token_k3",
                                    rollout_rs_threshold="0.1,0.02"), rollout=True),
    "rollout-batch-norm-seq": Case(C(rollout_correction="sequence_truncate", rollout_max=1.5,
                                     rollout_batch_normalize=True, policy_loss="gmpo"),
                                   rollout=True),
    "verl-preset-rs": Case(C.verl(rollout_is="token", rollout_is_batch_normalize=True,
                                  rollout_rs="seq_mean_k3,seq_sum_k3,seq_max_k2",
                                  rollout_rs_threshold="0.012,0.1,0.05",
                                  loss_agg_mode="seq-mean-token-sum"), rollout=True),
    "dro": Case(C(policy_loss="dro", dro_beta=0.7, log_ratio_clamp=None)),
    "dro-adv-per-token-addons": Case(C(policy_loss="dro", dro_beta=2.0,
                                       loss_agg_mode="seq-mean-token-sum", kl_coef=0.1,
                                       rollout_correction="token_truncate", rollout_max=1.1),
                                     ref=True, rollout=True, token_weights=True,
                                     adv_per_token=True),
    "dppo-tv": Case(C(policy_loss="dppo_tv", clip_ratio_low=0.03, clip_ratio_high=0.05,
                      clip_ratio_c=1.2)),
    "dppo-tv-adv-per-token-weights": Case(C(policy_loss="dppo_tv", clip_ratio_low=0.05,
                                            loss_agg_mode="seq-mean-token-mean"),
                                          token_weights=True, adv_per_token=True),
    "dppo-kl": Case(C(policy_loss="dppo_kl", clip_ratio_low=0.002, clip_ratio_high=0.004,
                      clip_ratio_c=1.2)),
    "dppo-kl-adv-per-token-addons": Case(C(policy_loss="dppo_kl", clip_ratio_low=0.003,
                                           clip_ratio_c=None, entropy_coef=0.01,
                                           top_entropy_quantile=0.7, kl_coef=0.05,
                                           kl_bias_correction=True),
                                         ref=True, entropy=True, adv_per_token=True),
    "verl-preset-dppo-kl": Case(C.verl(policy_loss="dppo_kl", clip_ratio=0.003, clip_ratio_c=1.3,
                                       use_kl_loss=True, rollout_is="token"),
                                ref=True, rollout=True),
    "clip-cov": Case(C(policy_loss="clip_cov", log_ratio_clamp=None, clip_ratio_high=0.28),
                     cov_select=True),
    "clip-cov-dual-addons": Case(C(policy_loss="clip_cov", clip_ratio_c=2.0, kl_coef=0.1,
                                   entropy_coef=0.01, rollout_correction="token_mask",
                                   rollout_min=0.5, rollout_max=2.0,
                                   loss_agg_mode="seq-mean-token-mean"),
                                 ref=True, rollout=True, entropy=True, token_weights=True,
                                 adv_per_token=True, cov_select=True),
    "kl-cov": Case(C(policy_loss="kl_cov", log_ratio_clamp=None, cov_kl_coef=0.7),
                   cov_select=True),
    "kl-cov-adv-per-token-addons": Case(C(policy_loss="kl_cov", cov_kl_coef=2.0,
                                          rollout_correction="sequence_truncate",
                                          rollout_max=1.5, loss_agg_mode="sum"),
                                        rollout=True, token_weights=True, adv_per_token=True,
                                        cov_select=True),
}


def make_inputs(B: int = 6, T: int = 11, dtype: torch.dtype = torch.float64, seed: int = 0,
                empty_row: bool = True, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """Random inputs: log-ratios of size ~spread (so every clip branch is taken), one row
    without valid tokens (when B > 2), masked positions filled with garbage (NaN) that must
    never be read."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + r(B, T) * spread
    mask = torch.rand(B, T, generator=g) > 0.25
    if empty_row and B > 2:
        mask[1] = False
    if B > 0 and T > 0:
        mask[0, 0] = True
    out = {
        "logprobs": lp,
        "old_logprobs": old,
        "advantages": r(B),
        "adv_per_token": r(B, T),
        "mask": mask,
        "ref_logprobs": lp + r(B, T) * 0.5,
        "rollout_logprobs": old + r(B, T) * 0.15,
        "entropy": torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        "token_weights": torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
    }
    # drawn after the others, so that their values do not depend on it
    out["cov_select"] = (torch.rand(B, T, generator=g) < 0.3).to(torch.float64)
    out = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in out.items()}
    for k in ("logprobs", "old_logprobs", "ref_logprobs", "entropy", "token_weights",
              "adv_per_token", "cov_select"):
        out[k] = torch.where(mask, out[k], torch.full_like(out[k], math.nan))
    return out


def call_kwargs(case: Case, inp: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """Positional and keyword arguments of rlkern.policy_loss for a case."""
    adv = inp["adv_per_token"] if case.adv_per_token else inp["advantages"]
    args = (inp["logprobs"], inp["old_logprobs"], adv, inp["mask"])
    kw = dict(case.kwargs)
    if case.ref:
        kw["ref_logprobs"] = inp["ref_logprobs"]
    if case.rollout:
        kw["rollout_logprobs"] = inp["rollout_logprobs"]
    if case.entropy:
        kw["entropy"] = inp["entropy"]
    if case.token_weights:
        kw["token_weights"] = inp["token_weights"]
    if case.cov_select:
        kw["cov_select"] = inp["cov_select"]
    return args, kw
