"""rlkern_gae, rlkern_reinforce_plus_plus and rlkern_remax, looked up in verl's own registry,
against verl's functions of the same names on random multi-turn batches (ragged responses with
observation spans, an empty response), float32, called the way verl's trainer calls them
(``compute_advantage``: gae with ``values``, ``gamma``, ``lam`` by keyword; the others with
the token rewards, the response mask, the algorithm config, the uids and, for remax,
``reward_baselines``).

verl is an optional test dependency (see test_integration_verl.py); without it these tests
skip with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verl_cases import close, import_verl

core_algos, _ = import_verl()
from verl.trainer.config import AlgoConfig  # noqa: E402

from rlkern.integrations import verl as rv  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True, scope="module")
def _registered():
    rv.register()
    yield
    rv.unregister()


def _batch(seed: int, *, mask_dtype=torch.float32, B: int = 12, T: int = 23):
    """Token rewards (dense, and an outcome reward at each response's last token), critic
    values, a multi-turn response mask (ragged lengths, observation spans, response 2 empty)
    and uid strings."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[2] = 0
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for i in range(B):
        start = int(torch.randint(0, T, (1,), generator=gen))
        mask[i, start:start + int(torch.randint(1, 6, (1,), generator=gen))] = False
    rewards = torch.randn(B, T, generator=gen) * 0.1
    rewards[torch.arange(B), (lengths - 1).clamp(min=0)] += torch.randn(B, generator=gen)
    values = torch.randn(B, T, generator=gen)
    uid = np.array([f"u{seed}-{i // 3}" for i in range(B)], dtype=object)
    return rewards, values, mask.to(mask_dtype), uid


def _check(name, ours, theirs, mask):
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, t, what in zip(ours, theirs, ("advantages", "returns"), strict=True):
        assert o.shape == t.shape and o.dtype == t.dtype, (name, what, o.dtype, t.dtype)
        close(o, t, f"{name} {what}", rtol=1e-5, atol=1e-5)
        assert not o.requires_grad


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.9)])
def test_gae_matches_verl(seed, gamma, lam):
    rewards, values, mask, _ = _batch(seed)
    kwargs = dict(values=values, response_mask=mask, gamma=gamma, lam=lam)
    theirs = core_algos.get_adv_estimator_fn("gae")(token_level_rewards=rewards.clone(),
                                                    **kwargs)
    ours = core_algos.get_adv_estimator_fn("rlkern_gae")(token_level_rewards=rewards, **kwargs)
    _check("gae", ours, theirs, mask)
    # positional, with γ and λ as 0-dim tensors (verl's annotation)
    pos = rv.compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma),
                                          torch.tensor(lam))
    _check("gae positional", pos, theirs, mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 0.0])
def test_reinforce_plus_plus_matches_verl(seed, gamma):
    rewards, _, mask, uid = _batch(seed + 10)
    kwargs = dict(response_mask=mask, config=AlgoConfig(gamma=gamma, lam=0.3), index=uid)
    theirs = core_algos.get_adv_estimator_fn("reinforce_plus_plus")(
        token_level_rewards=rewards.clone(), **kwargs)
    ours = core_algos.get_adv_estimator_fn("rlkern_reinforce_plus_plus")(
        token_level_rewards=rewards, **kwargs)
    _check("reinforce_plus_plus", ours, theirs, mask)
    assert (ours[0][mask == 0] == 0).all() and (ours[1][mask == 0] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_remax_matches_verl(seed):
    rewards, _, mask, uid = _batch(seed + 20)
    baselines = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(seed))
    kwargs = dict(reward_baselines=baselines, response_mask=mask, config=AlgoConfig(),
                  index=uid)
    theirs = core_algos.get_adv_estimator_fn("remax")(token_level_rewards=rewards.clone(),
                                                      **kwargs)
    ours = core_algos.get_adv_estimator_fn("rlkern_remax")(token_level_rewards=rewards,
                                                           **kwargs)
    _check("remax", ours, theirs, mask)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_mask_dtypes(mask_dtype):
    """verl's trainer passes an integer or float response mask (verl's own gae and
    reinforce_plus_plus compute ``1 − mask``, which a bool mask does not support)."""
    rewards, values, mask, _ = _batch(31, mask_dtype=mask_dtype)
    for name, kwargs in (
            ("gae", dict(values=values, response_mask=mask, gamma=0.99, lam=0.95)),
            ("reinforce_plus_plus", dict(response_mask=mask, config=AlgoConfig(gamma=0.9))),
            ("remax", dict(reward_baselines=torch.ones(rewards.shape[0]), response_mask=mask))):
        theirs = core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards.clone(),
                                                       **kwargs)
        ours = core_algos.get_adv_estimator_fn(f"rlkern_{name}")(token_level_rewards=rewards,
                                                                 **kwargs)
        _check(f"{name} {mask_dtype}", ours, theirs, mask)


