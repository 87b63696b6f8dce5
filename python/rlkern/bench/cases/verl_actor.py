"""Benchmark case ``verl_actor``: verl's per-token log-probs and entropy of the actor, from the
last hidden states and the LM head (what ``use_fused_kernels`` changes).

Modes: ``fwd`` (old log-probs, under ``torch.no_grad()``) and ``fwd+bwd`` (the policy update:
the gradient of ``log_probs.sum() + entropy.sum()`` wrt the hidden states and the weight).

Implementations (verl's own functions; skipped with the install hint when verl is absent):

* ``rlkern`` — :func:`rlkern.integrations.verl_fused.fused_linear_for_ppo`, what verl's fused
  path runs after ``patch_fused_kernels()`` (tile by tile, no logits tensor).
* ``verl fused (torch)`` — verl's ``FusedLinearForPPO`` (``impl_backend=torch``): chunks of 512
  tokens, each chunk's logits and softmax formed in float32, again in the backward.
* ``verl (non-fused)`` — verl's default actor path: the logits ``F.linear(h, W)``, then
  ``verl.utils.torch_functional.logprobs_from_logits`` and ``entropy_from_logits``.
* ``floor`` — the bare matmuls of the same shapes (as in ``linear_logprobs``).

The figure that matters is the peak extra memory: the non-fused path holds ``N × V`` logits
(and their float32 copies); the fused ones a chunk or a tile.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from rlkern.bench.cases import Case, CaseOptions, Impl, Outputs, Size, Tolerance, register
from rlkern.bench.cases.linear_logprobs import (
    FLOOR_NOTES,
    V_QWEN,
    LinearInputs,
    _floor,
    _outputs,
    check_eager_fits,
    make_inputs,
    row_and_grad_tolerances,
)
from rlkern.bench.kit import Peer, RlkernBackend, fresh_leaf

FULL_SIZES = [Size({"N": 4096, "H": 512, "V": V_QWEN}), Size({"N": 1024, "H": 1024, "V": V_QWEN})]
#: linear_logprobs' quick size at the Qwen vocabulary (N = 1024 took ~3.5 minutes of a quick
#: run on 2 cores with verl's peers installed).
QUICK_SIZES = [Size({"N": 256, "H": 512, "V": V_QWEN})]

VERL_HINT = "optional: pip install -e '.[parity]' && pip install --no-deps verl"
VERL_EXP = Peer("verl", lambda: importlib.import_module("verl.utils.experimental.torch_functional"),
                hint=VERL_HINT)
VERL_F = Peer("verl", lambda: importlib.import_module("verl.utils.torch_functional"),
              hint=VERL_HINT)


def _run(fn, mode: str):
    """``fn(hidden, weight, labels) -> (log_probs, entropy)`` in ``mode``."""
    def fwd(inp: LinearInputs) -> Outputs:
        with torch.no_grad():
            return _outputs(*fn(inp.hidden, inp.weight, inp.labels), None)

    def fwd_bwd(inp: LinearInputs) -> Outputs:
        h, w = fresh_leaf(inp.hidden), fresh_leaf(inp.weight)
        lp, ent = fn(h, w, inp.labels)
        grads = torch.autograd.grad(lp.sum() + ent.float().sum(), (h, w))
        return _outputs(lp, ent, grads)

    return fwd if mode == "fwd" else fwd_bwd


def _rlkern(backend: str):
    from rlkern.integrations.verl_fused import fused_linear_for_ppo

    return lambda hidden, weight, labels: fused_linear_for_ppo(hidden, weight, labels,
                                                               backend=backend)


def _verl_fused(hidden, weight, labels):
    exp = VERL_EXP.get()
    # verl's torch backend itself, even if rlkern has patched FusedLinearForPPO.forward
    return exp.FusedLinearForPPOFunction.apply(hidden, weight, labels, 1.0, 512)


def _verl_non_fused(hidden, weight, labels):
    verl_f = VERL_F.get()
    check_eager_fits(*labels.shape, weight.shape[0])
    logits = F.linear(hidden, weight)
    return verl_f.logprobs_from_logits(logits, labels), verl_f.entropy_from_logits(logits)


@register("verl_actor")
def verl_actor_case(options: CaseOptions) -> Case:
    """The ``verl_actor`` case for ``options`` (device, dtype, rlkern backend)."""
    backend = RlkernBackend.choose(options)

    def implementations(mode: str) -> list[Impl]:
        return [
            Impl.rlkern(_run(_rlkern(backend.name), mode), note=backend.note),
            Impl("verl fused (torch)", _run(_verl_fused, mode), skip=VERL_EXP.missing()),
            Impl("verl (non-fused)", _run(_verl_non_fused, mode), skip=VERL_F.missing()),
            Impl.floor(_floor(mode), note=FLOOR_NOTES[mode]),
        ]

    # verl's bf16 logits vs rlkern's float32-accumulated tiles: both round the logits to bf16
    tolerances = row_and_grad_tolerances(Tolerance(atol=5e-2, rtol=1e-2), 1e-2)
    return Case(name="verl_actor", sizes=FULL_SIZES, quick_sizes=QUICK_SIZES,
                modes=("fwd", "fwd+bwd"), make_inputs=make_inputs,
                implementations=implementations, tolerances=tolerances,
                notes=(*backend.notes, *FLOOR_NOTES.values()), warnings=backend.notes,
                environment=backend.environment)
