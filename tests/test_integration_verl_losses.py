"""verl's remaining policy losses — ``dro``, ``dppo_tv``, ``dppo_kl``, ``clip_cov``, ``kl_cov``
— as ``rlkern_<name>`` against verl's own ``compute_policy_loss_<name>``, both looked up in
verl's registry.

Called as verl's actor calls them (``ppo_loss``): an ``FSDPActorConfig`` (clip ratios,
``clip_ratio_c``, verl's ``policy_loss`` options: ``dro_beta``, ``clip_cov_ratio/lb/ub``,
``kl_cov_ratio``, ``ppo_kl_coef``; ``global_batch_info``), every ``loss_agg_mode`` verl has,
with the global-batch normalisers, with and without ``rollout_is_weights``, on random inputs
with ragged masks. clip_cov picks its tokens with ``torch.randperm`` on the global generator:
each side runs after ``torch.manual_seed`` with the same seed, so rlkern must draw verl's
tokens. Loss, ∂/∂log_prob and the metrics (keys, Python floats) are compared in float32.

verl is optional, not part of CI: ``pip install -e ".[parity]" && pip install --no-deps verl``;
without it these tests skip with that reason.
"""

from __future__ import annotations

import pytest
import torch

from verl_cases import close, fsdp_actor_config, import_verl, masked_batch

core_algos, rollout_corr = import_verl()
omegaconf = pytest.importorskip("omegaconf", reason="verl's configs need omegaconf")
from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig  # noqa: E402

from rlkern.integrations import verl as rv  # noqa: E402

pytestmark = pytest.mark.parity

