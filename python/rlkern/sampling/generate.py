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

Preemption (under ``kv_budget_bytes`` / ``kv_budget_tokens``, see
:mod:`rlkern.sampling.scheduler`): an evicted member's cache is freed and its tokens and
logprobs are kept; when it resumes its KV is rebuilt by replaying its generated tokens one
batch-of-one forward at a time on a copy of the prompt's prefix — the very computations that
first built that KV, so it is bitwise the same and the member continues exactly as if it had
never been evicted. (A one-shot prefill over those tokens, as vLLM's recompute does, would be
cheaper but its KV can differ from incremental decoding in the last bits — other matmul
shapes — which could move a token at a near-tie.) Nothing already drawn is drawn again.
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
    :class:`SimResult` for this run (peak KV tokens, decode steps, utilisation, preemptions,
    recomputed tokens, mean KV tokens and KV utilisation), from the same code as
    :func:`rlkern.sampling.simulate`.
    """

    completions: list[list[int]]
    logprobs: list[Tensor]
    lengths: Tensor
    group_ids: Tensor
    stats: GroupStats
    schedule: SimResult
    #: Per completion, float32: each token's log-prob under the filtered, renormalised
    #: distribution it was drawn from (the sampler's ``processed_logprobs``; equal to
    #: ``logprobs`` without top-k / top-p / min-p up to rounding).
    processed_logprobs: list[Tensor] | None = None


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
    kv_budget_tokens: int | None = None,
    length_prior: float | None = None,
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
        group_size: ``G``. max_new_tokens: per-member cap.
        schedule: ``"length_aware"`` (continuous refill, FPTAS knapsack admission of the
            shortest predicted members), ``"micro_group"`` (rounds of
            micro groups) or ``"full_group"`` — see :mod:`rlkern.sampling.scheduler`.
        micro_group_size: ``m`` (default ``max(1, G // 8)``, see
            :func:`rlkern.sampling.scheduler.default_micro_group_size`).
        kv_budget_bytes: KV memory budget; tokens = bytes // :func:`kv_bytes_per_token`.
            Members are admitted against predicted lengths and preempted (KV freed, rebuilt
            on resumption) when the next step would exceed it; at least the longest prompt
            + 1 token, and a member longer than the budget minus its prompt is an error.
        kv_budget_tokens: the same budget in tokens (give one of the two).
        length_prior: predicted length before any member has finished (default
            ``max_new_tokens / 2``).
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
    if kv_budget_bytes is not None and kv_budget_tokens is not None:
        raise ValueError("give kv_budget_bytes or kv_budget_tokens, not both")
    budget_tokens = kv_budget_tokens
    if kv_budget_bytes is not None:
        per_tok = kv_bytes_per_token(config, dtype)
        budget_tokens = int(kv_budget_bytes) // per_tok
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    G = group_size
    sched = Scheduler([int(p.numel()) for p in prompts], group_size=G, schedule=schedule,
                      max_new_tokens=max_new_tokens, kv_budget_tokens=budget_tokens,
                      micro_group_size=micro_group_size, length_prior=length_prior)
    P = len(prompts)
    prefix: dict[int, tuple[object, Tensor]] = {}  # prompt → (cache, last-position logits)
    caches: dict[tuple[int, int], object] = {}
    pending_logits: dict[tuple[int, int], Tensor] = {}
    toks: dict[tuple[int, int], list[int]] = {}
    lps: dict[tuple[int, int], list[float]] = {}
    plps: dict[tuple[int, int], list[float]] = {}
    stats = GroupStats()

    def decode(token: int, cache):
        """One batch-of-one forward of ``token`` on ``cache``: (new cache, fp32 logits)."""
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[token]], device=dev), past_key_values=cache,
                        use_cache=True)
        return out.past_key_values, out.logits[0, -1].float()

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
            cache = copy.deepcopy(cache)  # the member's own copy of the prefix KV
            if (p, j) in toks:
                # Resumed after a preemption: rebuild the KV of every generated token but the
                # last (the next step feeds it) by replaying them; nothing is sampled again.
                for t in toks[(p, j)][:-1]:
                    cache, _ = decode(t, cache)
            else:
                pending_logits[(p, j)] = logits
                toks[(p, j)], lps[(p, j)], plps[(p, j)] = [], [], []
            caches[(p, j)] = cache

    def on_preempt(evicted):
        for mem in evicted:
            del caches[mem]  # its tokens and logprobs stay; on_admit rebuilds the KV

    def on_step(active):
        rows = []
        for mem in active:
            if mem in pending_logits:  # first token: from the shared prefill logits
                rows.append(pending_logits.pop(mem))
                continue
            caches[mem], logits = decode(toks[mem][-1], caches[mem])
            rows.append(logits)
        seeds = torch.tensor([member_seed(seed, p, j, G) for p, j in active], dtype=torch.int64)
        steps = torch.tensor([len(toks[mem]) for mem in active], dtype=torch.int64)
        res = sample(torch.stack(rows).cpu(), temperature=temperature, top_k=top_k, top_p=top_p,
                     min_p=min_p, seeds=seeds, steps=steps)
        done = []
        for i, mem in enumerate(active):
            t = int(res.tokens[i])
            toks[mem].append(t)
            lps[mem].append(float(res.raw_logprobs[i]))
            plps[mem].append(float(res.processed_logprobs[i]))
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

    result = drive(sched, on_admit=on_admit, on_step=on_step, on_group_done=on_group_done,
                   on_preempt=on_preempt)
    order = [(p, j) for p in range(P) for j in range(G)]
    return GroupRollouts(
        completions=[toks[m] for m in order],
        logprobs=[torch.tensor(lps[m], dtype=torch.float32) for m in order],
        lengths=torch.tensor([len(toks[m]) for m in order], dtype=torch.int64),
        group_ids=torch.tensor([p for p, _ in order], dtype=torch.int64),
        stats=stats,
        schedule=result,
        processed_logprobs=[torch.tensor(plps[m], dtype=torch.float32) for m in order],
    )
