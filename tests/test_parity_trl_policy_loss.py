"""Parity with TRL's GRPO loss: ``GRPOTrainer._compute_loss`` itself, run on a stand-in trainer.

TRL computes the loss inside the trainer method. The test calls the real, unbound
``GRPOTrainer._compute_loss(stand_in, model, inputs)`` with a small object carrying the
attributes it reads (``loss_type``, ``epsilon_low/high``, ``beta``, ``args`` with ``delta``,
``use_bias_correction_kl``, the SAPO temperatures, ...), an identity ``accelerator`` (one
process) and a ``_get_per_token_logps_and_entropies`` that returns given tensors instead of
running a model; ``get_high_entropy_mask`` is TRL's own method bound to the stand-in. So every
line of TRL's loss — ratios, clipping, KL with bias correction, entropy mask, vLLM importance
sampling, the per-loss-type normalisation, the entropy bonus and the metrics — runs unchanged.

The one input TRL computes elsewhere, the vLLM importance-sampling ratio (in
``_generate_and_score_completions``), is transcribed below (:func:`trl_vllm_is_ratio`) from
TRL 1.16's formula. rlkern gets the same tensors with ``PolicyLossConfig.trl(...)``.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

import rlkern
from rlkern import PolicyLossConfig

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer",
                               reason="trl is not installed (pip install trl)")
GRPOTrainer = trl_grpo.GRPOTrainer

pytestmark = pytest.mark.parity

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def _stand_in(loss_type, *, epsilon=0.2, epsilon_high=None, beta=0.0, delta=None,
              level="token", max_completion_length=16, bias_kl=True, top_q=1.0,
              entropy_coef=0.0, vllm=False, ga=1, steps_per_generation=1, logps=None,
              entropies=None):
    args = types.SimpleNamespace(
        delta=delta, use_bias_correction_kl=bias_kl, sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05, steps_per_generation=steps_per_generation)
    s = types.SimpleNamespace(
        loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, beta=beta,
        importance_sampling_level=level, max_completion_length=max_completion_length,
        top_entropy_quantile=top_q, off_policy_mask_threshold=None, use_vllm=vllm,
        vllm_importance_sampling_correction=vllm, aux_loss_enabled=False,
        current_gradient_accumulation_steps=ga, accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True), args=args,
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    s._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    return s


def trl_vllm_is_ratio(old, sampling, mask, mode, cap_min, cap_max):
    """TRL 1.16 ``_generate_and_score_completions``'s vLLM importance-sampling ratio
    (transcribed): exp of the masked (token or summed) log-ratio, NaN diffs → 0, then
    truncated (``*_truncate``) or zeroed outside [min, max] (``*_mask``)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=cap_min, max=cap_max)
    lo = -math.inf if cap_min is None else cap_min
    hi = math.inf if cap_max is None else cap_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _batch(B=8, T=12, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # TRL's completion_mask
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + torch.randn(B, T, generator=g) * spread
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    sampling = old + torch.randn(B, T, generator=g) * 0.15
    entropy = torch.rand(B, T, generator=g) * 2
    adv = torch.randn(B, generator=g)
    return lp, old, ref, sampling, entropy, adv, mask


def _run_trl(loss_type, lp, old, ref, ent, adv, mask, *, is_ratio=None, num_items=None, **kw):
    x = lp.clone().requires_grad_()
    e = ent.clone().requires_grad_()
    s = _stand_in(loss_type, logps=x, entropies=e, vllm=is_ratio is not None, **kw)
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None
                                           else num_items),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    grads = torch.autograd.grad(loss, (x, e), allow_unused=True)
    metrics = {k: v[-1] for k, v in s._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def _close(ours, theirs, what):
    theirs = torch.zeros_like(ours) if theirs is None else theirs
    torch.testing.assert_close(ours.float(), torch.as_tensor(theirs).float(), rtol=2e-5,
                               atol=2e-6, msg=lambda m: f"{what}: {m}")


def _compare(loss_type, *, seed=0, rollout_mode=None, num_items=None, check_metrics=True,
             **kw):
    lp, old, ref, sampling, ent, adv, mask = _batch(seed=seed)
    is_ratio = None
    if rollout_mode is not None:
        is_ratio = trl_vllm_is_ratio(old, sampling, mask, rollout_mode, None, 3.0)
    theirs, g_theirs, metrics = _run_trl(loss_type, lp, old, ref, ent, adv, mask,
                                         is_ratio=is_ratio, num_items=num_items, **kw)
    ga = kw.get("ga", 1)
    cfg = PolicyLossConfig.trl(
        loss_type=loss_type, epsilon=kw.get("epsilon", 0.2), epsilon_high=kw.get("epsilon_high"),
        beta=kw.get("beta", 0.0), delta=kw.get("delta"),
        importance_sampling_level=kw.get("level", "token"),
        max_completion_length=kw.get("max_completion_length", 16),
        use_bias_correction_kl=kw.get("bias_kl", True), top_entropy_quantile=kw.get("top_q", 1.0),
        entropy_coef=kw.get("entropy_coef", 0.0),
        vllm_importance_sampling_correction=rollout_mode is not None,
        vllm_importance_sampling_mode=rollout_mode or "sequence_mask",
        gradient_accumulation_steps=ga)
    n_items = float(mask.sum()) if num_items is None else num_items
    num_tokens = max(n_items, 1.0) * ga / kw.get("steps_per_generation", 1)
    x = lp.clone().requires_grad_()
    e = ent.clone().requires_grad_()
    out = rlkern.policy_loss(
        x, old, adv, mask, config=cfg, ref_logprobs=ref if cfg.kl_coef else None,
        rollout_logprobs=sampling if rollout_mode else None, entropy=e,
        num_tokens=num_tokens if loss_type in ("dapo", "cispo") else None)
    g_ours = torch.autograd.grad(out.loss, (x, e), allow_unused=True)
    what = f"{loss_type} {kw} {rollout_mode}"
    _close(out.loss, theirs, f"{what} loss")
    _close(g_ours[0], g_theirs[0], f"{what} ∂/∂logp")
    _close(torch.zeros_like(e) if g_ours[1] is None else g_ours[1], g_theirs[1],
           f"{what} ∂/∂entropy")
    if not check_metrics:
        return
    _close(out.metrics["entropy_mean"], metrics["entropy"], f"{what} entropy metric")
    if cfg.kl_coef:
        _close(out.metrics["kl"], metrics["kl"], f"{what} kl metric")
    # TRL reports its clip fractions at the sequence level per sequence (not per token), and
    # with delta set after clamping the ratio at delta; rlkern's are per token, unclamped.
    if kw.get("level", "token") == "token" and kw.get("delta") is None:
        if loss_type == "cispo":
            _close(out.metrics["clipfrac_high"], metrics["cispo_clip_ratio"], what)
        elif loss_type != "sapo":
            _close(out.metrics["clipfrac_low"], metrics["clip_ratio/low_mean"], what)
            _close(out.metrics["clipfrac_high"], metrics["clip_ratio/high_mean"], what)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type(loss_type, level):
    kw = {"epsilon_high": 4.0} if loss_type == "cispo" else {"epsilon_high": 0.28}
    _compare(loss_type, level=level, seed=LOSS_TYPES.index(loss_type), **kw)


@pytest.mark.parametrize("bias_kl", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "cispo"])
def test_kl_term(loss_type, level, bias_kl):
    _compare(loss_type, level=level, beta=0.04, bias_kl=bias_kl, seed=11,
             epsilon_high=5.0 if loss_type == "cispo" else None)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_two_sided_delta(loss_type):
    _compare(loss_type, delta=1.2, seed=12)
    _compare(loss_type, delta=1.2, level="sequence", seed=13)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_entropy_mask_and_bonus(loss_type):
    _compare(loss_type, top_q=0.4, seed=14)
    _compare(loss_type, top_q=0.4, entropy_coef=0.01, seed=15)
    _compare(loss_type, entropy_coef=0.03, seed=16)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_vllm_importance_sampling(loss_type, mode):
    _compare(loss_type, rollout_mode=mode, beta=0.04, seed=17,
             epsilon_high=5.0 if loss_type == "cispo" else None)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_and_normalisers(loss_type):
    """GA steps, steps_per_generation and a num_items_in_batch spanning the generation batch."""
    _compare(loss_type, ga=4, steps_per_generation=2, num_items=157.0, entropy_coef=0.02,
             seed=18, epsilon_high=5.0 if loss_type == "cispo" else None)


def test_dr_grpo_max_completion_length():
    _compare("dr_grpo", max_completion_length=40, seed=19)
