"""rlkern_gdpo, rlkern_optimal_token_baseline and rlkern_tir_optimal_token_baseline against
verl's own functions (advantages and returns), called directly, looked up in verl's registry,
and run by verl's trainer step under verl's names after ``replace_verl_estimators()``.

Random batches with uuid-string uids in shuffled order, ragged response masks with
observation spans (multi-turn), empty responses, singleton groups, ties in the longest length
and a unique longest response (the zero-tail rule), with and without rollout IS weights.
verl is an optional test dependency (see test_integration_verl.py); without it these tests
skip with that reason.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from verl_cases import import_verl

core_algos, _ = import_verl()
from verl.trainer.config import AlgoConfig  # noqa: E402

from rlkern.integrations import verl as rv  # noqa: E402

pytestmark = pytest.mark.parity

OTB = {False: "optimal_token_baseline", True: "tir_optimal_token_baseline"}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    rv.register()
    yield
    rv.unregister()


def _batch(seed: int, *, B: int = 24, T: int = 13, holes: bool = True):
    """``(rewards, mask, uid, old_log_probs, sum_pi_squared, rho)`` as verl's trainer holds
    them: float32 tensors, a float mask, a numpy array of uuid strings."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes = [1, 1, 2, 3, 4, 5, 8]  # two singletons
    uids = [str(uuid.UUID(int=int(rng.integers(0, 2**62)))) for _ in sizes]
    uid = np.array([u for u, s in zip(uids, sizes, strict=True) for _ in range(s)],
                   dtype=object)[:B]
    B = len(uid)
    perm = rng.permutation(B)
    uid = uid[perm]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[:4] = T  # ties in the longest length (where they share a group)
    lengths[5] = 0  # an empty response
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    if holes:
        mask *= (torch.rand(B, T, generator=g) > 0.25).float()
    rewards = torch.randn(B, T, generator=g) * (torch.rand(B, T, generator=g) > 0.6)
    probs = (torch.randn(B, T, 11, generator=g) * 2).softmax(-1)
    tok = torch.randint(0, 11, (B, T, 1), generator=g)
    old = probs.gather(-1, tok).squeeze(-1).log()
    spi2 = (probs**2).sum(-1)
    rho = (torch.rand(B, T, generator=g) * 2).clamp_max(1.5)
    return rewards, mask, uid, old, spi2, rho


