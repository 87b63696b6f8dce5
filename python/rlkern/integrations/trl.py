"""rlkern inside TRL's ``GRPOTrainer``: fused LM-head log-probabilities and the fused GRPO loss.

``apply()`` replaces two methods of ``trl.GRPOTrainer`` (written against TRL 1.16):

* ``GRPOTrainer._get_per_token_logps_and_entropies`` — every per-token log-probability the
  trainer needs (the policy's during the loss, the old policy's and the reference model's while
  scoring completions) and the per-token entropy. TRL's method builds the model calls; rlkern
  serves them: it runs the model's backbone, keeps the hidden states of the positions that
  predict completion tokens and calls
  :func:`rlkern.linear_logprobs` on them and ``lm_head.weight`` (and ``lm_head.bias``), with the
  trainer's temperature: the ``(N, V)`` logits never exist. TRL 1.16's own fused head
  (``trl.trainer.utils.add_fused_lm_head``) scores every position of prompt and completion
  on CPU (no Triton) and, there, folds each logits tile of up to ``4096 × 32768`` with several
  full-size float32 temporaries; rlkern scores only the completion tokens, one ~8M-logit tile
  at a time (measured at V = 32768: 26 MiB vs 228 MiB peak for forward + backward).
* ``GRPOTrainer._compute_loss`` — the per-token loss, its aggregation and the KL / entropy
  terms become one :func:`rlkern.policy_loss` call configured by
  :meth:`rlkern.PolicyLossConfig.trl` (every ``loss_type`` of TRL 1.16:
  ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo``, ``vespo``), with
  TRL's normalisers (``num_items_in_batch / num_processes · grad_accum / steps_per_generation``
  for dapo, cispo and vespo, the accumulation steps for the others, none in eval mode) and
  TRL's metrics:
  the same keys in ``trainer._metrics[mode]`` with the same values, reduced across processes
  the way TRL reduces them (``kl`` and ``entropy`` from rlkern's metrics; the clip fractions
  and vespo's ``vespo/phi_seq_mean`` from the op's per-row statistics, which TRL averages per
  token, or per sequence at the sequence level / for vespo's per-sequence φ).

Why these two methods: they are where the trainer spends its memory (the LM head) and where
the loss math lives; everything else (generation, rewards, advantages, the optimizer step)
is untouched, so a patched trainer logs and checkpoints exactly as before. The methods are
patched on the class, so call :func:`apply` before or after building the trainer; trainers
that override these methods in a subclass keep their overrides.

Fallbacks (TRL's original method runs, nothing raises; :func:`usage` counts them and each
reason is logged once):

* log-probabilities: a model without a separate backbone (``base_model``) or without an
  ``nn.Linear`` output layer (e.g. a LoRA-wrapped ``lm_head``), and a logit scale or cap that is
  not a finite positive number. Everything else takes the fused path: vision-language models
  and inputs and the MoE router auxiliary loss (TRL's own method prepares the backbone's
  inputs; rlkern serves its fused-head calls), logit scales (``logit_scale``,
  ``logits_scaling``, ``lm_head_multiplier``, ``output_multiplier``: a scale folds exactly into
  the temperature), logit soft-capping (Gemma 2's ``final_logit_softcapping``:
  ``c·tanh(s·x/c) / T``, fused into the head's tile epilogue as
  ``rlkern.linear_logprobs(..., softcap=c / s)`` with temperature ``T / s``) and a sharded
  (FSDP2) head (the head's half runs inside the head module's own call, so FSDP2 gathers its
  weight and reduces its gradient as for the model's head call).
* loss: none. The adaptive entropy controller (``use_adaptive_entropy``) runs as TRL's
  (:mod:`rlkern.integrations.trl_entropy`): the coefficient it applies is the fused loss's
  ``entropy_coef`` and its state is updated on the trainer as TRL updates it.

Generation (opt-in): ``apply(generation="micro_groups", kv_budget_tokens=..., schedule=...,
micro_group_size=...)`` also replaces ``GRPOTrainer._generate_single_turn`` so that TRL's
transformers generation (no vLLM) runs through :func:`rlkern.generate_groups`, group by group
under rlkern's KV-budgeted scheduler, with GRPOConfig's sampling parameters; an option the
sampler cannot honour raises (see :mod:`rlkern.integrations.trl_generation`).

TRL's function-level helpers (``selective_log_softmax``, ``entropy_from_logits``,
``selective_log_softmax_and_entropy``), which its other trainers call, have drop-ins in
:mod:`rlkern.integrations.trl_functions`.

Verified by ``tests/test_integration_trl.py`` (TRL's real ``GRPOTrainer`` patched vs
unpatched, same seed: per-step loss and grad norm) and
``tests/test_integration_trl_generation.py``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import math
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import rlkern
from rlkern.config.layout import layout
from rlkern.config.policy_loss import TRL_LOSS_TYPES
from rlkern.integrations import trl_entropy, trl_generation
from rlkern.integrations._is_ratio import fold_is_ratio
from rlkern.integrations.trl_generation import (
    GENERATION_METHOD,
    GENERATIONS,
    GenerationOptions,
    last_rollouts,
)
from rlkern.ops.linear_truncated import active_filters
from rlkern.ops.policy_loss import prepare, run

__all__ = [
    "apply",
    "compute_loss",
    "is_applied",
    "last_rollouts",
    "patched",
    "per_token_logps_and_entropies",
    "remove",
    "reset_usage",
    "usage",
]

logger = logging.getLogger(__name__)

#: The TRL release whose ``GRPOTrainer`` this module reproduces (major.minor).
TESTED_TRL = "1.16"
#: The ``GRPOTrainer`` attributes that :func:`apply` replaces.
PATCHED_METHODS = ("_get_per_token_logps_and_entropies", "_compute_loss")

# Keyword arguments of TRL's method that carry vision-language inputs (TRL's loss passes them
# from its batch; TRL's method slices them per chunk and hands them to the backbone).
_MULTIMODAL_KWARGS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                      "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                      "mm_token_type_ids", "image_position_ids")
# Config fields that scale the logits, ``logits = s·(h Wᵀ + b)``, and how each model family
# applies them (Cohere: ``* logit_scale``; Granite, MiniCPM3: ``/ logits_scaling``, HyperCLOVA X:
# ``* logits_scaling``; Falcon-H1: ``* lm_head_multiplier``). A scale folds exactly into the
# temperature: softmax(s·z / T) = softmax(z / (T / s)), so these take the fused path with T / s.
_LOGIT_MULTIPLIERS = {"logit_scale": False, "lm_head_multiplier": False, "logits_scaling": True,
                      "output_multiplier": False}
# The config field of logit soft-capping, ``z = c·tanh(s·x / c)`` (Gemma 2, applied after the
# multiplier s and before the temperature, as TRL's fused head applies it): rlkern's
# ``softcap`` option, with the multiplier folded in (c·tanh(s·x/c) = s·c'·tanh(x/c'), c' = c/s).
_SOFTCAP_FIELD = "final_logit_softcapping"
# Keyword arguments of TRL's fused-head call (and of wrappers such as PEFT) that the backbone
# must not see.
_HEAD_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head",
                     "logits_to_keep", "return_dict")
# The request of the per_token_logps_and_entropies call in progress: while it is set, TRL's
# fused-head calls (``model(..., labels=..., fused_lm_head=True)``) are served by rlkern.
_REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "rlkern_trl_request", default=None)

_ORIGINALS: dict[str, Any] = {}
# The options of the generation patch while it is applied (apply(generation="micro_groups")).
_GENERATION: dict[str, GenerationOptions] = {}
# The backend of the fused head's rlkern.linear_logprobs call while applied (apply(backend=)).
_HEAD_BACKEND: dict[str, str] = {}
# apply(truncated_support=...) while applied: {"on": bool}.
_TRUNCATED: dict[str, bool] = {}
_USAGE: Counter[str] = Counter()
_WARNED: set[str] = set()
# Models whose instance ``forward`` got the rlkern wrapper (restored by remove()).
_WRAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _grpo_trainer() -> type:
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


def _note_fallback(kind: str, reason: str) -> None:
    _USAGE[f"{kind}_fallback"] += 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("rlkern.integrations.trl: %s falls back to TRL's own code: %s",
                       kind, reason)


def usage() -> dict[str, int]:
    """How often each path ran since the last :func:`reset_usage`: ``logps_rlkern``,
    ``logps_fallback``, ``loss_rlkern``, ``loss_fallback``; ``generation_micro_groups`` (TRL's
    generation calls that went through :func:`rlkern.generate_groups`; 0 while TRL generates
    itself) and ``generation_split_groups`` (those of them whose rows held a prompt with fewer
    than ``num_generations`` consecutive copies, generated as smaller groups)."""
    counts = {k: _USAGE.get(k, 0) for k in ("logps_rlkern", "logps_fallback", "loss_rlkern",
                                            "loss_fallback")}
    for k in ("generation_micro_groups", "generation_split_groups"):
        counts[k] = trl_generation.USAGE.get(k, 0)
    return counts


def reset_usage() -> None:
    """Zero the :func:`usage` counters."""
    _USAGE.clear()
    trl_generation.USAGE.clear()


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities and entropy through rlkern.linear_logprobs


def _head_model(trainer: Any, model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside the DDP / DeepSpeed / PEFT wrappers around ``model``."""
    inner = trainer.accelerator.unwrap_model(model)
    get_base = getattr(inner, "get_base_model", None)  # a PEFT model: the patched base model
    return get_base() if callable(get_base) else inner


