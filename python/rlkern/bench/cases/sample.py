"""Benchmark case ``sample``: one sampling step of a (N, V) logits tensor, with logprobs.

Modes:

* ``top_k+top_p`` — temperature 0.7, top-k 50, top-p 0.9 (a common RL rollout setting);
* ``plain`` — temperature 0.7 only.

Implementations:

* ``rlkern`` — ``rlkern.sample(...)`` (radix-select thresholds, inverse-CDF draw, Philox).
* ``torch sort (HF/vLLM style)`` — the sort-based sampler as HF's logits warpers and vLLM's
  torch fallback are written: fp32 ``z / T``, top-k by ``topk`` + mask, a full descending sort
  + ``cumsum`` for top-p, ``softmax`` + ``multinomial``, ``log_softmax`` + ``gather`` for the
  raw and processed logprobs (restated from the formulas; neither is a dependency).
* ``floor`` — one read of the logits (``logits.view(int16).amax()``).

Samples are random, so outputs are not compared here: exactness is tested statistically in
tests/test_sample.py. :func:`micro_group_report` gives the scheduling numbers (simulation of a
lognormal length distribution).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.bench.cases import FLOOR, RLKERN, Case, CaseOptions, Impl, Size, register

V_QWEN = 151936
TEMPERATURE, TOP_K, TOP_P = 0.7, 50, 0.9


class SampleInputs(NamedTuple):
    logits: Tensor
    seeds: Tensor
    steps: Tensor


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> SampleInputs:
    n, v = size["N"], size["V"]
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + v)
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype=dtype, device=device)
    return SampleInputs(logits, torch.arange(n, device=device),
                        torch.zeros(n, dtype=torch.int64, device=device))


def torch_sort_sampler(logits: Tensor, temperature: float, top_k: int | None,
                       top_p: float | None) -> dict[str, Tensor]:
    """Sort-based sampling with raw and processed logprobs, as HF/vLLM write it in torch."""
    z = logits.float() / temperature
    raw = torch.log_softmax(z, -1)
    if top_k is not None:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None:
        sorted_z, idx = torch.sort(z, descending=True, dim=-1)
        probs = sorted_z.softmax(-1)
        before = probs.cumsum(-1) - probs
        sorted_z = sorted_z.masked_fill(before >= top_p, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, sorted_z)
    processed = torch.log_softmax(z, -1)
    tokens = torch.multinomial(processed.exp(), 1)
    return {"tokens": tokens[:, 0], "raw": raw.gather(-1, tokens)[:, 0],
            "processed": processed.gather(-1, tokens)[:, 0]}


@register("sample")
def sample_case(options: CaseOptions) -> Case:
    import rlkern

    def impls(mode: str) -> list[Impl]:
        k, p = (TOP_K, TOP_P) if mode == "top_k+top_p" else (None, None)

        def ours(x: SampleInputs):
            rlkern.sample(x.logits, temperature=TEMPERATURE, top_k=k, top_p=p, seeds=x.seeds,
                          steps=x.steps, backend=options.rlkern_backend)
            return {}

        def peer(x: SampleInputs):
            torch_sort_sampler(x.logits, TEMPERATURE, k, p)
            return {}

        def floor(x: SampleInputs):
            x.logits.view(torch.int16).amax()
            return {}

        return [Impl("rlkern", ours, role=RLKERN),
                Impl("torch sort (HF/vLLM style)", peer),
                Impl("floor", floor, role=FLOOR)]

    return Case(
        name="sample",
        sizes=[Size({"N": 256, "V": V_QWEN}), Size({"N": 1024, "V": V_QWEN})],
        quick_sizes=[Size({"N": 256, "V": V_QWEN})],
        modes=("top_k+top_p", "plain"),
        make_inputs=make_inputs,
        implementations=impls,
        tolerances={},
        notes=("outputs are random draws and are not compared; see tests/test_sample.py",
               "floor: one read of the logits, `logits.view(int16).amax()`"),
    )


def micro_group_report(P: int = 64, G: int = 16, m: int = 4, seed: int = 0) -> dict[str, float]:
    """Scheduling numbers on a lognormal length distribution (μ = 5.5, σ = 0.8 in log tokens,
    clamped to [1, 4096]; prompts of 50–300 tokens), via :func:`rlkern.sampling.simulate`:

    * ``peak_ratio`` — micro groups of ``m`` (one at a time) vs the full group of ``G``:
      peak resident KV tokens;
    * ``step_reduction`` — length-aware vs naive micro groups, same budget (two micro groups'
      worst-case reservation): 1 − decode steps ratio.
    """
    from rlkern.sampling import simulate

    g = torch.Generator().manual_seed(seed)
    L = torch.exp(torch.randn(P, G, generator=g) * 0.8 + 5.5).round().long().clamp(1, 4096)
    pl = torch.randint(50, 300, (P,), generator=g)
    full = simulate(L, pl, schedule="full_group", group_size=G)
    micro = simulate(L, pl, schedule="micro_group", group_size=G, micro_group_size=m)
    budget = 2 * (300 + m * int(L.max()))
    naive = simulate(L, pl, schedule="micro_group", group_size=G, micro_group_size=m,
                     kv_budget_tokens=budget)
    la = simulate(L, pl, schedule="length_aware", group_size=G, micro_group_size=m,
                  kv_budget_tokens=budget)
    return {
        "full_peak_tokens": full.peak_tokens, "micro_peak_tokens": micro.peak_tokens,
        "peak_ratio": micro.peak_tokens / full.peak_tokens,
        "naive_decode_steps": naive.decode_steps, "length_aware_decode_steps": la.decode_steps,
        "step_reduction": 1 - la.decode_steps / naive.decode_steps,
        "naive_utilisation": naive.utilisation, "length_aware_utilisation": la.utilisation,
    }
