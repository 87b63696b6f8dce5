"""rlkern inside OpenRLHF: drop-ins for its log-probabilities, entropy and PPO policy loss.

Written against OpenRLHF 0.11.2 (``openrlhf.models.utils`` and ``openrlhf.models.loss``):

* :func:`log_probs_from_logits` ``(logits, labels, temperature=1.0)`` and
  :func:`compute_entropy` ``(logits)``: :func:`rlkern.token_logprobs` (one pass over the
  logits, float32 accumulation, no ``(N, V)`` temporary), results in the logits' dtype as
  OpenRLHF returns them.
* :class:`PolicyLoss`: the same constructor and ``forward`` as OpenRLHF's (``ppo`` and ``gspo``,
  dual clip, token- or sequence-level aggregation with the data-parallel normalisers, the
  train/rollout importance-sampling correction with every gating, level and mode), one
  :func:`rlkern.policy_loss` call for the loss, its gradient and the metrics, and OpenRLHF's
  five returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``.

:func:`patch` swaps them into ``openrlhf.models.utils`` / ``openrlhf.models.loss`` and every
loaded ``openrlhf.*`` module that imported them by name (``openrlhf.models.actor``, the
trainers); :func:`unpatch` restores OpenRLHF's.

The importance-sampling gate reads only detached inputs (``old_log_probs`` and
``rollout_log_probs``); it is computed as OpenRLHF computes it and enters the fused loss as its
per-token weight (``token_weights``), so the loss, its aggregation and its gradient are rlkern's.
OpenRLHF's ``compute_approx_kl`` is not replaced: it is a few element-wise operations on
``(B, T)`` tensors, with nothing to fuse.

OpenRLHF is not imported by this module (it imports DeepSpeed at import time); :func:`patch`
imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rlkern.config.layout import layout
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.integrations._fold import (
    eager16_applies,
    eager16_logprobs,
    eager16_stats,
    fold,
    row_entropy,
)
from rlkern.integrations._swap import FunctionSwap
from rlkern.ops.policy_loss.api import run
from rlkern.ops.policy_loss.inputs import prepare

__all__ = ["PolicyLoss", "compute_entropy", "log_probs_from_logits", "patch", "unpatch"]

#: The OpenRLHF release these drop-ins reproduce.
TESTED_OPENRLHF = "0.11.2"

# OpenRLHF's choices, with its messages (PolicyLoss.__init__)
_LEVELS = ("off", "token", "seq")
_MODES = ("mask", "clip")
_GATINGS = ("ratio", "binary_kl", "tv")


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` at ``labels``: OpenRLHF's ``log_probs_from_logits``.

    Args:
        logits: ``(..., V)`` bfloat16 / float16 / float32 / float64, last dim contiguous.
        labels: int64 / int32 of shape ``logits.shape[:-1]``, each in ``[0, V)``.
        temperature: as OpenRLHF, a temperature other than 1 divides ``logits`` **in place**
            first (OpenRLHF's callers read the scaled logits afterwards, e.g. for the entropy).

    Returns:
        ``labels``' shape, in the logits' dtype (OpenRLHF's result dtype); differentiable.
        16-bit logits on the CPU give OpenRLHF's bits: it takes them row by row through
        torch's ``log_softmax`` in their dtype, whose roundings these values repeat
        (:func:`rlkern.integrations._fold.eager16_logprobs`).
    """
    if temperature != 1.0:
        logits.div_(temperature)
    out = fold(logits, labels)
    if eager16_applies(logits, logits.dtype, 1.0):  # OpenRLHF's row-by-row 16-bit log_softmax
        return eager16_logprobs(out.logprobs, eager16_stats(logits, out.lse), logits, labels)
    return out.logprobs.to(logits.dtype)


def compute_entropy(logits: Tensor) -> Tensor:
    """``logsumexp(x) − Σ softmax(x)·x`` per row of ``logits (..., V)``:
    OpenRLHF's ``compute_entropy``. In the logits' dtype; differentiable."""
    return row_entropy(logits).to(logits.dtype)


