"""``RolloutCorrection``: verl's rollout-correction options (``rollout_corr_helper`` of verl
0.9.1), parsed and validated once.

A rollout correction compares the training policy's log-probabilities with the rollout
engine's, ``log r = old − rollout`` per token, and

* **importance weights** (``rollout_is``): ``w = exp(clamp(log r, ±20))`` per token, or
  ``exp(clamp(Σ_t m·log r, ±20))`` per sequence; a threshold ``u`` truncates them
  (``min(w, u)``, TIS), a ``"lower_upper"`` string zeroes those outside ``[lower, upper]``
  (IcePop); optionally divided by their batch mean (``rollout_is_batch_normalize``);
* **rejection sampling** (``rollout_rs``, comma-separated, every option must pass): a
  divergence estimate of ``log r`` (clamped to ±20) per token —
  ``k1 = −log r``, ``k2 = ½ (log r)²``, ``k3 = exp(log r) − 1 − log r`` — compared per token
  (``token_k*``) or as its masked sum / mean / max over the sequence (``seq_sum_k*``,
  ``seq_mean_k*``, ``seq_max_k{2,3}``). ``k1`` options keep ``log(lower) ≤ stat ≤ log(upper)``
  (``"lower_upper"``, or one number u: ``[1/u, u]``); the others keep ``stat ≤ upper``. A
  rejected token (or every token of a rejected sequence) leaves the response mask.

The threshold grammar and the error messages are verl's (``_parse_rollout_is_threshold``,
``_parse_rollout_rs_thresholds``, ``compute_rollout_rejection_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_RS_OPTIONS",
    "RejectionOption",
    "RolloutCorrection",
]

#: verl's SUPPORTED_ROLLOUT_RS_OPTIONS, in a fixed order.
ROLLOUT_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2",
                      "seq_sum_k3", "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2",
                      "seq_max_k3")
ROLLOUT_IS_LEVELS = ("token", "sequence")
#: |log r| bound before exp (verl's SAFETY_BOUND).
SAFETY_BOUND = 20.0


@dataclass(frozen=True)
class RejectionOption:
    """One rejection-sampling criterion.

    ``name``: a :data:`ROLLOUT_RS_OPTIONS` entry; ``level``: ``"token"`` or ``"sum"`` /
    ``"mean"`` / ``"max"`` (the sequence reduction); ``estimator``: ``"k1"``, ``"k2"`` or
    ``"k3"``; ``lower`` / ``upper``: the kept interval of the statistic (k1: the logs of the
    ratio bounds; others: ``lower = None``, ``upper`` the bound itself).
    """

    name: str
    level: str
    estimator: str
    lower: float | None
    upper: float


def _parse_is_threshold(spec: str | float) -> tuple[float, float | None]:
    """verl's ``_parse_rollout_is_threshold``: ``(upper, lower or None)``."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be specified as a float or a string threshold "
                        "specification, not a boolean.")
    if isinstance(spec, int | float):
        upper, lower = float(spec), None
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        try:
            if "_" in text:
                lo_text, hi_text = text.split("_", 1)
                lower, upper = float(lo_text), float(hi_text)
            else:
                upper, lower = float(text), None
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold '{spec}'.") from exc
    else:
        raise TypeError("rollout_is_threshold must be a float or a string threshold "
                        "specification.")
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}.")
    if lower is not None:
        if not lower > 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}.")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound.")
    return upper, lower


