"""rlkern inside verl: registered advantage estimators and policy losses, and drop-in logprobs.

verl looks its advantage estimators and policy losses up by name in two registries of
``verl.trainer.ppo.core_algos`` (``ADV_ESTIMATOR_REGISTRY`` via ``get_adv_estimator_fn``,
``POLICY_LOSS_REGISTRY`` via ``get_policy_loss_fn``). :func:`register` adds rlkern's versions
under new names, so a run switches with two config values and nothing else changes::

    import rlkern.integrations.verl
    rlkern.integrations.verl.register()
    # algorithm.adv_estimator=rlkern_grpo
    # actor_rollout_ref.actor.policy_loss.loss_mode=rlkern_vanilla

Every registered function has verl's signature and returns what verl's function of the same
name returns: advantage estimators ``(advantages, returns)``, both ``(bs, response_length)``
(the same tensor for the outcome estimators, as verl does); policy losses
``(pg_loss, pg_metrics)`` with a 0-dim loss and verl's metric keys (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower``; ``dro``, ``kl_cov``: ``actor/ppo_kl`` only;
``clip_cov``: ``actor/pg_clipfrac`` and ``actor/ppo_kl``) as Python floats (``gpg``: ``{}``).
clip_cov / kl_cov select their tokens as verl does (clip_cov draws from the global generator
with ``torch.randperm``: a seeded run picks verl's tokens). The values
are computed by :func:`rlkern.group_advantages` (outcome estimators), :func:`rlkern.gae` (the
token-level ``gae``, ``reinforce_plus_plus``, ``remax``: one fused reverse scan, then verl's
whitening in torch) and :func:`rlkern.policy_loss` with :meth:`rlkern.PolicyLossConfig.verl`.

verl runs its trainer and its actor in Ray worker processes: a registration made in the
launching process does not reach them. The environment variable
``VERL_USE_EXTERNAL_MODULES=rlkern.integrations.verl_plugin`` does (verl imports the listed
modules in every process that imports verl); see docs/integrations/verl.md.

:func:`logprobs_from_logits` and :func:`entropy_from_logits` (and
:func:`entropy_from_logits_with_chunking`) replace ``verl.utils.torch_functional``'s functions
of the same names and signatures with :func:`rlkern.token_logprobs`;
:func:`patch_torch_functional` swaps them in (also in the verl modules that imported them by
name), :func:`unpatch_torch_functional` restores verl's.

verl is imported lazily, when one of these functions is called: importing this module does
not need verl.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlkern.backends import cpp_ops, resolve_backend
from rlkern.config.advantages import WHITEN_EPS
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.integrations._fold import row_entropy
from rlkern.integrations._swap import FunctionSwap
from rlkern.integrations.verl_rollout import compute_policy_loss_rlkern_bypass_mode
from rlkern.ops.advantages import group_advantages
from rlkern.ops.eager import plain_eager
from rlkern.ops.logprobs import token_logprobs
from rlkern.ops.policy_loss import kl_penalty as rlkern_kl_penalty
from rlkern.ops.policy_loss import policy_loss
from rlkern.ops.token_advantages import gae

__all__ = [
    "ADV_ESTIMATORS",
    "POLICY_LOSSES",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "group_ids_from_index",
    "is_registered",
    "logprobs_from_logits",
    "patch_torch_functional",
    "policy_loss_function",
    "register",
    "replace_verl_estimators",
    "restore_verl_estimators",
    "scan_estimator",
    "unpatch_torch_functional",
    "unregister",
]

# Marks every function this module registers, so that register() / unregister() recognise
# rlkern's entries (also from an earlier import of this module) and never touch anyone else's.
_MARK = "_rlkern_verl_integration"


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _MARK, True)
    return fn


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, _MARK, False))


# ---------------------------------------------------------------------------------------------
# Group ids from verl's uid array


def group_ids_from_index(index: Any, device: torch.device | str | None = None) -> Tensor:
    """verl's ``index`` (one group label per response, usually a numpy array of uid strings)
    as an ``(N,)`` int64 tensor of group ids for :func:`rlkern.group_advantages`.

    Integer labels (numpy or torch) are used as they are (rlkern's ids need not be dense).
    Anything else is factorised in one hash pass (``pandas.factorize``, O(N); verl depends on
    pandas) or, without pandas, ``np.unique(..., return_inverse=True)`` (a sort): equal labels
    get equal ids, in any order.
    """
    if isinstance(index, Tensor):
        if index.dtype.is_floating_point or index.dtype.is_complex:
            index = index.cpu().numpy()
        else:
            return index.reshape(-1).to(device=device, dtype=torch.int64)
    arr = np.asarray(index)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "iub":
        codes = arr.astype(np.int64, copy=False)
    else:
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - verl installs pandas
            codes = np.unique(arr, return_inverse=True)[1].reshape(-1)
        else:
            codes = pd.factorize(arr, sort=False)[0]
        codes = codes.astype(np.int64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(codes)).to(device)


# ---------------------------------------------------------------------------------------------
# Advantage estimators (verl's outcome-reward estimators, same signatures and outputs)


def _cfg_get(config: Any, key: str, default: Any) -> Any:
    """``config.get(key, default)`` for verl's AlgoConfig / ActorConfig (dict-like dataclasses),
    an OmegaConf DictConfig or a plain dict; ``default`` when config is None."""
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _advantages(token_level_rewards: Tensor, response_mask: Tensor, index: Any, *,
                estimator: str, epsilon: float = 1e-6, std: str = "unbiased",
                singleton: str = "verl", lengths: bool = False) -> tuple[Tensor, Tensor]:
    if index is None:
        raise ValueError(f"rlkern's {estimator} estimator needs index (the uid of each "
                         "response's prompt): verl passes data.non_tensor_batch['uid']")
    ids = group_ids_from_index(index, token_level_rewards.device)
    with torch.no_grad():
        out = group_advantages(
            token_level_rewards, group_ids=ids, mask=response_mask, estimator=estimator,
            eps=float(epsilon), std=std, singleton=singleton,
            lengths=response_mask.sum(-1) if lengths else None)
    adv = out.advantages.to(token_level_rewards.dtype)
    return adv, adv


def _norm_flag(norm_adv_by_std_in_grpo: bool | None, config: Any) -> bool:
    # verl's trainer passes the flag only through the algorithm config to registered
    # estimators (ray_trainer.compute_advantage): an explicit argument wins, then the config.
    if norm_adv_by_std_in_grpo is not None:
        return bool(norm_adv_by_std_in_grpo)
    return bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))


@dataclass(frozen=True)
class _EstimatorSpec:
    """One of verl's outcome estimators: its function name, rlkern's estimator and options, the
    extra parameters of verl's signature, and the docstring."""

    function: str
    estimator: str
    doc: str
    norm_flag: bool = False  # takes norm_adv_by_std_in_grpo (std="none" when False)
    singleton: str = "verl"
    lengths: bool = False  # opo: lengths = mask.sum(-1)
    f_norm: bool = False  # gpg: f_norm (and alpha, which verl ignores)


_ESTIMATOR_SPECS = (
    _EstimatorSpec(
        "compute_grpo_outcome_advantage", "grpo", norm_flag=True,
        doc="""verl's ``grpo`` / ``grpo_vectorized``: ``s_i = Σ_t r[i, t]``,
    ``A_i = (s_i − μ_g) / (σ_g + ε)`` (σ unbiased; no division when
    ``norm_adv_by_std_in_grpo`` is False), singletons ``μ = 0, σ = 1``; returned as
    ``A_i · mask`` ``(bs, response_length)``, twice (advantages, returns).

    ``norm_adv_by_std_in_grpo``: the argument, else ``config.norm_adv_by_std_in_grpo``
    (how verl's trainer passes it to registered estimators), else True.
    """),
    _EstimatorSpec(
        "compute_grpo_passk_outcome_advantage", "grpo_passk", norm_flag=True,
        doc="""verl's ``grpo_passk``: the best response of each group gets
    ``(s_max − s_2nd) / (σ_g + ε)`` (no division without std normalisation), the others 0.
    Groups need ≥ 2 responses (ValueError otherwise, as in verl)."""),
    _EstimatorSpec(
        "compute_rloo_outcome_advantage", "rloo",
        doc="verl's ``rloo``: ``A_i = (s_i − μ_g) · n_g / (n_g − 1)``; a singleton keeps "
            "``s_i``."),
    _EstimatorSpec(
        "compute_rloo_vectorized_outcome_advantage", "rloo", singleton="zero",
        doc="verl's ``rloo_vectorized``: as ``rloo`` but a singleton gets 0."),
    _EstimatorSpec(
        "compute_opo_outcome_advantage", "opo", lengths=True,
        doc="""verl's ``opo``: ``A_i = s_i − Σ_j len_j s_j / Σ_j len_j`` over the group,
    ``len = mask.sum(-1)``; a singleton keeps ``s_i``."""),
    _EstimatorSpec(
        "compute_gpg_outcome_advantage", "gpg", f_norm=True,
        doc="""verl's ``gpg``: ``A_i = α (s_i − μ_g) / f_norm`` with ``α = bs / max(#{s ≠ 0}, 1)``
    (verl recomputes α and ignores the ``alpha`` argument; so does this); a singleton has
    ``μ = 0``."""),
    _EstimatorSpec(
        "compute_reinforce_plus_plus_baseline_outcome_advantage", "reinforce_pp_baseline",
        doc="""verl's ``reinforce_plus_plus_baseline``: ``c_i = s_i − μ_g`` (singleton: ``s_i``),
    whitened over the batch's valid tokens (``(c − mean) · rsqrt(var + 1e-8)``, unbiased var),
    times the mask."""),
)

_KW = inspect.Parameter.POSITIONAL_OR_KEYWORD
# verl's estimator signature: these, then the estimator's own parameters, then config, **kwargs.
_HEAD = (inspect.Parameter("token_level_rewards", _KW, annotation=Tensor),
         inspect.Parameter("response_mask", _KW, annotation=Tensor),
         inspect.Parameter("index", _KW, default=None, annotation="np.ndarray | None"),
         inspect.Parameter("epsilon", _KW, default=1e-6, annotation=float))
_NORM = (inspect.Parameter("norm_adv_by_std_in_grpo", _KW, default=None,
                           annotation="bool | None"),)
_GPG = (inspect.Parameter("f_norm", _KW, default=1.0, annotation=float),
        inspect.Parameter("alpha", _KW, default=1.0, annotation=float))
_TAIL = (inspect.Parameter("config", _KW, default=None, annotation=Any),
         inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD, annotation=Any))