def _masked_mean(values: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    """OpenRLHF's ``masked_mean`` (``Σ v·m / Σ m``; a plain mean without a mask)."""
    if mask is None:
        return values.mean(dim=dim)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def _per_row_if_constant(advantages: Tensor) -> Tensor:
    """``(B, T)`` advantages that are one value per row broadcast along T (stride 0, as
    ``adv[:, None].expand(B, T)`` makes them) as the ``(B, 1)`` column they view: the op reads a
    column per row, where a ``(B, T)`` input would be copied into a contiguous ``(B, T)``
    buffer first. The same values, so the same loss."""
    if advantages.dim() == 2 and advantages.shape[1] > 1 and advantages.stride(1) == 0:
        return advantages[:, :1]
    return advantages


class PolicyLoss(nn.Module):
    r"""OpenRLHF's ``PolicyLoss``, computed by :func:`rlkern.policy_loss`.

    Per token, ``Δ = log_probs − old_log_probs`` and (``ppo``) ``ρ = exp(clamp(Δ, ±20))`` or
    (``gspo``) ``ρ = exp(Σ_t m·Δ / max(Σ_t m, 1))`` for the whole row::

        ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)        (A < 0 with dual_clip c:
                                                                 min(ℓ, −c·A))
        loss = Σ ℓ·w·m / Σ m                                     (token level)
             = mean over rows with a token of Σ_t ℓ·w·m / Σ_t m  (sequence level; gspo)

    ``w`` is the importance-sampling coefficient of ``is_correction_*`` (1 when off). With
    ``batch_num_tokens`` / ``global_batch_size`` the denominators are those global counts
    divided by ``dp_size``, as OpenRLHF's ``aggregate_loss``.

    Args: OpenRLHF's: ``clip_eps_low``, ``clip_eps_high``, ``dual_clip`` (> 1),
        ``token_level_loss``, ``policy_loss_type`` (``"ppo"`` / ``"gspo"``; gspo aggregates per
        sequence), ``is_correction_level`` (``off`` / ``token`` / ``seq``),
        ``is_correction_mode`` (``mask`` / ``clip``), ``is_correction_gating`` (``ratio`` /
        ``binary_kl`` / ``tv``), ``is_correction_threshold`` ``(low, high)``.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None)`` takes ``(B, T)`` tensors
    (``advantages`` broadcastable to them; ``action_mask`` bool or 0/1, as OpenRLHF's
    experience maker builds it: a token counts where it is non-zero) and returns ``(loss,
    clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``: the 0-dim loss (differentiable wrt
    ``log_probs``), the fraction of tokens whose clipped surrogate is the smaller, the mean of
    ``−Δ`` (unclamped), and with the correction on (``ppo``) the mean of ``rollout − old`` and
    the fraction of units the gate filtered (``None`` otherwise).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in _LEVELS:
            raise ValueError("is_correction_level must be off/token/seq, got "
                             f"{is_correction_level}")
        if is_correction_mode not in _MODES:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in _GATINGS:
            raise ValueError("is_correction_gating must be ratio/binary_kl/tv, got "
                             f"{is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq"
                                             or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if (is_correction_gating != "ratio" and is_correction_level != "off"
                and is_correction_threshold[0] > 0):
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound "
                             "only (a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        # OpenRLHF's gspo is one ratio per sequence, exp(mean Δ), differentiated through the
        # mean (every token's gradient carries the whole row's surrogate terms): rlkern's
        # sequence-level importance sampling of the ppo loss, not its "gspo" (verl's, whose
        # per-token stop-gradient form has the same value and, with per-token advantages,
        # another gradient)
        self.config = PolicyLossConfig(
            policy_loss="ppo",
            importance_sampling_level="sequence" if policy_loss_type == "gspo" else "token",
            loss_agg_mode="token-mean" if self.token_level_loss else "seq-mean-token-mean",
            clip_ratio_low=clip_eps_low, clip_ratio_high=clip_eps_high, clip_ratio_c=dual_clip,
            log_ratio_clamp=20.0, seq_log_ratio_max=None, count_empty_seqs=False)

    def _is_weights(self, old_log_probs: Tensor, rollout_log_probs: Tensor,
                    mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """OpenRLHF's train/rollout gate: ``(coef, vllm_kl, is_filter_ratio)`` (all detached)."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = (_masked_mean(is_log_ratio, mask, dim=-1).unsqueeze(-1) if seq_level
                    else is_log_ratio).exp()
        else:
            # the clamp keeps the binary KL's logs finite (OpenRLHF's)
            p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        filter_ratio = (filtered.float().mean() if seq_level
                        else _masked_mean(filtered.float(), mask))
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        return coef.expand_as(mask), vllm_kl, filter_ratio

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | Tensor | None = None,
        global_batch_size: float | Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask
        advantages = _per_row_if_constant(advantages.expand_as(log_probs))
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs "
                             "rollout_log_probs")
        weights = vllm_kl = filter_ratio = None
        old = old_log_probs
        if correcting and self.policy_loss_type == "ppo":
            weights, vllm_kl, filter_ratio = self._is_weights(old_log_probs, rollout_log_probs,
                                                              mask)
        elif correcting:
            # OpenRLHF's gspo takes its sequence ratio against the rollout policy then
            old = rollout_log_probs
        num_tokens = num_seqs = None
        if self.token_level_loss and batch_num_tokens is not None:
            num_tokens = batch_num_tokens / dp_size
        if not self.token_level_loss and global_batch_size is not None:
            num_seqs = global_batch_size / dp_size
        out, row_stats = run(prepare(log_probs, old, advantages, mask, config=self.config,
                                     token_weights=weights),
                             num_tokens=num_tokens, num_seqs=num_seqs)
        # OpenRLHF's ppo_kl is the mean of the unclamped −Δ = log_probs − old_log_probs (rlkern's
        # approx_kl clamps Δ as the ratio does): the op's per-row sums of the unclamped Δ
        # give it without another pass over the (B, T) inputs
        S = layout("policy_loss").row_stats
        if old is old_log_probs:
            ppo_kl = (-row_stats[S.lp_sum].sum() / row_stats[S.len].sum()).to(log_probs.dtype)
        else:  # gspo against the rollout policy: the op's Δ is not OpenRLHF's
            ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), action_mask)
        return out.loss, out.metrics["clipfrac"], ppo_kl, vllm_kl, filter_ratio


_UTILS = FunctionSwap("openrlhf.models.utils", {
    "log_probs_from_logits": log_probs_from_logits,
    "compute_entropy": compute_entropy,
})
_LOSS = FunctionSwap("openrlhf.models.loss", {"PolicyLoss": PolicyLoss})


def patch() -> list[str]:
    """Swap :func:`log_probs_from_logits`, :func:`compute_entropy` and :class:`PolicyLoss` into
    ``openrlhf.models.utils`` / ``openrlhf.models.loss`` and every loaded ``openrlhf.*`` module
    that imported them by name. Call it before OpenRLHF builds its actor and loss. Idempotent;
    returns the ``module.attribute`` names replaced."""
    return _UTILS.apply() + _LOSS.apply()


def unpatch() -> None:
    """Restore OpenRLHF's functions and class wherever :func:`patch` replaced them."""
    _LOSS.undo()
    _UTILS.undo()