def _parse_rs(rollout_rs: str, threshold: str | float | None) -> tuple[RejectionOption, ...]:
    """verl's option list (deduplicated, in the given order) with its thresholds
    (``_parse_rollout_rs_thresholds``)."""
    if not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple "
                         "options).")
    if threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    names: list[str] = []
    for opt in (o.strip() for o in rollout_rs.split(",")):
        if not opt:
            continue
        if opt not in ROLLOUT_RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {opt}. Must be one of "
                             f"{sorted(ROLLOUT_RS_OPTIONS)}.")
        if opt not in names:
            names.append(opt)
    if not names:
        raise ValueError("rollout_rs must contain at least one valid option.")
    if not isinstance(threshold, int | float | str):
        raise TypeError("rollout_rs_threshold must be a string or numeric value specifying "
                        "per-option thresholds.")
    specs = ([str(threshold)] if not isinstance(threshold, str)
             else [p.strip() for p in threshold.split(",") if p.strip()])
    if not specs:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value.")
    if len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_rs_threshold expects either one threshold shared by all "
                         f"options or exactly {len(names)} thresholds to match the provided "
                         f"rollout_rs options.")
    specs = specs * len(names) if len(specs) == 1 else specs
    out = []
    for name, spec in zip(names, specs, strict=True):
        parts = name.split("_")
        level = "token" if parts[0] == "token" else parts[1]
        est = parts[-1]
        if est == "k1":
            try:
                if "_" in spec:
                    lo_text, hi_text = spec.split("_", 1)
                    lower, upper = float(lo_text), float(hi_text)
                else:
                    upper = float(spec)
                    lower = 1.0 / upper
            except (ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"Invalid numeric threshold '{spec}' for option "
                                 f"'{name}'.") from exc
            if lower <= 0 or upper <= 0:
                raise ValueError(f"Thresholds for option '{name}' must be positive, got {spec}.")
            if lower > upper:
                raise ValueError(f"Thresholds for option '{name}' must be lower <= upper, got "
                                 f"{spec}.")
            out.append(RejectionOption(name, level, est, math.log(lower), math.log(upper)))
        else:
            if "_" in spec:
                raise ValueError(f"rollout_rs_threshold for option '{name}' must provide a "
                                 f"single upper bound without '_'. Received '{spec}'.")
            try:
                upper = float(spec)
            except ValueError as exc:
                raise ValueError(f"Invalid numeric threshold '{spec}' for option "
                                 f"'{name}'.") from exc
            if upper <= 0:
                raise ValueError(f"Threshold for option '{name}' must be positive, got {spec}.")
            out.append(RejectionOption(name, level, est, None, upper))
    return tuple(out)


@dataclass(frozen=True)
class RolloutCorrection:
    """verl's rollout-correction options, validated (:meth:`from_verl` builds it from verl's
    argument names; :meth:`from_config` from a verl ``RolloutCorrectionConfig`` or dict).

    ``is_level``: ``"token"`` / ``"sequence"`` / ``None`` (no weights); ``is_upper`` /
    ``is_lower``: the weight bounds (``is_lower`` set: IcePop's zeroing, else truncation);
    ``batch_normalize``: divide the weights by their batch mean; ``rejection``: the
    rejection-sampling criteria (empty: none).
    """

    is_level: str | None = None
    is_upper: float = 2.0
    is_lower: float | None = None
    batch_normalize: bool = False
    rejection: tuple[RejectionOption, ...] = ()

    @classmethod
    def from_verl(cls, rollout_is: str | None = None,
                  rollout_is_threshold: str | float | None = 2.0,
                  rollout_is_batch_normalize: bool = False, rollout_rs: str | None = None,
                  rollout_rs_threshold: str | float | None = None) -> RolloutCorrection:
        """The arguments of verl's ``compute_rollout_correction_and_rejection_mask``. As
        there, weights are computed only when both ``rollout_is`` and
        ``rollout_is_threshold`` are set."""
        level, upper, lower = None, 2.0, None
        if rollout_is is not None and rollout_is_threshold is not None:
            if rollout_is not in ROLLOUT_IS_LEVELS:
                raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of "
                                 f"{set(ROLLOUT_IS_LEVELS)}.")
            level = rollout_is
            upper, lower = _parse_is_threshold(rollout_is_threshold)
        if not isinstance(rollout_is_batch_normalize, bool):
            raise TypeError("rollout_is_batch_normalize must be a bool, got "
                            f"{type(rollout_is_batch_normalize).__name__}")
        rejection: tuple[RejectionOption, ...] = ()
        if rollout_rs is not None:
            if rollout_rs_threshold is None:
                raise ValueError("rollout_rs_threshold must be explicitly provided when "
                                 "rollout_rs is enabled. Set rollout_rs_threshold to the "
                                 "desired threshold value.")
            rejection = _parse_rs(rollout_rs, rollout_rs_threshold)
        return cls(level, upper, lower, rollout_is_batch_normalize, rejection)

    @classmethod
    def from_config(cls, config: object) -> RolloutCorrection:
        """From verl's ``RolloutCorrectionConfig`` (or any mapping with its keys), read with
        verl's defaults as its trainer and ``compute_policy_loss_bypass_mode`` read them."""
        get = config.get if hasattr(config, "get") else (
            lambda k, d: getattr(config, k, d))
        return cls.from_verl(get("rollout_is", None), get("rollout_is_threshold", 2.0),
                             get("rollout_is_batch_normalize", False), get("rollout_rs", None),
                             get("rollout_rs_threshold", None))

    @property
    def icepop(self) -> bool:
        """Weights outside ``[is_lower, is_upper]`` are zeroed (rather than truncated)."""
        return self.is_lower is not None