def _make_estimator(spec: _EstimatorSpec) -> Callable[..., tuple[Tensor, Tensor]]:
    """verl's estimator ``spec.function`` (same name, signature, outputs) computed by
    :func:`rlkern.group_advantages`."""
    signature = inspect.Signature(
        [*_HEAD, *(_NORM if spec.norm_flag else ()), *(_GPG if spec.f_norm else ()), *_TAIL],
        return_annotation="tuple[Tensor, Tensor]")

    def fn(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        a = signature.bind(*args, **kwargs)
        a.apply_defaults()
        arg = a.arguments
        std = "unbiased"
        if spec.norm_flag and not _norm_flag(arg["norm_adv_by_std_in_grpo"], arg["config"]):
            std = "none"
        adv, _ = _advantages(arg["token_level_rewards"], arg["response_mask"], arg["index"],
                             estimator=spec.estimator, epsilon=arg["epsilon"], std=std,
                             singleton=spec.singleton, lengths=spec.lengths)
        if spec.f_norm and arg["f_norm"] != 1.0:
            adv = adv / arg["f_norm"]
        return adv, adv

    fn.__name__ = fn.__qualname__ = spec.function
    fn.__doc__ = spec.doc
    fn.__signature__ = signature  # type: ignore[attr-defined]
    return _mark(fn)


_ESTIMATOR_FUNCTIONS = {spec.function: _make_estimator(spec) for spec in _ESTIMATOR_SPECS}
compute_grpo_outcome_advantage = _ESTIMATOR_FUNCTIONS["compute_grpo_outcome_advantage"]
compute_grpo_passk_outcome_advantage = _ESTIMATOR_FUNCTIONS[
    "compute_grpo_passk_outcome_advantage"]
compute_rloo_outcome_advantage = _ESTIMATOR_FUNCTIONS["compute_rloo_outcome_advantage"]
compute_rloo_vectorized_outcome_advantage = _ESTIMATOR_FUNCTIONS[
    "compute_rloo_vectorized_outcome_advantage"]
compute_opo_outcome_advantage = _ESTIMATOR_FUNCTIONS["compute_opo_outcome_advantage"]
compute_gpg_outcome_advantage = _ESTIMATOR_FUNCTIONS["compute_gpg_outcome_advantage"]
compute_reinforce_plus_plus_baseline_outcome_advantage = _ESTIMATOR_FUNCTIONS[
    "compute_reinforce_plus_plus_baseline_outcome_advantage"]


# ---------------------------------------------------------------------------------------------
# Token-level estimators: one fused reverse scan (rlkern.gae), then verl's whitening


#: The mask dtypes rlkern::masked_whiten_out reads in place.
_WHITEN_MASK_DTYPES = (torch.bool, torch.int32, torch.int64, torch.float32, torch.float64)


def _masked_whiten(x: Tensor, mask: Tensor, backend: str = "auto") -> Tensor:
    """verl's ``masked_whiten(x, mask)`` (shift_mean=True): mean and unbiased variance over the
    masked entries of the whole batch (``Σ / (count + 1e-8)``, Bessel ``count / (count − 1)``),
    then ``(x − mean) · rsqrt(var + 1e-8)``, with verl's two errors (no valid entry, one).

    On the CPU backend (plain eager tensors, :func:`rlkern.ops.eager.plain_eager`) one C++ op,
    ``rlkern::masked_whiten_out``: three passes, no temporaries, the mask read as it is (bool,
    int32, int64, float32, float64), the sums in float64 (verl's arithmetic otherwise).
    Elsewhere verl's torch operations, one for one."""
    # verl's count arithmetic (Σ mask + 1e-8, Bessel's factor) runs in the dtype of
    # mask.sum(): the mask's float dtype, the default float dtype for a bool / int mask.
    count_dtype = mask.dtype if mask.dtype.is_floating_point else torch.get_default_dtype()
    if (x.dtype in (torch.float32, torch.float64) and plain_eager(x, mask)
            and mask.dtype in _WHITEN_MASK_DTYPES
            and torch.promote_types(x.dtype, mask.dtype) == x.dtype
            and torch.promote_types(x.dtype, count_dtype) == x.dtype
            and count_dtype in (torch.float32, torch.float64)
            and resolve_backend(backend, x.device) == "cpu"):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        cpp_ops().masked_whiten_out(x.contiguous(), mask.contiguous(),
                                    count_dtype == torch.float64, out)
        return out
    valid = mask.bool()
    count = mask.sum()
    n = float(count)  # one host sync for both of verl's checks
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    mean = (torch.where(valid, x, 0.0) * mask).sum() / (count + WHITEN_EPS)
    centered = x - mean
    var = (torch.where(valid, centered**2, 0.0) * mask).sum() / (count + WHITEN_EPS)
    var = var * (count / (count - 1))
    return centered * torch.rsqrt(var + WHITEN_EPS)


def _as_float(x: Any, name: str) -> float:
    """verl types γ / λ as tensors but passes floats; either is accepted."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def scan_estimator(name: str, token_level_rewards: Tensor, response_mask: Tensor, *,
                   values: Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
                   reward_baselines: Tensor | None = None,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """verl's token-level estimator ``name`` (``"gae"``, ``"reinforce_plus_plus"``,
    ``"remax"``) as ``(advantages, returns)``: one :func:`rlkern.gae` scan on ``backend``, then
    what verl does after its loop (whitening, masking, the baseline). The registered functions
    below call it with verl's arguments; ``rlkern bench --op gae`` with its backend."""
    with torch.no_grad():
        if name == "gae":
            if values is None:
                raise ValueError("gae needs values (verl's trainer passes the critic's)")
            dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
            out = gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam,
                      backend=backend)
            return (_masked_whiten(out.advantages.to(dtype), response_mask, backend),
                    out.returns.to(dtype))
        dtype = token_level_rewards.dtype
        if name == "reinforce_plus_plus":
            out = gae(token_level_rewards, None, response_mask, gamma=gamma, lam=1.0,
                      backend=backend)
            returns = out.advantages.to(dtype) * response_mask
            return _masked_whiten(returns, response_mask, backend) * response_mask, returns
        if name == "remax":
            if reward_baselines is None:
                raise ValueError("remax needs reward_baselines (the greedy rollout's rewards)")
            out = gae(token_level_rewards, None, response_mask, gamma=1.0, lam=1.0,
                      backend=backend)
            returns = out.advantages.to(dtype)
            return returns - reward_baselines.unsqueeze(-1) * response_mask, returns
    raise ValueError(f"name must be gae, reinforce_plus_plus or remax, got {name!r}")


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor,
                                 response_mask: Tensor, gamma: Any,
                                 lam: Any) -> tuple[Tensor, Tensor]:
    """verl's ``gae``: the reverse GAE scan with verl's carry over masked (observation)
    tokens, fused in :func:`rlkern.gae`; ``returns = A + V`` (unwhitened A), then
    ``advantages = masked_whiten(A, response_mask)`` over the batch. Inputs
    ``(bs, response_length)``; ``gamma``, ``lam`` floats (or 1-element tensors).

    verl's trainer routes only ``adv_estimator=gae`` to this signature (with ``values`` from
    its critic); it calls any other name, ``rlkern_gae`` included, without ``values``.
    """
    return scan_estimator("gae", token_level_rewards, response_mask, values=values,
                          gamma=_as_float(gamma, "gamma"), lam=_as_float(lam, "lam"))


