"""Parity with verl's own advantage estimators (verl.trainer.ppo.core_algos), when importable.

verl is an optional test dependency, not part of CI: ``pip install verl`` pins packages that
conflict with this environment, and ``core_algos`` takes ~20 s to import. To run these tests::

    pip install -e ".[parity]" && pip install --no-deps verl

(the ``parity`` extra lists verl's runtime imports). verl receives what its trainer passes: token
rewards ``(B, T)``, the response mask and a shuffled numpy array of uid strings; rlkern gets the
same rewards and mask with the uids as int64 ids, ``singleton="verl"`` and ``eps=1e-6``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlkern

core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed (optional: pip install -e '.[parity]' && "
    "pip install --no-deps verl)",
)

pytestmark = pytest.mark.parity

T = 7


def _batch(seed: int, *, singletons: bool = True, kind: str = "binary"):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 9, (10,), generator=gen)
    if singletons:
        sizes[:2] = 1
    ids = torch.randint(0, 2**62, (10,), generator=gen).repeat_interleave(sizes)
    b = ids.numel()
    perm = torch.randperm(b, generator=gen)
    ids = ids[perm]
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(b, T)
    if kind == "binary":
        final = torch.randint(0, 2, (b,), generator=gen).float()
    else:
        final = torch.randn(b, generator=gen)
    rewards[torch.arange(b), lengths - 1] = final  # the outcome reward on the last token
    uid = np.array([f"uid-{int(i):x}" for i in ids], dtype=object)
    return rewards, mask, uid, ids


def _compare(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["binary", "normal"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("fn_name", ["compute_grpo_outcome_advantage",
                                     "compute_grpo_vectorized_outcome_advantage"])
def test_grpo(kind, norm, fn_name):
    rewards, mask, uid, ids = _batch(1, kind=kind)
    fn = getattr(core_algos, fn_name)
    theirs, _ = fn(rewards.clone(), mask, uid, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    # Both verl functions give singletons μ = 0, σ = 1 (singleton="verl").
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, singleton="verl",
                                   std="unbiased" if norm else "none")
    _compare(ours.advantages, theirs)


@pytest.mark.parametrize("fn_name", ["compute_rloo_outcome_advantage",
                                     "compute_rloo_vectorized_outcome_advantage"])
def test_rloo(fn_name):
    rewards, mask, uid, ids = _batch(2, kind="normal")
    fn = getattr(core_algos, fn_name)
    theirs, _ = fn(rewards.clone(), mask, uid)
    singleton = "verl" if fn_name == "compute_rloo_outcome_advantage" else "zero"
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, estimator="rloo",
                                   singleton=singleton)
    # verl's vectorised RLOO gives singletons 0 (the zero convention); its loop keeps s.
    _compare(ours.advantages, theirs)


def test_opo():
    rewards, mask, uid, ids = _batch(3, kind="normal")
    theirs, _ = core_algos.compute_opo_outcome_advantage(rewards.clone(), mask, uid)
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, estimator="opo",
                                   lengths=mask.sum(-1), singleton="verl")
    _compare(ours.advantages, theirs)


def test_gpg():
    rewards, mask, uid, ids = _batch(4, kind="binary")
    theirs, _ = core_algos.compute_gpg_outcome_advantage(rewards.clone(), mask, uid)
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, estimator="gpg",
                                   singleton="verl")
    _compare(ours.advantages, theirs)


def test_reinforce_pp_baseline():
    rewards, mask, uid, ids = _batch(5, kind="normal")
    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        rewards.clone(), mask, uid)
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask,
                                   estimator="reinforce_pp_baseline", singleton="verl")
    _compare(ours.advantages, theirs)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk(norm):
    # Distinct scores: with a tie at the top, verl's topk may pick either row (both get 0 then).
    rewards, mask, uid, ids = _batch(6, singletons=False, kind="normal")
    cfg = {"norm_adv_by_std_in_grpo": norm}
    theirs, _ = core_algos.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, uid,
                                                                config=cfg)
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, estimator="grpo_passk",
                                   singleton="verl", std="unbiased" if norm else "none")
    _compare(ours.advantages, theirs)


def test_grpo_passk_singleton_raises_like_verl():
    rewards, mask, uid, ids = _batch(7, singletons=True)
    with pytest.raises(ValueError):
        core_algos.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, uid,
                                                        config={"norm_adv_by_std_in_grpo": True})
    with pytest.raises(ValueError, match="grpo_passk"):
        rlkern.group_advantages(rewards, group_ids=ids, mask=mask, estimator="grpo_passk",
                                singleton="verl")


def test_zero_variance_groups_match():
    rewards, mask, uid, ids = _batch(8, kind="binary")
    rewards[:] = 0.0  # every group has all-equal scores
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uid)
    ours = rlkern.group_advantages(rewards, group_ids=ids, mask=mask, singleton="verl")
    _compare(ours.advantages, theirs)
    assert torch.all(ours.advantages == 0)
