"""verl's ``gdpo``, ``optimal_token_baseline`` and ``tir_optimal_token_baseline`` estimators
with verl's signatures, computed by rlkern (no call into verl).

* :func:`compute_gdpo_outcome_advantage`: every reward component is group-normalised by ONE
  :func:`rlkern.group_advantages` call (GRPO, verl's singleton rule): the K components are
  stacked as K·N rows whose group ids are ``(component, uid)`` pairs numbered densely, so one
  hash-grouping pass and one fused kernel launch serve every component instead of K of each;
  the weighted sum and verl's ``masked_whiten`` follow in torch (rlkern's whitening of
  ``rlkern_reinforce_plus_plus``).
* :func:`compute_optimal_token_baseline_advantage` and
  :func:`compute_multi_turn_optimal_token_baseline_advantage`:
  :func:`rlkern.optimal_token_baseline` on ``backend="auto"`` (the C++ kernel on CPU tensors,
  the Triton kernels on CUDA tensors).

verl's trainer (``ray_trainer.compute_advantage``) passes the per-component rewards
(``non_tensor_batch``, ``batch``) only to ``adv_estimator=gdpo``, and ``old_log_probs`` /
``sum_pi_squared`` / ``rollout_is_weights`` only to ``optimal_token_baseline`` /
``tir_optimal_token_baseline``: under the names ``rlkern_<name>`` these functions do not get
them. :func:`rlkern.integrations.verl.replace_verl_estimators` runs them under verl's names
instead (see docs/integrations/verl.md).

The helpers of :mod:`rlkern.integrations.verl` are imported inside the functions: that module
imports this one at its end, so a module-level import here would be circular.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlkern.ops.advantages import group_advantages
from rlkern.ops.token_baseline import optimal_token_baseline

__all__ = [
    "compute_gdpo_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_optimal_token_baseline_advantage",
    "gdpo_advantages",
]


def _gdpo_scores(token_level_rewards: Tensor, config: Any, non_tensor_batch: Any,
                 batch: Any) -> tuple[Tensor, list[float] | None]:
    """``(K, N)`` float32 scores, one row per reward component, and the weights (or None).

    verl writes each component at the row's last valid token of a zero ``(N, T)`` tensor and
    GRPO sums the row: the sum is the component itself, so it is used as is. Without
    ``config``, ``non_tensor_batch`` and ``batch`` (verl's condition) the one component is the
    row sum of the token-level rewards."""
    from rlkern.integrations.verl import _cfg_get

    device = token_level_rewards.device
    if config is None or non_tensor_batch is None or batch is None:
        if _cfg_get(config, "gdpo_reward_keys", None) and non_tensor_batch is None:
            raise ValueError(
                "gdpo_reward_keys is set but non_tensor_batch was not passed: verl's trainer "
                "passes the reward components only to adv_estimator=gdpo; keep that name and "
                "call rlkern.integrations.verl.replace_verl_estimators() (or set "
                "RLKERN_VERL_REPLACE_ESTIMATORS=1) to run rlkern's gdpo under it")
        return token_level_rewards.sum(dim=-1).unsqueeze(0), None
    keys = _cfg_get(config, "gdpo_reward_keys", None)
    if not keys:
        raise ValueError("GDPO requires 'algorithm.gdpo_reward_keys' listing the individual "
                         "reward component keys returned by compute_score (e.g. "
                         "['format_reward', 'accuracy_reward']).")
    rows = []
    for key in keys:
        if key not in non_tensor_batch:
            raise ValueError(f"GDPO reward key {key!r} not found in non_tensor_batch "
                             f"(available: {list(non_tensor_batch.keys())})")
        comp = torch.tensor(np.asarray(non_tensor_batch[key], dtype=np.float32), device=device)
        if comp.shape != token_level_rewards.shape[:1]:
            raise ValueError(f"GDPO reward key {key!r}: expected {token_level_rewards.shape[0]} "
                             f"values (one per response), got shape {tuple(comp.shape)}")
        rows.append(comp)
    weights = _cfg_get(config, "gdpo_reward_weights", None)
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(rows):
            raise ValueError(f"gdpo_reward_weights has {len(weights)} values for "
                             f"{len(rows)} gdpo_reward_keys")
    return torch.stack(rows), weights


def compute_gdpo_outcome_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index: Any, epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True, config: Any = None, non_tensor_batch: Any = None,
    batch: Any = None, **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl's ``gdpo``: for each reward component ``k`` (``config.gdpo_reward_keys``, read
    from ``non_tensor_batch``; else the token-level rewards' row sums as the one component),
    ``A_k = (s_k − μ_g) / (σ_g + ε)`` within each uid group (unbiased σ; no division when
    ``norm_adv_by_std_in_grpo`` is False; singletons ``μ = 0, σ = 1``), then
    ``A = Σ_k w_k · A_k · mask`` (``config.gdpo_reward_weights``, default 1) and
    ``masked_whiten(A, mask) · mask``. Returns ``(advantages, advantages)``,
    ``(bs, response_length)``.

    All K group normalisations are one :func:`rlkern.group_advantages` call over K·N rows
    grouped by (component, uid). ``norm_adv_by_std_in_grpo`` is taken as given (default
    True), as verl's gdpo does. Raises ``ValueError`` where verl asserts (no
    ``gdpo_reward_keys``, a missing key), for a weights list whose length differs from the
    keys', and when ``gdpo_reward_keys`` is configured but ``non_tensor_batch`` is missing
    (verl's trainer passes it only under the name ``gdpo``).
    """
    return gdpo_advantages(token_level_rewards, response_mask, index, epsilon,
                           norm_adv_by_std_in_grpo, config, non_tensor_batch, batch)


def gdpo_advantages(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                    epsilon: float, norm_adv_by_std_in_grpo: bool, config: Any,
                    non_tensor_batch: Any, batch: Any, *,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """:func:`compute_gdpo_outcome_advantage` with the backend of its
    :func:`rlkern.group_advantages` call (``rlkern bench --op gdpo``)."""
    from rlkern.integrations.verl import _masked_whiten, group_ids_from_index

    if index is None:
        raise ValueError("rlkern's gdpo estimator needs index (the uid of each response's "
                         "prompt): verl passes data.non_tensor_batch['uid']")
    scores, weights = _gdpo_scores(token_level_rewards, config, non_tensor_batch, batch)
    k, n = scores.shape
    device = token_level_rewards.device
    ids = group_ids_from_index(index, device)
    dense = torch.unique(ids, return_inverse=True)[1] if n else ids
    num_groups = int(dense.max()) + 1 if n else 0
    # component k's groups are numbered k·G + g: one call groups all K·N rows at once
    stacked_ids = (dense.unsqueeze(0)
                   + torch.arange(k, device=device).unsqueeze(1) * num_groups).reshape(-1)
    with torch.no_grad():
        out = group_advantages(scores.reshape(-1), group_ids=stacked_ids, estimator="grpo",
                               eps=float(epsilon),
                               std="unbiased" if norm_adv_by_std_in_grpo else "none",
                               singleton="verl", backend=backend)
        adv_k = out.advantages.to(torch.float32).view(k, n)
        mask = response_mask.to(torch.float32)
        w = (torch.ones(k, device=device) if weights is None
             else torch.tensor(weights, dtype=torch.float32, device=device))
        # verl's order of float32 operations: Σ_k w_k · (A_k · mask), accumulated in k order
        total = w[0] * (adv_k[0].unsqueeze(-1) * mask)
        for i in range(1, k):
            total = total + w[i] * (adv_k[i].unsqueeze(-1) * mask)
        advantages = _masked_whiten(total, response_mask) * response_mask
    return advantages, advantages


def _token_baseline(name: str, token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                    old_log_probs: Tensor | None, sum_pi_squared: Tensor | None,
                    rollout_is_weights: Tensor | None, handle_zero_tail: bool, epsilon: float,
                    multi_turn: bool) -> tuple[Tensor, Tensor]:
    from rlkern.integrations.verl import group_ids_from_index

    missing = [n for n, t in (("index", index), ("old_log_probs", old_log_probs),
                              ("sum_pi_squared", sum_pi_squared)) if t is None]
    if missing:
        raise ValueError(
            f"rlkern's {name} needs {', '.join(missing)}: verl's trainer passes old_log_probs "
            f"and sum_pi_squared (actor.calculate_sum_pi_squared=True) only under the name "
            f"{name!r}; keep it and call rlkern.integrations.verl.replace_verl_estimators() "
            "(or set RLKERN_VERL_REPLACE_ESTIMATORS=1)")
    device = token_level_rewards.device
    out = optimal_token_baseline(
        token_level_rewards, response_mask, old_log_probs, sum_pi_squared,
        group_ids=group_ids_from_index(index, device), rollout_is_weights=rollout_is_weights,
        multi_turn=multi_turn, zero_tail=bool(handle_zero_tail), eps=float(epsilon))
    dtype = torch.promote_types(token_level_rewards.dtype, response_mask.dtype)
    return out.advantages.to(dtype), out.returns.to(dtype)


def _token_baseline_estimator(function: str, name: str, multi_turn: bool, doc: str):
    """verl's estimator ``name`` as the function ``function`` (verl's signature, keyword names
    and defaults) by :func:`rlkern.optimal_token_baseline` with ``multi_turn``."""

    def estimator(
        token_level_rewards: Tensor, response_mask: Tensor, index: Any,
        old_log_probs: Tensor | None = None, sum_pi_squared: Tensor | None = None,
        rollout_is_weights: Tensor | None = None, handle_zero_tail: bool = True,
        epsilon: float = 1e-8, **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        return _token_baseline(name, token_level_rewards, response_mask, index, old_log_probs,
                               sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon,
                               multi_turn=multi_turn)

    estimator.__doc__ = doc
    estimator.__name__ = estimator.__qualname__ = function
    return estimator


compute_optimal_token_baseline_advantage = _token_baseline_estimator(
    "compute_optimal_token_baseline_advantage", "optimal_token_baseline", False,
    """verl's ``optimal_token_baseline``: ``G`` = reward-to-go, ``W_t = Σ_{s≤t} (1 − 2π_s +
    Σπ²_s)·ρ_s²``, per uid group and position ``B_t = Σ G_t W_t / (Σ W_t + ε)`` over valid
    tokens (0 for a singleton; the zero-tail rule of ``handle_zero_tail``), ``A = (G − B) ·
    mask``. Returns ``(advantages, returns = G)``, ``(bs, response_length)``, by
    :func:`rlkern.optimal_token_baseline`.""")

compute_multi_turn_optimal_token_baseline_advantage = _token_baseline_estimator(
    "compute_multi_turn_optimal_token_baseline_advantage", "tir_optimal_token_baseline", True,
    """verl's ``tir_optimal_token_baseline``: as ``optimal_token_baseline`` but each response's
    valid tokens are compacted before the group sums (a group's responses are aligned by
    valid-token rank, not by position), and responses without valid tokens belong to no group.
    Returns ``(advantages, returns)``, ``(bs, response_length)``, by
    :func:`rlkern.optimal_token_baseline` with ``multi_turn=True``.""")
