"""Benchmark case ``linear_grpo_loss``: hidden states + LM head → GRPO loss → gradients.

One mode, ``fwd+bwd`` (a policy update: the loss and its gradients wrt ``hidden`` and
``weight``), with TRL's ``dapo`` loss, β = 0.04 against reference logprobs, and old logprobs
near the current ones (some ratios clipped).

Implementations:

* ``rlkern`` — ``rlkern.linear_grpo_loss`` (one chunked pass, three matmuls).
* ``liger`` / ``liger (compiled)`` — Liger-Kernel's ``LigerFusedLinearGRPOLoss`` with
  ``compiled=False`` / ``True`` (its default), ``chunk_size=1``: the torch implementation that
  runs on CPU (its Triton ops need a GPU).
* ``eager`` — the logits materialised as TRL writes it (``F.linear`` in bf16, fp32
  log-softmax and gather, the clipped loss, autograd through all of it).
* ``floor`` — the three bare matmuls of the same shapes (``h Wᵀ``, ``X W``, ``Xᵀ h``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.cases.linear_logprobs import V_QWEN, check_eager_fits, hidden_and_head
from rlkern.bench.kit import Peer, RlkernBackend, fresh_leaf

BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.28

FULL_SIZES = [Size({"B": 8, "T": 256, "H": 2048, "V": V_QWEN})]
QUICK_SIZES = [Size({"B": 4, "T": 128, "H": 512, "V": 32000})]

FLOOR_NOTE = "floor: the three bare matmuls `X = h @ W.T`, `X @ W`, `X.T @ h`"


class LossInputs(NamedTuple):
    hidden: Tensor  # (B, T, H)
    weight: Tensor  # (V, H)
    labels: Tensor  # (B, T)
    mask: Tensor  # (B, T) int64, as TRL passes it
    advantages: Tensor  # (B,)
    old_logprobs: Tensor  # (B, T)
    ref_logprobs: Tensor  # (B, T)


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> LossInputs:
    """Unit-scale hidden states, an LM head scaled like a trained one (logit σ ≈ 2), responses
    of random lengths, and old / reference logprobs within ~0.2 of the current ones."""
    b, t, h, v = size["B"], size["T"], size["H"], size["V"]
    gen = torch.Generator(device="cpu").manual_seed(b * 7919 + t * 31 + h + v)
    hidden, weight = hidden_and_head((b, t), h, v, dtype, gen)
    labels = torch.randint(0, v, (b, t), generator=gen)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    advantages = torch.randn(b, generator=gen)
    from rlkern import linear_logprobs

    with torch.no_grad():
        logprobs = linear_logprobs(hidden, weight, labels).logprobs
    old = logprobs + torch.randn(b, t, generator=gen) * 0.2
    ref = logprobs + torch.randn(b, t, generator=gen) * 0.2
    to = lambda x: x.to(device)
    return LossInputs(*map(to, (hidden, weight, labels, mask, advantages, old, ref)))


def _grads(loss: Tensor, h: Tensor, w: Tensor) -> Outputs:
    loss.backward()
    return {"loss": loss.detach().float().reshape(1), "grad_hidden": h.grad,
            "grad_weight": w.grad}


def _leaves(inp: LossInputs) -> tuple[Tensor, Tensor]:
    return fresh_leaf(inp.hidden), fresh_leaf(inp.weight)


def _rlkern(backend: str):
    import rlkern

    config = rlkern.PolicyLossConfig.trl("dapo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                                         beta=BETA, use_bias_correction_kl=False)

    def fwd_bwd(inp: LossInputs) -> Outputs:
        h, w = _leaves(inp)
        out = rlkern.linear_grpo_loss(h, w, inp.labels, inp.mask, inp.advantages,
                                      old_logprobs=inp.old_logprobs,
                                      ref_logprobs=inp.ref_logprobs, config=config,
                                      backend=backend)
        return _grads(out.loss, h, w)

    return fwd_bwd


def _liger_loss_class() -> Any:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss


#: Liger-Kernel's fused linear GRPO loss module class.
LIGER = Peer("liger_kernel", _liger_loss_class, hint="pip install liger-kernel")


def _liger(compiled: bool) -> Impl:
    module = None

    def fwd_bwd(inp: LossInputs) -> Outputs:
        nonlocal module
        if module is None:
            module = LIGER.get()(beta=BETA, compiled=compiled, chunk_size=1, epsilon_low=EPS_LOW,
                                 epsilon_high=EPS_HIGH, loss_type="dapo")
        h, w = _leaves(inp)
        loss, _ = module(h, w, inp.labels, inp.mask, inp.advantages,
                         ref_per_token_logps=inp.ref_logprobs,
                         old_per_token_logps=inp.old_logprobs)
        return _grads(loss, h, w)

    # Compiled: a second warm-up call runs the compiled code once before the timing.
    name = "liger (compiled)" if compiled else "liger"
    return Impl(name, fwd_bwd, warmup=2 if compiled else 1, skip=LIGER.missing())


def eager_dapo_loss(inp: LossInputs, h: Tensor, w: Tensor) -> Tensor:
    """TRL's GRPOTrainer loss written out on materialised logits (dapo, β > 0)."""
    logits = F.linear(h, w)
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp.gather(-1, inp.labels.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logprobs - inp.old_logprobs)
    adv = inp.advantages.unsqueeze(1)
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    diff = inp.ref_logprobs - logprobs
    kl = torch.exp(diff) - diff - 1
    mask = inp.mask.float()
    return ((pg + BETA * kl) * mask).sum() / mask.sum().clamp(min=1.0)


def _eager(inp: LossInputs) -> Outputs:
    check_eager_fits(inp.labels.numel(), inp.weight.shape[0])
    h, w = _leaves(inp)
    return _grads(eager_dapo_loss(inp, h, w), h, w)


def _floor(inp: LossInputs) -> Outputs:
    h = inp.hidden.reshape(-1, inp.hidden.shape[-1])
    x = h @ inp.weight.T
    x @ inp.weight
    x.T @ h
    return {}


@register("linear_grpo_loss")
def linear_grpo_loss_case(options: CaseOptions) -> Case:
    """The ``linear_grpo_loss`` case for ``options`` (device, dtype, rlkern backend)."""
    backend = RlkernBackend.choose(options)

    def implementations(mode: str) -> list[Impl]:
        return [
            Impl.rlkern(_rlkern(backend.name), note=backend.note),
            _liger(compiled=False),
            _liger(compiled=True),
            Impl("eager", _eager),
            Impl.floor(_floor, note=FLOOR_NOTE),
        ]

    # Everyone rounds the logits to bf16 the same way; the loss is a mean of fp32 terms, the
    # gradients differ by bf16 accumulation order.
    return Case(
        name="linear_grpo_loss",
        sizes=FULL_SIZES,
        quick_sizes=QUICK_SIZES,
        modes=("fwd+bwd",),
        make_inputs=make_inputs,
        implementations=implementations,
        tolerances={
            "loss": Tolerance(atol=1e-4, rtol=1e-3),
            "grad_hidden": Tolerance(rtol=1e-2, scale_by_max=True),
            "grad_weight": Tolerance(rtol=1e-2, scale_by_max=True),
        },
        notes=(*backend.notes, FLOOR_NOTE, "loss: TRL dapo, beta=0.04, epsilon 0.2 / 0.28, "
               "chunk_size=1 for Liger (its default)"),
        warnings=backend.notes,
        environment=backend.environment,
    )
