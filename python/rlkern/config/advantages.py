"""``AdvantageConfig``: the options of :func:`rlkern.group_advantages` as one frozen dataclass,
and the names and constants of the advantages family that ``rlkern.ops`` and
``rlkern.reference`` share.

The config is validated once, when it is built, and reaches every backend the same way:
:meth:`AdvantageConfig.kernel_args` gives the ops' ``int[] flags`` (one code per option) and
``float[] hparams``, laid out as ``csrc/include/rlkern/group_stats.h`` defines them (read from
``rlkern._C`` by :func:`rlkern.config.layout.layout`; the numbering exists only in the header).
The option names below are the header's code-table entries, in the header's order
(``tests/test_advantages_layout.py`` checks both).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from rlkern.config.layout import layout

__all__ = [
    "ESTIMATORS",
    "GIGPO_MODES",
    "GRPO_FAMILY",
    "NAN_POLICIES",
    "SINGLETONS",
    "STD_MODES",
    "STD_SCOPES",
    "STREAMING_ESTIMATORS",
    "UNLIKELY_LAMBDA",
    "WHITEN_EPS",
    "AdvantageConfig",
    "code",
    "codes",
    "config_and_args",
    "entries",
    "loglik_policy",
    "sequence_loglik",
]

#: Estimators (ALGORITHMS.md §2), in the order of the header's estimator codes.
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo", "gpg", "grpo_passk",
              "ngrpo", "unlikely", "xrpo")
STD_MODES = ("unbiased", "biased", "none")
STD_SCOPES = ("group", "batch")
SINGLETONS = ("zero", "verl")
NAN_POLICIES = ("raise", "omit")
#: GiGPO's modes of each level (``rlkern.gigpo_advantages``).
GIGPO_MODES = ("mean_norm", "std_norm")
#: Estimators that normalise by a standard deviation (so ``std_scope="batch"`` applies).
GRPO_FAMILY = ("grpo", "unlikely", "xrpo")
#: Estimators whose advantages depend only on each group's (n, mean, M2): ``GroupStats``.
STREAMING_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "gpg", "ngrpo")
#: Estimators that read each response's mean old log-probability (old_logprobs).
_NEEDS_LOGLIK = ("unlikely", "xrpo")
#: Rewarding the Unlikely's default λ.
UNLIKELY_LAMBDA = 0.25
#: reinforce_pp_baseline's whitening: (c − mean c) · rsqrt(var c + WHITEN_EPS) (verl's
#: masked_whiten; rlkern/group_stats.h: kWhitenEps).
WHITEN_EPS = 1e-8


def codes() -> SimpleNamespace:
    """The advantages family's tables (``IntEnum`` each): ``estimator``, ``std``, ``std_scope``,
    ``singleton``, ``nan_policy``, ``gigpo_mode`` (codes); ``flags``, ``hparams``, ``params``,
    ``moments``, ``extras`` (positions in the packed arrays)."""
    return layout("advantages")


# torch.compile traces the public functions that build the kernels' arguments; these two
# lookups are constants for it (evaluated once at trace time), not code to trace.
@torch.compiler.assume_constant_result
def code(table: str, name: str) -> int:
    """The header's code of entry ``name`` in ``table``: ``code("estimator", "rloo")``."""
    return int(getattr(codes(), table)[name])


@torch.compiler.assume_constant_result
def entries(table: str) -> tuple[str, ...]:
    """The entries of ``table`` in the header's order: ``entries("flags")``."""
    return tuple(entry.name for entry in getattr(codes(), table))


def sequence_loglik(old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """ŝ_i: the masked mean of response i's old token log-probabilities (0 for an empty
    response), float64 ``(N,)`` — the per-response input of unlikely and xrpo, computed the
    same way for the kernels and for the reference. Tokens outside the mask are not read at
    all (padding may hold anything, NaN and ±inf included: 0·NaN would be NaN)."""
    m = mask.to(torch.float64)
    total = torch.where(m != 0, old_logprobs.to(torch.float64) * m, 0.0).sum(-1)
    count = m.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1e-300), 0.0)


