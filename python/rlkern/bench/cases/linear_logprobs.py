"""Benchmark case ``linear_logprobs``: logprobs + entropy from hidden states and the LM head.

Modes:

* ``fwd`` — under ``torch.no_grad()`` (old / reference policy logprobs).
* ``fwd+bwd`` — the gradient of ``logprobs.sum() + entropy.sum()`` wrt ``hidden`` and
  ``weight`` (the policy update).

Implementations:

* ``rlkern`` — ``rlkern.linear_logprobs`` (autograd; the backward recomputes each tile: four
  matmuls in fwd+bwd).
* ``rlkern (with_grad)`` — ``rlkern.linear_logprobs_with_grad`` with the upstream gradient given
  up front (three matmuls; what a fused loss uses). fwd+bwd only.
* ``eager`` — the logits materialised as TRL and verl do (``F.linear`` in bf16, then an fp32
  ``log_softmax``, a gather and the entropy), autograd through it.
* ``floor`` — the bare matmuls of the same shapes: ``h Wᵀ`` (fwd); ``h Wᵀ``, ``X W`` and
  ``Xᵀ h`` (fwd+bwd), in the inputs' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkern.bench.cases import (
    Case,
    CaseOptions,
    Impl,
    ImplUnavailableError,
    Outputs,
    Size,
    Tolerance,
    register,
)
from rlkern.bench.kit import RlkernBackend, fresh_leaf

V_QWEN = 151936

#: The issue's target shape first, then scaling in N and in V at a smaller H (a 2-core CPU does
#: ~0.15 TFLOP/s in bf16; H = 2048 at N = 16k would take minutes per call).
FULL_SIZES = [
    Size({"N": 2048, "H": 2048, "V": V_QWEN}),
    Size({"N": 1024, "H": 512, "V": V_QWEN}),
    Size({"N": 4096, "H": 512, "V": V_QWEN}),
    Size({"N": 16384, "H": 512, "V": V_QWEN}),
    Size({"N": 4096, "H": 512, "V": 32000}),
    Size({"N": 4096, "H": 512, "V": 65536}),
    Size({"N": 4096, "H": 512, "V": 262144}),
]
#: Small enough that ``rlkern bench --quick`` stays a few minutes on 2 cores (N = H = 1024 at
#: V_QWEN took ~3 of them alone); the Qwen vocabulary is kept.
QUICK_SIZES = [Size({"N": 512, "H": 512, "V": 32000}), Size({"N": 256, "H": 512, "V": V_QWEN})]

#: Above this many logits the eager peer is not run (its fp32 copies need ~12 bytes a logit).
EAGER_MAX_LOGITS = 800_000_000

FLOOR_NOTES = {
    "fwd": "floor (fwd): the bare matmul `h @ W.T` of the same shape",
    "fwd+bwd": "floor (fwd+bwd): the three bare matmuls `X = h @ W.T`, `X @ W`, `X.T @ h`",
}


class LinearInputs(NamedTuple):
    hidden: Tensor
    weight: Tensor
    labels: Tensor


def hidden_and_head(lead: tuple[int, ...], h: int, v: int, dtype: torch.dtype,
                    gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Hidden states ``(*lead, h)`` of unit scale and an LM head ``(v, h)`` scaled like a
    trained one (logit σ ≈ 2), drawn on the CPU from ``gen``, in ``dtype``."""
    hidden = torch.randn(*lead, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * (2.0 / h**0.5)).to(dtype)
    return hidden, weight


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> LinearInputs:
    """Hidden states of unit scale and a weight scaled like a trained LM head (logit σ ≈ 2)."""
    n, h, v = size["N"], size["H"], size["V"]
    gen = torch.Generator(device="cpu").manual_seed(n * 7919 + h * 31 + v)
    hidden, weight = hidden_and_head((n,), h, v, dtype, gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    return LinearInputs(hidden.to(device), weight.to(device), labels.to(device))


def _outputs(logprobs: Tensor, entropy: Tensor, grads: tuple[Tensor, Tensor] | None) -> Outputs:
    out = {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
    if grads is not None:
        out["grad_hidden"], out["grad_weight"] = grads
    return out


def _rlkern(mode: str, backend: str):
    from rlkern import linear_logprobs

    def fwd(inp: LinearInputs) -> Outputs:
        with torch.no_grad():
            out = linear_logprobs(inp.hidden, inp.weight, inp.labels, return_entropy=True,
                                  backend=backend)
        return _outputs(out.logprobs, out.entropy, None)

    def fwd_bwd(inp: LinearInputs) -> Outputs:
        h, w = fresh_leaf(inp.hidden), fresh_leaf(inp.weight)
        out = linear_logprobs(h, w, inp.labels, return_entropy=True, backend=backend)
        grads = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (h, w))
        return _outputs(out.logprobs, out.entropy, grads)

    return fwd if mode == "fwd" else fwd_bwd


def _rlkern_with_grad(backend: str):
    from rlkern import linear_logprobs_with_grad

    def fwd_bwd(inp: LinearInputs) -> Outputs:
        ones = torch.ones(inp.labels.shape, dtype=torch.float32, device=inp.labels.device)
        res = linear_logprobs_with_grad(inp.hidden, inp.weight, inp.labels, grad_logprobs=ones,
                                        grad_entropy=ones, return_entropy=True, backend=backend)
        return _outputs(res.outputs.logprobs, res.outputs.entropy,
                        (res.grad_hidden, res.grad_weight))

    return fwd_bwd


def eager_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor):
    """What a trainer writes: bf16 logits from the LM head, fp32 log-softmax, gather, entropy."""
    logits = F.linear(hidden, weight)
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logprobs, entropy


