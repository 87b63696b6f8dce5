"""Benchmark case ``verl_losses``: verl's remaining policy losses as fused rlkern losses against
verl's own functions.

B responses of T tokens (float32, ragged lengths, advantages broadcast to (B, T) as verl's
actor passes them), forward and backward (∂loss/∂log_prob). One mode per verl loss:
``dro``, ``dppo_tv``, ``dppo_kl``, ``clip_cov``, ``kl_cov``, ``bypass_mode``. Each side is called
as verl's actor calls it, with one actor config (clip ratios 0.2 / 0.28, ``clip_ratio_c`` 3, dro's
β = 0.5, clip_cov's and kl_cov's selection options; bypass_mode: ``reinforce`` with token
importance weights truncated at 2 and the ``seq_mean_k3`` / ``token_k1`` rejection options) and
token-mean:

* ``rlkern`` — the registered ``rlkern_<name>`` function on the run's backend
  (:func:`rlkern.integrations.verl.policy_loss_function`): the fused loss; clip_cov /
  kl_cov first select their tokens (``cov_selection``: a few torch reductions, the selection);
  bypass_mode first computes its weights and rejection mask (``rlkern.rollout_correction``);
* ``verl <name>`` — verl's ``compute_policy_loss_<name>`` (eager torch + ``agg_loss``).

clip_cov draws its tokens from the global generator: each call seeds it identically, so both
sides select the same tokens. The floor reads the inputs once and writes the gradient once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Outputs, Size, Tolerance, register
from rlkern.bench.kit import VERL_CORE, RlkernBackend, traffic_floor, verl_peer_case

LOSSES = ("dro", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "bypass_mode")
SEED = 0  # the global generator's seed before each call (clip_cov's torch.randperm)


class LossInputs(NamedTuple):
    logp: Tensor  # (B, T) float32
    old: Tensor  # (B, T) float32
    adv: Tensor  # (B, T) float32, broadcast per response and masked (verl's layout)
    mask: Tensor  # (B, T) bool


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> LossInputs:
    """float32 whatever ``dtype`` (verl's actor keeps log-probs in float32)."""
    b, t = size["B"], size["T"]
    gen = torch.Generator().manual_seed(b * 131 + t)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + torch.randn(b, t, generator=gen) * 0.3
    adv = (torch.randn(b, generator=gen)[:, None].expand(b, t) * mask).contiguous()
    return LossInputs(*(x.to(device) for x in (logp, old, adv, mask)))


class _Attrs(dict):
    """What verl's losses read of its ActorConfig: attributes, ``.get`` and a mapping
    ``global_batch_info`` (a plain dict with attribute access)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def actor_config() -> _Attrs:
    """The actor config both sides get."""
    bypass = _Attrs(loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0,
                    rollout_rs="seq_mean_k3,token_k1", rollout_rs_threshold="0.05,0.5_2.0")
    policy = _Attrs(dro_beta=0.5, clip_cov_ratio=0.02, clip_cov_lb=1.0, clip_cov_ub=5.0,
                    kl_cov_ratio=0.02, ppo_kl_coef=1.0, rollout_correction=bypass)
    return _Attrs(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  policy_loss=policy, global_batch_info={})


#: verl's core_algos (shared by the verl cases).
VERL = VERL_CORE


def _loss_and_grad(fn: Callable[..., Any], inp: LossInputs) -> Outputs:
    x = inp.logp.detach().clone().requires_grad_()
    torch.manual_seed(SEED)
    loss, _metrics = fn(inp.old, x, inp.adv, inp.mask, loss_agg_mode="token-mean",
                        config=actor_config())
    (grad,) = torch.autograd.grad(loss, x)
    return {"loss": loss.detach(), "grad": grad}


def _verl(name: str) -> Callable[[LossInputs], Outputs]:
    def call(inp: LossInputs) -> Outputs:
        return _loss_and_grad(VERL.get().get_policy_loss_fn(name), inp)

    return call


def _rlkern(name: str, backend: str) -> Callable[[LossInputs], Outputs]:
    from rlkern.integrations.verl import policy_loss_function

    fn = policy_loss_function(name, backend)

    def call(inp: LossInputs) -> Outputs:
        return _loss_and_grad(fn, inp)

    return call


@register("verl_losses")
def verl_losses_case(options: CaseOptions) -> Case:
    backend = RlkernBackend.choose(options)

    return verl_peer_case(
        name="verl_losses", backend=backend, rlkern=lambda mode: _rlkern(mode, backend.name),
        verl=_verl, floor=traffic_floor(("logp", "old", "adv", "mask"), ("logp",)),
        floor_note="one read of logp, old, adv, mask; one (B, T) write",
        sizes=[Size({"B": 256, "T": 1024}), Size({"B": 512, "T": 4096})],
        quick_sizes=[Size({"B": 32, "T": 256})],
        modes=LOSSES,
        make_inputs=make_inputs,
        tolerances={"loss": Tolerance(atol=1e-5, rtol=1e-4),
                    "grad": Tolerance(rtol=1e-4, scale_by_max=True)},
        notes=("issue 16: each fused policy loss against verl's own function (forward + "
               "∂loss/∂log_prob, token-mean)",
               "rlkern = the rlkern_<name> functions verl's registry hands out (clip_cov / "
               "kl_cov: their token selection included)", *backend.notes),
    )