def compute_reinforce_plus_plus_outcome_advantage(
        token_level_rewards: Tensor, response_mask: Tensor, config: Any = None,
        **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's ``reinforce_plus_plus``: ``returns_t = mask_t · (r_t + γ·G)``, the running
    return ``G`` carried over masked tokens (:func:`rlkern.gae` with ``values=None, lam=1``;
    ``γ = config.gamma``), then ``advantages = masked_whiten(returns, mask) · mask``."""
    if config is None:
        raise ValueError("rlkern_reinforce_plus_plus needs verl's algorithm config (config=..., "
                         "for gamma), as verl's compute_reinforce_plus_plus_outcome_advantage does")
    return scan_estimator("reinforce_plus_plus", token_level_rewards, response_mask,
                          gamma=_as_float(_cfg_get(config, "gamma", 1.0), "gamma"))


def compute_remax_outcome_advantage(token_level_rewards: Tensor, reward_baselines: Tensor,
                                    response_mask: Tensor, config: Any = None,
                                    **kwargs: Any) -> tuple[Tensor, Tensor]:
    """verl's ``remax``: ``returns_t = Σ_{s ≥ t} r_s · mask_s`` (:func:`rlkern.gae` with
    ``values=None, gamma=lam=1``), ``advantages = returns − baseline_b · mask``;
    ``reward_baselines`` ``(bs,)`` is the greedy rollout's reward (verl's trainer generates it
    only for ``adv_estimator=remax``)."""
    return scan_estimator("remax", token_level_rewards, response_mask,
                          reward_baselines=reward_baselines)


for _fn in (compute_gae_advantage_return, compute_reinforce_plus_plus_outcome_advantage,
            compute_remax_outcome_advantage):
    _mark(_fn)


#: registered name → rlkern function; each mirrors verl's estimator of the name without
#: the ``rlkern_`` prefix.
ADV_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "rlkern_grpo": compute_grpo_outcome_advantage,
    "rlkern_grpo_vectorized": compute_grpo_outcome_advantage,
    "rlkern_grpo_passk": compute_grpo_passk_outcome_advantage,
    "rlkern_rloo": compute_rloo_outcome_advantage,
    "rlkern_rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "rlkern_opo": compute_opo_outcome_advantage,
    "rlkern_gpg": compute_gpg_outcome_advantage,
    "rlkern_reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rlkern_gae": compute_gae_advantage_return,
    "rlkern_reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "rlkern_remax": compute_remax_outcome_advantage,
}


# ---------------------------------------------------------------------------------------------
# Policy losses (verl's PolicyLossFn signature and outputs)

# verl name → (default loss_agg_mode of verl's function, metrics verl reports: key → rlkern
# metric, or None for the constant 0.0 verl reports "for compatibility").
_LOSS_SPECS: dict[str, tuple[str, dict[str, str | None]]] = {
    "vanilla": ("token-mean", {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                               "actor/pg_clipfrac_lower": "dualclip_frac"}),
    "gspo": ("seq-mean-token-mean", {"actor/pg_clipfrac": "clipfrac",
                                     "actor/ppo_kl": "approx_kl",
                                     "actor/pg_clipfrac_lower": None}),
    "cispo": ("token-mean", {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                             "actor/pg_clipfrac_lower": None}),
    "sapo": ("seq-mean-token-mean", {"actor/pg_clipfrac": None, "actor/ppo_kl": "approx_kl",
                                     "actor/pg_clipfrac_lower": None}),
    "geo_mean": ("token-mean", {"actor/pg_clipfrac": "clipfrac_high",
                                "actor/ppo_kl": "approx_kl",
                                "actor/pg_clipfrac_lower": "clipfrac_low"}),
    "gpg": ("token-mean", {}),
    "dro": ("token-mean", {"actor/ppo_kl": "approx_kl"}),
    **{name: ("token-mean", {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                             "actor/pg_clipfrac_lower": "dualclip_frac"})
       for name in ("dppo_tv", "dppo_kl")},
    "clip_cov": ("token-mean", {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl"}),
    # kl_cov's ppo_kl is mean |Δ| (abs_log_ratio: computed in _pg_loss)
    "kl_cov": ("token-mean", {"actor/ppo_kl": "abs_log_ratio"}),
}


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = _cfg_get(config, "global_batch_info", None)
    return dict(info) if info else {}


def _cov_options(name: str, pl_cfg: Any) -> dict[str, float]:
    """clip_cov / kl_cov's selection options from verl's ``policy_loss`` config, with verl's
    defaults for unset fields."""
    return {"cov_ratio": float(_cfg_get(pl_cfg, f"{name}_ratio", 0.0002)),
            "cov_lb": float(_cfg_get(pl_cfg, "clip_cov_lb", 1.0)),
            "cov_ub": float(_cfg_get(pl_cfg, "clip_cov_ub", 5.0)),
            "ppo_kl_coef": float(_cfg_get(pl_cfg, "ppo_kl_coef", 1.0))}


def _pg_loss(name: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
             response_mask: Tensor, loss_agg_mode: str, config: Any,
             rollout_is_weights: Tensor | None, backend: str = "auto", *,
             spec: dict[str, str | None] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_<name>`` by rlkern; ``spec``: the metrics to report
    (verl key → rlkern metric; default: those of ``name``)."""
    if config is None:
        raise ValueError(f"rlkern_{name} needs verl's actor config (config=...), as verl's "
                         f"compute_policy_loss_{name} does")
    info = _global_batch_info(config)
    dp_size = int(info.get("dp_size") or 1)
    num_tokens = info.get("batch_num_tokens")
    num_seqs = info.get("global_batch_size")
    # verl's SAPO always aggregates its policy term per sequence; GMPO takes a plain mean over
    # the micro-batch's rows whatever the mode (the preset encodes both).
    agg = "seq-mean-token-mean" if name == "sapo" else loss_agg_mode
    if name != "geo_mean" and dp_size > 1:
        # agg_loss refuses a local normaliser under data parallelism; so do we.
        if agg == "token-mean" and num_tokens is None:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if agg.startswith("seq-mean") and num_seqs is None:
            raise ValueError("global_batch_size is required when dp_size > 1")
    pl_cfg = _cfg_get(config, "policy_loss", None)  # verl's PolicyLossConfig
    cfg = PolicyLossConfig.verl(
        policy_loss=name, loss_agg_mode=loss_agg_mode,
        clip_ratio=float(_cfg_get(config, "clip_ratio", 0.2)),
        clip_ratio_low=_cfg_get(config, "clip_ratio_low", None),
        clip_ratio_high=_cfg_get(config, "clip_ratio_high", None),
        # dppo reads config.get("clip_ratio_c", 20.0), the others config.clip_ratio_c
        clip_ratio_c=float(_cfg_get(config, "clip_ratio_c",
                                    20.0 if name.startswith("dppo") else 3.0)),
        tau_pos=float(_cfg_get(config, "tau_pos", 1.0)),
        tau_neg=float(_cfg_get(config, "tau_neg", 1.05)),
        loss_scale_factor=info.get("loss_scale_factor"),
        dp_size=dp_size,
        dro_beta=_cfg_get(pl_cfg, "dro_beta", None) if name == "dro" else None,
        **(_cov_options(name, pl_cfg) if name in ("clip_cov", "kl_cov") else {}),
    )
    token_weights = rollout = None
    if rollout_is_weights is not None:
        w = rollout_is_weights.detach()
        if name == "geo_mean":
            # gmpo applies the geometric mean of the token weights per sequence; rlkern forms
            # it from rollout log-probabilities, w = exp(old − rollout): pass rollout =
            # old − log w, untruncated (w = 0 gives rollout = +inf and weight 0, as in verl).
            cfg = cfg.replace(rollout_correction="token_truncate", rollout_min=None,
                              rollout_max=None, rollout_log_clamp=None)
            rollout = old_log_prob.detach() - torch.log(w.to(old_log_prob.dtype))
        else:
            token_weights = w
    if name == "geo_mean":
        num_tokens = num_seqs = None
    out = policy_loss(log_prob, old_log_prob, advantages, response_mask, config=cfg,
                      token_weights=token_weights, rollout_logprobs=rollout,
                      num_tokens=num_tokens, num_seqs=num_seqs, backend=backend)
    spec = _LOSS_SPECS[name][1] if spec is None else spec
    if not spec:
        return out.loss, {}
    zero = torch.zeros((), dtype=out.loss.dtype, device=out.loss.device)
    metrics = out.metrics
    if name == "kl_cov":  # verl's masked_mean(|Δ|): not a metric of the fused loss
        m = response_mask.to(zero.dtype)
        d = (log_prob.detach() - old_log_prob).to(zero.dtype).abs()
        metrics = {"abs_log_ratio": (torch.where(m > 0, d, 0.0) * m).sum() / (m.sum() + 1e-8)}
    # verl reports Python floats (.item()); one stacked transfer instead of three syncs.
    values = torch.stack([zero if k is None else metrics[k].detach().to(zero.dtype)
                          for k in spec.values()]).tolist()
    return out.loss, dict(zip(spec.keys(), values, strict=True))