def check_eager_fits(tokens: int, vocab: int) -> None:
    """:class:`ImplUnavailableError` when an eager peer's ``tokens × vocab`` logits (and their
    fp32 copies) would not fit in memory."""
    logits = tokens * vocab
    if logits > EAGER_MAX_LOGITS:
        raise ImplUnavailableError(
            f"eager needs ~12 bytes per logit ({logits * 12 / 2**30:.0f} GiB here): not run "
            "on this 24 GiB machine")


def _eager(mode: str):
    def fwd(inp: LinearInputs) -> Outputs:
        check_eager_fits(*inp.labels.shape, inp.weight.shape[0])
        with torch.no_grad():
            return _outputs(*eager_logprobs_entropy(*inp), None)

    def fwd_bwd(inp: LinearInputs) -> Outputs:
        check_eager_fits(*inp.labels.shape, inp.weight.shape[0])
        h, w = fresh_leaf(inp.hidden), fresh_leaf(inp.weight)
        logprobs, entropy = eager_logprobs_entropy(h, w, inp.labels)
        grads = torch.autograd.grad(logprobs.sum() + entropy.sum(), (h, w))
        return _outputs(logprobs, entropy, grads)

    return fwd if mode == "fwd" else fwd_bwd


def _floor(mode: str):
    def fwd(inp: LinearInputs) -> Outputs:
        inp.hidden @ inp.weight.T
        return {}

    def fwd_bwd(inp: LinearInputs) -> Outputs:
        x = inp.hidden @ inp.weight.T
        x @ inp.weight
        x.T @ inp.hidden
        return {}

    return fwd if mode == "fwd" else fwd_bwd


def row_and_grad_tolerances(row: Tolerance, grad_rtol: float) -> dict[str, Tolerance]:
    """Tolerances of the outputs of a logprobs-from-hidden-states case: ``row`` for the
    per-token log-probs and entropy, ``grad_rtol`` (of the largest entry) for both gradients."""
    grad = Tolerance(rtol=grad_rtol, scale_by_max=True)
    return {"logprobs": row, "entropy": row, "grad_hidden": grad, "grad_weight": grad}


@register("linear_logprobs")
def linear_logprobs_case(options: CaseOptions) -> Case:
    """The ``linear_logprobs`` case for ``options`` (device, dtype, rlkern backend)."""
    backend = RlkernBackend.choose(options)

    def implementations(mode: str) -> list[Impl]:
        impls = [Impl.rlkern(_rlkern(mode, backend.name), note=backend.note)]
        if mode == "fwd+bwd":
            impls.append(Impl("rlkern (with_grad)", _rlkern_with_grad(backend.name)))
        impls += [Impl("eager", _eager(mode)), Impl.floor(_floor(mode), note=FLOOR_NOTES[mode])]
        return impls

    # Both sides round the logits to bf16 identically; gradients differ by the float32
    # accumulation of per-tile bf16 products (rlkern) vs one bf16 matmul (eager).
    tol = 1e-2
    return Case(
        name="linear_logprobs",
        sizes=FULL_SIZES,
        quick_sizes=QUICK_SIZES,
        modes=("fwd", "fwd+bwd"),
        make_inputs=make_inputs,
        implementations=implementations,
        tolerances=row_and_grad_tolerances(Tolerance(atol=1e-4, rtol=1e-4), tol),
        notes=(*backend.notes, *FLOOR_NOTES.values()),
        warnings=backend.notes,
        environment=backend.environment,
    )
