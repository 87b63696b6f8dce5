"""TRL's adaptive entropy controller (``GRPOConfig.use_adaptive_entropy``) for the rlkern loss.

TRL 1.16's ``GRPOTrainer._compute_loss`` subtracts ``coef · H`` from the loss, ``H`` the mean
per-token entropy over the tokens the policy term acts on (the completion mask, times the
high-entropy mask when ``top_entropy_quantile < 1``), scaled for gradient accumulation. With
the adaptive controller the coefficient applied during an accumulation window is

    coef = entropy_coef   if the last optimizer step's world entropy ≤ entropy_target
           0              otherwise (and before the first measurement: the entropy starts at +inf)

and at each optimizer-step boundary (train mode only) the window's token-weighted world
entropy ``Σ H·mask / Σ mask`` (summed over the window's micro-batches and all-reduced across
processes) moves ``entropy_coef`` by ``± entropy_coef_delta`` within
``[entropy_coef_min, entropy_coef_max]``: up when the entropy is at or below the target, down
otherwise. The controller's state lives on the trainer (``entropy_coef``,
``_last_world_entropy``, ``_entropy_window_stats``), exactly where TRL keeps it, so TRL's
checkpointing of it (``_save_checkpoint`` / ``_load_rng_state``) keeps working.

rlkern takes the coefficient of :func:`applied_coef` as its fused loss's ``entropy_coef`` and
calls :func:`update` after the loss, with the entropies the loss saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def applied_coef(trainer: Any) -> float:
    """The entropy coefficient TRL applies to the current micro-batch: ``trainer.entropy_coef``
    for a static bonus; with the adaptive controller, that coefficient only while the last
    optimizer step's world entropy is at or below ``entropy_target`` (else 0)."""
    if not getattr(trainer, "use_adaptive_entropy", False):
        return float(trainer.entropy_coef)
    if trainer._last_world_entropy <= trainer.args.entropy_target:
        return float(trainer.entropy_coef)
    return 0.0


def effective_mask(trainer: Any, entropies: Tensor, mask: Tensor) -> Tensor:
    """The tokens the entropy bonus acts on: ``mask`` times TRL's high-entropy mask when
    ``top_entropy_quantile < 1`` (TRL's own ``get_high_entropy_mask``, which gathers the
    entropies of every process)."""
    if trainer.top_entropy_quantile >= 1.0:
        return mask
    return mask * trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile)


def update(trainer: Any, entropies: Tensor, mask: Tensor, mode: str) -> None:
    """Accumulate this micro-batch's ``(Σ H·mask, Σ mask)`` into the window and, at an
    optimizer-step boundary, move ``trainer.entropy_coef`` as TRL's controller does (module
    doc). A no-op without the adaptive controller or outside train mode.

    Args:
        entropies: ``(B, K)`` per-token entropies of the micro-batch.
        mask: ``(B, K)`` the completion (and tool) mask; the high-entropy mask is applied here.
        mode: ``"train"`` or ``"eval"``.
    """
    if not getattr(trainer, "use_adaptive_entropy", False) or mode != "train":
        return
    eff = effective_mask(trainer, entropies, mask)
    stats = torch.stack([(entropies * eff).sum(), eff.sum()]).detach()
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    args = trainer.args
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta,
                                   args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta,
                                   args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None
