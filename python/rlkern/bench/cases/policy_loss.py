"""Benchmark case ``policy_loss``: the PPO clipped surrogate (verl's ``vanilla``: ε = 0.2, dual
clip c = 3, token-mean) on ``B`` sequences of ``T`` tokens, float32.

Modes:

* ``fwd`` — the loss (what an evaluation step computes);
* ``fwd+bwd`` — the loss and ∂loss/∂logprobs (the policy update; the issue's target);
* ``fwd+bwd+kl`` — the same with verl's KL loss added, as verl's actor adds it with
  ``use_kl_loss``: ``kl_loss_coef = 0.001`` × token-mean of ``kl_penalty(logp, ref,
  "low_var_kl")`` (k3 with ``|ref − logp|`` clamped to 20 and the value to ±10), on reference
  log-probs ``ref`` (not OpenRLHF's ``PolicyLoss``, which has no KL term).

Implementations, each called the way its trainer calls it:

* ``rlkern`` — ``rlkern.policy_loss(logp, old, adv, mask, config=PolicyLossConfig.verl())``.
* ``verl`` — verl's own ``compute_policy_loss_vanilla`` (with its ``agg_loss``), imported from
  verl when installed (optional): eager torch, with its ``.item()`` metrics, on advantages
  broadcast to ``(B, T)`` as verl's actor passes them.
* ``verl formula (eager)`` — the same formula restated (always available), with verl's three
  metrics as tensors.
* ``rlkern (OpenRLHF PolicyLoss)`` — :class:`rlkern.integrations.openrlhf.PolicyLoss` with the
  same clip ratios and dual clip, called as OpenRLHF's actor calls its loss (the same math; its
  five returns, ``ppo_kl`` computed beside the fused op): the cost of the drop-in.
* ``openrlhf`` — OpenRLHF's own ``PolicyLoss`` (``openrlhf.models.loss``), when OpenRLHF is
  installed (optional; it imports DeepSpeed).
* ``torch.compile`` — that formula compiled per shape (``dynamic=False``), forward and backward.
  (rlkern computes those metrics and more in the same pass.)
* ``floor`` — the least memory traffic any implementation needs: one read of the inputs
  (``fwd``), plus one write of a gradient-sized buffer (``fwd+bwd``), plus one read of ``ref``
  (``fwd+bwd+kl``).

Inputs are float32 whatever ``--dtype`` says (log-probabilities leave the logprobs op in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.kit import (
    Peer,
    RlkernBackend,
    compiled_on_first_call,
    fresh_leaf,
    traffic_floor,
)

T_SEQ = 1024
FULL_SIZES = [Size({"B": b, "T": T_SEQ}) for b in (256, 1024, 4096)]  # 4096 × 1024 = 4M tokens
QUICK_SIZES = [Size({"B": 64, "T": T_SEQ}), Size({"B": 512, "T": T_SEQ})]
TARGETS = ("targets (issue 5): fwd+bwd on 4M tokens (B=4096, T=1024, fp32): rlkern >= 4x "
           "'verl' (eager vanilla + agg_loss) and >= 1.5x 'torch.compile' of the same formula",)
CLIP, CLIP_C = 0.2, 3.0
KL_COEF, KL_TYPE = 0.001, "low_var_kl"  # verl's defaults for use_kl_loss
MODES = ("fwd", "fwd+bwd", "fwd+bwd+kl")


class PolicyLossInputs(NamedTuple):
    logprobs: Tensor  # (B, T) fp32
    old_logprobs: Tensor  # (B, T) fp32
    advantages: Tensor  # (B,) fp32
    advantages_bt: Tensor  # (B, T) broadcast view (verl's layout)
    mask: Tensor  # (B, T) bool
    ref_logprobs: Tensor  # (B, T) fp32 (the KL mode's reference policy)


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> PolicyLossInputs:
    """Log-probs in [−3, 0], old = logp + N(0, 0.1²) (a few percent of tokens clipped), GRPO
    advantages, responses of random length (about 3/4 of the positions valid), ref = logp +
    N(0, 0.05²) (drawn last, so the other inputs are those of the modes without a KL term)."""
    b, t = size["B"], size["T"]
    gen = torch.Generator(device="cpu").manual_seed(b * 7919 + t)
    lp = -torch.rand(b, t, generator=gen) * 3
    old = lp + torch.randn(b, t, generator=gen) * 0.1
    adv = torch.randn(b, generator=gen)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ref = lp + torch.randn(b, t, generator=gen) * 0.05
    to = lambda x: x.to(device)
    return PolicyLossInputs(to(lp), to(old), to(adv), to(adv)[:, None].expand(b, t), to(mask),
                            to(ref))


def vanilla_formula(old: Tensor, logp: Tensor, adv: Tensor, mask: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """verl's ``compute_policy_loss_vanilla`` + ``agg_loss(token-mean)`` restated in torch:
    the loss and verl's three metrics (pg_clipfrac, ppo_kl, pg_clipfrac_lower), as tensors
    (verl's ``.item()`` calls would break a compiled graph)."""
    m = mask.to(logp.dtype)
    n = m.sum()
    masked_mean = lambda x: (x * m).sum() / n
    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * CLIP_C
    dual = torch.min(loss3, clipped)
    per_token = torch.where(adv < 0, dual, clipped)
    clipfrac = masked_mean(torch.gt(loss2, loss1).to(m.dtype))
    ppo_kl = masked_mean(-neg_kl)
    clipfrac_lower = masked_mean((torch.gt(clipped, loss3) & (adv < 0)).to(m.dtype))
    return masked_mean(per_token), clipfrac, ppo_kl, clipfrac_lower


def kl_formula(logp: Tensor, ref: Tensor, mask: Tensor) -> Tensor:
    """verl's ``kl_penalty(logp, ref, "low_var_kl")`` + ``agg_loss(token-mean)`` in torch (the
    per-token k3 from :func:`rlkern.reference.policy_loss.kl_penalty_reference`, whose default
    clamps are low_var_kl's), times ``KL_COEF``: what verl's actor adds to the policy loss with
    ``use_kl_loss``."""
    from rlkern.reference.policy_loss import kl_penalty_reference

    m = mask.to(logp.dtype)
    return KL_COEF * (kl_penalty_reference(logp, ref, "k3") * m).sum() / m.sum()


Loss = Callable[[Tensor, PolicyLossInputs], Tensor]


def _in_mode(loss_fn: Loss, mode: str) -> Callable[[PolicyLossInputs], Outputs]:
    if mode == "fwd":
        def fwd(inp: PolicyLossInputs) -> Outputs:
            with torch.no_grad():
                return {"loss": loss_fn(inp.logprobs, inp).detach()}

        return fwd

    def fwd_bwd(inp: PolicyLossInputs) -> Outputs:
        logp = fresh_leaf(inp.logprobs)
        loss = loss_fn(logp, inp)
        (grad,) = torch.autograd.grad(loss, logp)
        return {"loss": loss.detach(), "grad": grad}

    return fwd_bwd


def _rlkern_loss(backend: str, kl: bool = False) -> Loss:
    from rlkern import PolicyLossConfig, policy_loss

    cfg = PolicyLossConfig.verl(policy_loss="vanilla", clip_ratio=CLIP, clip_ratio_c=CLIP_C,
                                use_kl_loss=kl, kl_loss_coef=KL_COEF, kl_loss_type=KL_TYPE)

    def loss(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
        return policy_loss(logp, inp.old_logprobs, inp.advantages, inp.mask, config=cfg,
                           ref_logprobs=inp.ref_logprobs if kl else None, backend=backend).loss

    return loss


def _verl_vanilla() -> tuple[Callable[..., Any], Any]:
    from verl.trainer.ppo import core_algos
    from verl.workers.config.actor import FSDPActorConfig

    cfg = FSDPActorConfig(strategy="fsdp", clip_ratio=CLIP, clip_ratio_c=CLIP_C,
                          ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False, rollout_n=8)
    return core_algos.compute_policy_loss_vanilla, cfg


#: verl's vanilla loss and an actor config with this case's clip ratios.
VERL = Peer("verl", _verl_vanilla,
            hint="optional: pip install -e '.[parity]' && pip install --no-deps verl; "
            "'verl formula (eager)' is the same computation")


def _verl_loss(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
    fn, cfg = VERL.get()
    pg_loss, _ = fn(inp.old_logprobs, logp, inp.advantages_bt, inp.mask,
                    loss_agg_mode="token-mean", config=cfg)
    return pg_loss


def _verl_loss_kl(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
    """verl's actor loss with ``use_kl_loss`` (``verl.workers.utils.losses.ppo_loss``): the
    policy loss plus ``kl_loss_coef`` × ``agg_loss(kl_penalty(...))``, verl's own functions."""
    from verl.trainer.ppo import core_algos

    kld = core_algos.kl_penalty(logprob=logp, ref_logprob=inp.ref_logprobs, kl_penalty=KL_TYPE)
    kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=inp.mask, loss_agg_mode="token-mean")
    return _verl_loss(logp, inp) + kl_loss * KL_COEF


def _openrlhf_policy_loss() -> type:
    from openrlhf.models.loss import PolicyLoss

    return PolicyLoss


#: OpenRLHF's own PolicyLoss class.
OPENRLHF = Peer("openrlhf", _openrlhf_policy_loss,
                hint="optional: pip install openrlhf (with DeepSpeed); 'rlkern (OpenRLHF "
                "PolicyLoss)' is the drop-in")


def _openrlhf_style(cls_of: Callable[[], type]) -> Loss:
    """A loss called the way OpenRLHF's actor calls its ``PolicyLoss``: built once, then
    ``loss_fn(log_probs, old_log_probs, advantages, action_mask=...)[0]``."""
    built: list[Any] = []

    def loss(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
        if not built:
            built.append(cls_of()(clip_eps_low=CLIP, clip_eps_high=CLIP, dual_clip=CLIP_C))
        return built[0](logp, inp.old_logprobs, inp.advantages_bt, action_mask=inp.mask)[0]

    return loss


def _rlkern_openrlhf_class() -> type:
    from rlkern.integrations.openrlhf import PolicyLoss

    return PolicyLoss


def _eager_loss(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
    return vanilla_formula(inp.old_logprobs, logp, inp.advantages_bt, inp.mask)[0]


def _eager_loss_kl(logp: Tensor, inp: PolicyLossInputs) -> Tensor:
    return _eager_loss(logp, inp) + kl_formula(logp, inp.ref_logprobs, inp.mask)


def _vanilla_with_kl(old: Tensor, logp: Tensor, adv: Tensor, mask: Tensor, ref: Tensor
                     ) -> Tensor:
    return vanilla_formula(old, logp, adv, mask)[0] + kl_formula(logp, ref, mask)


def _compiled_loss() -> Loss:
    compiled = compiled_on_first_call(vanilla_formula)
    return lambda logp, inp: compiled(inp.old_logprobs, logp, inp.advantages_bt, inp.mask)[0]


def _compiled_loss_kl() -> Loss:
    compiled = compiled_on_first_call(_vanilla_with_kl)
    return lambda logp, inp: compiled(inp.old_logprobs, logp, inp.advantages_bt, inp.mask,
                                      inp.ref_logprobs)


FLOOR_NOTES = {
    "fwd": "floor (fwd): one read of logprobs, old_logprobs and the mask (integer amax)",
    "fwd+bwd": "floor (fwd+bwd): the fwd floor plus one write of a (B, T) fp32 buffer (the "
    "gradient)",
    "fwd+bwd+kl": "floor (fwd+bwd+kl): the fwd+bwd floor plus one read of ref_logprobs",
}

#: Why OpenRLHF's PolicyLoss sits out the KL mode.
NO_KL_TERM = "OpenRLHF's PolicyLoss has no KL term (its actor adds the KL loss apart)"


def _floor(mode: str) -> Callable[[PolicyLossInputs], Outputs]:
    # the backward modes also write a (B, T) fp32 buffer shaped like old_logprobs: the
    # gradient's traffic
    reads = ("logprobs", "old_logprobs", "mask")
    if mode == "fwd+bwd+kl":
        reads = (*reads, "ref_logprobs")
    return traffic_floor(reads, ("old_logprobs",) if mode != "fwd" else ())


@register("policy_loss")
def policy_loss_case(options: CaseOptions) -> Case:
    """The ``policy_loss`` case for ``options`` (device, rlkern backend; inputs are fp32)."""
    backend = RlkernBackend.choose(options)
    rlkern_loss, rlkern_loss_kl = _rlkern_loss(backend.name), _rlkern_loss(backend.name, kl=True)
    compiled = _compiled_loss()  # one Dynamo cache for fwd and fwd+bwd
    compiled_kl = _compiled_loss_kl()

    def implementations(mode: str) -> list[Impl]:
        kl = mode == "fwd+bwd+kl"
        verl_note = "core_algos.compute_policy_loss_vanilla + agg_loss"
        return [
            Impl.rlkern(_in_mode(rlkern_loss_kl if kl else rlkern_loss, mode), note=backend.note),
            Impl("verl", _in_mode(_verl_loss_kl if kl else _verl_loss, mode), skip=VERL.missing(),
                 note=verl_note + (" + kl_loss_coef · agg_loss(kl_penalty)" if kl else "")),
            Impl("verl formula (eager)", _in_mode(_eager_loss_kl if kl else _eager_loss, mode)),
            Impl("rlkern (OpenRLHF PolicyLoss)",
                 _in_mode(_openrlhf_style(_rlkern_openrlhf_class), mode),
                 skip=NO_KL_TERM if kl else None),
            Impl("openrlhf", _in_mode(_openrlhf_style(OPENRLHF.get), mode),
                 skip=NO_KL_TERM if kl else OPENRLHF.missing(),
                 note="openrlhf.models.loss.PolicyLoss"),
            Impl("torch.compile", _in_mode(compiled_kl if kl else compiled, mode), warmup=2),
            Impl.floor(_floor(mode), note=FLOOR_NOTES[mode]),
        ]

    return Case(
        name="policy_loss",
        sizes=FULL_SIZES,
        quick_sizes=QUICK_SIZES,
        modes=MODES,
        make_inputs=make_inputs,
        implementations=implementations,
        tolerances={
            "loss": Tolerance(atol=1e-6, rtol=1e-5),
            "grad": Tolerance(rtol=1e-5, scale_by_max=True),
        },
        notes=(*TARGETS, *FLOOR_NOTES.values(),
               "inputs are float32 (the dtype in the table title is the run's default, unused)",
               *backend.notes),
        warnings=backend.notes,
        environment=backend.environment,
    )