def policy_loss_function(name: str,
                         backend: str = "auto") -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """verl's policy loss ``name`` (``"vanilla"``, ``"dro"``, ...; a key of verl's registry)
    as rlkern computes it, with verl's signature, on ``backend`` (the registered
    ``rlkern_<name>`` functions are these with ``backend="auto"``)."""
    if name == "bypass_mode":
        return functools.partial(compute_policy_loss_rlkern_bypass_mode, backend=backend)
    if name not in _LOSS_SPECS:
        raise ValueError(f"name must be one of {sorted([*_LOSS_SPECS, 'bypass_mode'])}, got "
                         f"{name!r}")
    default_agg = _LOSS_SPECS[name][0]

    def fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = default_agg,
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        return _pg_loss(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                        config, rollout_is_weights, backend)

    fn.__name__ = fn.__qualname__ = f"compute_policy_loss_rlkern_{name}"
    fn.__doc__ = (
        f"verl's ``{name}`` policy loss (``compute_policy_loss_{name}``) computed by "
        f"``rlkern.policy_loss`` with ``PolicyLossConfig.verl(policy_loss={name!r}, ...)``.\n\n"
        "Inputs ``(bs, response_length)``; ``config`` is verl's actor config (clip ratios, "
        "``clip_ratio_c``, ``tau_pos/neg``, ``policy_loss.dro_beta``, ``global_batch_info``: "
        "dp_size, batch_num_tokens, global_batch_size, loss_scale_factor); "
        "``rollout_is_weights`` multiply the per-token loss. Returns ``(pg_loss, pg_metrics)``: "
        "a 0-dim loss, differentiable wrt ``log_prob``, and verl's metrics as Python floats.")
    return _mark(fn)


