"""``PolicyLossConfig``: every option of :func:`rlkern.policy_loss`, as one frozen dataclass,
and its translation into the kernels' integer codes and hyperparameters.

The fields are rlkern's own names for the options of ALGORITHMS.md §3; the presets
:meth:`PolicyLossConfig.verl` and :meth:`PolicyLossConfig.trl` translate a trainer's
configuration into them so that the loss, its gradient and the metrics are the trainer's own
(docs/policy_loss.md has the full mapping table). The config is validated once, when it is
built: an unknown name raises ``ValueError`` listing the valid ones.

:meth:`PolicyLossConfig.kernel_args` gives the kernels' ``flags`` / ``hparams`` lists, in the
layout of ``csrc/include/rlkern/policy_loss.h`` (read through :func:`rlkern.config.layout`;
this module restates no code or index); :func:`decode_kernel_args` names them back.
:meth:`PolicyLossConfig.to_args` / :meth:`PolicyLossConfig.from_args` carry a whole config
through a registered op as an int list and a float list.

Float fields are runtime values for the kernels (never a compile-time constant), so changing
e.g. ``clip_ratio_high`` or ``kl_coef`` between steps recompiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from rlkern.config.layout import layout
from rlkern.config.rollout_correction import RejectionOption, RolloutCorrection

__all__ = [
    "AGG_MODES",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "TRL_LOSS_TYPES",
    "VERL_POLICY_LOSSES",
    "PolicyLossConfig",
    "canonical_kl_estimator",
    "decode_kernel_args",
]

#: rlkern's loss names (ALGORITHMS.md §3).
POLICY_LOSSES = ("ppo", "gspo", "cispo", "sapo", "gmpo", "reinforce", "gvpo", "vespo", "dro",
                 "dppo_tv", "dppo_kl", "clip_cov", "kl_cov")
#: Aggregation modes; "token-sum" is verl's name for "sum".
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm", "sum", "token-sum")
IS_LEVELS = ("token", "sequence")
_KL_BASE = ("k1", "k2", "k3", "abs")
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
#: KL estimators: k1, k2, k3, abs, verl's aliases (kl, mse, low_var_kl), each optionally with
#: a trailing "+" (the value of the estimator with the gradient of k2).
KL_ESTIMATORS = tuple(n + s for n in (*_KL_BASE, *_KL_ALIASES) for s in ("", "+"))
ROLLOUT_CORRECTIONS = (None, "token_truncate", "token_mask", "sequence_truncate",
                       "sequence_mask")
VERL_POLICY_LOSSES = ("vanilla", "gspo", "cispo", "sapo", "geo_mean", "gpg", "dro", "dppo_tv",
                      "dppo_kl", "clip_cov", "kl_cov")
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

# rlkern's loss name → (the kernels' loss kind, their ratio mode for token-level sampling):
# names of policy_loss.h's loss_kinds / ratio_modes tables. gspo is PPO on the sequence ratio
# with GSPO-token's straight-through gradient.
_LOSS_CODES = {"ppo": ("ppo", "token"), "gspo": ("ppo", "seq_detached"),
               "cispo": ("cispo", "token"), "sapo": ("sapo", "token"),
               "reinforce": ("reinforce", "token"), "gmpo": ("gmpo", "token"),
               "gvpo": ("gvpo", "token"), "vespo": ("vespo", "token"),
               "dro": ("dro", "token"), "dppo_tv": ("dppo_tv", "token"),
               "dppo_kl": ("dppo_kl", "token"), "clip_cov": ("clip_cov", "token"),
               "kl_cov": ("kl_cov", "token")}
# DPPO's trust regions: clip_ratio_low / clip_ratio_high are divergence thresholds, not ratio
# bounds, and clip_ratio_c is the truncation of the (stop-gradient) ratio.
_DPPO = ("dppo_tv", "dppo_kl")
# The covariance-selected losses: a per-token selection (the cov_select input) switches the
# token's term.
_COV = ("clip_cov", "kl_cov")


# vespo's hyperparameters: the same names in PolicyLossConfig, the kernels' hparams and TRL's
# GRPOConfig.
_VESPO_FIELDS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")


def _choice(value: Any, name: str, options: tuple) -> None:
    if value not in options:
        shown = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


def canonical_kl_estimator(name: str) -> tuple[str, bool]:
    """``"low_var_kl+"`` → ``("k3", True)``: the base estimator and the straight-through flag."""
    _choice(name, "kl_estimator", KL_ESTIMATORS)
    straight = name.endswith("+")
    base = name[:-1] if straight else name
    return _KL_ALIASES.get(base, base), straight


def _inf(value: float | None, default: float = math.inf) -> float:
    """A kernel hyperparameter: ``None`` (off) is ±inf."""
    return default if value is None else float(value)


def decode_kernel_args(flags: list[int], hparams: list[float]) -> SimpleNamespace:
    """The kernels' ``flags`` and ``hparams`` by name: ``.loss_kind``, ``.clip_lo``, ... (the
    fields of policy_loss.h's struct Flags and struct HParams)."""
    lay = layout("policy_loss")
    if len(flags) != len(lay.flags) or len(hparams) != len(lay.hparams):
        raise ValueError(f"expected {len(lay.flags)} flags and {len(lay.hparams)} hparams, got "
                         f"{len(flags)} and {len(hparams)}")
    return SimpleNamespace(**{f.name: int(flags[f]) for f in lay.flags},
                           **{h.name: float(hparams[h]) for h in lay.hparams})


