"""Benchmark case ``truncated_logprobs``: token log-probs under the sampler's top-p truncation
against plain token log-probs of the same (N, V) logits (the cost of ``truncated_support``).

Modes:

* ``fwd`` — logprobs (and entropy) of the labels;
* ``fwd+bwd`` — the same plus the gradient of ``logprobs.sum()`` wrt the logits.

Implementations:

* ``rlkern`` — ``rlkern.token_logprobs(logits, labels, temperature=0.7, top_p=0.9)``: the
  sampler's kept set per row (radix select), the renormalised log-prob;
* ``plain token_logprobs`` — ``rlkern.token_logprobs(logits, labels, temperature=0.7)``, the
  full-vocabulary log-probs. The two differ by design (renormalised vs not), so outputs are not
  compared; tests/test_truncated_logprobs.py checks correctness;
* ``floor`` — one read of the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.bench.cases import Case, CaseOptions, Impl, Size, register
from rlkern.bench.kit import RlkernBackend, fresh_leaf, peaked_logits, read_once

V_QWEN = 151936
TEMPERATURE, TOP_P = 0.7, 0.9


class Inputs(NamedTuple):
    logits: Tensor
    labels: Tensor


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    n, v = size["N"], size["V"]
    logits, _ = peaked_logits(n, v, dtype, device, seed=n * 11 + v)
    # The most likely token of each row: always in the kept set (a finite log-prob).
    return Inputs(logits, logits.argmax(-1))


@register("truncated_logprobs")
def truncated_logprobs_case(options: CaseOptions) -> Case:
    import rlkern

    backend = RlkernBackend.choose(options)

    def impls(mode: str) -> list[Impl]:
        def run(x: Inputs, **filters):
            logits = fresh_leaf(x.logits) if mode == "fwd+bwd" else x.logits
            out = rlkern.token_logprobs(logits, x.labels, temperature=TEMPERATURE,
                                        return_entropy=True, backend=backend.name, **filters)
            if mode == "fwd+bwd":
                torch.where(torch.isfinite(out.logprobs), out.logprobs, 0.0).sum().backward()
            return {}

        return [Impl.rlkern(lambda x: run(x, top_p=TOP_P), note=backend.note),
                Impl("plain token_logprobs", lambda x: run(x)),
                Impl.floor(lambda x: read_once(x.logits))]

    return Case(
        name="truncated_logprobs",
        sizes=[Size({"N": 256, "V": V_QWEN}), Size({"N": 1024, "V": V_QWEN})],
        quick_sizes=[Size({"N": 256, "V": V_QWEN})],
        modes=("fwd", "fwd+bwd"),
        make_inputs=make_inputs,
        implementations=impls,
        tolerances={},
        notes=(*backend.notes,
               f"rlkern: token_logprobs(top_p={TOP_P}, T={TEMPERATURE}); peer: the same "
               "without the filter (target: at most 2x its time at V = 151936)",
               "outputs differ by design (renormalised vs full vocabulary) and are not "
               "compared; see tests/test_truncated_logprobs.py",
               "floor: one read of the logits, `logits.view(int16).amax()`"),
        warnings=backend.notes,
        environment=backend.environment,
    )
