"""Micro-group generation with any Hugging Face causal LM that has a KV cache (ALGORITHMS.md §5).

How completions stay identical under every schedule: a member's token at position ``t`` is
drawn by :func:`rlkern.sample` with seed ``member_seed(seed, p, j)`` and step ``t`` from its
own logits, and those logits come from a computation that does not depend on the schedule —
the prompt is prefilled once (batch of one) and each member decodes on its own copy of the
prefix cache with batch size one (padding-free). Batching the decode forward across members
with ragged caches would need a variable-length attention kernel whose per-row results do not
depend on the batch; until then the schedules differ in *when* a member runs (and in the memory
and decode steps they need), never in *what* it produces. The sampler call itself is batched
over all active members (it is batch invariant).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.ops.group_stats import GroupStats
from rlkern.ops.sample import sample
from rlkern.sampling.scheduler import Scheduler, SimResult, drive


class GroupRollouts(NamedTuple):
    """Result of :func:`generate_groups`, group-major (row ``p·G + j`` is member j of prompt p).

    ``completions``: list of token lists; ``logprobs``: list of float32 tensors, the raw
    logprob (``log_softmax(x/T)``) of each generated token; ``lengths``: int64 ``(P·G,)``;
    ``group_ids``: int64 ``(P·G,)`` (= p); ``stats``: :class:`rlkern.GroupStats` of the scores,
    filled group by group as each completes; ``schedule``: the scheduler's
    :class:`SimResult` (peak KV tokens, decode steps, utilisation) for this run.
    """

    completions: list[list[int]]
    logprobs: list[Tensor]
    lengths: Tensor
    group_ids: Tensor
    stats: GroupStats
    schedule: SimResult


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """``2 · n_layers · n_kv_heads · head_dim · bytes(dtype)`` from a transformers config."""
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return 2 * n_layers * n_kv * head_dim * torch.empty(0, dtype=dtype).element_size()


def member_seed(seed: int, prompt: int, member: int, group_size: int) -> int:
    """The Philox seed of member ``j`` of prompt ``p``: distinct per member, int64."""
    return (seed * 1_000_003 + prompt * group_size + member) % (2**63)


def generate_groups(
    model,
    prompts: Sequence[Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    schedule: str = "length_aware",
    micro_group_size: int | None = None,
    kv_budget_bytes: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    reward_fn: Callable[[int, list[int]], float] | None = None,
) -> GroupRollouts:
    """Generate ``group_size`` completions per prompt, decoding in (micro-)groups.

    Args:
        model: a Hugging Face causal LM whose forward accepts ``past_key_values`` and
            ``use_cache=True`` and returns a cache (e.g. ``LlamaForCausalLM``).
        prompts: ``P`` 1-D int token tensors.
        group_size: ``G``. max_new_tokens: per-member cap (also the per-member reservation).
        schedule: ``"length_aware"`` (continuous refill, FPTAS knapsack admission of the
            shortest predicted members), ``"micro_group"`` (rounds of
            micro groups) or ``"full_group"`` — see :mod:`rlkern.sampling.scheduler`.
        micro_group_size: ``m`` (default ``max(1, G // 8)``, see
            :func:`rlkern.sampling.scheduler.default_micro_group_size`).
        kv_budget_bytes: KV memory budget; tokens = bytes // :func:`kv_bytes_per_token`.
        temperature, top_k, top_p, min_p: sampler options (:func:`rlkern.sample`).
        seed: base seed; member j of prompt p uses :func:`member_seed` and step = position.
        eos_token_id: token(s) that end a completion (kept in it).
        reward_fn: ``(prompt index, completion) → score`` for the streaming group statistics;
            default: the completion's summed raw logprob.

    Returns:
        :class:`GroupRollouts`. The completions for a given seed are identical under all three
        schedules.
    """
    if not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D token tensors")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0 or p.is_floating_point():
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D integer tensor")
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        raise ValueError("model has no KV cache (config.use_cache is off or missing); "
                         "generate_groups needs a causal LM with a KV cache")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    budget_tokens = None
    if kv_budget_bytes is not None:
        per_tok = kv_bytes_per_token(config, dtype)
        budget_tokens = int(kv_budget_bytes) // per_tok
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    G = group_size
    sched = Scheduler([int(p.numel()) for p in prompts], group_size=G, schedule=schedule,
                      max_new_tokens=max_new_tokens, kv_budget_tokens=budget_tokens,
                      micro_group_size=micro_group_size)
    P = len(prompts)
    prefix: dict[int, tuple[object, Tensor]] = {}  # prompt → (cache, last-position logits)
    caches: dict[tuple[int, int], object] = {}
    pending_logits: dict[tuple[int, int], Tensor] = {}
    toks: dict[tuple[int, int], list[int]] = {}
    lps: dict[tuple[int, int], list[float]] = {}
    stats = GroupStats()

    def on_admit(new):
        for p, j in new:
            if p not in prefix:
                with torch.no_grad():
                    out = model(input_ids=prompts[p].to(dev).reshape(1, -1), use_cache=True)
                if getattr(out, "past_key_values", None) is None:
                    raise ValueError("model returned no past_key_values: generate_groups needs "
                                     "a causal LM with a KV cache")
                prefix[p] = (out.past_key_values, out.logits[0, -1].float())
            cache, logits = prefix[p]
            caches[(p, j)] = copy.deepcopy(cache)  # the member's own copy of the prefix KV
            pending_logits[(p, j)] = logits
            toks[(p, j)], lps[(p, j)] = [], []

    def on_step(active):
        rows = []
        for mem in active:
            if mem in pending_logits:  # first token: from the shared prefill logits
                rows.append(pending_logits.pop(mem))
                continue
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[toks[mem][-1]]], device=dev),
                            past_key_values=caches[mem], use_cache=True)
            caches[mem] = out.past_key_values
            rows.append(out.logits[0, -1].float())
        seeds = torch.tensor([member_seed(seed, p, j, G) for p, j in active], dtype=torch.int64)
        steps = torch.tensor([len(toks[mem]) for mem in active], dtype=torch.int64)
        res = sample(torch.stack(rows).cpu(), temperature=temperature, top_k=top_k, top_p=top_p,
                     min_p=min_p, seeds=seeds, steps=steps)
        done = []
        for i, mem in enumerate(active):
            t = int(res.tokens[i])
            toks[mem].append(t)
            lps[mem].append(float(res.raw_logprobs[i]))
            if t in eos or len(toks[mem]) >= max_new_tokens:
                done.append(mem)
                del caches[mem]
        return done

    def on_group_done(p):
        prefix.pop(p, None)
        scores = [reward_fn(p, toks[(p, j)]) if reward_fn is not None else sum(lps[(p, j)])
                  for j in range(G)]
        stats.update(torch.tensor(scores, dtype=torch.float64),
                     torch.full((G,), p, dtype=torch.int64))

    result = drive(sched, on_admit=on_admit, on_step=on_step, on_group_done=on_group_done)
    order = [(p, j) for p in range(P) for j in range(G)]
    return GroupRollouts(
        completions=[toks[m] for m in order],
        logprobs=[torch.tensor(lps[m], dtype=torch.float32) for m in order],
        lengths=torch.tensor([len(toks[m]) for m in order], dtype=torch.int64),
        group_ids=torch.tensor([p for p, _ in order], dtype=torch.int64),
        stats=stats,
        schedule=result,
    )
