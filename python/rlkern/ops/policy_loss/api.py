"""The public entry points of the policy loss: :func:`policy_loss` (autograd) and, for fused
callers that need ∂loss/∂logprobs chunk by chunk, :func:`policy_loss_chunk`.

Each is: :func:`~rlkern.ops.policy_loss.inputs.prepare` (checks, kernel arguments), the
registered forward op (per-row statistics, :mod:`rlkern.ops.policy_loss.register`), the O(B)
aggregation and the metrics (:mod:`rlkern.ops.policy_loss.aggregate`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern.config.layout import layout
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.ops import eager
from rlkern.ops.policy_loss.aggregate import (
    LinearAggregate,
    aggregate,
    aggregate_grad,
    finish_metrics,
)
from rlkern.ops.policy_loss.fused import (
    forward_applies,
    fused_applies,
    fused_loss,
    fused_rows,
    linear_forward,
)
from rlkern.ops.policy_loss.inputs import Prepared, normaliser, prepare
from rlkern.ops.policy_loss.register import split_inputs
from rlkern.ops.policy_loss.rollout_rs import apply_rejection, norm_scale, norm_scaled

__all__ = ["PolicyLossChunk", "PolicyLossOutput", "policy_loss", "policy_loss_chunk", "run"]


class PolicyLossOutput(NamedTuple):
    """Outputs of :func:`policy_loss`.

    * ``loss`` — 0-dim, float32 (float64 for float64 log-probabilities); differentiable wrt
      ``logprobs`` and ``entropy``.
    * ``metrics`` — dict of 0-dim tensors (no host synchronisation): ``pg_loss``,
      ``clipfrac``, ``clipfrac_low``, ``clipfrac_high``, ``dualclip_frac``, ``approx_kl``,
      ``ratio_mean``, ``ratio_min``, ``ratio_max``; with a KL term ``kl_loss`` and ``kl``; with
      ``entropy`` ``entropy_loss`` and ``entropy_mean``; with a rollout correction
      ``rollout_weight_mean``; with rejection sampling ``rollout_rs_masked_fraction``
      (rejected / valid tokens, verl's). Means are over the valid tokens (after rejection).
    """

    loss: Tensor
    metrics: dict[str, Tensor]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    entropy_threshold: float | Tensor | None = None,
    backend: str = "auto",
    cov_select: Tensor | None = None,
    **overrides: Any,
) -> PolicyLossOutput:
    r"""Policy loss of the clipped-surrogate family (ALGORITHMS.md §3), fused.

    Per token, with ``Δ = logp − old`` and ``ρ = exp(r)`` (``r = clamp(Δ, ±20)``, or the
    sequence log-ratio ``mean_t Δ`` for gspo / ``importance_sampling_level="sequence"``)::

        ppo        ℓ = max(−A·min(ρ, δ), −A·clip(ρ, 1−ε_low, 1+ε_high));  A<0: min(ℓ, −A·c)
        cispo      ℓ = −sg[clip(ρ, lo, hi)]·A·logp
        sapo       ℓ = −σ(τ(ρ−1))·(4/τ)·A,  τ = τ_pos if A > 0 else τ_neg
        reinforce  ℓ = −A·logp
        gmpo       ℓ_i = −Ā_i·exp(Σ_t m·Δc / len_i)   (per sequence; Δc the sign-aware clip)
        gvpo       ℓ_i = ½[(R_i − R̄_g) − (s_i − s̄_g)]² / (n_g − 1),  R_i = β·Σ_t m·Δ
        dro        ℓ = −(A·logp − ½β·Δ²)
        dppo_*     ℓ = −A·sg[min(ρ, c)]·logp·1[token inside the TV / binary-KL trust region]
        clip_cov   ℓ = PPO's term × (1 − s);   kl_cov  ℓ = −A·ρ + s·k·|Δ|   (s: cov_select)

    The policy term is ``agg(ℓ · w_rollout · 1[H ≥ q-quantile] · token_weights)``; the loss is
    ``loss_scale · (policy + β·agg(kl) − c_H·agg(entropy))`` with the aggregation of
    ``config.loss_agg_mode`` (token-mean, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm, sum). :meth:`PolicyLossConfig.verl` / :meth:`PolicyLossConfig.trl`
    reproduce verl's ``compute_policy_loss_*`` + ``agg_loss`` and TRL's GRPOTrainer loss.

    Args:
        logprobs: ``(B, T)`` float log-probabilities of the sampled tokens under the current
            policy (differentiable). float32 math (float64 for float64 input).
        old_logprobs: ``(B, T)`` under the policy that generated / was last synced.
        advantages: ``(B,)`` (one per response) or ``(B, T)``; for gvpo the ``(B,)`` scores.
        mask: ``(B, T)`` of any dtype, nonzero = a valid response token (verl's float
            ``response_mask`` and TRL's integer ``completion_mask`` as they are). Values at masked
            positions never reach a result (NaN / inf there change nothing).
        config: a :class:`PolicyLossConfig` (default: PPO, ε = 0.2, token-mean).
        ref_logprobs: ``(B, T)`` reference log-probabilities (KL term when ``kl_coef != 0``).
        rollout_logprobs: ``(B, T)`` rollout-engine log-probabilities (rollout correction).
        entropy: ``(B, T)`` per-token entropy (entropy bonus, entropy mask; differentiable).
        token_weights: ``(B, T)`` per-token weights of the policy term (not differentiated).
        num_tokens: global token count for token-mean (data parallel; verl's
            ``batch_num_tokens``, TRL's dapo normaliser). Default: the local count.
        num_seqs: global sequence count for the seq-mean modes (verl's ``global_batch_size``).
            A count must be > 0 and finite: a number is checked at once; a tensor count raises
            ``ValueError`` while checks are on and makes the loss, its gradient and every
            metric NaN with checks off (no host sync).
        entropy_threshold: the entropy-mask threshold, when computed elsewhere (chunks).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        cov_select: ``(B, T)`` 0 / 1, the tokens clip_cov / kl_cov treat differently (not
            differentiated); default: verl's selection (``rlkern.ops.policy_loss.cov_select``,
            clip_cov draws from the global generator). Other losses refuse it.
        **overrides: any :class:`PolicyLossConfig` field, e.g. ``clip_ratio_high=0.28``.

    Returns:
        :class:`PolicyLossOutput` ``(loss, metrics)``.

    Raises:
        TypeError / ValueError: wrong types, shape or device mismatches, unknown names (the
        message lists the valid ones), ``clip_ratio_c <= 1``, negative epsilons, missing
        inputs for an enabled add-on, and (while checks are on, :func:`rlkern.set_checks`)
        a non-finite input at a valid token.

    Example::

        >>> cfg = rlkern.PolicyLossConfig.verl(policy_loss="vanilla", clip_ratio_high=0.28)
        >>> out = rlkern.policy_loss(logp, old_logp, adv, mask, config=cfg)
        >>> out.loss.backward(); out.metrics["clipfrac"]
    """
    p = prepare(logprobs, old_logprobs, advantages, mask, config=config,
                ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, entropy=entropy,
                token_weights=token_weights, entropy_threshold=entropy_threshold,
                backend=backend, overrides=overrides, cov_select=cov_select)
    return run(p, num_tokens=num_tokens, num_seqs=num_seqs)[0]


def run(p: Prepared, *, num_tokens: float | Tensor | None = None,
        num_seqs: float | Tensor | None = None) -> tuple[PolicyLossOutput, Tensor]:
    """:func:`policy_loss` on prepared inputs (:func:`~rlkern.ops.policy_loss.inputs.prepare`):
    its output and the per-row statistics ``row_stats`` (for an integration that derives its
    trainer's own metrics from them, rows named by ``layout("policy_loss").row_stats``)."""
    dev = p.lp.device
    nt = normaliser(num_tokens, "num_tokens", dev)
    ns = normaliser(num_seqs, "num_seqs", dev)
    # verl's rejection sampling: a pre-pass reduces the mask (and, with it, gives the batch
    # normalisation's divisor over the original mask); a no-op without rollout_rs
    before = p.mask
    p, norm_factor = apply_rejection(p)
    with_entropy = p.get("entropy") is not None
    with_rollout = p.get("rollout_logprobs") is not None and p.cfg.rollout_correction is not None
    fused = fused_applies(p)  # CPU: the gradient's factors formed in the forward
    linear = LinearAggregate.applies(p.cfg, pg_scaled=norm_scaled(p))
    if linear and (fused or forward_applies(p)):
        # one op: the weights, the kernel, the loss and the metrics
        agg = LinearAggregate.of(p.cfg, p.mask.shape[1], nt, ns, with_entropy=with_entropy,
                                 with_rollout=with_rollout)
        loss, row_stats, metrics = (fused_loss if fused else linear_forward)(p, agg)
    else:
        if fused:
            row_sums, row_stats = fused_rows(p)
        else:
            # where no graph is built, in plain eager mode: the op's body, without the
            # dispatcher's fixed cost (rlkern.ops.eager)
            row_sums, row_stats = eager.call(
                "rlkern::policy_loss_fwd", p.lp, p.old, p.adv, p.mask, *split_inputs(p.inputs),
                p.flags, p.hparams, p.backend, no_graph=not torch.is_grad_enabled())
        loss, parts = aggregate(row_sums, row_stats, p.cfg, p.mask.shape[1], p.adv, nt, ns,
                                with_entropy=with_entropy,
                                pg_scale=norm_scale(p, row_stats, norm_factor))
        metrics = finish_metrics(row_stats, parts, with_kl=p.get("ref_logprobs") is not None,
                                 with_entropy=with_entropy, with_rollout=with_rollout,
                                 vespo=p.cfg.policy_loss == "vespo", dtype=p.out_dtype)
    if p.mask is not before:  # verl's rollout_rs_masked_fraction: rejected / valid tokens
        n = before.sum().to(row_stats.dtype)
        kept = row_stats[layout("policy_loss").row_stats.len].sum()
        metrics["rollout_rs_masked_fraction"] = ((n - kept) / (n + 1e-8)).to(p.out_dtype)
    if loss.dtype != p.out_dtype:  # (a same-dtype .to() still costs a dispatcher call)
        loss = loss.to(p.out_dtype)
    return PolicyLossOutput(loss, metrics), row_stats


class PolicyLossChunk(NamedTuple):
    """Outputs of :func:`policy_loss_chunk` for one chunk of rows.

    ``loss``: the chunk's share of the total loss (the shares add up to it); ``grad_logprobs``
    (and ``grad_entropy``): ∂total/∂ of the chunk's inputs, already multiplied by
    ``grad_scale``; ``row_stats``: the per-row sums, for :func:`finish_metrics` over all chunks.
    """

    loss: Tensor
    grad_logprobs: Tensor
    grad_entropy: Tensor | None
    row_stats: Tensor


def policy_loss_chunk(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PolicyLossConfig | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    seq_lens: Tensor | None = None,
    entropy_threshold: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    grad_scale: float | Tensor = 1.0,
    backend: str = "auto",
    **overrides: Any,
) -> PolicyLossChunk:
    """The per-token derivative of :func:`policy_loss` for one chunk of rows, without autograd.

    For fused callers that produce log-probabilities chunk by chunk and need ∂loss/∂logprobs
    (and ∂loss/∂entropy) right away (``rlkern.linear_logprobs_with_grad``'s ``grad_fn``).
    Each chunk runs the forward and the backward kernel once. The global normalisers must be
    known up front and are required here:

    * ``num_tokens`` for token-mean (the total valid tokens of the whole batch);
    * ``num_seqs`` for the seq-mean modes, gmpo and gvpo (the number of sequences the total
      is averaged over: verl counts rows with a valid token, TRL all rows);
    * ``entropy_threshold`` for ``top_entropy_quantile < 1`` (a quantile over all tokens).

    Chunk boundaries: token-level losses (ppo, cispo, sapo, reinforce with token ratios and
    token rollout correction) in token-mean or sum mode accept any chunking, even one that
    splits a sequence (pass a ``(1, n)`` piece). The seq-mean-token-mean mode needs each
    row's full length: pass ``seq_lens`` when a piece is not a whole row. Sequence-level
    variants (gspo, ``importance_sampling_level="sequence"``, gmpo, gvpo, sequence rollout
    correction) need per-sequence sums of all of a row's tokens: a chunk must hold whole
    sequences (and gvpo whole groups).
    """
    p = prepare(logprobs, old_logprobs, advantages, mask, config=config,
                ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, entropy=entropy,
                token_weights=token_weights, entropy_threshold=entropy_threshold,
                backend=backend, overrides=overrides)
    cfg = p.cfg
    ent = p.get("entropy")
    _check_chunkable(cfg, ent is not None, num_tokens=num_tokens, num_seqs=num_seqs,
                     entropy_threshold=entropy_threshold)
    dev = p.lp.device
    nt = normaliser(num_tokens, "num_tokens", dev)
    ns = normaliser(num_seqs, "num_seqs", dev)
    given, slots = split_inputs(p.inputs)
    row_sums, row_stats = torch.ops.rlkern.policy_loss_fwd(
        p.lp, p.old, p.adv, p.mask, given, slots, p.flags, p.hparams, p.backend)
    args = (row_stats, cfg, p.mask.shape[1], p.adv, nt, ns)
    loss, _ = aggregate(row_sums, *args, with_entropy=ent is not None, seq_lens=seq_lens)
    grad_rows = (aggregate_grad(row_sums, *args, with_entropy=ent is not None,
                                seq_lens=seq_lens) * grad_scale).contiguous()
    want_ent = ent is not None and cfg.entropy_coef != 0.0
    grad_lp, grad_ent = torch.ops.rlkern.policy_loss_bwd(
        p.lp, p.old, p.adv, p.mask, given, slots, row_stats, grad_rows, p.flags, p.hparams,
        want_ent, p.backend)
    return PolicyLossChunk(loss.detach().to(p.out_dtype), grad_lp,
                           grad_ent if want_ent else None, row_stats)


def _check_chunkable(cfg: PolicyLossConfig, with_entropy: bool, *, num_tokens, num_seqs,
                     entropy_threshold) -> None:
    """The global normalisers a chunk needs, and the entropy bonus that cannot be chunked."""
    if cfg.rollout_rs is not None or cfg.rollout_batch_normalize:
        raise ValueError("policy_loss_chunk: rollout_rs / rollout_batch_normalize need the "
                         "whole batch; apply rlkern.rollout_correction's mask and weights "
                         "(token_weights) to the chunks instead")
    if cfg.policy_loss in ("clip_cov", "kl_cov"):
        raise ValueError("policy_loss_chunk: clip_cov / kl_cov select their tokens over the "
                         "whole batch; use rlkern.policy_loss")
    seq_level_pg = cfg.policy_loss in ("gmpo", "gvpo")
    modes = set() if seq_level_pg else {cfg.loss_agg_mode}
    if cfg.kl_coef:
        modes.add(cfg.kl_agg())
    if cfg.entropy_coef and with_entropy:
        if not cfg.entropy_global_norm:
            raise ValueError("policy_loss_chunk: an entropy bonus normalised by local counts "
                             "(entropy_global_norm=False) cannot be split into chunks; set "
                             "entropy_global_norm=True and pass the global counts")
        if cfg.top_entropy_quantile < 1.0:
            raise ValueError("policy_loss_chunk: an entropy bonus restricted by the entropy "
                             "mask is normalised by the count of the tokens it acts on, which "
                             "spans chunks; use entropy_coef=0 here and add the bonus outside")
        modes.add(cfg.entropy_agg())
    if "token-mean" in modes and num_tokens is None:
        raise ValueError("policy_loss_chunk: token-mean needs num_tokens (the total count of "
                         "valid tokens over all chunks)")
    needs_seqs = any(m.startswith("seq-mean") for m in modes) or (
        seq_level_pg and cfg.loss_agg_mode not in ("sum", "token-sum"))
    if needs_seqs and num_seqs is None:
        raise ValueError("policy_loss_chunk: this aggregation needs num_seqs (the number of "
                         "sequences the loss is averaged over, over all chunks)")
    if cfg.top_entropy_quantile < 1.0 and entropy_threshold is None:
        raise ValueError("policy_loss_chunk: top_entropy_quantile < 1 needs entropy_threshold "
                         "(the quantile over all chunks' valid tokens)")