def _logps_fallback_reason(target: nn.Module) -> str | None:
    config = getattr(target, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return f"{type(target).__name__} has no transformers config"
    text_config = config.get_text_config()
    cap = getattr(text_config, _SOFTCAP_FIELD, None)
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                and math.isfinite(cap) and cap > 0):
        return f"the model caps its logits by {_SOFTCAP_FIELD}={cap!r} (not a finite float > 0)"
    scale = logit_multiplier(text_config)
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        return f"the model scales its logits by {scale!r}"
    backbone = getattr(target, "base_model", None)
    if backbone is None or backbone is target:
        return f"{type(target).__name__} has no separate backbone (base_model)"
    get_head = getattr(target, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        return f"the output layer is {type(head).__name__}, not a plain nn.Linear"
    return None


def sampler_filters(trainer: Any) -> dict[str, int | float]:
    """``GRPOConfig``'s sampling filters as :func:`rlkern.linear_logprobs` options: the ones
    that are on (TRL: ``top_k`` 0 or None, ``top_p`` 1.0, ``min_p`` None or 0 are off)."""
    return active_filters(*(getattr(trainer, n, None) for n in ("top_k", "top_p", "min_p")))


def logit_multiplier(text_config: Any) -> float:
    """The factor ``s`` the model multiplies its logits by (1.0 for most models), from the
    config fields of :data:`_LOGIT_MULTIPLIERS`."""
    scale = 1.0
    for name, divides in _LOGIT_MULTIPLIERS.items():
        value = getattr(text_config, name, None)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            return value  # not a number: the caller falls back and says why
        # HyperCLOVA X multiplies by its logits_scaling where Granite and MiniCPM3 divide
        if divides and getattr(text_config, "model_type", None) == "hyperclovax":
            divides = False
        scale = scale / value if divides else scale * value
    return scale


def _fused_forward(self: nn.Module, *args: Any, rlkern_request: dict[str, Any],
                   **kwargs: Any) -> Any:
    """TRL's fused-head call ``model(**inputs, labels=labels, fused_lm_head=True)`` served by
    rlkern: the backbone, then :func:`rlkern.linear_logprobs` on the hidden states of the
    scored positions only (labels ≠ −100: the completion tokens), through the LM head module's
    own call. Returns what TRL's fused head returns and its method reads: ``log_probs`` and
    ``entropy`` of shape ``labels[:, 1:]`` (0 where unscored), and ``aux_loss`` (the MoE
    load-balancing loss, when the call asks for router logits).

    TRL's method builds the call — its chunking, the vision-language inputs sliced per chunk,
    ``output_router_logits`` for the auxiliary loss — so every input it supports reaches the
    backbone exactly as TRL sends it; this function replaces only the head.

    ``rlkern_request`` keys: ``temperature``, ``entropy`` (bool), ``fp32_head`` (bool: TRL's
    ``cast_lm_head_to_fp32``), ``softcap`` (float or None: logit soft-capping); ``served``
    counts the calls served.
    """
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    for name in _HEAD_ONLY_KWARGS:
        kwargs.pop(name, None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["use_cache"] = False
    text_config = self.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):  # as the model's own forward does
        kwargs.setdefault("output_router_logits", True)
    outputs = self.base_model(*args, **kwargs)
    hidden = outputs.last_hidden_state  # (B, L, H)
    if shift_labels is None:  # position t predicts token t + 1
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:  # pre-shifted (context / sequence parallelism)
        labels = shift_labels
    scored = labels != -100
    head = self.get_output_embeddings()
    _ensure_wrapped(head, _fused_head_forward)
    # Through the head module's own call, so that whatever manages its parameters runs its
    # hooks: FSDP2 all-gathers a sharded (DTensor) weight for the call and again for the
    # backward, and reduces its gradient, as for the model's own head call.
    logps, entropy = head(hidden[scored.to(hidden.device)],
                          rlkern_request={**rlkern_request, "labels": labels[scored]})
    scored = scored.to(logps.device)
    # masked_scatter keeps an all-unscored chunk connected to the graph (a zero gradient)
    log_probs = logps.new_zeros(scored.shape).masked_scatter(scored, logps)
    if entropy is not None:
        entropy = entropy.new_zeros(scored.shape).masked_scatter(scored, entropy)
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_aux_loss(outputs, text_config, kwargs.get("attention_mask"))
    rlkern_request["served"] += 1
    return types.SimpleNamespace(log_probs=log_probs, entropy=entropy, aux_loss=aux_loss)


def _router_aux_loss(outputs: Any, text_config: Any, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss of the backbone's router logits: transformers' Mixtral
    function, which every MoE family shares, as the model's own forward and TRL compute it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(outputs.router_logits, text_config.num_experts,
                                    text_config.num_experts_per_tok, attention_mask)


def _fused_head_forward(self: nn.Linear, hidden: Tensor,
                        rlkern_request: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    """The LM head's half of :func:`_fused_forward`: ``hidden (M, H)`` rows and their
    ``labels (M,)`` → ``(logps, entropy or None)`` (M,) through :func:`rlkern.linear_logprobs`
    with the head's (unsharded) parameters."""
    labels: Tensor = rlkern_request["labels"]
    weight, bias = self.weight, self.bias
    hidden = hidden.to(weight.device)
    device_type = hidden.device.type
    if rlkern_request["fp32_head"]:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # what F.linear would compute in
    else:
        dtype = hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    # the casts are explicit above; autocast would otherwise re-cast inside the op
    with torch.autocast(device_type, enabled=False):
        out = rlkern.linear_logprobs(hidden, weight, labels.to(weight.device), bias=bias,
                                     temperature=float(rlkern_request["temperature"]),
                                     return_entropy=bool(rlkern_request["entropy"]),
                                     softcap=rlkern_request.get("softcap"),
                                     top_k=rlkern_request.get("top_k"),
                                     top_p=rlkern_request.get("top_p"),
                                     min_p=rlkern_request.get("min_p"),
                                     backend=_HEAD_BACKEND.get("backend", "auto"))
    return out.logprobs, out.entropy


def _ensure_wrapped(target: nn.Module, fused: Callable[..., Any]) -> None:
    """Give ``target`` a forward that ``fused`` serves when a request is given: for the model
    (``fused`` = :func:`_fused_forward`), a fused-head call while a
    :func:`per_token_logps_and_entropies` request is active; for its LM head, an explicit
    ``rlkern_request`` keyword. Every other call runs the previous forward (generation, TRL's
    own paths)."""
    if getattr(target.forward, "_rlkern_fused", False):
        return
    def wrapper(self: nn.Module, *args: Any, rlkern_request: dict[str, Any] | None = None,
                **kwargs: Any) -> Any:
        if rlkern_request is None and fused is _fused_forward and kwargs.get("fused_lm_head"):
            rlkern_request = _REQUEST.get()
        if rlkern_request is None:
            return self._rlkern_prev_forward(*args, **kwargs)
        return fused(self, *args, rlkern_request=rlkern_request, **kwargs)

    # Keep the class forward's signature visible: ``generate`` validates its kwargs against it.
    functools.update_wrapper(wrapper, type(target).forward)
    wrapper._rlkern_fused = True  # type: ignore[attr-defined]
    target._rlkern_had_instance_forward = "forward" in target.__dict__
    target._rlkern_prev_forward = target.forward
    target.forward = types.MethodType(wrapper, target)
    _WRAPPED.add(target)


def _unwrap_all() -> None:
    for target in list(_WRAPPED):
        prev = target.__dict__.pop("_rlkern_prev_forward", None)
        had = target.__dict__.pop("_rlkern_had_instance_forward", False)
        if had and prev is not None:
            target.forward = prev
        else:
            target.__dict__.pop("forward", None)
    _WRAPPED.clear()


def per_token_logps_and_entropies(
    trainer: Any,
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    batch_size: int | None = None,
    compute_entropy: bool = False,
    compute_aux_loss: bool = False,
    **extra: Any,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``GRPOTrainer._get_per_token_logps_and_entropies`` with the LM head through
    :func:`rlkern.linear_logprobs`.

    TRL's own method runs — its chunking into ``batch_size`` rows, the vision-language inputs
    sliced per chunk, the MoE auxiliary loss request — and each of its fused-head calls
    ``model(**inputs, labels=labels, fused_lm_head=True)`` is served by rlkern's wrapper over
    the model's forward (:func:`_fused_forward`): the backbone as TRL calls it, then rlkern on
    the scored positions' hidden states, with the trainer's temperature (a logit scale folded
    in), ``cast_lm_head_to_fp32`` and the entropy.

    Args:
        trainer: the ``GRPOTrainer`` (``self``).
        model: the policy or the reference model, possibly wrapped (DDP, DeepSpeed, PEFT,
            FSDP2).
        input_ids / attention_mask: ``(B, L)`` prompt + completion tokens and their mask.
        logits_to_keep: ``K``, the completion width: the last ``K`` tokens are scored.
        batch_size: rows per model call (TRL's chunking; default all ``B``).
        compute_entropy: also return the per-token entropy of ``softmax(logits / T)``.
        compute_aux_loss: also return the MoE router load-balancing loss.
        extra: TRL's vision-language arguments (``pixel_values``, ``image_grid_thw``, ...).

    Returns:
        ``(logps (B, K), entropy (B, K) or None, aux_loss or None)``: float32, 0 where the
        token is padding (``attention_mask == 0``), as TRL returns them. Differentiable wrt the
        model's parameters when grad is enabled. For a model this path cannot handle (see the
        module doc) TRL's original head runs, counted in :func:`usage`.
    """
    target = _head_model(trainer, model)
    reason = _logps_fallback_reason(target)
    original = _ORIGINALS.get(PATCHED_METHODS[0]) or _grpo_trainer().__dict__[PATCHED_METHODS[0]]
    call = functools.partial(original, trainer, model, input_ids, attention_mask, logits_to_keep,
                             batch_size=batch_size, compute_entropy=compute_entropy,
                             compute_aux_loss=compute_aux_loss, **extra)
    if reason is not None:
        _note_fallback("logps", reason)
        return call()
    _ensure_wrapped(target, _fused_forward)
    # a logit scale s folds into the temperature: softmax(s·z / T) = softmax(z / (T / s)), and
    # into the cap: c·tanh(s·x/c) = s·c'·tanh(x/c') with c' = c / s
    text_config = target.config.get_text_config()
    scale = logit_multiplier(text_config)
    cap = getattr(text_config, _SOFTCAP_FIELD, None)
    request = {
        "temperature": trainer.temperature / scale,
        "softcap": None if cap is None else float(cap) / scale,
        **(sampler_filters(trainer) if _TRUNCATED.get("on") and model is not
           getattr(trainer, "ref_model", None) else {}),
        "entropy": compute_entropy,
        "fp32_head": bool(getattr(trainer.args, "cast_lm_head_to_fp32", False)),
        "served": 0,
    }
    token = _REQUEST.set(request)
    try:
        out = call()
    finally:
        _REQUEST.reset(token)
    if request["served"] == 0:
        # TRL's fused head ran instead: a wrapper did not pass the call to the model's forward
        _note_fallback("logps", f"{type(model).__name__} did not route TRL's fused-head call "
                                "through the model's forward")
    else:
        _USAGE["logps_rlkern"] += 1
    return out


# ---------------------------------------------------------------------------------------------
# The loss through rlkern.policy_loss


def _loss_fallback_reason(trainer: Any) -> str | None:
    if trainer.loss_type not in TRL_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r} (rlkern covers {', '.join(TRL_LOSS_TYPES)})"
    return None


def _global_mean(trainer: Any, total: Tensor, count: Tensor) -> float:
    """TRL's metric reduction: Σ over processes of ``total`` / Σ of ``count``."""
    local = torch.stack([total.float(), count.float()])
    totals = trainer.accelerator.reduce(local, reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _log_clip_metrics(trainer: Any, metrics: dict[str, list], row_stats: Tensor,
                      advantages: Tensor) -> None:
    """TRL's clip metrics from the op's per-row counts of clipped tokens (``row_stats``,
    rlkern's ratio is TRL's: unclamped, per token or per sequence, PPO's after the ``delta``
    clamp). TRL averages them over the valid tokens, or, with sequence-level ratios and one
    advantage per sequence (a ``(B, 1)`` ratio), over the sequences; its per-sequence min / max
    skip empty rows (NaN) in the token case."""
    from trl.trainer.utils import nanmax, nanmin

    S = layout("policy_loss").row_stats
    lens = row_stats[S.len]
    per_seq = trainer.importance_sampling_level == "sequence" and advantages.shape[1] == 1
    # (B,) per-sequence fractions; a sequence-level row is wholly clipped or not
    frac = lambda name: row_stats[S[name]] / (lens.clamp(min=1.0) if per_seq else lens)
    if per_seq:
        mean = lambda name: _global_mean(trainer, frac(name).sum(), torch.tensor(
            float(lens.shape[0]), device=lens.device))
    else:
        mean = lambda name: _global_mean(trainer, row_stats[S[name]].sum(), lens.sum())
    if trainer.loss_type == "cispo":  # its clip is one-sided: ratio > ε_high with A > 0
        metrics["cispo_clip_ratio"].append(mean("clip_high"))
        return
    if trainer.loss_type == "vespo":
        phi = row_stats[S.phi_sum]
        if advantages.shape[1] == 1:  # TRL's φ is then (B, 1): a mean over the sequences
            # an empty row has S = 0, hence φ(w = 1) = 1 (the gamma weight's normalisation)
            per_seq_phi = torch.where(lens > 0, phi / lens.clamp(min=1.0), torch.ones_like(phi))
            value = _global_mean(trainer, per_seq_phi.sum(),
                                 torch.tensor(float(lens.shape[0]), device=lens.device))
        else:
            value = _global_mean(trainer, phi.sum(), lens.sum())
        metrics["vespo/phi_seq_mean"].append(value)
        return
    if trainer.loss_type == "sapo":
        return
    low, high = mean("clip_low"), mean("clip_high")
    metrics["clip_ratio/low_mean"].append(low)
    metrics["clip_ratio/high_mean"].append(high)
    metrics["clip_ratio/region_mean"].append(low + high)  # A < 0 and A > 0: disjoint
    metrics["clip_ratio/low_min"].append(
        nanmin(trainer.accelerator.gather(frac("clip_low").float())).item())
    metrics["clip_ratio/high_max"].append(
        nanmax(trainer.accelerator.gather(frac("clip_high").float())).item())


def _entropy_threshold(trainer: Any, entropies: Tensor, mask: Tensor) -> Tensor | None:
    """The (1 − q) entropy quantile over every process's valid tokens (TRL gathers them);
    ``None`` on one process, where rlkern computes the same quantile itself."""
    if trainer.top_entropy_quantile >= 1.0 or trainer.accelerator.num_processes == 1:
        return None
    local = entropies.detach()[mask.bool()].float()
    sentinel = -1e9  # entropies are >= 0, so padding cannot be mistaken for a value
    padded = trainer.accelerator.pad_across_processes(local, dim=0, pad_index=sentinel)
    gathered = trainer.accelerator.gather(padded)
    gathered = gathered[gathered != sentinel]
    if gathered.numel() == 0:
        return torch.tensor(math.inf, device=entropies.device)
    return torch.quantile(gathered, 1 - trainer.top_entropy_quantile)


def _token_weights(trainer: Any, inputs: dict[str, Any], logps: Tensor, old: Tensor,
                   advantages: Tensor, mask: Tensor) -> Tensor | None:
    """TRL's per-token multipliers of the policy term: the off-policy sequence mask
    (``off_policy_mask_threshold``) and vLLM's importance-sampling ratio, as ``(B, T)``."""
    weights = None
    if trainer.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old)
        weights = trainer.get_off_policy_mask(
            advantages=advantages, per_token_logps=logps, sampling_per_token_logps=sampling,
            mask=mask, off_policy_threshold=trainer.off_policy_mask_threshold)
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and (
            trainer.loss_type != "vespo"):  # vespo folds the ratio into its sequence weight
        ratio = inputs["importance_sampling_ratio"]
        weights = ratio if weights is None else weights * ratio
    if weights is None:
        return None
    return weights.detach().float().expand(mask.shape)


def compute_loss(trainer: Any, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """``GRPOTrainer._compute_loss`` with the loss from :func:`rlkern.policy_loss`.

    ``inputs`` is TRL's batch: ``prompt_ids / prompt_mask (B, P)``, ``completion_ids /
    completion_mask (B, K)``, ``advantages (B,)`` or ``(B, K)``, optionally
    ``old_per_token_logps``, ``ref_per_token_logps``, ``tool_mask``, ``num_items_in_batch``,
    ``importance_sampling_ratio`` (all ``(B, K)``-shaped per-token tensors). Returns the scalar
    loss TRL would return (scaled for gradient accumulation as TRL scales it) and appends
    TRL's metrics to ``trainer._metrics[mode]``.

    The loss is ``rlkern.policy_loss(logps, old, A, mask, config=PolicyLossConfig.trl(...))``
    with ``num_tokens = num_items_in_batch / num_processes · GA / steps_per_generation`` for
    dapo, cispo and vespo (no GA / steps factor in eval mode); the entropy bonus
    (``entropy_coef``), the high-entropy token mask (``top_entropy_quantile``), the KL term
    (``beta``, ``use_bias_correction_kl``), vLLM's importance-sampling ratio and the
    off-policy mask are applied by the same call.
    """
    reason = _loss_fallback_reason(trainer)
    if reason is not None:
        _note_fallback("loss", reason)
        return _ORIGINALS.get(PATCHED_METHODS[1], _grpo_trainer().__dict__[PATCHED_METHODS[1]])(
            trainer, model, inputs)
    _USAGE["loss_rlkern"] += 1
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    extra = {k: inputs.get(k) for k in _MULTIMODAL_KWARGS}
    logps, entropies, aux_loss = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, keep, compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled, **extra)

    mode = "train" if trainer.model.training else "eval"
    ga = int(trainer.current_gradient_accumulation_steps) if mode == "train" else 1
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): TRL's shape for the metrics below
    old = inputs.get("old_per_token_logps")
    old = logps.detach() if old is None else old
    bonus = bool(trainer._entropy_bonus_enabled)
    # the adaptive controller's coefficient for this window (TRL's static one otherwise)
    coef = trl_entropy.applied_coef(trainer) if bonus else 0.0
    args = trainer.args
    config = rlkern.PolicyLossConfig.trl(
        trainer.loss_type,
        epsilon=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        beta=trainer.beta,
        delta=args.delta,
        importance_sampling_level=trainer.importance_sampling_level,
        max_completion_length=trainer.max_completion_length,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        use_bias_correction_kl=bool(args.use_bias_correction_kl),
        top_entropy_quantile=trainer.top_entropy_quantile,
        entropy_coef=coef,
        # vLLM's ratio arrives precomputed (inputs["importance_sampling_ratio"]): applied as
        # a token weight, exactly the tensor TRL multiplies by
        vllm_importance_sampling_correction=False,
        gradient_accumulation_steps=ga,
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )
    rollout = None
    if trainer.loss_type == "vespo" and trainer.use_vllm and (
            trainer.vllm_importance_sampling_correction):
        config, rollout = fold_is_ratio(config, old, inputs["importance_sampling_ratio"])
    num_tokens = None
    if trainer.loss_type in ("dapo", "cispo", "vespo"):
        num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":  # the count spans the generation batch: one accumulation window
            num_tokens = num_tokens * ga / args.steps_per_generation
    # The entropy is differentiated only through the bonus; otherwise it feeds the mask and
    # the metric, and a detached input spares the LM head's backward an all-zero gradient.
    entropy_in = entropies if coef != 0.0 else entropies.detach()
    out, row_stats = run(prepare(
        logps, old, advantages, mask, config=config,
        ref_logprobs=inputs["ref_per_token_logps"] if trainer.beta != 0.0 else None,
        rollout_logprobs=rollout,
        entropy=entropy_in,
        token_weights=_token_weights(trainer, inputs, logps, old, advantages, mask),
        entropy_threshold=_entropy_threshold(trainer, entropies, mask),
    ), num_tokens=num_tokens)
    loss, metrics = out.loss, out.metrics
    log = trainer._metrics[mode]
    if bonus:
        # TRL's "policy_loss": the policy + KL terms before the accumulation scaling
        policy = metrics["pg_loss"] + trainer.beta * metrics.get("kl_loss", 0.0)
        log["policy_loss"].append(trainer.accelerator.gather(policy.float()).nanmean().item())
        trl_entropy.update(trainer, entropies.detach(), mask, mode)
        if mode == "train" and trainer.accelerator.sync_gradients:
            log["entropy_coef"].append(trainer.entropy_coef)
    if trainer.aux_loss_enabled and aux_loss is not None:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / ga
        log["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())

    # rlkern's kl / entropy metrics are means over this process's valid tokens: times the
    # count they give the sums that TRL reduces across processes.
    count = mask.sum().float()
    for key, name in (("kl", "kl"), ("entropy", "entropy_mean")):
        if key == "kl" and trainer.beta == 0.0:
            continue
        log[key].append(_global_mean(trainer, metrics[name].float() * count, count))
    _log_clip_metrics(trainer, log, row_stats, advantages)
    return loss


# ---------------------------------------------------------------------------------------------
# apply / remove


def _profiled(fn: Callable, name: str) -> Callable:
    """``fn`` under TRL's ``profiling_decorator`` with TRL's method name, so TRL's timing
    logs keep their keys."""
    fn.__name__ = fn.__qualname__ = name
    try:
        from trl.extras.profiling import profiling_decorator
    except ImportError:  # pragma: no cover - older TRL layouts
        return fn
    return profiling_decorator(fn)


def _patched_logps(self: Any, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   logits_to_keep: int, batch_size: int | None = None,
                   compute_entropy: bool = False, compute_aux_loss: bool = False,
                   **extra: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                         batch_size, compute_entropy, compute_aux_loss, **extra)


def _patched_loss(self: Any, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return compute_loss(self, model, inputs)


def _patched_generate(self: Any, prompt_ids: list[list[int]], images: Any,
                      multimodal_fields: dict[str, Any], num_generations: int,
                      has_tool_images: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    return trl_generation.generate_single_turn(self, _GENERATION["options"], prompt_ids, images,
                                               multimodal_fields, num_generations,
                                               has_tool_images)


_REPLACEMENTS = {
    PATCHED_METHODS[0]: _profiled(_patched_logps, PATCHED_METHODS[0]),
    PATCHED_METHODS[1]: _profiled(_patched_loss, PATCHED_METHODS[1]),
}


def is_applied() -> bool:
    """True while ``GRPOTrainer``'s methods are rlkern's."""
    return bool(_ORIGINALS)


def apply(*, generation: str | None = None, kv_budget_tokens: int | None = None,
          schedule: str = "length_aware", micro_group_size: int | None = None,
          backend: str | None = None, truncated_support: bool | None = None) -> None:
    """Swap ``GRPOTrainer._get_per_token_logps_and_entropies`` and ``_compute_loss`` for rlkern
    (see the module doc). Idempotent; :func:`remove` undoes it.

    Args:
        generation: ``"micro_groups"`` also makes ``GRPOTrainer`` (without vLLM) generate
            through :func:`rlkern.generate_groups` (``_generate_single_turn`` is replaced; see
            :mod:`rlkern.integrations.trl_generation`); a later call with other options
            replaces them. ``None`` (default) leaves generation as it is: TRL's own, or
            rlkern's if an earlier call turned it on (so :func:`patched` keeps it).
        kv_budget_tokens: the generation's KV-cache budget in tokens (prompt prefixes plus the
            resident members' generated tokens); ``None``: one micro group (or group) at a
            time. Only with ``generation="micro_groups"``.
        schedule: ``"length_aware"`` (default), ``"micro_group"`` or ``"full_group"``
            (:mod:`rlkern.sampling.scheduler`). Completions do not depend on it.
        micro_group_size: members per micro group (default ``max(1, num_generations // 8)``).
        backend: the ``backend`` of the fused head's :func:`rlkern.linear_logprobs` calls
            (e.g. ``"torch"`` where ``rlkern._C`` is not built). ``None`` (default) leaves it
            as it is: ``"auto"``, or what an earlier call set (until :func:`remove`).
        truncated_support: ``True``: the policy's and the old policy's log-probabilities (and
            entropies) are those of the sampler's truncated distribution — ``GRPOConfig``'s
            ``top_k``, ``top_p``, ``min_p`` at its ``temperature``, renormalised over the kept
            set (:func:`rlkern.linear_logprobs` with the filters) — so that they match the
            rollout engine's processed log-probabilities and vLLM's importance ratio is
            unbiased. The reference model's stay full-vocabulary. A completion token outside
            the trainer's kept set gets log-prob −inf (ratio 0, no gradient). ``None``
            (default) leaves it as it is (off, or what an earlier call set).

    Raises:
        ImportError: TRL is not installed.
        ValueError: an unknown ``generation`` / ``schedule``, a non-positive budget or micro
            group size, or generation options given without ``generation="micro_groups"``.
    """
    if backend is not None and backend not in rlkern.backends.BACKENDS:
        raise ValueError(f"backend must be one of {rlkern.backends.BACKENDS}, got {backend!r}")
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    if generation is None and (kv_budget_tokens is not None or micro_group_size is not None
                               or schedule != "length_aware"):
        raise ValueError("kv_budget_tokens, schedule and micro_group_size configure rlkern's "
                         "generation: pass generation='micro_groups' with them")
    if backend is not None:
        _HEAD_BACKEND["backend"] = backend
    if truncated_support is not None:
        _TRUNCATED["on"] = bool(truncated_support)
        if "options" in _GENERATION:  # generation turned on earlier: its log-probs follow
            _GENERATION["options"] = dataclasses.replace(
                _GENERATION["options"], processed_logprobs=_TRUNCATED["on"])
    options = None if generation is None else GenerationOptions(
        kv_budget_tokens=kv_budget_tokens, schedule=schedule, micro_group_size=micro_group_size,
        processed_logprobs=_TRUNCATED.get("on", False))
    cls = _grpo_trainer()
    if options is not None:
        if GENERATION_METHOD not in cls.__dict__ and GENERATION_METHOD not in _ORIGINALS:
            raise ValueError(f"this TRL's GRPOTrainer has no {GENERATION_METHOD} (written "
                             f"against TRL {TESTED_TRL}): generation='micro_groups' cannot "
                             "be installed")
        _ORIGINALS.setdefault(GENERATION_METHOD, cls.__dict__[GENERATION_METHOD])
        _GENERATION["options"] = options
        setattr(cls, GENERATION_METHOD, _patched_generate)
    if all(name in _ORIGINALS for name in PATCHED_METHODS):
        return
    import trl

    if not str(trl.__version__).startswith(TESTED_TRL):
        logger.warning("rlkern.integrations.trl was written and tested against TRL %s.x; "
                       "TRL %s is installed: check tests/test_integration_trl.py",
                       TESTED_TRL, trl.__version__)
    for name in PATCHED_METHODS:
        _ORIGINALS[name] = cls.__dict__[name]
    for name in PATCHED_METHODS:
        setattr(cls, name, _REPLACEMENTS[name])


def remove() -> None:
    """Put TRL's original methods back (the very same function objects) and take rlkern's
    forward wrapper off every model it was installed on. Idempotent."""
    if _ORIGINALS:
        cls = _grpo_trainer()
        for name, original in _ORIGINALS.items():
            setattr(cls, name, original)
        _ORIGINALS.clear()
    _GENERATION.clear()
    _HEAD_BACKEND.clear()
    _TRUNCATED.clear()
    _unwrap_all()


@contextmanager
def patched() -> Iterator[None]:
    """``with rlkern.integrations.trl.patched(): trainer.train()`` — :func:`apply` for the
    block, :func:`remove` after it (unless it was applied before the block)."""
    was = is_applied()
    apply()
    try:
        yield
    finally:
        if not was:
            remove()