NAMES = ["dro", "dppo_tv", "dppo_kl"]
COV_NAMES = ["clip_cov", "kl_cov"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm", "token-sum"]


@pytest.fixture(autouse=True, scope="module")
def _registered():
    rv.register()
    yield
    rv.unregister()


def _config(name: str, *, beta: float = 0.3, low: float | None = 0.2,
            high: float | None = 0.28, c: float = 3.0, ratio: float = 0.1, lb: float = 0.5,
            ub: float = 3.0, **info) -> object:
    """verl's actor config for loss ``name`` with its ``policy_loss`` options (dro: β;
    clip_cov / kl_cov: the selection)."""
    options = {"dro": dict(dro_beta=beta),
               "clip_cov": dict(clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub),
               "kl_cov": dict(kl_cov_ratio=ratio, ppo_kl_coef=0.8)}.get(name)
    fields = {} if options is None else {
        "policy_loss": VerlPolicyLossConfig(loss_mode=name, **options)}
    return fsdp_actor_config(low=low, high=high, c=c, fields=fields, **info)


def _batch(seed: int, spread: float = 0.4, B: int = 11, T: int = 17):
    g, lp, old, adv, mask = masked_batch(B, T, seed, spread, full_rows=(5,))
    rollout = old + torch.randn(B, T, generator=g) * 0.2
    return lp, old, adv, mask, rollout


def _run(fn, seed, lp, old, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    torch.manual_seed(seed)  # clip_cov's torch.randperm
    loss, metrics = fn(old, x, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


def _check(name, lp, old, adv, mask, cfg, agg=None, weights=None, what="", seed=0):
    """verl's and rlkern's loss, gradient and metrics agree; returns verl's metrics and
    loss."""
    kw = {"config": cfg, "rollout_is_weights": weights}
    if agg is not None:
        kw["loss_agg_mode"] = agg
    t_loss, t_grad, t_met = _run(core_algos.get_policy_loss_fn(name), seed, lp, old, adv, mask,
                                 **kw)
    o_loss, o_grad, o_met = _run(core_algos.get_policy_loss_fn(f"rlkern_{name}"), seed, lp,
                                 old, adv, mask, **kw)
    tag = f"{name}/{agg}{what}"
    assert o_loss.shape == t_loss.shape == () and o_loss.dtype == t_loss.dtype, tag
    assert all(type(v) is float for v in (*o_met.values(), *t_met.values())), tag
    ours = {"loss": o_loss, "grad": o_grad, **o_met}
    theirs = {"loss": t_loss, "grad": t_grad, **t_met}
    assert ours.keys() == theirs.keys(), (tag, sorted(ours), sorted(theirs))
    for key, want in theirs.items():
        close(ours[key], want, f"{tag} {key}", **({} if key in t_met else
                                                  {"rtol": 2e-5, "atol": 2e-7}))
    return {**t_met, "loss": t_loss.item()}



@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", NAMES)
def test_losses_match_verl(name, agg):
    seen = []
    for seed, spread in ((0, 0.4), (1, 1.5)):
        lp, old, adv, mask, _ = _batch(seed * 100 + NAMES.index(name), spread)
        seen.append(_check(name, lp, old, adv, mask, _config(name), agg, what=f" seed {seed}"))
    if name != "dro":  # both branches of the trust region and the truncation were exercised
        assert any(0 < m["actor/pg_clipfrac"] < 1 for m in seen), seen
        assert any(m["actor/pg_clipfrac_lower"] > 0 for m in seen), seen


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_thresholds_and_truncation(name):
    """Tight asymmetric thresholds (many tokens outside the region on either side of A) and a
    truncation c below most ratios."""
    lp, old, adv, mask, _ = _batch(7, spread=0.6)
    for low, high, c in ((0.01, 0.03, 1.05), (0.002, 0.001, 0.9), (None, None, 20.0)):
        _check(name, lp, old, adv, mask, _config(name, low=low, high=high, c=c),
               "token-mean", what=f" {low} {high} {c}")


@pytest.mark.parametrize("beta", [0.05, 1.0, 4.0])
def test_dro_beta(beta):
    lp, old, adv, mask, _ = _batch(8, spread=0.8)
    _check("dro", lp, old, adv, mask, _config("dro", beta=beta), "seq-mean-token-mean",
           what=f" beta {beta}")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", NAMES + COV_NAMES)
def test_global_batch_info(name, agg):
    lp, old, adv, mask, _ = _batch(3)
    cfg = _config(name, dp_size=4, batch_num_tokens=211, global_batch_size=29,
                  loss_scale_factor=40)
    _check(name, lp, old, adv, mask, cfg, agg, what=" dp4")


@pytest.mark.parametrize("threshold", [2.0, 1.1, "0.9_1.2"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", NAMES + COV_NAMES)
def test_rollout_is_weights(name, level, threshold):
    lp, old, adv, mask, rollout = _batch(9, spread=0.3)
    weights, _ = rollout_corr.compute_rollout_correction_weights(
        old - rollout, mask, rollout_is=level, rollout_is_threshold=threshold)
    for agg in ("token-mean", "seq-mean-token-sum"):
        _check(name, lp, old, adv, mask, _config(name), agg, weights,
               what=f" {level} {threshold}")


@pytest.mark.parametrize("name", NAMES)
def test_default_mode(name):
    lp, old, adv, mask, _ = _batch(10)
    _check(name, lp, old, adv, mask, _config(name, low=None, high=None), what=" default")


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_truncation_default_without_clip_ratio_c(name):
    """verl reads ``config.get("clip_ratio_c", 20.0)``: a config without the key truncates at
    20 (an ActorConfig always carries one)."""
    lp, old, adv, mask, _ = _batch(11, spread=2.5)
    cfg = omegaconf.OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2,
                                      "clip_ratio_high": 0.28, "global_batch_info": {}})
    met = _check(name, lp, old, adv, mask, cfg, "token-mean", what=" no clip_ratio_c")
    assert met["actor/pg_clipfrac_lower"] > 0  # some ratios above 20 were truncated


@pytest.mark.parametrize("beta", [None, 0.0, -1.0])
def test_dro_needs_a_positive_beta_like_verl(beta):
    lp, old, adv, mask, _ = _batch(12)
    cfg = _config("dro", beta=beta)
    for name in ("dro", "rlkern_dro"):
        with pytest.raises(ValueError, match="dro_beta must be a positive value"):
            core_algos.get_policy_loss_fn(name)(old, lp, adv, mask, config=cfg)


# ------------------------------------------------------------------- clip_cov / kl_cov


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", COV_NAMES)
def test_cov_losses_match_verl(name, agg):
    for seed, spread in ((0, 0.4), (1, 1.5)):
        lp, old, adv, mask, _ = _batch(seed * 100 + COV_NAMES.index(name), spread)
        met = _check(name, lp, old, adv, mask, _config(name), agg, what=f" seed {seed}",
                     seed=seed)
        if name == "clip_cov":  # several tokens were selected (the draw mattered)
            assert met["actor/pg_clipfrac"] > 0.02, met


def test_clip_cov_draws_verls_tokens():
    """More candidates than tokens to select: different seeds select different tokens, and
    each seed's selection is verl's."""
    lp, old, adv, mask, _ = _batch(20, spread=0.3)
    cfg = _config("clip_cov", ratio=0.05, lb=-0.5, ub=5.0)
    losses = {_check("clip_cov", lp, old, adv, mask, cfg, "token-mean", what=f" draw {seed}",
                     seed=seed)["loss"] for seed in range(4)}
    assert len(losses) > 1, losses


@pytest.mark.parametrize("name", COV_NAMES)
def test_cov_verl_default_selection_options(name):
    """verl's defaults (ratio 0.0002: one token; lb 1, ub 5; ppo_kl_coef 0.1 of its config)."""
    lp, old, adv, mask, _ = _batch(21)
    cfg = fsdp_actor_config(fields={"policy_loss": VerlPolicyLossConfig(loss_mode=name)})
    _check(name, lp, old, adv, mask, cfg, what=" defaults")
