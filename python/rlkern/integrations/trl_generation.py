"""TRL's ``GRPOTrainer`` generating through rlkern's micro-group sampler.

``rlkern.integrations.trl.apply(generation="micro_groups", ...)`` replaces
``GRPOTrainer._generate_single_turn`` (TRL 1.16) — the narrowest point of TRL's generation: it
takes the batch's unpadded prompt token lists (one per completion, the ``num_generations``
copies of each prompt consecutive, as TRL's ``RepeatSampler`` lays them out) and returns
``(completion_ids, logprobs)``: one ``list[int]`` per row, ending at the first EOS token (kept)
or at ``max_new_tokens``, and the per-token sampling log-probabilities (``None`` on TRL's
transformers path). Everything around it — tokenising, padding (prompts left, completions
right, with the tokenizer's pad id), masks, rewards, the tool-call loop — stays TRL's, so the
batch TRL builds has its own format.

With the patch the rows go through :func:`rlkern.generate_groups`:

* **Groups.** Consecutive rows with the same prompt, in chunks of at most ``num_generations``
  (TRL's argument), form one group: its prompt is prefilled once and its members are scheduled
  by rlkern's scheduler (``schedule``, ``micro_group_size``, the KV budget). A chunk with fewer
  copies (the batch of one process can hold part of a prompt's copies when
  ``per_device_train_batch_size`` is not a multiple of ``num_generations``, and TRL's tool loop
  generates one row per sample) is generated in a separate :func:`generate_groups` call with its
  own group size; :func:`rlkern.integrations.trl.usage` counts such calls
  (``generation_split_groups``). Rows of one chunk share a prompt, so which copies form a group
  never changes what is sampled from.
* **Sampling.** ``temperature``, ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` and
  ``max_new_tokens`` come from ``trainer.generation_config`` — GRPOConfig's values with
  ``generation_kwargs`` applied, exactly what TRL's ``generate`` would use; ``do_sample=False``
  is greedy (``top_k=1``). EOS tokens are TRL's (``trainer.eos_token_ids`` and the config's).
  Any other setting that changes what is generated (``repetition_penalty != 1``, beams,
  ``no_repeat_ngram_size``, ``suppress_tokens``, ...), vLLM, transformers' continuous batching,
  and images or other multimodal inputs raise ``ValueError`` naming the option: nothing falls
  back to TRL's generate.
* **Log-probabilities.** The sampler's raw log-probabilities (``log_softmax(logits / T)`` of
  the drawn token, before top-k / top-p / min-p: the quantity TRL's loss recomputes; with
  ``apply(truncated_support=True)`` the processed ones, under the truncated distribution, which
  the trainer then recomputes) fill TRL's ``logprobs`` slot, so TRL stores them as
  ``inputs["sampling_per_token_logps"]``. TRL's transformers path leaves that slot empty;
  filled, TRL uses it only in the off-policy sequence mask (``off_policy_mask_threshold``), as
  the sampling policy's log-probabilities (it falls back to the old policy's otherwise). The
  last call's :class:`rlkern.GroupRollouts` (with the scheduler's peak KV tokens and decode
  steps) are kept for users: :func:`last_rollouts`.
* **Seeds.** Each call draws with a base seed hashed from ``args.seed``, the process index, the
  global step and the trainer's count of generation calls: reproducible runs, fresh samples at
  every generation, distinct samples across processes; the same seed gives the same completions
  under every ``schedule`` and budget (:func:`rlkern.generate_groups`).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlkern.sampling.generate import GroupRollouts, generate_groups
from rlkern.sampling.scheduler import SCHEDULES

__all__ = [
    "GENERATIONS",
    "GENERATION_METHOD",
    "GenerationOptions",
    "check_generation_config",
    "generate_single_turn",
    "last_rollouts",
    "plan_groups",
    "sampling_options",
]

# Generation calls through rlkern, and those that needed more than one group size (read by
# rlkern.integrations.trl.usage()).
USAGE: Counter[str] = Counter()

#: The ``GRPOTrainer`` method replaced when generation goes through rlkern.
GENERATION_METHOD = "_generate_single_turn"
#: Values of ``apply(generation=...)``: ``None`` keeps TRL's generation.
GENERATIONS = (None, "micro_groups")

# GenerationConfig fields that TRL sets and rlkern honours (read by sampling_options) or that do
# not change what is generated. Any other field that differs from GenerationConfig's default
# raises: an option the sampler would silently ignore is a different generation.
_HONOURED = frozenset({
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
    "cache_implementation", "disable_compile", "transformers_version", "_from_model_config",
    # output formatting of HF generate: no effect on the tokens drawn
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
    "output_hidden_states",
})


@dataclass(frozen=True)
class GenerationOptions:
    """How rlkern generates inside TRL (the arguments of ``apply(generation="micro_groups")``).

    ``kv_budget_tokens``: KV-cache budget in tokens (prompt prefixes + generated tokens of the
    resident members, see :mod:`rlkern.sampling.scheduler`), or ``None`` for one unit at a time
    (``generate_groups``' own ``kv_budget_tokens``). ``schedule``: one of
    :data:`rlkern.sampling.SCHEDULES`. ``micro_group_size``: ``m`` (default
    ``max(1, G // 8)``). ``processed_logprobs``: store the sampler's log-probabilities under
    the truncated distribution it drew from instead of the raw ones (set by
    ``apply(truncated_support=True)``, whose trainer log-probabilities are truncated too).
    """

    kv_budget_tokens: int | None = None
    schedule: str = "length_aware"
    micro_group_size: int | None = None
    processed_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("kv_budget_tokens", "micro_group_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def check_generation_config(trainer: Any) -> None:
    """Raise ``ValueError`` naming every generation option of ``trainer`` that rlkern's sampler
    cannot honour (see the module doc); return quietly otherwise."""
    if getattr(trainer, "use_vllm", False):
        raise ValueError("generation='micro_groups' replaces TRL's transformers generation; "
                         "it cannot run with use_vllm=True (drop one of them)")
    if getattr(trainer, "use_transformers_continuous_batching", False):
        raise ValueError("generation='micro_groups' cannot run with "
                         "use_transformers_continuous_batching=True (drop one of them)")
    config = getattr(trainer, "generation_config", None)
    if config is None:
        raise ValueError("the trainer has no generation_config: generation='micro_groups' "
                         "needs TRL's transformers generation path")
    rp = getattr(config, "repetition_penalty", 1.0)
    if rp is not None and float(rp) != 1.0:
        raise ValueError(f"repetition_penalty={rp} is not supported by generation="
                         "'micro_groups' (rlkern's sampler has no repetition penalty); set "
                         "GRPOConfig(repetition_penalty=1.0) or use TRL's own generation")
    unsupported = sorted(set(config.to_diff_dict()) - _HONOURED)
    if unsupported:
        values = ", ".join(f"{k}={getattr(config, k, None)!r}" for k in unsupported)
        raise ValueError(f"generation options not supported by generation='micro_groups': "
                         f"{values} (rlkern's sampler honours temperature, top_k, top_p, min_p, "
                         "max_new_tokens, do_sample and the EOS tokens)")
    cache = getattr(config, "cache_implementation", None)
    if cache not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={cache!r} is not supported by generation="
                         "'micro_groups' (each member decodes on its own dynamic KV cache)")
    if getattr(config, "use_cache", True) is False:
        raise ValueError("generation_config.use_cache=False is not supported by generation="
                         "'micro_groups' (it decodes with a KV cache)")


def sampling_options(trainer: Any) -> dict[str, Any]:
    """The :func:`rlkern.generate_groups` keyword arguments equivalent to the trainer's
    ``generation_config``: ``temperature``, ``top_k``, ``top_p``, ``min_p`` (``None`` where
    the filter is off), ``max_new_tokens`` and ``eos_token_id`` (a sorted list). Checks the
    config first (:func:`check_generation_config`)."""
    check_generation_config(trainer)
    config = trainer.generation_config
    max_new = config.max_new_tokens
    if max_new is None or int(max_new) < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r} "
                         "(GRPOConfig.max_completion_length)")
    eos = set(getattr(trainer, "eos_token_ids", None) or [])
    cfg_eos = config.eos_token_id
    eos |= set([cfg_eos] if isinstance(cfg_eos, int) else (cfg_eos or []))
    if config.do_sample is False:  # HF greedy: the argmax (top_k = 1), other filters moot
        return dict(temperature=1.0, top_k=1, top_p=None, min_p=None,
                    max_new_tokens=int(max_new), eos_token_id=sorted(eos))
    temperature = 1.0 if config.temperature is None else float(config.temperature)
    top_k = None if not config.top_k else int(config.top_k)  # HF: 0 / None is off
    top_p = None if config.top_p is None or float(config.top_p) >= 1.0 else float(config.top_p)
    min_p = None if not config.min_p else float(config.min_p)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                max_new_tokens=int(max_new), eos_token_id=sorted(eos))


def plan_groups(prompt_ids: list[list[int]], group_size: int) -> dict[int, list[list[int]]]:
    """Split TRL's rows into groups: maximal runs of consecutive equal prompts, cut into chunks
    of at most ``group_size`` rows. Returns ``{chunk size: [row indices of each chunk]}``;
    in TRL's layout every chunk has ``group_size`` rows (one entry).

    Example: rows ``[a, a, b, b, b, b, c]`` with ``group_size=4`` →
    ``{2: [[0, 1]], 4: [[2, 3, 4, 5]], 1: [[6]]}``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    plan: dict[int, list[list[int]]] = defaultdict(list)
    i, n = 0, len(prompt_ids)
    while i < n:
        j = i + 1
        while j < n and j - i < group_size and prompt_ids[j] == prompt_ids[i]:
            j += 1
        plan[j - i].append(list(range(i, j)))
        i = j
    return dict(plan)


def _call_seed(trainer: Any, call: int, part: int) -> int:
    """A 62-bit base seed from (``args.seed``, process index, global step, call, part)."""
    key = (f"{getattr(trainer.args, 'seed', 0)}:{trainer.accelerator.process_index}:"
           f"{trainer.state.global_step}:{call}:{part}")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def last_rollouts(trainer: Any) -> list[GroupRollouts]:
    """The :class:`rlkern.GroupRollouts` of the trainer's last generation call through rlkern
    (one per :func:`rlkern.generate_groups` call: one per chunk size, see
    :func:`plan_groups`); empty before the first. ``rollouts[i].schedule`` holds the
    scheduler's peak KV tokens and decode steps."""
    return list(getattr(trainer, "_rlkern_rollouts", []))


def generate_single_turn(trainer: Any, options: GenerationOptions, prompt_ids: list[list[int]],
                         images: Any, multimodal_fields: dict[str, Any] | None,
                         num_generations: int, has_tool_images: bool = False,
                         ) -> tuple[list[list[int]], list[list[float]]]:
    """``GRPOTrainer._generate_single_turn`` through :func:`rlkern.generate_groups`.

    Args:
        trainer: the ``GRPOTrainer``.
        options: the :class:`GenerationOptions` given to ``apply``.
        prompt_ids: ``B`` unpadded prompt token lists, the copies of a prompt consecutive.
        images / multimodal_fields / has_tool_images: TRL's vision-language inputs (refused).
        num_generations: TRL's group size ``G`` for this call (1 in the tool loop).

    Returns:
        ``(completion_ids, logprobs)``: ``B`` token lists (each ends at its first EOS, kept, or
        has ``max_new_tokens`` tokens — TRL's masking of its padded ``generate`` output) and
        ``B`` lists of the sampler's float log-probabilities, one per completion token.
    """
    if (images is not None and any(img for img in images)) or multimodal_fields or has_tool_images:
        raise ValueError("generation='micro_groups' does not handle images or other multimodal "
                         "inputs (rlkern's sampler takes token prompts only)")
    sampling = sampling_options(trainer)
    completions: list[list[int] | None] = [None] * len(prompt_ids)
    logprobs: list[list[float] | None] = [None] * len(prompt_ids)
    call = getattr(trainer, "_rlkern_generation_calls", 0)
    trainer._rlkern_generation_calls = call + 1
    plan = plan_groups(prompt_ids, max(1, int(num_generations)))
    rollouts = []
    from trl.extras.profiling import profiling_context
    from trl.models.utils import unwrap_model_for_generation

    dist = getattr(trainer, "_dist", None)
    summon = (dist.summon_full_params(trainer.model_wrapped, recurse=False) if dist is not None
              else nullcontext())
    with (
        profiling_context(trainer, "rlkern.generate_groups"),
        unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            generation_kwargs=getattr(trainer, "generation_kwargs", None),
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model,
        torch.no_grad(),
        summon,
    ):
        config = model.config
        # TRL turns the model config's use_cache off for training; HF generate decodes with a
        # cache anyway (generation_config.use_cache), and so does the sampler.
        use_cache = config.use_cache
        config.use_cache = True
        try:
            for part, (size, chunks) in enumerate(sorted(plan.items(), reverse=True)):
                out = generate_groups(
                    model, [torch.tensor(prompt_ids[c[0]], dtype=torch.long) for c in chunks],
                    group_size=size, schedule=options.schedule,
                    # a smaller chunk (split group) caps m at its own size
                    micro_group_size=None if options.micro_group_size is None
                    else min(options.micro_group_size, size),
                    kv_budget_tokens=options.kv_budget_tokens,
                    seed=_call_seed(trainer, call, part), **sampling)
                rollouts.append(out)
                for p, rows in enumerate(chunks):  # rollout row p·G + j is member j of chunk p
                    for j, row in enumerate(rows):
                        completions[row] = out.completions[p * size + j]
                        sampled = (out.processed_logprobs if options.processed_logprobs
                                   else out.logprobs)
                        logprobs[row] = sampled[p * size + j].tolist()
        finally:
            config.use_cache = use_cache
    trainer._rlkern_rollouts = rollouts
    USAGE["generation_micro_groups"] += 1
    if any(size < num_generations for size in plan):
        USAGE["generation_split_groups"] += 1
    return completions, logprobs  # type: ignore[return-value]
