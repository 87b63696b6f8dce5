"""What the verl tests share (test_integration_verl.py, test_parity_verl_policy_loss.py): verl's
modules (or a skip), the actor config and the batch verl's actor passes to a policy loss, and
the float32 comparison."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch

VERL_MISSING = ("verl is not installed (optional: pip install -e '.[parity]' && "
                "pip install --no-deps verl)")


def import_verl() -> tuple[ModuleType, ModuleType]:
    """verl's ``core_algos`` and ``rollout_corr_helper``, called at a test module's top: the
    module is skipped, with :data:`VERL_MISSING`, where verl (or its actor config) is absent."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason=VERL_MISSING)
    pytest.importorskip("verl.workers.config.actor")
    rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    return core_algos, rollout_corr


def fsdp_actor_config(*, low: float | None = 0.2, high: float | None = 0.28, c: float = 3.0,
                      clip_ratio: float = 0.2, fields: dict[str, Any] | None = None,
                      **global_info: Any) -> Any:
    """verl's ``FSDPActorConfig`` with these clip ratios (ε, ε_low, ε_high, dual-clip c), the
    extra config ``fields``, and ``global_batch_info`` entries as ``ppo_loss`` sets them under
    data parallelism (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)."""
    from verl.workers.config.actor import FSDPActorConfig

    cfg = FSDPActorConfig(
        strategy="fsdp", clip_ratio=clip_ratio, clip_ratio_low=low, clip_ratio_high=high,
        clip_ratio_c=c, ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False, rollout_n=8,
        **(fields or {}))
    cfg.global_batch_info.update(global_info)
    return cfg


def masked_batch(B: int, T: int, seed: int, spread: float, *, full_rows: tuple[int, ...] = ()
                 ) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """``(g, log_prob, old_log_prob, advantages, response_mask)`` for B responses of up to T
    tokens: random lengths (response 2 empty, those in ``full_rows`` complete), log-probs in
    [−3, 0], old = log_prob + N(0, spread²), and one advantage per response broadcast to
    (B, T) and masked, as verl's trainer passes them. The generator ``g`` draws the rest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0  # a fully masked response
    for row in full_rows:
        lengths[row] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]  # bool, as ppo_loss passes it
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + torch.randn(B, T, generator=g) * spread
    adv = (torch.randn(B, generator=g)[:, None].expand(B, T) * mask).contiguous()
    return g, lp, old, adv, mask


def close(ours, theirs, what: str = "", rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``ours`` and ``theirs`` (tensors or Python floats) agree in float32."""
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float32),
                               torch.as_tensor(theirs, dtype=torch.float32), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")