#: registered name → rlkern policy loss; each mirrors verl's loss of the name without the
#: ``rlkern_`` prefix.
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Any]]]] = {
    f"rlkern_{name}": policy_loss_function(name) for name in _LOSS_SPECS
}
# verl's bypass_mode: the rollout correction + ppo_clip / reinforce (verl_rollout.py)
POLICY_LOSSES["rlkern_bypass_mode"] = _mark(compute_policy_loss_rlkern_bypass_mode)


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's ``core_algos.kl_penalty`` (same signature) by :func:`rlkern.kl_penalty`: the
    per-token KL estimate ``kl_penalty`` (``"kl"`` / ``"k1"``, ``"abs"``, ``"mse"`` / ``"k2"``,
    ``"low_var_kl"`` / ``"k3"``, each with an optional ``"+"``: the value of the estimator with
    the gradient of k2), with verl's clamps (``low_var_kl``: the log-ratio to ±20, the value to
    ±10). ``logprob``, ``ref_logprob``: same shape; returns that shape, float32 (float64 for
    float64 input), differentiable wrt both."""
    return rlkern_kl_penalty(logprob, ref_logprob, estimator=kl_penalty)


# ---------------------------------------------------------------------------------------------
# Registration


def _core_algos() -> Any:
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:  # pragma: no cover - exercised without verl only
        raise ImportError("rlkern.integrations.verl needs verl (verl.trainer.ppo.core_algos): "
                          f"{exc}") from exc
    return core_algos


def register() -> list[str]:
    """Add rlkern's estimators (``rlkern_grpo``, ``rlkern_grpo_vectorized``,
    ``rlkern_grpo_passk``, ``rlkern_rloo``, ``rlkern_rloo_vectorized``, ``rlkern_opo``,
    ``rlkern_gpg``, ``rlkern_reinforce_plus_plus_baseline``, ``rlkern_gae``,
    ``rlkern_reinforce_plus_plus``, ``rlkern_remax``, ``rlkern_gdpo``,
    ``rlkern_optimal_token_baseline``, ``rlkern_tir_optimal_token_baseline``) and policy losses
    (``rlkern_vanilla``, ``rlkern_gspo``, ``rlkern_cispo``, ``rlkern_sapo``,
    ``rlkern_geo_mean``, ``rlkern_gpg``, ``rlkern_dro``, ``rlkern_dppo_tv``,
    ``rlkern_dppo_kl``, ``rlkern_clip_cov``, ``rlkern_kl_cov``, ``rlkern_bypass_mode``) to
    verl's registries, through
    verl's own ``register_adv_est`` / ``register_policy_loss``.

    Idempotent: calling it again (also after this module was reloaded) re-registers the same
    names. A name already registered by someone else raises ``ValueError`` and nothing is
    changed. Returns the registered names.
    """
    core_algos = _core_algos()
    adv_reg, loss_reg = core_algos.ADV_ESTIMATOR_REGISTRY, core_algos.POLICY_LOSS_REGISTRY
    for reg, names in ((adv_reg, ADV_ESTIMATORS), (loss_reg, POLICY_LOSSES)):
        clash = [n for n in names if n in reg and not _is_ours(reg[n])]
        if clash:
            raise ValueError(f"verl already has {clash} registered by someone else; rlkern "
                             "does not overwrite them")
    for name, fn in ADV_ESTIMATORS.items():
        if name in adv_reg and adv_reg[name] is not fn:
            del adv_reg[name]  # ours from an earlier import: register_adv_est refuses a swap
        core_algos.register_adv_est(name)(fn)
    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(fn)
    return [*ADV_ESTIMATORS, *POLICY_LOSSES]


def unregister() -> list[str]:
    """Remove the names :func:`register` added (only entries that are rlkern's). Returns the
    removed names."""
    core_algos = _core_algos()
    removed = []
    for reg in (core_algos.ADV_ESTIMATOR_REGISTRY, core_algos.POLICY_LOSS_REGISTRY):
        for name in [n for n, fn in reg.items() if n.startswith("rlkern_") and _is_ours(fn)]:
            del reg[name]
            removed.append(name)
    return removed


# verl's trainer calls GAE by attribute (``core_algos.compute_gae_advantage_return``) and gives
# the critic's values / the greedy baseline only under the literal names ``gae`` / ``remax``:
# (core_algos attribute, verl's registry name, rlkern's function of verl's signature).
_UNDER_VERL_NAMES = (
    ("compute_gae_advantage_return", "gae", compute_gae_advantage_return),
    ("compute_remax_outcome_advantage", "remax", compute_remax_outcome_advantage),
    ("compute_reinforce_plus_plus_outcome_advantage", "reinforce_plus_plus",
     compute_reinforce_plus_plus_outcome_advantage),
)
# (container, key, verl's original) for every swap replace_verl_estimators made
_REPLACED: list[tuple[Any, str, Any]] = []


def replace_verl_estimators() -> list[str]:
    """Run rlkern's ``gae``, ``remax`` and ``reinforce_plus_plus`` (and ``gdpo``,
    ``optimal_token_baseline``, ``tir_optimal_token_baseline``, whose extra inputs verl's
    trainer passes only under those names) under verl's own names.

    verl's trainer treats ``algorithm.adv_estimator=gae`` and ``remax`` specially (a critic's
    ``values``; a greedy baseline rollout), so ``rlkern_gae`` / ``rlkern_remax`` cannot stand
    in for them in a config. This swaps rlkern's functions (verl's signatures and results) into
    ``core_algos`` and its registry under verl's names instead: the config keeps
    ``adv_estimator=gae`` and the trainer's special handling stays. Idempotent; with
    ``RLKERN_VERL_REPLACE_ESTIMATORS=1`` the plugin calls it in every verl process.
    :func:`restore_verl_estimators` undoes it. Returns the replaced names.
    """
    core = _core_algos()
    done = {(id(c), k) for c, k, _ in _REPLACED}
    for attr, name, fn in _UNDER_VERL_NAMES:
        for container, key, get, put in (
                (core, attr, getattr, setattr),
                (core.ADV_ESTIMATOR_REGISTRY, name, dict.get, dict.__setitem__)):
            if (id(container), key) not in done and get(container, key) is not fn:
                _REPLACED.append((container, key, get(container, key)))
                put(container, key, fn)
    return sorted({k for _, k, _ in _REPLACED})


def restore_verl_estimators() -> None:
    """Put verl's functions back where :func:`replace_verl_estimators` swapped rlkern's in."""
    while _REPLACED:
        container, key, original = _REPLACED.pop()
        if isinstance(container, dict):
            container[key] = original
        else:
            setattr(container, key, original)


def is_registered() -> bool:
    """Whether every name of :func:`register` is registered in verl (with rlkern's function)."""
    if "verl.trainer.ppo.core_algos" not in sys.modules:
        return False
    core_algos = sys.modules["verl.trainer.ppo.core_algos"]
    return all(_is_ours(core_algos.ADV_ESTIMATOR_REGISTRY.get(n)) for n in ADV_ESTIMATORS) and \
        all(_is_ours(core_algos.POLICY_LOSS_REGISTRY.get(n)) for n in POLICY_LOSSES)


# ---------------------------------------------------------------------------------------------
# Drop-ins for verl.utils.torch_functional


def _rows(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``(..., V)`` logits as the ``(N, V)`` or ``(B, L, V)`` rlkern reads (a view when the
    layout allows; 2-D and 3-D inputs as they are, strided views included)."""
    lead = tuple(logits.shape[:-1])
    if tuple(labels.shape) != lead:
        labels = labels.reshape(lead)
    if logits.dim() in (2, 3):
        return logits, labels, lead
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), lead


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """``log_softmax(logits)[..., labels]`` for ``logits (..., V)``, ``labels (...)``: verl's
    ``logprobs_from_logits`` by :func:`rlkern.token_logprobs` (one pass, fp32 accumulation).

    Returns float32 (float64 for float64 logits), like verl's flash-attn path; differentiable
    wrt ``logits``. ``inplace_backward`` (verl's default True, as with flash-attn's
    cross-entropy) writes the gradient over the logits buffer in backward: the logits must not
    be needed by a later backward step (autograd's version check raises if they are).
    """
    x, y, lead = _rows(logits, labels)
    out = token_logprobs(x, y, inplace_backward=bool(inplace_backward)).logprobs
    return out.reshape(lead)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``H = logsumexp(x) − Σ softmax(x)·x`` per row of ``logits (..., V)``: verl's
    ``entropy_from_logits`` by :func:`rlkern.token_logprobs` (one pass, no ``(N, V)``
    temporary). Returns float32 (float64 for float64 logits); differentiable."""
    return row_entropy(logits)


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """verl's chunked entropy (float32 output); rlkern never materialises ``(N, V)``, so the
    chunking is unnecessary and ``chunk_size`` is ignored."""
    return entropy_from_logits(logits)


_TORCH_FUNCTIONAL = FunctionSwap("verl.utils.torch_functional", {
    "logprobs_from_logits": logprobs_from_logits,
    "entropy_from_logits": entropy_from_logits,
    "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
})


def patch_torch_functional() -> list[str]:
    """Swap :func:`logprobs_from_logits`, :func:`entropy_from_logits` and
    :func:`entropy_from_logits_with_chunking` into ``verl.utils.torch_functional`` and into
    every loaded ``verl.*`` module that imported verl's function by name (e.g.
    ``verl.workers.engine.fsdp.transformer_impl``'s ``logprobs_from_logits``). Modules
    imported later read the patched ``verl.utils.torch_functional``. Call it before verl builds
    its engines (they may ``torch.compile`` the entropy function once at construction).

    Idempotent. Returns the patched ``module.attribute`` names.
    """
    return _TORCH_FUNCTIONAL.apply()


def unpatch_torch_functional() -> None:
    """Restore verl's functions wherever :func:`patch_torch_functional` replaced them."""
    _TORCH_FUNCTIONAL.undo()


for _fn in _TORCH_FUNCTIONAL.drop_ins.values():
    _mark(_fn)


# ---------------------------------------------------------------------------------------------
# gdpo and the optimal token baselines (rlkern/integrations/verl_estimators.py): imported here,
# after the helpers they use, and registered / swapped in with the others.

from rlkern.integrations.verl_estimators import (  # noqa: E402
    compute_gdpo_outcome_advantage,
    compute_multi_turn_optimal_token_baseline_advantage,
    compute_optimal_token_baseline_advantage,
)

ADV_ESTIMATORS.update({
    "rlkern_gdpo": _mark(compute_gdpo_outcome_advantage),
    "rlkern_optimal_token_baseline": _mark(compute_optimal_token_baseline_advantage),
    "rlkern_tir_optimal_token_baseline": _mark(
        compute_multi_turn_optimal_token_baseline_advantage),
})
# verl's trainer passes their extra inputs only under verl's names (see verl_estimators.py)
_UNDER_VERL_NAMES += (
    ("compute_gdpo_outcome_advantage", "gdpo", compute_gdpo_outcome_advantage),
    ("compute_optimal_token_baseline_advantage", "optimal_token_baseline",
     compute_optimal_token_baseline_advantage),
    ("compute_multi_turn_optimal_token_baseline_advantage", "tir_optimal_token_baseline",
     compute_multi_turn_optimal_token_baseline_advantage),
)