def loglik_policy(scores: Tensor, loglik: Tensor, nan_omit: bool) -> tuple[Tensor, Tensor]:
    """Apply ``nan_policy`` to the responses whose ŝ_i is NaN or ±inf (a non-finite old
    log-probability at a valid token), as to a non-finite score, the same for every backend:
    ``"raise"`` raises ``ValueError`` naming the first such row; ``"omit"`` leaves the response
    out (its score becomes NaN: out of its group's statistics, A = 0) and sets its ŝ to 0, so
    that no kernel ranks or averages a NaN. Returns ``(scores, loglik)``."""
    bad = ~torch.isfinite(loglik)
    if not nan_omit:
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"old_logprobs: row {row} has a NaN or infinite log-probability at "
                             "a valid token (nan_policy='raise'; nan_policy='omit' leaves such "
                             "responses out of their group's statistics and gives them an "
                             "advantage of 0)")
        return scores, loglik
    return torch.where(bad, torch.nan, scores), torch.where(bad, 0.0, loglik)


def _choice(value: Any, name: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _finite(value: Any, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class AdvantageConfig:
    """Options of :func:`rlkern.group_advantages` (ALGORITHMS.md §2; the function's docstring
    has the formulas and the trainer conventions).

    Fields:
        estimator: one of :data:`ESTIMATORS`.
        eps: added to σ (verl 1e-6, TRL 1e-4); finite, ≥ 0.
        std: ``"unbiased"`` (n − 1), ``"biased"`` (n) or ``"none"`` (no division).
        std_scope: ``"group"`` or ``"batch"`` (σ of the whole batch; grpo, unlikely, xrpo).
        singleton: ``"zero"`` (A = 0) or ``"verl"`` (μ = 0, σ = 1).
        nan_policy: ``"raise"`` or ``"omit"`` (non-finite scores leave their group, A = 0).
        r_max: ngrpo's virtual maximum reward.
        lam: unlikely's λ (``None``: 0.25) or xrpo's λ (required); ``None`` for the others.
        kappa: xrpo's κ (required for xrpo); ``None`` for the others.

    Example::

        >>> cfg = rlkern.AdvantageConfig(estimator="rloo", singleton="verl")
        >>> flags, hparams = cfg.kernel_args()     # what the kernels receive
    """

    estimator: str = "grpo"
    eps: float = 1e-6
    std: str = "unbiased"
    std_scope: str = "group"
    singleton: str = "zero"
    nan_policy: str = "raise"
    r_max: float = 1.0
    lam: float | None = None
    kappa: float | None = None

    def __post_init__(self) -> None:
        _choice(self.estimator, "estimator", ESTIMATORS)
        _choice(self.std, "std", STD_MODES)
        _choice(self.std_scope, "std_scope", STD_SCOPES)
        _choice(self.singleton, "singleton", SINGLETONS)
        _choice(self.nan_policy, "nan_policy", NAN_POLICIES)
        for name in ("eps", "r_max"):
            object.__setattr__(self, name, _finite(getattr(self, name), name))
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        est = self.estimator
        if self.std_scope == "batch" and est not in GRPO_FAMILY:
            raise ValueError(f"std_scope='batch' normalises by the batch std: it applies to "
                             f"{GRPO_FAMILY}, not to {est!r}")
        if est == "xrpo" and (self.lam is None or self.kappa is None):
            raise ValueError("estimator='xrpo' needs lam (λ, the sharpening strength) and kappa "
                             "(κ, the cap relative to |A|)")
        if self.lam is not None and est not in _NEEDS_LOGLIK:
            raise ValueError(f"lam only applies to 'unlikely' and 'xrpo', not {est!r}")
        if self.kappa is not None and est != "xrpo":
            raise ValueError(f"kappa only applies to 'xrpo', not {est!r}")
        for name in ("lam", "kappa"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
            object.__setattr__(self, name, None if value is None else float(value))

    # ------------------------------------------------------------------------------ inputs

    def check_inputs(self, *, lengths: bool, old_logprobs: bool) -> None:
        """Raise unless the estimator's extra inputs are given exactly when it takes them
        (``lengths``: opo; ``old_logprobs``: unlikely, xrpo)."""
        est = self.estimator
        if est == "opo" and not lengths:
            raise ValueError("estimator='opo' needs lengths: the response lengths (N,), e.g. "
                             "mask.sum(-1), for its length-weighted baseline")
        if est != "opo" and lengths:
            raise ValueError(f"lengths only applies to estimator='opo', not {est!r}")
        if est in _NEEDS_LOGLIK and not old_logprobs:
            raise ValueError(f"estimator={est!r} needs old_logprobs (N, T) and mask (N, T): "
                             "it ranks responses by their mean token log-probability")
        if est not in _NEEDS_LOGLIK and old_logprobs:
            raise ValueError(f"old_logprobs only applies to 'unlikely' and 'xrpo', not {est!r}")

    @property
    def uses_loglik(self) -> bool:
        """Whether the estimator reads each response's mean old log-probability."""
        return self.estimator in _NEEDS_LOGLIK

    # ------------------------------------------------------------------------- the kernels

    def kernel_args(self) -> tuple[list[int], list[float]]:
        """The ops' ``flags`` (the code of each option, in the header's ``flags`` order: each
        flag is named after its code table and after the field of this config) and
        ``hparams`` (eps, r_max, λ, κ in the header's ``hparams`` order; λ defaults to 0.25
        for unlikely, an unused one is 0)."""
        flags = [code(flag, getattr(self, flag)) for flag in entries("flags")]
        lam = UNLIKELY_LAMBDA if self.lam is None else self.lam
        values = {"eps": self.eps, "r_max": self.r_max, "lam": lam, "kappa": self.kappa or 0.0}
        return flags, [float(values[name]) for name in entries("hparams")]

    @classmethod
    def from_kernel_args(cls, flags: list[int], hparams: list[float]) -> AdvantageConfig:
        """The config that :meth:`kernel_args` turned into ``(flags, hparams)`` (unlikely's
        default λ made explicit; λ and κ ``None`` where the estimator takes none)."""
        c = codes()
        fields = {f.name: getattr(c, f.name)(flags[f]).name for f in c.flags}
        values = {h.name: float(hparams[h]) for h in c.hparams}
        est = fields["estimator"]
        return cls(**fields, eps=values["eps"], r_max=values["r_max"],
                   lam=values["lam"] if est in _NEEDS_LOGLIK else None,
                   kappa=values["kappa"] if est == "xrpo" else None)


# Option values of these exact types are cached by value (a bool, a tensor or any other value
# takes the uncached path, so it gets the same validation and the same error).
_CACHEABLE = (str, int, float, type(None))


@functools.lru_cache(maxsize=64)
def _cached_config_and_args(**options: Any) -> tuple[AdvantageConfig, tuple[int, ...],
                                                      tuple[float, ...]]:
    cfg = AdvantageConfig(**options)
    flags, hparams = cfg.kernel_args()
    return cfg, tuple(flags), tuple(hparams)


def config_and_args(**options: Any) -> tuple[AdvantageConfig, list[int], list[float]]:
    """``AdvantageConfig(**options)`` and its :meth:`~AdvantageConfig.kernel_args`, cached by
    the options' values: validating and encoding them is a fixed cost of every call, large
    next to the contiguous-groups kernel at small N. Raises as the constructor does (errors are
    not cached)."""
    if all(type(v) in _CACHEABLE for v in options.values()):
        cfg, flags, hparams = _cached_config_and_args(**options)
        return cfg, list(flags), list(hparams)
    cfg = AdvantageConfig(**options)
    return cfg, *cfg.kernel_args()
