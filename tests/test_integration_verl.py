"""rlkern.integrations.verl against verl's own functions, looked up in verl's own registries.

For every name :func:`rlkern.integrations.verl.register` adds, the test asks verl's registry
(``core_algos.get_adv_estimator_fn`` / ``get_policy_loss_fn``) for the function — i.e. what
verl's trainer and actor would call — and compares it with verl's function of the name
without the ``rlkern_`` prefix on the same inputs, called as verl calls it: estimators with
the trainer's keyword arguments (token rewards, response mask, a shuffled numpy array of uid
strings, the algorithm config), losses as ``ppo_loss`` calls them (an ``FSDPActorConfig``
whose ``global_batch_info`` carries the global normalisers, optional ``rollout_is_weights``).
Outputs, dtypes, shapes, gradients and metrics (keys, Python float values) are compared in
float32. The drop-ins are compared with verl's ``logprobs_from_logits`` /
``entropy_from_logits`` (values and gradients).

verl is an optional test dependency, not part of CI (its pins conflict with this
environment): ``pip install -e ".[parity]" && pip install --no-deps verl``. Without it these
tests skip with that reason.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from verl_cases import close, fsdp_actor_config, import_verl, masked_batch

core_algos, rollout_corr = import_verl()
verl_F = pytest.importorskip("verl.utils.torch_functional")  # noqa: N816
from verl.trainer.config import AlgoConfig  # noqa: E402

from rlkern.integrations import verl as rv  # noqa: E402

pytestmark = pytest.mark.parity

# verl's originals, captured before any patching
VERL_LOGPROBS = verl_F.logprobs_from_logits
VERL_ENTROPY = verl_F.entropy_from_logits
VERL_ENTROPY_CHUNKED = verl_F.entropy_from_logits_with_chunking

ADV_NAMES = ["grpo", "grpo_vectorized", "grpo_passk", "rloo", "rloo_vectorized", "opo", "gpg",
             "reinforce_plus_plus_baseline"]
# the token-level estimators on rlkern.gae (parity in test_integration_verl_scan.py)
SCAN_ADV_NAMES = ["gae", "reinforce_plus_plus", "remax"]
# gdpo and the optimal token baselines (parity in test_parity_verl_estimators.py)
OTB_ADV_NAMES = ["gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"]
LOSS_NAMES = ["vanilla", "gspo", "cispo", "sapo", "geo_mean", "gpg"]
# registered losses driven by verl's rollout-correction config (their parity tests:
# test_parity_verl_rollout_correction.py)
ROLLOUT_LOSS_NAMES = ["bypass_mode"]
# the losses with their own config fields (parity in test_integration_verl_losses.py)
OWN_CONFIG_LOSS_NAMES = ["dro", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm", "token-sum"]


@pytest.fixture(autouse=True, scope="module")
def _registered():
    names = rv.register()
    yield names
    rv.unregister()
    rv.unpatch_torch_functional()


_close = close


# ---------------------------------------------------------------------------------- registry


def test_register_adds_every_name_and_is_idempotent():
    names = rv.register()
    assert set(names) == {f"rlkern_{n}" for n in ADV_NAMES + SCAN_ADV_NAMES + OTB_ADV_NAMES} | \
        {f"rlkern_{n}" for n in LOSS_NAMES + ROLLOUT_LOSS_NAMES + OWN_CONFIG_LOSS_NAMES}
    for n in ADV_NAMES + SCAN_ADV_NAMES + OTB_ADV_NAMES:
        assert core_algos.get_adv_estimator_fn(f"rlkern_{n}") is rv.ADV_ESTIMATORS[f"rlkern_{n}"]
    for n in LOSS_NAMES + ROLLOUT_LOSS_NAMES + OWN_CONFIG_LOSS_NAMES:
        assert core_algos.get_policy_loss_fn(f"rlkern_{n}") is rv.POLICY_LOSSES[f"rlkern_{n}"]
    before = (dict(core_algos.ADV_ESTIMATOR_REGISTRY), dict(core_algos.POLICY_LOSS_REGISTRY))
    rv.register()
    assert (dict(core_algos.ADV_ESTIMATOR_REGISTRY), dict(core_algos.POLICY_LOSS_REGISTRY)) == \
        before
    assert rv.is_registered()


def test_unregister_and_reload():
    removed = rv.unregister()
    assert len(removed) == (len(ADV_NAMES) + len(SCAN_ADV_NAMES) + len(OTB_ADV_NAMES)
                            + len(LOSS_NAMES) + len(ROLLOUT_LOSS_NAMES)
                            + len(OWN_CONFIG_LOSS_NAMES))
    assert not rv.is_registered()
    assert not any(k.startswith("rlkern_") for k in core_algos.ADV_ESTIMATOR_REGISTRY)
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        core_algos.get_adv_estimator_fn("rlkern_grpo")
    # verl's own entries are untouched
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    rv.register()
    # a reloaded module (new function objects) replaces its earlier registration
    # (register_adv_est alone would refuse the swap)
    fresh = importlib.reload(rv)
    fresh.register()
    assert core_algos.get_adv_estimator_fn("rlkern_grpo") is \
        fresh.ADV_ESTIMATORS["rlkern_grpo"]
    assert fresh.unregister() and not fresh.is_registered()
    rv.register()


def test_register_refuses_to_overwrite_someone_elses_name():
    rv.unregister()
    try:
        core_algos.POLICY_LOSS_REGISTRY["rlkern_vanilla"] = core_algos.compute_policy_loss_vanilla
        with pytest.raises(ValueError, match="someone else"):
            rv.register()
        assert "rlkern_grpo" not in core_algos.ADV_ESTIMATOR_REGISTRY  # nothing half-done
        rv.unregister()  # leaves the foreign entry alone
        assert core_algos.POLICY_LOSS_REGISTRY["rlkern_vanilla"] is \
            core_algos.compute_policy_loss_vanilla
    finally:
        core_algos.POLICY_LOSS_REGISTRY.pop("rlkern_vanilla", None)
        rv.register()


def test_plugin_module_registers_in_a_fresh_process(tmp_path):
    """VERL_USE_EXTERNAL_MODULES: verl imports the plugin in every process importing verl
    (its Ray workers included), which registers and, on request, patches."""
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "import verl.utils.torch_functional as F\n"
            "from rlkern.integrations import verl as rv\n"
            "assert core_algos.get_policy_loss_fn('rlkern_vanilla') is "
            "rv.POLICY_LOSSES['rlkern_vanilla']\n"
            "assert core_algos.get_adv_estimator_fn('rlkern_grpo') is "
            "rv.ADV_ESTIMATORS['rlkern_grpo']\n"
            "assert F.logprobs_from_logits is rv.logprobs_from_logits\n"
            "print('ok')\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlkern.integrations.verl_plugin",
               RLKERN_VERL_PATCH_LOGPROBS="1")
    # Not in the repository root: `python -c` puts the working directory first on sys.path,
    # where kernels/ would shadow Hugging Face's `kernels` package (see the root conftest.py).
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------------------------------------------- estimators


def _adv_batch(seed: int, *, singletons: bool = True, kind: str = "binary",
               mask_dtype=torch.float32, T: int = 9):
    """verl's inputs: shuffled rows of groups of 1–9 responses (odd sizes), uid strings,
    responses of 0..T tokens (empty rows in groups of ≥ 2), the outcome reward on the last
    token (on token 0 for an empty response: outside the mask, still in verl's row sum)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 10, (9,), generator=gen)
    if singletons:
        sizes[:2] = 1
    groups = torch.arange(sizes.numel()).repeat_interleave(sizes)
    b = groups.numel()
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    in_big = torch.nonzero(sizes[groups] >= 3).flatten()
    lengths[in_big[:3]] = 0  # empty responses
    if kind == "binary":
        final = torch.randint(0, 2, (b,), generator=gen).float()
        final[groups == groups[-1]] = 1.0  # a zero-variance group
    else:
        final = torch.randn(b, generator=gen)
    rewards = torch.zeros(b, T)
    rewards[torch.arange(b), (lengths - 1).clamp(min=0)] = final
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(mask_dtype)
    perm = torch.randperm(b, generator=gen)
    uid_of_group = [f"{seed}-{g}-{'x' * g}" for g in range(sizes.numel())]
    uid = np.array([uid_of_group[int(g)] for g in groups[perm]], dtype=object)
    return rewards[perm].contiguous(), mask[perm].contiguous(), uid


def _call_verl_adv(name, rewards, mask, uid, norm, epsilon=1e-6):
    algo = AlgoConfig(norm_adv_by_std_in_grpo=norm)
    fn = core_algos.get_adv_estimator_fn(name)
    if name in ("grpo", "grpo_vectorized"):
        # verl's trainer calls grpo directly with the flag as an argument
        return fn(token_level_rewards=rewards.clone(), response_mask=mask, index=uid,
                  epsilon=epsilon, norm_adv_by_std_in_grpo=norm)
    return fn(token_level_rewards=rewards.clone(), response_mask=mask, config=algo, index=uid,
              epsilon=epsilon)


def _check_adv(name, rewards, mask, uid, norm=True, epsilon=1e-6):
    theirs = _call_verl_adv(name, rewards, mask, uid, norm, epsilon)
    ours_fn = core_algos.get_adv_estimator_fn(f"rlkern_{name}")
    # what verl's trainer passes to a registered estimator: no norm flag, the algorithm config
    ours = ours_fn(token_level_rewards=rewards, response_mask=mask,
                   config=AlgoConfig(norm_adv_by_std_in_grpo=norm), index=uid,
                   epsilon=epsilon)
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, t, what in zip(ours, theirs, ("advantages", "returns"), strict=True):
        assert o.shape == t.shape and o.dtype == t.dtype, (what, o.shape, o.dtype, t.dtype)
        _close(o, t, f"{name} {what}")
    # padding is exactly zero, as verl's A·mask
    assert (ours[0][mask == 0] == 0).all()
    return ours


@pytest.mark.parametrize("kind", ["binary", "normal"])
@pytest.mark.parametrize("name", ADV_NAMES)
def test_estimators_match_verl(name, kind):
    singletons = name != "grpo_passk"
    for seed in range(3):
        rewards, mask, uid = _adv_batch(seed * 7 + ADV_NAMES.index(name), kind=kind,
                                        singletons=singletons)
        _check_adv(name, rewards, mask, uid)


@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "grpo_passk"])
def test_estimators_without_std_normalisation(name):
    rewards, mask, uid = _adv_batch(11, kind="normal", singletons=name != "grpo_passk")
    _check_adv(name, rewards, mask, uid, norm=False)
    # an explicit argument wins over the config (verl's own grpo signature)
    fn = core_algos.get_adv_estimator_fn(f"rlkern_{name}")
    a, _ = fn(rewards, mask, uid, norm_adv_by_std_in_grpo=False,
              config=AlgoConfig(norm_adv_by_std_in_grpo=True))
    b, _ = fn(rewards, mask, uid, config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
@pytest.mark.parametrize("name", ["grpo", "rloo", "opo", "reinforce_plus_plus_baseline"])
def test_estimators_mask_dtypes(name, mask_dtype):
    rewards, mask, uid = _adv_batch(5, kind="normal", mask_dtype=mask_dtype)
    _check_adv(name, rewards, mask, uid)


def test_estimators_other_index_types_and_epsilon():
    rewards, mask, uid = _adv_batch(21, kind="normal")
    _, codes = np.unique(uid, return_inverse=True)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uid,
                                                          epsilon=1e-3)
    fn = core_algos.get_adv_estimator_fn("rlkern_grpo")
    for index in (uid, list(uid), codes.astype(np.int32), torch.from_numpy(codes * 1000 + 7),
                  np.array([hash(u) for u in uid], dtype=np.int64)):
        ours, _ = fn(rewards, mask, index, epsilon=1e-3)
        _close(ours, theirs, f"index {type(index).__name__}")