def _verl_dro_beta(beta: float | None) -> float:
    """verl's check of ``policy_loss.dro_beta`` (compute_policy_loss_dro), its wording."""
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return float(beta)


def _float(value: Any, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {want}, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of :func:`rlkern.policy_loss` (ALGORITHMS.md §3). Build directly, or with
    :meth:`verl` / :meth:`trl` to reproduce a trainer; change fields with :meth:`replace`.

    Loss:
        policy_loss: ``"ppo"`` (clipped surrogate; + dual clip, two-sided δ), ``"gspo"``
            (PPO on the sequence ratio with GSPO-token's straight-through gradient, verl),
            ``"cispo"``, ``"sapo"``, ``"gmpo"`` (geometric mean, per sequence), ``"reinforce"``
            (−A·logp, verl's gpg), ``"gvpo"`` (group-centred MSE; needs ``group_size``),
            ``"vespo"`` (−sg[φ]·A·logp with φ = exp(λ + k·log w − λ·w) a gamma weight of the
            row's clamped sequence ratio w; TRL's ``loss_type="vespo"``), ``"dro"``
            (−(A·logp − ½β·Δ²), Δ = logp − old; verl's dro; needs ``dro_beta``),
            ``"dppo_tv"`` / ``"dppo_kl"`` (−A·sg[min(ρ, c)]·logp on the tokens inside DPPO's
            binary total-variation / binary-KL trust region; verl's dppo_tv / dppo_kl),
            ``"clip_cov"`` (PPO's clipped term, 0 at the covariance-selected tokens) /
            ``"kl_cov"`` (−A·ρ, + k·|Δ| at the selected tokens); verl's clip_cov / kl_cov.
        clip_ratio_low / clip_ratio_high: ε_low / ε_high ≥ 0 (``None`` high = low): the ratio
            is clipped to [1 − ε_low, 1 + ε_high] (gmpo: the log-ratio to [−ε_low, ε_high]).
        ratio_min / ratio_max: explicit ratio bounds replacing 1 − ε_low / 1 + ε_high (TRL's
            cispo clips only above, at ``epsilon_high``: ``ratio_min=-inf, ratio_max=ε_high``).
        clip_ratio_c: dual clip c > 1 for A < 0 (``None``: off; verl's vanilla uses 3);
            dppo: the truncation c > 0 of the ratio, min(ρ, c) (``None``: off).
        delta: two-sided clip δ of the unclipped ratio (``None``: off; TRL ``delta``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (ρ_i = exp(mean Δ) with the
            exact gradient of the mean, TRL's GSPO); ppo, cispo and sapo only.
        log_ratio_clamp: |Δ| clamp before exp for token ratios (verl 20; ``None``: off, TRL).
        seq_log_ratio_max: upper clamp of the sequence log-ratio (verl's GSPO 10; ``None``).
        sapo_tau_pos / sapo_tau_neg: SAPO temperatures for A > 0 / A ≤ 0.
    KL to a reference policy (needs ``ref_logprobs``):
        kl_coef: β (0: no KL term even when ref_logprobs are given).
        kl_estimator: ``k1``, ``k2``, ``k3``, ``abs`` (or verl's ``kl``, ``mse``,
            ``low_var_kl``), with a trailing ``+`` for the straight-through form.
        kl_log_clamp / kl_value_clamp: k3's clamps (verl 20 / 10; ``None``: off, TRL).
        kl_bias_correction: multiply the KL term by ρ (TRL ``use_bias_correction_kl``).
        kl_agg_mode: aggregation of the KL term (``None``: ``loss_agg_mode``).
    Entropy bonus (needs ``entropy``):
        entropy_coef: c_H; the loss gets ``− c_H·agg(entropy)``.
        entropy_agg_mode: its aggregation (``None``: ``loss_agg_mode``).
        entropy_global_norm: use the ``num_tokens`` / ``num_seqs`` given to the call for the
            entropy term too (verl); ``False``: the local counts of the tokens it acts on (TRL).
        top_entropy_quantile: q ∈ (0, 1]: the policy term (and the entropy bonus) only keeps
            tokens whose entropy is ≥ the (1 − q) quantile of the valid tokens' entropies.
    Rollout correction (needs ``rollout_logprobs``; off when they are not given):
        rollout_correction: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``,
            ``"sequence_mask"`` (TRL's names) or ``None``.
        rollout_min / rollout_max: weight bounds (``None``: unbounded on that side).
        rollout_log_clamp: clamp of the (token or summed) log-ratio before exp (verl 20).
        rollout_batch_normalize: divide the weights by their batch mean (verl's
            ``rollout_is_batch_normalize``: the token mean, or the mean of the rows' weights).
        rollout_rs / rollout_rs_threshold: verl's rejection sampling (comma-separated options
            of ``token_k{1,2,3}``, ``seq_sum_k{1,2,3}``, ``seq_mean_k{1,2,3}``,
            ``seq_max_k{2,3}``, verl's threshold strings): rejected tokens leave the mask of
            every term (docs/policy_loss.md).
    Aggregation:
        loss_agg_mode: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``, ``sum`` (alias ``token-sum``).
        count_empty_seqs: seq-mean modes divide by all B rows (TRL) instead of the rows with
            at least one valid token (verl).
        max_len: L of ``seq-mean-token-sum-norm`` (``None``: the padded width T).
        loss_scale: multiplies the whole loss (verl's dp_size; TRL's 1 / grad-accumulation).
    gvpo:
        group_size: responses per prompt, contiguous rows; gvpo_beta: β of GVPO's reward.
    dro:
        dro_beta: β > 0 of the quadratic penalty ½β·(logp − old)² (required for dro).
    dppo (dppo_tv / dppo_kl):
        clip_ratio_low / clip_ratio_high: the trust region's thresholds ε_low / ε_high: a
        token with A > 0 counts when p − p_old ≤ ε_high (tv; kl: its binary KL ≤ ε_high or
        p ≤ p_old), one with A ≤ 0 when p − p_old ≥ −ε_low (kl: binary KL ≤ ε_low or
        p ≥ p_old), p = exp(logp).
    clip_cov / kl_cov (the selection, when ``cov_select`` is not given to the call):
        cov_ratio: the fraction of valid tokens to select (> 0; at least one token);
        cov_lb / cov_ub: clip_cov picks, at random (``torch.randperm``, the global generator,
            as verl), among the valid tokens the PPO clip did not clip whose covariance term
            ``(A − Ā)·(logp − l̄ogp)`` lies in (cov_lb, cov_ub); kl_cov takes the top
            ``cov_ratio`` by that term.
        cov_kl_coef: kl_cov's k (verl's ``ppo_kl_coef``).
    vespo:
        vespo_k_pos / vespo_lambda_pos: the gamma weight's shape k and rate λ where A ≥ 0;
        vespo_k_neg / vespo_lambda_neg: where A < 0 (λ is clamped to ≥ 1e-4). A token-level
        rollout correction is folded into w (log-weights summed) instead of multiplying.
    """

    policy_loss: str = "ppo"
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    clip_ratio_c: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    log_ratio_clamp: float | None = 20.0
    seq_log_ratio_max: float | None = 10.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_log_clamp: float | None = 20.0
    kl_value_clamp: float | None = 10.0
    kl_bias_correction: bool = False
    kl_agg_mode: str | None = None
    entropy_coef: float = 0.0
    entropy_agg_mode: str | None = None
    entropy_global_norm: bool = True
    top_entropy_quantile: float = 1.0
    rollout_correction: str | None = None
    rollout_min: float | None = None
    rollout_max: float | None = 2.0
    rollout_log_clamp: float | None = 20.0
    count_empty_seqs: bool = False
    max_len: int | None = None
    loss_scale: float = 1.0
    group_size: int | None = None
    gvpo_beta: float = 0.1
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    rollout_rs: str | None = None
    rollout_rs_threshold: str | float | None = None
    rollout_batch_normalize: bool = False
    dro_beta: float | None = None
    cov_ratio: float = 0.0002
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    cov_kl_coef: float = 1.0

    # ----------------------------------------------------------------------------- validation

    def __post_init__(self) -> None:
        _choice(self.policy_loss, "policy_loss", POLICY_LOSSES)
        _choice(self.loss_agg_mode, "loss_agg_mode", AGG_MODES)
        for name in ("kl_agg_mode", "entropy_agg_mode"):
            if getattr(self, name) is not None:
                _choice(getattr(self, name), name, AGG_MODES)
        _choice(self.importance_sampling_level, "importance_sampling_level", IS_LEVELS)
        canonical_kl_estimator(self.kl_estimator)
        _choice(self.rollout_correction, "rollout_correction", ROLLOUT_CORRECTIONS)
        for name in ("kl_bias_correction", "entropy_global_norm", "count_empty_seqs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        optional = {"clip_ratio_high", "ratio_min", "ratio_max", "clip_ratio_c", "delta",
                    "log_ratio_clamp", "seq_log_ratio_max", "kl_log_clamp", "kl_value_clamp",
                    "rollout_min", "rollout_max", "rollout_log_clamp", "dro_beta"}
        for name in ("clip_ratio_low", "sapo_tau_pos", "sapo_tau_neg", "kl_coef", "entropy_coef",
                     "top_entropy_quantile", "loss_scale", "gvpo_beta", *_VESPO_FIELDS,
                     "cov_ratio", "cov_lb", "cov_ub", "cov_kl_coef",
                     *sorted(optional)):
            object.__setattr__(self, name, _float(getattr(self, name), name,
                                                  optional=name in optional))
        for name in ("clip_ratio_low", "clip_ratio_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} (an epsilon) must be >= 0, got {value}")
        if self.policy_loss in _DPPO:
            if self.clip_ratio_c is not None and not self.clip_ratio_c > 0.0:
                raise ValueError(f"clip_ratio_c (dppo's ratio truncation) must be > 0, got "
                                 f"{self.clip_ratio_c}; use None to turn it off")
        elif self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {self.clip_ratio_c}; "
                             "use None to turn the dual clip off")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        lo, hi = self.clip_bounds()
        if not lo <= hi:
            raise ValueError(f"the clip bounds must satisfy lower <= upper, got [{lo}, {hi}]")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("log_ratio_clamp", "kl_log_clamp", "kl_value_clamp", "rollout_log_clamp"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        for name in ("kl_coef", "entropy_coef", "loss_scale", "gvpo_beta", *_VESPO_FIELDS,
                     "cov_kl_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got "
                             f"{self.top_entropy_quantile}")
        rmin = -math.inf if self.rollout_min is None else self.rollout_min
        rmax = math.inf if self.rollout_max is None else self.rollout_max
        if not rmin <= rmax:
            raise ValueError(f"rollout_min must be <= rollout_max, got {rmin} > {rmax}")
        if self.max_len is not None and (isinstance(self.max_len, bool)
                                         or not isinstance(self.max_len, int)
                                         or self.max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")
        seq_loss = self.policy_loss in ("gspo", "gmpo", "gvpo", "reinforce", "vespo", "dro",
                                        *_DPPO, *_COV)
        if seq_loss and self.importance_sampling_level != "token":
            raise ValueError(f"importance_sampling_level='sequence' applies to ppo, cispo and "
                             f"sapo; policy_loss={self.policy_loss!r} fixes its own ratio")
        if self.policy_loss in ("gmpo", "reinforce", "gvpo", "vespo", "dro", *_DPPO,
                                "kl_cov") and (
                self.ratio_min is not None or self.ratio_max is not None):
            raise ValueError(f"ratio_min / ratio_max do not apply to {self.policy_loss!r}")
        if self.policy_loss == "gvpo":
            if self.group_size is None or isinstance(self.group_size, bool) or not isinstance(
                    self.group_size, int) or self.group_size < 2:
                raise ValueError("policy_loss='gvpo' needs group_size: the number (>= 2) of "
                                 "responses per prompt, in contiguous rows; got "
                                 f"{self.group_size!r}")
            if self.top_entropy_quantile < 1.0:
                raise ValueError("gvpo is a sequence-level loss: top_entropy_quantile < 1 does "
                                 "not apply to it")
        elif self.group_size is not None:
            raise ValueError("group_size applies to policy_loss='gvpo' only")
        if self.policy_loss in ("gmpo", "gvpo") and self.kl_bias_correction:
            raise ValueError(f"kl_bias_correction applies to token-level losses, not "
                             f"{self.policy_loss!r}")
        if self.policy_loss == "vespo" and (self.rollout_correction or "").startswith("sequence"):
            raise ValueError("vespo folds token-level rollout weights into its sequence weight: "
                             "rollout_correction must be 'token_truncate', 'token_mask' or None, "
                             f"got {self.rollout_correction!r}")
        if self.policy_loss == "dro":
            if self.dro_beta is None or not self.dro_beta > 0 or not math.isfinite(self.dro_beta):
                # verl's wording (compute_policy_loss_dro)
                raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        elif self.dro_beta is not None:
            raise ValueError("dro_beta applies to policy_loss='dro' only")
        if not (self.cov_ratio > 0 and math.isfinite(self.cov_ratio)):
            raise ValueError(f"cov_ratio must be finite and > 0, got {self.cov_ratio}")
        if not self.cov_lb <= self.cov_ub:
            raise ValueError(f"cov_lb must be <= cov_ub, got {self.cov_lb} > {self.cov_ub}")
        if self.policy_loss == "gmpo" and self.top_entropy_quantile < 1.0:
            raise ValueError("gmpo is a sequence-level loss: top_entropy_quantile < 1 does not "
                             "apply to it")
        self._check_rollout_rs()

    def _check_rollout_rs(self) -> None:
        """Rejection sampling and batch-normalised weights (verl's ``rollout_rs``,
        ``rollout_rs_threshold``, ``rollout_is_batch_normalize``), parsed with verl's rules."""
        if not isinstance(self.rollout_batch_normalize, bool):
            raise TypeError("rollout_batch_normalize must be a bool, got "
                            f"{type(self.rollout_batch_normalize).__name__}")
        if self.rollout_rs is not None:
            options = self.rejection()
            if self.top_entropy_quantile < 1.0:
                raise ValueError("rollout_rs with top_entropy_quantile < 1: the entropy "
                                 "quantile would be taken over the tokens before rejection")
            level = (self.rollout_correction or "").split("_")[0]
            if level == "sequence" and any(o.level == "token" for o in options):
                raise ValueError(
                    "a sequence-level rollout_correction with a token-level rollout_rs option: "
                    "verl sums the log-ratio over the mask before rejection, the fused loss "
                    "after it; compute the weights with rlkern.rollout_correction and pass "
                    "them as token_weights")
        if self.rollout_batch_normalize:
            if self.rollout_correction is None:
                raise ValueError("rollout_batch_normalize needs a rollout_correction")
            if self.policy_loss in ("gvpo", "vespo"):
                raise ValueError(f"rollout_batch_normalize scales the policy term linearly: "
                                 f"not {self.policy_loss!r}, which folds or ignores the weights")

    def rejection(self) -> tuple[RejectionOption, ...]:
        """The parsed rejection-sampling options (:class:`RejectionOption`; empty: none)."""
        if self.rollout_rs is None:
            return ()
        return RolloutCorrection.from_verl(rollout_rs=self.rollout_rs,
                                           rollout_rs_threshold=self.rollout_rs_threshold
                                           ).rejection

    # ------------------------------------------------------------------------------- derived

    @property
    def eps_high(self) -> float:
        return self.clip_ratio_low if self.clip_ratio_high is None else self.clip_ratio_high

    def clip_bounds(self) -> tuple[float, float]:
        """The loss's clip interval: ratio bounds (ppo, gspo, cispo) or log-ratio bounds
        (gmpo: [−ε_low, ε_high]) or trust-region thresholds (dppo: [−ε_low, ε_high])."""
        if self.policy_loss in ("gmpo", *_DPPO):
            return -self.clip_ratio_low, self.eps_high
        lo = 1.0 - self.clip_ratio_low if self.ratio_min is None else self.ratio_min
        hi = 1.0 + self.eps_high if self.ratio_max is None else self.ratio_max
        return lo, hi

    def kl_agg(self) -> str:
        return self.loss_agg_mode if self.kl_agg_mode is None else self.kl_agg_mode

    def entropy_agg(self) -> str:
        return self.loss_agg_mode if self.entropy_agg_mode is None else self.entropy_agg_mode

    def kernel_args(self, *, with_kl: bool, with_rollout: bool) -> tuple[list[int], list[float]]:
        """The kernels' ``int[] flags`` and ``float[] hparams`` (policy_loss.h struct Flags /
        struct HParams, in field order). ``with_kl`` / ``with_rollout``: whether those add-ons
        are active in the call (their inputs are given).

        Cached by the config's value (the config is frozen, so an equal config encodes
        equally); each call gets its own lists."""
        try:
            flags, hparams = _cached_kernel_args(self, bool(with_kl), bool(with_rollout))
        except TypeError:  # a field value that cannot be hashed: encode afresh
            flags, hparams = self._encode(with_kl=with_kl, with_rollout=with_rollout)
        return list(flags), list(hparams)

    def _encode(self, *, with_kl: bool, with_rollout: bool) -> tuple[list[int], list[float]]:
        lay = layout("policy_loss")
        kind, ratio = _LOSS_CODES[self.policy_loss]
        if self.importance_sampling_level == "sequence":
            ratio = "seq_full"  # TRL's sequence level: the exact gradient of the mean
        kl_kind, straight = canonical_kl_estimator(self.kl_estimator) if with_kl else ("none",
                                                                                       False)
        level, mask_mode = "none", False
        if with_rollout and self.rollout_correction is not None:
            level, mode = self.rollout_correction.split("_")
            mask_mode = mode == "mask"
        lo, hi = self.clip_bounds()
        flags = {
            "loss_kind": lay.loss_kinds[kind],
            "ratio_mode": lay.ratio_modes[ratio],
            "kl_kind": lay.kl_kinds[kl_kind],
            "kl_straight_through": straight,
            "kl_bias_correction": with_kl and self.kl_bias_correction,
            "rollout_level": lay.rollout_levels[level],
            "rollout_mask": mask_mode,
        }
        hparams = {
            "clip_lo": lo,
            "clip_hi": hi,
            "dual_clip_c": _inf(self.clip_ratio_c),
            "delta": _inf(self.delta),
            "log_ratio_clamp": _inf(self.log_ratio_clamp),
            "seq_log_ratio_max": _inf(self.seq_log_ratio_max),
            "sapo_tau_pos": self.sapo_tau_pos,
            "sapo_tau_neg": self.sapo_tau_neg,
            "kl_log_clamp": _inf(self.kl_log_clamp),
            "kl_value_clamp": _inf(self.kl_value_clamp),
            "rollout_log_clamp": _inf(self.rollout_log_clamp),
            "rollout_min": _inf(self.rollout_min, -math.inf),
            "rollout_max": _inf(self.rollout_max),
            **{name: getattr(self, name) for name in _VESPO_FIELDS},
            "dro_beta": 0.0 if self.dro_beta is None else self.dro_beta,
            "cov_kl_coef": self.cov_kl_coef,
        }
        return ([int(flags[f.name]) for f in lay.flags],
                [float(hparams[h.name]) for h in lay.hparams])

    def to_args(self) -> tuple[list[int], list[float]]:
        """The whole config as an int list and a float list (a registered op's ``int[]`` /
        ``float[]`` arguments, constants to ``torch.compile``); :meth:`from_args` inverts it.
        Names are indices into their option tuples, ``None`` is −1 (ints) or NaN (floats: NaN
        is never a valid value)."""
        lists: tuple[list[int], list[float]] = ([], [])
        if self.rollout_rs is not None:
            raise ValueError("rollout_rs (rejection sampling) needs whole batches: the chunked "
                             "and fused-linear losses do not take it; apply "
                             "rlkern.rollout_correction's mask instead")
        for f in fields(self):
            if f.name in _NOT_CARRIED:
                continue
            encode, _, is_float = _codec(f)
            lists[is_float].append(encode(getattr(self, f.name)))
        return lists

    @classmethod
    def from_args(cls, ints: list[int], floats: list[float]) -> PolicyLossConfig:
        """The config :meth:`to_args` encoded."""
        values = (iter(ints), iter(floats))
        kw = {}
        for f in fields(cls):
            if f.name in _NOT_CARRIED:
                continue
            _, decode, is_float = _codec(f)
            kw[f.name] = decode(next(values[is_float]))
        return cls(**kw)

    def replace(self, **overrides: Any) -> PolicyLossConfig:
        """A copy with some fields changed (validated). Unknown names raise ``ValueError``."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PolicyLossConfig field(s) {unknown}; valid fields: "
                             f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    # ------------------------------------------------------------------------------- presets

    @classmethod
    def verl(
        cls,
        policy_loss: str = "vanilla",
        loss_agg_mode: str = "token-mean",
        clip_ratio: float = 0.2,
        clip_ratio_low: float | None = None,
        clip_ratio_high: float | None = None,
        clip_ratio_c: float | None = None,
        *,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        use_kl_loss: bool = False,
        kl_loss_coef: float = 0.001,
        kl_loss_type: str = "low_var_kl",
        entropy_coeff: float = 0.0,
        rollout_is: str | None = None,
        rollout_is_threshold: float | str = 2.0,
        loss_scale_factor: int | None = None,
        dp_size: int = 1,
        rollout_is_batch_normalize: bool = False,
        rollout_rs: str | None = None,
        rollout_rs_threshold: str | float | None = None,
        dro_beta: float | None = None,
        cov_ratio: float | None = None,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        ppo_kl_coef: float = 1.0,
    ) -> PolicyLossConfig:
        """verl's actor loss (``verl.workers.utils.losses.ppo_loss``): the registered
        ``compute_policy_loss_<policy_loss>`` + ``agg_loss``, the KL loss (``use_kl_loss``,
        ``kl_penalty``) and the entropy bonus, with verl's argument names and defaults.

        ``rollout_is`` (``"token"`` / ``"sequence"``) with ``rollout_is_threshold`` (a float:
        truncate above it; ``"lower_upper"``: zero outside [lower, upper]) reproduces
        ``compute_rollout_correction_weights`` applied to the policy term;
        ``rollout_is_batch_normalize``, ``rollout_rs`` and ``rollout_rs_threshold`` its batch
        normalisation and rejection sampling (``compute_rollout_rejection_mask``: the rejected
        tokens leave the mask of every term, as verl's trainer replaces ``response_mask``).
        Global batch normalisers (``batch_num_tokens``, ``global_batch_size``) are call arguments
        (``num_tokens``, ``num_seqs``); ``dp_size`` scales the loss as verl does. verl's
        ``geo_mean`` averages its policy term over the call's rows whatever the mode, dp size
        or global batch size: do not pass ``num_seqs`` for it (the preset folds ``dp_size``
        into the KL and entropy coefficients only).

        ``clip_ratio_c`` (``None``: verl's default for the loss): vanilla's dual clip (3) or
        dppo's ratio truncation (20, ``config.get("clip_ratio_c", 20.0)``; an ``ActorConfig``
        carries 3.0, pass it). ``dro_beta``: verl's ``policy_loss.dro_beta`` (dro only).
        ``cov_ratio`` (verl's ``clip_cov_ratio`` / ``kl_cov_ratio``; ``None``: 0.0002),
        ``cov_lb`` / ``cov_ub`` (``clip_cov_lb`` / ``clip_cov_ub``) and ``ppo_kl_coef``: the
        token selection of clip_cov / kl_cov (ratios unclamped, as verl's).
        """
        _choice(policy_loss, "policy_loss (verl)", VERL_POLICY_LOSSES)
        _choice(loss_agg_mode, "loss_agg_mode", AGG_MODES)
        low = clip_ratio if clip_ratio_low is None else clip_ratio_low
        high = clip_ratio if clip_ratio_high is None else clip_ratio_high
        if not isinstance(dp_size, int) or isinstance(dp_size, bool) or dp_size < 1:
            raise ValueError(f"dp_size must be a positive int, got {dp_size!r}")
        name = {"vanilla": "ppo", "gspo": "gspo", "cispo": "cispo", "sapo": "sapo",
                "geo_mean": "gmpo", "gpg": "reinforce", "dro": "dro", "dppo_tv": "dppo_tv",
                "dppo_kl": "dppo_kl", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}[policy_loss]
        if clip_ratio_c is None:
            clip_ratio_c = 20.0 if name in _DPPO else 3.0
        rollout, rmin, rmax = None, None, None
        if rollout_is is not None:
            _choice(rollout_is, "rollout_is", ("token", "sequence"))
            if isinstance(rollout_is_threshold, str) and "_" in rollout_is_threshold:
                lower, upper = (float(v) for v in rollout_is_threshold.split("_", 1))
                rollout, rmin, rmax = f"{rollout_is}_mask", lower, upper
            else:
                rollout, rmax = f"{rollout_is}_truncate", float(rollout_is_threshold)
        # verl's SAPO aggregates its policy term per sequence and GMPO (geo_mean) takes a plain
        # mean over the micro-batch's rows (no dp_size, no global batch size), whatever
        # loss_agg_mode says; the KL and entropy terms still use loss_agg_mode and dp_size.
        own_agg = {"sapo": "seq-mean-token-mean", "gmpo": "token-mean"}.get(name)
        dp = 1.0 if name == "gmpo" else float(dp_size)
        term_dp = float(dp_size) / dp
        return cls(
            policy_loss=name,
            loss_agg_mode=own_agg or loss_agg_mode,
            kl_agg_mode=loss_agg_mode if own_agg else None,
            entropy_agg_mode=loss_agg_mode if own_agg else None,
            clip_ratio_low=low,
            clip_ratio_high=high,
            clip_ratio_c=clip_ratio_c if name in ("ppo", *_DPPO) else None,
            log_ratio_clamp=20.0 if name in ("ppo", "cispo", "sapo", *_DPPO) else None,
            seq_log_ratio_max=10.0,
            sapo_tau_pos=tau_pos,
            sapo_tau_neg=tau_neg,
            kl_coef=float(kl_loss_coef) * term_dp if use_kl_loss else 0.0,
            kl_estimator=kl_loss_type,
            kl_log_clamp=20.0,
            kl_value_clamp=10.0,
            entropy_coef=float(entropy_coeff) * term_dp,
            rollout_correction=rollout,
            rollout_min=rmin,
            rollout_max=rmax,
            rollout_log_clamp=20.0,
            count_empty_seqs=False,
            max_len=loss_scale_factor,
            loss_scale=dp,
            rollout_rs=rollout_rs,
            rollout_rs_threshold=rollout_rs_threshold,
            # verl ignores the normalisation when there are no weights
            rollout_batch_normalize=rollout_is_batch_normalize and rollout is not None,
            dro_beta=_verl_dro_beta(dro_beta) if name == "dro" else None,
            cov_ratio=0.0002 if cov_ratio is None else cov_ratio,
            cov_lb=cov_lb,
            cov_ub=cov_ub,
            cov_kl_coef=ppo_kl_coef,
        )

    @classmethod
    def trl(
        cls,
        loss_type: str = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        delta: float | None = None,
        importance_sampling_level: str = "token",
        max_completion_length: int | None = None,
        *,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        use_bias_correction_kl: bool = True,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: str = "sequence_mask",
        vllm_importance_sampling_clip_min: float | None = None,
        vllm_importance_sampling_clip_max: float | None = 3.0,
        gradient_accumulation_steps: int = 1,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ) -> PolicyLossConfig:
        """TRL's ``GRPOTrainer._compute_loss`` (TRL 1.16), with ``GRPOConfig``'s names and
        defaults.

        For ``dapo`` and ``cispo`` pass TRL's normaliser as ``num_tokens`` to the call
        (``num_items_in_batch / num_processes · grad_accum / steps_per_generation``; by default
        the local token count, which is what it is on one process with one accumulation step).
        ``max_completion_length`` is ``dr_grpo``'s L (``None``: the padded width). The
        rollout correction applies when ``rollout_logprobs`` (vLLM's sampling logprobs) are
        given to the call. ``gradient_accumulation_steps`` reproduces TRL's loss scaling.
        ``vespo`` normalises like ``dapo`` (pass ``num_tokens``) and folds a token-level
        rollout correction into its sequence weight; with a sequence-level
        ``vllm_importance_sampling_mode`` (which TRL refuses for vespo under vLLM) the
        rollout correction is off, so rollout_logprobs given to the call raise.
        """
        _choice(loss_type, "loss_type (trl)", TRL_LOSS_TYPES)
        _choice(importance_sampling_level, "importance_sampling_level", IS_LEVELS)
        eps_high = epsilon if epsilon_high is None else epsilon_high
        ga = gradient_accumulation_steps
        if not isinstance(ga, int) or isinstance(ga, bool) or ga < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive int, got {ga!r}")
        agg = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean",
               "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
               "dapo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
               "luspo": "seq-mean-token-sum"}[loss_type]
        name = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}.get(loss_type, "ppo")
        rollout = None
        if vllm_importance_sampling_correction:
            _choice(vllm_importance_sampling_mode, "vllm_importance_sampling_mode",
                    ROLLOUT_CORRECTIONS[1:])
            rollout = vllm_importance_sampling_mode
            if name == "vespo" and rollout.startswith("sequence"):
                # TRL refuses this too: vespo folds token-level ratios into its weight
                raise ValueError(f"loss_type='vespo' needs a token-level "
                                 f"vllm_importance_sampling_mode, got {rollout!r}")
        # dapo / cispo / vespo fold the accumulation steps into num_items_in_batch (the call's
        # num_tokens); the others divide by them. The entropy bonus always does.
        scale = 1.0 if loss_type in ("dapo", "cispo", "vespo") else 1.0 / ga
        return cls(
            policy_loss=name,
            loss_agg_mode=agg,
            clip_ratio_low=epsilon,
            clip_ratio_high=eps_high,
            ratio_min=-math.inf if name == "cispo" else None,
            ratio_max=eps_high if name == "cispo" else None,
            delta=delta if name == "ppo" else None,
            importance_sampling_level=importance_sampling_level,
            log_ratio_clamp=None,
            seq_log_ratio_max=None,
            sapo_tau_pos=sapo_temperature_pos,
            sapo_tau_neg=sapo_temperature_neg,
            kl_coef=float(beta),
            kl_estimator="k3",
            kl_log_clamp=None,
            kl_value_clamp=None,
            kl_bias_correction=bool(use_bias_correction_kl),
            entropy_coef=float(entropy_coef) / ga / scale,
            entropy_agg_mode="token-mean",
            entropy_global_norm=False,
            top_entropy_quantile=top_entropy_quantile,
            rollout_correction=rollout,
            rollout_min=vllm_importance_sampling_clip_min,
            rollout_max=vllm_importance_sampling_clip_max,
            rollout_log_clamp=None,
            count_empty_seqs=True,
            max_len=max_completion_length,
            loss_scale=scale,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
        )


# The string-valued fields of PolicyLossConfig and their options (to_args / from_args).
_CHOICES: dict[str, tuple] = {
    "policy_loss": POLICY_LOSSES,
    "loss_agg_mode": AGG_MODES,
    "importance_sampling_level": IS_LEVELS,
    "kl_estimator": KL_ESTIMATORS,
    "kl_agg_mode": (None, *AGG_MODES),
    "entropy_agg_mode": (None, *AGG_MODES),
    "rollout_correction": ROLLOUT_CORRECTIONS,
}


# Fields to_args does not carry (free-form strings; to_args refuses a config that sets them).
_NOT_CARRIED = ("rollout_rs", "rollout_rs_threshold")


def _codec(f: dataclasses.Field) -> tuple[Any, Any, bool]:
    """(encode, decode, is_float) of a PolicyLossConfig field for to_args / from_args."""
    if f.name in _CHOICES:
        options = _CHOICES[f.name]
        return options.index, options.__getitem__, False
    if f.type == "bool":
        return int, bool, False
    if f.type == "int | None":
        return (lambda v: -1 if v is None else int(v)), (lambda v: None if v == -1 else v), False
    return ((lambda v: math.nan if v is None else float(v)),
            (lambda v: None if math.isnan(v) else v), True)


@functools.lru_cache(maxsize=64)
def _cached_kernel_args(cfg: PolicyLossConfig, with_kl: bool, with_rollout: bool
                        ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    flags, hparams = cfg._encode(with_kl=with_kl, with_rollout=with_rollout)
    return tuple(flags), tuple(hparams)
