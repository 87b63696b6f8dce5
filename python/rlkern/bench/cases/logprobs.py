"""Benchmark case ``logprobs``: per-token log-probabilities + entropy of a (N, V) logits tensor.

Modes:

* ``fwd`` — logprobs and entropy (what a trainer computes for the old/reference policy).
* ``fwd+bwd`` — the same plus the gradient of ``logprobs.sum() + entropy.sum()`` wrt the
  logits (the policy update).

Implementations, each called the way its trainer calls it:

* ``rlkern`` — ``rlkern.token_logprobs(logits, labels, return_entropy=True)``.
* ``trl`` — TRL's ``selective_log_softmax`` + ``entropy_from_logits``, imported from TRL, on a
  ``(B, L, V)`` view (TRL's GRPO trainer passes per-sequence logits; its bf16 path loops over
  the ``B`` sequences).
* ``rlkern (TRL drop-in)`` — :func:`rlkern.integrations.trl_functions.
  selective_log_softmax_and_entropy` called as TRL's pair is above (same view, TRL's result
  dtype: the logits' on CPU): the cost of using the drop-in in place of TRL's functions.
* ``verl (eager formula)`` — verl's ``logprobs_from_logits_v2`` and ``entropy_from_logits``
  restated here (verl is not a dependency) on the ``(N, V)`` tensor, the layout verl's actor
  uses with padding removed (its bf16 path loops over the ``N`` tokens).
* ``torch.compile`` — the textbook formula (fp32 log_softmax, gather, entropy) compiled per
  shape; compilation happens in the warm-up calls.
* ``floor`` — the least memory traffic any implementation needs (see :data:`FLOOR_NOTES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.kit import (
    Peer,
    RlkernBackend,
    compiled_on_first_call,
    fresh_leaf,
    peaked_logits,
    traffic_floor,
)

V_QWEN = 151936  # Qwen2/Qwen3 vocabulary: the largest common case, and the default here.

FULL_SIZES = [
    Size({"N": 1024, "V": 32000}),
    Size({"N": 1024, "V": 65536}),
    Size({"N": 1024, "V": V_QWEN}),
    Size({"N": 4096, "V": V_QWEN}),
]
QUICK_SIZES = [Size({"N": 256, "V": 32000}), Size({"N": 512, "V": V_QWEN})]

#: Tokens per sequence for TRL's (B, L, V) view of the N tokens (when L divides N).
TRL_SEQ_LEN = 512

FLOOR_NOTES = {
    "fwd": "floor (fwd): one read of the logits, `logits.view(int16).amax()`",
    "bwd": "floor (bwd): one read of the logits, `logits.view(int16).amax()` (the backward "
    "alone, from the saved per-row lse and entropy, against the read-once floor)",
    "fwd+bwd": "floor (fwd+bwd): one read of the logits and one write of a fresh buffer of "
    "the same size (`empty_like(logits).copy_(logits)`, the buffer advised as huge pages as "
    "rlkern's gradient is), the traffic of producing a gradient",
}


class LogprobsInputs(NamedTuple):
    """Contiguous ``logits`` (N, V) and ``labels`` (N,), plus the ``(B, L)`` split for TRL."""

    logits: Tensor
    labels: Tensor
    batch: int
    seq_len: int


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> LogprobsInputs:
    """Random logits (σ = 4, so the softmax is peaked as in a trained model) and labels."""
    n, v = size["N"], size["V"]
    logits, gen = peaked_logits(n, v, dtype, device, seed=n * 1_000_003 + v)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    seq_len = TRL_SEQ_LEN if n % TRL_SEQ_LEN == 0 else n
    return LogprobsInputs(logits, labels, n // seq_len, seq_len)


# ---------------------------------------------------------------------------------------------
# One call of an implementation, in each mode.

#: ``(logits, labels, inputs) -> (logprobs, entropy)``; logits may require grad.
Forward = Callable[[Tensor, Tensor, LogprobsInputs], tuple[Tensor, Tensor]]


def _in_mode(forward: Forward, mode: str) -> Callable[[LogprobsInputs], Outputs]:
    """Wrap a forward into one benchmark call for ``mode``."""
    if mode == "fwd":

        def fwd(inp: LogprobsInputs) -> Outputs:
            logprobs, entropy = forward(inp.logits, inp.labels, inp)
            return {"logprobs": logprobs, "entropy": entropy}

        return fwd

    def fwd_bwd(inp: LogprobsInputs) -> Outputs:
        logits = fresh_leaf(inp.logits)
        logprobs, entropy = forward(logits, inp.labels, inp)
        (grad,) = torch.autograd.grad(logprobs.sum() + entropy.sum(), logits)
        return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad": grad}

    return fwd_bwd


def _rlkern_forward(backend: str) -> Forward:
    from rlkern import token_logprobs

    def forward(logits: Tensor, labels: Tensor, inp: LogprobsInputs) -> tuple[Tensor, Tensor]:
        out = token_logprobs(
            logits, labels, return_entropy=True, inplace_backward=False, backend=backend
        )
        assert out.entropy is not None
        return out.logprobs, out.entropy

    return forward


def _trl_utils() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax, entropy_from_logits


#: TRL's functions (importing trl pulls in transformers: seconds, so on first use).
TRL = Peer("trl", _trl_utils, hint="pip install trl")


def _trl_forward(logits: Tensor, labels: Tensor, inp: LogprobsInputs) -> tuple[Tensor, Tensor]:
    selective_log_softmax, entropy_from_logits = TRL.get()
    b, seq, v = inp.batch, inp.seq_len, logits.shape[-1]
    per_seq = logits.view(b, seq, v)
    logprobs = selective_log_softmax(per_seq, labels.view(b, seq))
    entropy = entropy_from_logits(per_seq)
    return logprobs.reshape(-1), entropy.reshape(-1)


def _trl_drop_in_forward(logits: Tensor, labels: Tensor,
                         inp: LogprobsInputs) -> tuple[Tensor, Tensor]:
    from rlkern.integrations.trl_functions import selective_log_softmax_and_entropy

    b, seq, v = inp.batch, inp.seq_len, logits.shape[-1]
    logprobs, entropy = selective_log_softmax_and_entropy(logits.view(b, seq, v),
                                                          labels.view(b, seq))
    return logprobs.reshape(-1), entropy.reshape(-1)


# verl's eager formulas (verl/utils/torch_functional.py), restated: a row loop keeps the bf16
# path's peak memory at one row, the fp32 path subtracts a per-row logsumexp from the gathered
# logit, and the entropy is logsumexp − Σ softmax·logits over the whole tensor at once.


def verl_logprobs_from_logits_v2(logits: Tensor, labels: Tensor) -> Tensor:
    """verl's memory-saving logprobs: per-row logsumexp (fp32/fp64) or per-row log_softmax."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = []
    for row_logits, row_label in zip(logits, labels, strict=True):
        row_logprobs = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logprobs.gather(-1, row_label.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def verl_entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's entropy: ``logsumexp(x) − Σ softmax(x)·x``, in the logits' dtype."""
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _verl_forward(logits: Tensor, labels: Tensor, inp: LogprobsInputs) -> tuple[Tensor, Tensor]:
    return verl_logprobs_from_logits_v2(logits, labels), verl_entropy_from_logits(logits)


def naive_logprobs_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The textbook formula: fp32 log_softmax, gather, entropy = −Σ p·log p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logprobs, entropy


def _compiled_forward() -> Forward:
    compiled = compiled_on_first_call(naive_logprobs_entropy)
    return lambda logits, labels, inp: compiled(logits, labels)


def _rlkern_backward(backend: str, inplace: bool) -> Callable[[LogprobsInputs], Outputs]:
    """The backward op alone: d(logprobs.sum() + entropy.sum())/d logits from the saved per-row
    ``lse`` and ``entropy`` (computed once per input, untimed). ``inplace`` writes the gradient
    over a scratch copy of the logits (made once; the values it then holds are gradients, which
    is fine for timing: the op reads every logit whatever its value)."""
    from rlkern.backends import resolve_backend

    saved: dict[int, tuple[Tensor, ...]] = {}

    def backward(inp: LogprobsInputs) -> Outputs:
        key = id(inp)
        if key not in saved:
            from rlkern import token_logprobs

            out = token_logprobs(inp.logits, inp.labels, return_entropy=True, backend=backend)
            ones = torch.ones_like(out.lse)
            scratch = inp.logits.clone() if inplace else inp.logits
            saved.clear()
            saved[key] = (out.lse, out.entropy, ones, scratch)
        lse, entropy, ones, scratch = saved[key]
        args = (inp.labels, lse, entropy, ones, ones, None, 1.0, -100,
                resolve_backend(backend, inp.logits.device))
        if inplace:
            torch.ops.rlkern.logprobs_bwd_inplace(scratch, *args)
            return {"grad": scratch}
        return {"grad": torch.ops.rlkern.logprobs_bwd(inp.logits, *args)}

    return backward


def _floor(mode: str) -> Callable[[LogprobsInputs], Outputs]:
    # fwd / bwd: one read of the logits; fwd+bwd: a fresh buffer of their size written from
    # them (read once, written once)
    if mode == "fwd+bwd":
        return traffic_floor((), (), copies=("logits",))
    return traffic_floor(("logits",), ())


# ---------------------------------------------------------------------------------------------


@register("logprobs")
def logprobs_case(options: CaseOptions) -> Case:
    """The ``logprobs`` case for ``options`` (device, dtype, rlkern backend)."""
    backend = RlkernBackend.choose(options)
    rlkern_fwd = _rlkern_forward(backend.name)
    compiled_fwd = _compiled_forward()  # shared by both modes: one Dynamo cache

    def implementations(mode: str) -> list[Impl]:
        floor = Impl.floor(_floor(mode), note=FLOOR_NOTES[mode])
        if mode == "bwd":
            return [
                Impl.rlkern(_rlkern_backward(backend.name, inplace=False)),
                Impl("rlkern (inplace_backward)", _rlkern_backward(backend.name, inplace=True)),
                floor,
            ]
        return [
            Impl.rlkern(_in_mode(rlkern_fwd, mode), note=backend.note),
            Impl("trl", _in_mode(_trl_forward, mode), skip=TRL.missing()),
            Impl("rlkern (TRL drop-in)", _in_mode(_trl_drop_in_forward, mode)),
            Impl("verl (eager formula)", _in_mode(_verl_forward, mode)),
            Impl("torch.compile", _in_mode(compiled_fwd, mode), warmup=2),
            floor,
        ]

    # Precision level: 1e-2 for bf16 inputs; the bf16 peers round their outputs (and some
    # intermediates, e.g. verl's bf16 logsumexp in the entropy) to bf16, 2^-8 relative, hence
    # an rtol too. Identity gate: a tenth of the largest reference value (see Tolerance).
    bf16_tol, gate = 1e-2, 0.1
    return Case(
        name="logprobs",
        sizes=FULL_SIZES,
        quick_sizes=QUICK_SIZES,
        modes=("fwd", "fwd+bwd", "bwd"),
        make_inputs=make_inputs,
        implementations=implementations,
        tolerances={
            "logprobs": Tolerance(atol=bf16_tol, rtol=bf16_tol, gate=gate),
            "entropy": Tolerance(atol=bf16_tol, rtol=bf16_tol, gate=gate),
            "grad": Tolerance(rtol=bf16_tol, scale_by_max=True, gate=gate),
        },
        notes=(
            *backend.notes,
            *FLOOR_NOTES.values(),
            f"trl and rlkern (TRL drop-in) get a (B, L, V) view with L = {TRL_SEQ_LEN} where it "
            "divides N; verl (padding removed) and the others get (N, V)",
            "rlkern (TRL drop-in) returns TRL's bits on 16-bit CPU logits: its entropy, rounded "
            "term by term as TRL's, can fail the check against the float32 reference as TRL's "
            "does",
        ),
        warnings=backend.notes,
        environment=backend.environment,
    )