def test_estimators_keep_verls_names_signatures_and_docs():
    """The generated estimators carry verl's function name and parameters (plus **kwargs)."""
    import inspect

    for fn in set(rv.ADV_ESTIMATORS.values()):
        theirs = inspect.signature(getattr(core_algos, fn.__name__)).parameters
        ours = inspect.signature(fn).parameters
        assert [n for n in ours if n != "kwargs"] == [n for n in theirs if n != "kwargs"]
        # verl's defaults (its norm flag's True is read from the config here when not given)
        assert all(ours[n].default == p.default for n, p in theirs.items()
                   if p.default is not p.empty and n != "norm_adv_by_std_in_grpo"), fn.__name__
        assert fn.__doc__ and fn.__doc__.startswith("verl's ``")
        assert getattr(rv, fn.__name__) is fn


def test_group_ids_from_index_partition():
    rng = np.random.default_rng(0)
    uid = np.array([f"u{v}" for v in rng.integers(0, 50, 400)], dtype=object)
    ids = rv.group_ids_from_index(uid)
    assert ids.dtype == torch.int64 and ids.shape == (400,)
    _, ref = np.unique(uid, return_inverse=True)
    # same partition: equal labels ⇔ equal ids
    same_ours = ids[:, None] == ids[None, :]
    same_ref = torch.from_numpy(ref[:, None] == ref[None, :])
    assert torch.equal(same_ours, same_ref)