def test_whitening_needs_two_valid_tokens_like_verl():
    rewards, values, _, _ = _batch(41, B=3, T=4)
    for mask in (torch.zeros(3, 4), torch.nn.functional.one_hot(torch.tensor(5), 12).view(3, 4)
                 .float()):
        for fn, kwargs in ((core_algos.compute_gae_advantage_return,
                            dict(values=values, response_mask=mask, gamma=1.0, lam=1.0)),
                           (rv.compute_gae_advantage_return,
                            dict(values=values, response_mask=mask, gamma=1.0, lam=1.0)),
                           (core_algos.compute_reinforce_plus_plus_outcome_advantage,
                            dict(response_mask=mask, config=AlgoConfig())),
                           (rv.compute_reinforce_plus_plus_outcome_advantage,
                            dict(response_mask=mask, config=AlgoConfig()))):
            with pytest.raises(ValueError, match="mask"):
                fn(token_level_rewards=rewards.clone(), **kwargs)


def test_reinforce_plus_plus_needs_the_config():
    rewards, _, mask, _ = _batch(42)
    with pytest.raises(ValueError, match="config"):
        rv.compute_reinforce_plus_plus_outcome_advantage(rewards, mask)


@pytest.mark.parametrize("estimator", ["gae", "remax", "reinforce_plus_plus"])
def test_replace_runs_rlkern_under_verls_names_in_its_trainer(estimator):
    """replace_verl_estimators(): verl's trainer step ``compute_advantage`` with
    ``adv_estimator=gae`` / ``remax`` (the names it treats specially: the critic's values, the
    greedy baseline) runs rlkern's function and gets verl's result; restore puts verl's back."""
    # verl's trainer module also needs torchdata (in the parity extra)
    ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")
    from verl import DataProto

    rewards, values, mask, uid = _batch(11)
    baselines = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(12))

    def step():
        data = DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "values": values.clone(),
                     "response_mask": mask.clone(), "reward_baselines": baselines.clone()},
            non_tensors={"uid": uid})
        out = ray_trainer.compute_advantage(data, adv_estimator=estimator, gamma=0.99, lam=0.95,
                                            config=AlgoConfig(gamma=0.99, lam=0.95))
        return out.batch["advantages"], out.batch["returns"]

    verl_fn = core_algos.ADV_ESTIMATOR_REGISTRY[estimator]
    verl_attrs = {a: getattr(core_algos, a) for a, _, _ in rv._UNDER_VERL_NAMES}
    theirs = step()
    replaced = rv.replace_verl_estimators()
    try:
        assert estimator in replaced and rv.replace_verl_estimators() == replaced  # idempotent
        assert core_algos.ADV_ESTIMATOR_REGISTRY[estimator] is not verl_fn
        assert (core_algos.compute_gae_advantage_return is rv.compute_gae_advantage_return)
        calls = []
        original_scan = rv.scan_estimator
        rv.scan_estimator = lambda *a, **k: calls.append(a[0]) or original_scan(*a, **k)
        try:
            ours = step()
        finally:
            rv.scan_estimator = original_scan
        assert calls == [estimator]  # rlkern's scan ran, not verl's function
    finally:
        rv.restore_verl_estimators()
    assert core_algos.ADV_ESTIMATOR_REGISTRY[estimator] is verl_fn
    assert all(getattr(core_algos, a) is f for a, f in verl_attrs.items())
    _check(estimator, ours, theirs, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(12, 23), (64, 4099)])  # one block; several, two threads
def test_whitening_matches_verls_masked_whiten(dtype, mask_dtype, shape):
    """The CPU's whitening (one C++ op, float64 sums) against verl's own masked_whiten, and
    the torch path (backend="torch", verl's operations one for one) bit for bit; masked
    entries hold large values (their whitened value is verl's too)."""
    from verl.utils.torch_functional import masked_whiten

    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.3
    x = torch.where(mask, x, torch.full_like(x, 1e4))
    m = mask.to(mask_dtype)
    theirs = masked_whiten(x, m)
    ours = rv._masked_whiten(x, m)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    assert torch.equal(rv._masked_whiten(x, m, backend="torch"), theirs)