def _close(ours, theirs):
    for o, t in zip(ours, theirs, strict=True):
        assert o.shape == t.shape and o.dtype == t.dtype, (o.dtype, t.dtype)
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("isw", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_token_baseline_matches_verl(multi_turn, isw, zero_tail, seed):
    r, m, uid, old, spi2, rho = _batch(seed, holes=multi_turn or seed == 2)
    kwargs = dict(response_mask=m, index=uid, old_log_probs=old, sum_pi_squared=spi2,
                  rollout_is_weights=rho if isw else None, handle_zero_tail=zero_tail)
    theirs = core_algos.get_adv_estimator_fn(OTB[multi_turn])(token_level_rewards=r.clone(),
                                                              **kwargs)
    ours = core_algos.get_adv_estimator_fn(f"rlkern_{OTB[multi_turn]}")(
        token_level_rewards=r.clone(), **kwargs)
    _close(ours, theirs)


@pytest.mark.parametrize("multi_turn", [False, True])
def test_zero_tail_cases_match_verl(multi_turn):
    """A group whose longest response is unique (its tail has no baseline) next to one whose
    two longest responses tie, and a group of one response beside an empty one."""
    T = 8
    lengths = torch.tensor([8, 5, 3, 6, 6, 2, 4, 0])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    uid = np.array(["a", "a", "a", "b", "b", "b", "c", "c"], dtype=object)
    g = torch.Generator().manual_seed(3)
    r = torch.randn(8, T, generator=g)
    old = -torch.rand(8, T, generator=g)
    spi2 = torch.rand(8, T, generator=g) * 0.5
    for zero_tail in (True, False):
        args = (r, mask, uid, old, spi2, None, zero_tail)
        _close(core_algos.get_adv_estimator_fn(f"rlkern_{OTB[multi_turn]}")(*args),
               core_algos.get_adv_estimator_fn(OTB[multi_turn])(*args))


def _gdpo_batch(seed: int, B: int = 20, T: int = 9, P: int = 4):
    rewards, mask, uid, *_ = _batch(seed, B=B, T=T, holes=False)
    B = len(uid)
    rng = np.random.default_rng(seed)
    ntb = {"uid": uid, "format_reward": rng.integers(0, 2, B).astype(np.float32),
           "accuracy_reward": rng.normal(size=B), "length_reward": list(rng.random(B))}
    attn = torch.cat([torch.ones(B, P), mask], 1).long()
    batch = {"prompts": torch.zeros(B, P, dtype=torch.long), "attention_mask": attn}
    return rewards, mask, uid, ntb, batch


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_gdpo_matches_verl(weights, norm, seed):
    r, m, uid, ntb, batch = _gdpo_batch(seed)
    cfg = AlgoConfig(gdpo_reward_keys=["format_reward", "accuracy_reward", "length_reward"],
                     gdpo_reward_weights=weights)
    kwargs = dict(response_mask=m, index=uid, norm_adv_by_std_in_grpo=norm, config=cfg,
                  non_tensor_batch=ntb, batch=batch)
    _close(core_algos.get_adv_estimator_fn("rlkern_gdpo")(token_level_rewards=r, **kwargs),
           core_algos.get_adv_estimator_fn("gdpo")(token_level_rewards=r, **kwargs))


def test_gdpo_without_components_uses_the_token_rewards_as_verl_does():
    r, m, uid, _, _ = _gdpo_batch(4)
    for kwargs in ({}, {"config": AlgoConfig()}, {"norm_adv_by_std_in_grpo": False}):
        _close(rv.compute_gdpo_outcome_advantage(r, m, uid, **kwargs),
               core_algos.compute_gdpo_outcome_advantage(r, m, uid, **kwargs))


def test_gdpo_runs_one_group_advantages_call_for_all_components(monkeypatch):
    import rlkern.integrations.verl_estimators as ve

    calls = []
    original = ve.group_advantages
    monkeypatch.setattr(ve, "group_advantages",
                        lambda scores, **k: calls.append(scores.shape) or original(scores, **k))
    r, m, uid, ntb, batch = _gdpo_batch(5)
    cfg = AlgoConfig(gdpo_reward_keys=["format_reward", "accuracy_reward"])
    rv.compute_gdpo_outcome_advantage(r, m, uid, config=cfg, non_tensor_batch=ntb, batch=batch)
    assert calls == [torch.Size([2 * len(uid)])]


def test_gdpo_and_otb_errors():
    r, m, uid, ntb, batch = _gdpo_batch(6)
    gdpo = rv.compute_gdpo_outcome_advantage
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        gdpo(r, m, uid, config=AlgoConfig(), non_tensor_batch=ntb, batch=batch)
    with pytest.raises(ValueError, match="'missing' not found"):
        gdpo(r, m, uid, config=AlgoConfig(gdpo_reward_keys=["missing"]), non_tensor_batch=ntb,
             batch=batch)
    with pytest.raises(ValueError, match="gdpo_reward_weights has 1 values for 2"):
        gdpo(r, m, uid, config=AlgoConfig(gdpo_reward_keys=["format_reward", "length_reward"],
                                          gdpo_reward_weights=[1.0]),
             non_tensor_batch=ntb, batch=batch)
    with pytest.raises(ValueError, match="replace_verl_estimators"):  # rlkern_gdpo by name
        gdpo(r, m, uid, config=AlgoConfig(gdpo_reward_keys=["format_reward"]))
    with pytest.raises(ValueError, match="needs index"):
        gdpo(r, m, None)
    bad = dict(ntb, format_reward=np.zeros(3))
    with pytest.raises(ValueError, match="one per response"):
        gdpo(r, m, uid, config=AlgoConfig(gdpo_reward_keys=["format_reward"]),
             non_tensor_batch=bad, batch=batch)
    # verl's trainer passes old_log_probs / sum_pi_squared only under verl's names
    for name in OTB.values():
        fn = core_algos.get_adv_estimator_fn(f"rlkern_{name}")
        with pytest.raises(ValueError, match=r"old_log_probs, sum_pi_squared.*replace_verl"):
            fn(token_level_rewards=r, response_mask=m, index=uid, config=AlgoConfig())


@pytest.mark.parametrize(("estimator", "isw"), [
    ("gdpo", False), ("optimal_token_baseline", False), ("optimal_token_baseline", True),
    ("tir_optimal_token_baseline", False), ("tir_optimal_token_baseline", True)])
def test_replace_runs_rlkern_under_verls_names_in_its_trainer(estimator, isw):
    """verl's trainer step passes the components / sum_pi_squared only under verl's names:
    after replace_verl_estimators() it runs rlkern's function there and gets verl's result."""
    ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")
    from verl import DataProto

    r, m, uid, old, spi2, rho = _batch(9, holes=estimator.startswith("tir"))
    _, _, _, ntb, batch = _gdpo_batch(9, B=len(uid))
    B, P = len(uid), batch["prompts"].shape[1]
    attn = torch.cat([torch.ones(B, P), m], 1).long()
    cfg = AlgoConfig(gdpo_reward_keys=["format_reward", "accuracy_reward"],
                     gdpo_reward_weights=[1.0, 0.5])

    def step():
        tensors = {"token_level_rewards": r.clone(), "response_mask": m.clone(),
                   "old_log_probs": old.clone(), "sum_pi_squared": spi2.clone(),
                   "prompts": torch.zeros(B, P, dtype=torch.long), "attention_mask": attn}
        if isw:
            tensors["rollout_is_weights"] = rho.clone()
        non_tensors = {"uid": uid, "format_reward": ntb["format_reward"],
                       "accuracy_reward": ntb["accuracy_reward"]}
        data = DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
        out = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=cfg)
        return out.batch["advantages"], out.batch["returns"]

    verl_fn = core_algos.ADV_ESTIMATOR_REGISTRY[estimator]
    theirs = step()
    replaced = rv.replace_verl_estimators()
    try:
        assert estimator in replaced
        assert core_algos.ADV_ESTIMATOR_REGISTRY[estimator] is rv.ADV_ESTIMATORS[
            f"rlkern_{estimator}"]
        ours = step()
    finally:
        rv.restore_verl_estimators()
    assert core_algos.ADV_ESTIMATOR_REGISTRY[estimator] is verl_fn
    _close(ours, theirs)