def test_passk_singleton_raises_like_verl():
    rewards, mask, uid = _adv_batch(3, singletons=True)
    with pytest.raises(ValueError):
        core_algos.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, uid,
                                                        config=AlgoConfig())
    with pytest.raises(ValueError):
        core_algos.get_adv_estimator_fn("rlkern_grpo_passk")(rewards, mask, uid,
                                                              config=AlgoConfig())


def test_gpg_f_norm():
    rewards, mask, uid = _adv_batch(4, kind="normal")
    theirs, _ = core_algos.compute_gpg_outcome_advantage(rewards.clone(), mask, uid, f_norm=2.5)
    ours, _ = core_algos.get_adv_estimator_fn("rlkern_gpg")(rewards, mask, uid, f_norm=2.5)
    _close(ours, theirs, "gpg f_norm")


# ----------------------------------------------------------------------------- policy losses


_actor_config = functools.partial(fsdp_actor_config, fields=dict(tau_pos=1.0, tau_neg=1.05))


def _loss_batch(B=11, T=17, seed=0, spread=0.4):
    g, lp, old, adv, mask = masked_batch(B, T, seed, spread, full_rows=(5,))
    rollout = old + torch.randn(B, T, generator=g) * 0.2
    return lp, old, adv, mask, rollout


def _run_loss(fn, lp, *args, **kwargs):
    x = lp.clone().requires_grad_()
    loss, metrics = fn(args[0], x, *args[1:], **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


def _check_loss(name, agg, lp, old, adv, mask, cfg, weights=None, what=""):
    verl_fn = core_algos.get_policy_loss_fn(name)
    ours_fn = core_algos.get_policy_loss_fn(f"rlkern_{name}")
    kw = dict(loss_agg_mode=agg, config=cfg, rollout_is_weights=weights)
    t_loss, t_grad, t_met = _run_loss(verl_fn, lp, old, adv, mask, **kw)
    o_loss, o_grad, o_met = _run_loss(ours_fn, lp, old, adv, mask, **kw)
    tag = f"{name}/{agg}{what}"
    assert o_loss.shape == t_loss.shape == () and o_loss.dtype == t_loss.dtype, tag
    _close(o_loss, t_loss, f"{tag} loss", rtol=2e-5)
    _close(o_grad, t_grad, f"{tag} grad", rtol=2e-5, atol=2e-7)
    assert set(o_met) == set(t_met), (tag, sorted(o_met), sorted(t_met))
    for k, v in t_met.items():
        assert type(o_met[k]) is type(v) is float, (tag, k, type(o_met[k]), type(v))
        _close(o_met[k], v, f"{tag} {k}")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_policy_losses_match_verl(name, agg):
    for seed, spread in ((0, 0.4), (1, 1.5)):  # 1.5: many clipped and dual-clipped tokens
        lp, old, adv, mask, _ = _loss_batch(seed=seed * 100 + LOSS_NAMES.index(name),
                                            spread=spread)
        _check_loss(name, agg, lp, old, adv, mask, _actor_config(), what=f" seed {seed}")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_policy_losses_default_mode_and_symmetric_clip(name):
    lp, old, adv, mask, _ = _loss_batch(seed=40)
    cfg = _actor_config(low=None, high=None, clip_ratio=0.15, c=2.5)
    verl_fn = core_algos.get_policy_loss_fn(name)
    ours_fn = core_algos.get_policy_loss_fn(f"rlkern_{name}")
    t_loss, t_met = verl_fn(old, lp, adv, mask, config=cfg)  # verl's default loss_agg_mode
    o_loss, o_met = ours_fn(old, lp, adv, mask, config=cfg)
    _close(o_loss, t_loss, f"{name} default mode")
    for k, v in t_met.items():
        _close(o_met[k], v, f"{name} {k}")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_policy_losses_global_batch_info(name, agg):
    """dp_size / batch_num_tokens / global_batch_size / loss_scale_factor, as ppo_loss sets
    them in config.global_batch_info under data parallelism."""
    lp, old, adv, mask, _ = _loss_batch(seed=3)
    cfg = _actor_config(dp_size=4, batch_num_tokens=211, global_batch_size=29,
                        loss_scale_factor=40)
    _check_loss(name, agg, lp, old, adv, mask, cfg, what=" dp4")


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo"])
def test_dp_without_global_normaliser_raises_like_verl(name):
    lp, old, adv, mask, _ = _loss_batch(seed=4)
    agg = "seq-mean-token-mean" if name == "sapo" else "token-mean"
    cfg = _actor_config(dp_size=2)
    for fn in (core_algos.get_policy_loss_fn(name),
               core_algos.get_policy_loss_fn(f"rlkern_{name}")):
        with pytest.raises(ValueError, match="required when dp_size > 1"):
            fn(old, lp, adv, mask, loss_agg_mode=agg, config=cfg)


@pytest.mark.parametrize("threshold", [2.0, 1.1, "0.9_1.2"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_policy_losses_rollout_is_weights(name, level, threshold):
    """verl's precomputed rollout correction weights (rollout_corr_helper), zeros included
    (the lower_upper mask)."""
    lp, old, adv, mask, rollout = _loss_batch(seed=7, spread=0.2)
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        old - rollout, mask, rollout_is=level, rollout_is_threshold=threshold)
    if threshold == "0.9_1.2":
        assert (weights[mask] == 0).any()
    for agg in ("token-mean", "seq-mean-token-mean"):
        _check_loss(name, agg, lp, old, adv, mask, _actor_config(), weights,
                    what=f" {level} {threshold}")


def test_policy_loss_needs_config():
    lp, old, adv, mask, _ = _loss_batch(seed=8)
    with pytest.raises(ValueError, match="actor config"):
        core_algos.get_policy_loss_fn("rlkern_vanilla")(old, lp, adv, mask)


def test_policy_loss_all_masked_batch():
    """A micro-batch with no valid token: verl's token-mean divides 0 by 0 (NaN loss); rlkern
    returns 0 (and a zero gradient), its documented input policy. Metrics agree (0)."""
    lp, old, adv, _, _ = _loss_batch(seed=9)
    mask = torch.zeros_like(lp, dtype=torch.bool)
    t_loss, t_met = core_algos.compute_policy_loss_vanilla(old, lp, adv, mask,
                                                           config=_actor_config())
    o_loss, o_grad, o_met = _run_loss(core_algos.get_policy_loss_fn("rlkern_vanilla"), lp, old,
                                      adv, mask, config=_actor_config())
    assert torch.isnan(t_loss)
    assert o_loss.item() == 0.0 and not o_grad.any()
    assert set(o_met) == set(t_met)
    for k, v in t_met.items():
        _close(o_met[k], v, f"all masked {k}")


# ---------------------------------------------------------------------------------- drop-ins


def _logits(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("shape", [(37, 301), (3, 11, 257), (2, 3, 5, 64)])
def test_logprobs_from_logits_matches_verl(shape, inplace):
    logits = _logits(shape, seed=len(shape))
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(2))
    x_ref = logits.clone().requires_grad_()
    theirs = VERL_LOGPROBS(x_ref, labels)
    (g_ref,) = torch.autograd.grad((theirs * w).sum(), x_ref)
    x = logits.clone().requires_grad_()
    # a non-leaf buffer, as in verl (logits / temperature): inplace backward overwrites it
    z = x * 1.0
    ours = rv.logprobs_from_logits(z, labels, inplace_backward=inplace)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    _close(ours, theirs, "logprobs", rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad((ours * w).sum(), x)
    _close(g, g_ref, "logprobs grad", rtol=1e-5, atol=1e-6)


def test_logprobs_from_logits_strided_view_and_bf16():
    full = _logits((4, 13, 300), seed=3)
    labels = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(4))
    view = full[:, :-1, :]  # the trainer's shifted view, read in place
    _close(rv.logprobs_from_logits(view, labels), VERL_LOGPROBS(view, labels), "view",
           rtol=1e-5, atol=1e-5)
    # bf16: rlkern accumulates in fp32, so it matches verl's fp32 result on the same values
    bf = full.to(torch.bfloat16)
    ours = rv.logprobs_from_logits(bf[:, :-1, :], labels)
    _close(ours, VERL_LOGPROBS(bf[:, :-1, :].float(), labels), "bf16 vs fp32", rtol=1e-5,
           atol=1e-5)
    # and is at least as close to that truth as verl's own bf16 path
    err_ours = (ours - VERL_LOGPROBS(bf[:, :-1, :].double(), labels)).abs().max()
    err_verl = (VERL_LOGPROBS(bf[:, :-1, :], labels).double()
                - VERL_LOGPROBS(bf[:, :-1, :].double(), labels)).abs().max()
    assert err_ours <= err_verl


@pytest.mark.parametrize("shape", [(37, 301), (3, 11, 257), (2, 3, 5, 64)])
def test_entropy_from_logits_matches_verl(shape):
    logits = _logits(shape, seed=10 + len(shape))
    w = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(5))
    x_ref = logits.clone().requires_grad_()
    theirs = VERL_ENTROPY(x_ref)
    (g_ref,) = torch.autograd.grad((theirs * w).sum(), x_ref)
    x = logits.clone().requires_grad_()
    ours = rv.entropy_from_logits(x)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    _close(ours, theirs, "entropy", rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad((ours * w).sum(), x)
    _close(g, g_ref, "entropy grad", rtol=1e-5, atol=1e-6)
    if len(shape) == 2:
        _close(rv.entropy_from_logits_with_chunking(logits, chunk_size=8),
               VERL_ENTROPY_CHUNKED(logits, chunk_size=8), "chunked", rtol=1e-5, atol=1e-5)


def test_logprobs_and_entropy_on_the_same_logits_inplace():
    """verl's actor computes both from one logits tensor, then backpropagates their sum: the
    in-place logprobs backward must not corrupt the entropy's gradient (or must raise)."""
    logits = _logits((29, 211), seed=6)
    labels = torch.randint(0, 211, (29,), generator=torch.Generator().manual_seed(7))

    def total(lp_fn, ent_fn, **kw):
        x = logits.clone().requires_grad_()
        z = x / 0.7
        loss = (lp_fn(z, labels, **kw) * 0.3).sum() - (ent_fn(z) * 0.01).sum()
        return torch.autograd.grad(loss, x)[0]

    ref = total(VERL_LOGPROBS, VERL_ENTROPY)
    _close(total(rv.logprobs_from_logits, rv.entropy_from_logits, inplace_backward=True), ref,
           "grad, in place", rtol=1e-5, atol=1e-6)
    _close(total(rv.logprobs_from_logits, VERL_ENTROPY, inplace_backward=True), ref,
           "grad, in place with verl's entropy", rtol=1e-5, atol=1e-6)


def test_entropy_drop_in_under_torch_compile_dynamic():
    """verl's engines torch.compile(entropy_from_logits, dynamic=True) once at construction."""
    compiled = torch.compile(rv.entropy_from_logits, dynamic=True, fullgraph=True,
                             backend="aot_eager")
    for n in (7, 19):
        logits = _logits((n, 97), seed=n)
        _close(compiled(logits), VERL_ENTROPY(logits), f"compiled n={n}", rtol=1e-5, atol=1e-5)


def test_patch_and_unpatch_torch_functional():
    naive = importlib.import_module("verl.workers.rollout.naive.naive_rollout")
    assert naive.logprobs_from_logits is VERL_LOGPROBS  # imported by name
    patched = rv.patch_torch_functional()
    try:
        assert verl_F.logprobs_from_logits is rv.logprobs_from_logits
        assert verl_F.entropy_from_logits is rv.entropy_from_logits
        assert verl_F.entropy_from_logits_with_chunking is rv.entropy_from_logits_with_chunking
        assert naive.logprobs_from_logits is rv.logprobs_from_logits
        assert "verl.workers.rollout.naive.naive_rollout.logprobs_from_logits" in patched
        assert rv.patch_torch_functional() == patched  # idempotent
        # verl code calling through the module now runs rlkern: core_algos'
        # compute_entropy_loss calls verl_F.entropy_from_logits
        logits = _logits((3, 5, 64), seed=8)
        mask = torch.ones(3, 5)
        _close(core_algos.compute_entropy_loss(logits, mask),
               (rv.entropy_from_logits(logits) * mask).sum() / mask.sum(), "entropy loss")
    finally:
        rv.unpatch_torch_functional()
    assert verl_F.logprobs_from_logits is VERL_LOGPROBS
    assert verl_F.entropy_from_logits is VERL_ENTROPY
    assert verl_F.entropy_from_logits_with_chunking is VERL_ENTROPY_CHUNKED
    assert naive.logprobs_from_logits is VERL_LOGPROBS


# ---------------------------------------------------------------------------------------------
# Coverage of verl's registries, enumerated at run time


def _verl_names(registry: dict) -> set[str]:
    return {n for n in registry if not n.startswith("rlkern_")}


def test_every_verl_registry_name_is_covered_or_listed_with_a_reason():
    """A verl release that adds an estimator or a loss fails here until rlkern covers it or
    lists it (with the reason) in rlkern.integrations.verl_coverage."""
    from rlkern.integrations import verl_coverage as cov

    for registry, covered, missing in (
            (core_algos.ADV_ESTIMATOR_REGISTRY, cov.covered_estimators(),
             cov.NOT_COVERED_ESTIMATORS),
            (core_algos.POLICY_LOSS_REGISTRY, cov.covered_losses(), cov.NOT_COVERED_LOSSES)):
        names = _verl_names(registry)
        assert not set(covered) & set(missing), "listed as missing but covered"
        assert names - set(covered) - set(missing) == set(), "verl names rlkern does not know"
        assert set(covered) <= names, "rlkern covers a name verl does not have"
        assert set(missing) <= names, "listed as missing but absent from verl"
        assert all(reason.strip() for reason in missing.values())


def test_coverage_table_in_docs_is_generated_from_the_code():
    from pathlib import Path

    from rlkern.integrations.verl_coverage import coverage_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations" / "verl.md").read_text()
    table = doc.split("<!-- coverage:begin -->\n", 1)[1].split("<!-- coverage:end -->", 1)[0]
    assert table == coverage_markdown(), "regenerate the table: see docs/integrations/verl.md"
