"""Checking and preparing the inputs of :func:`rlkern.policy_loss` (and of its chunked form):
the user's tensors become the ops' arguments — the compute-dtype ``(B, T)`` tensors, the
optional inputs as one list by slot of ``layout("policy_loss").inputs``, the kernels' ``flags``
/ ``hparams`` and the concrete backend. Also the NaN policy's error and the entropy quantile.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlkern import backends
from rlkern.config.dtypes import INDEX_DTYPES, acc_dtype, bool_mask
from rlkern.config.layout import entries, layout
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.ops.logprobs import checks_enabled
from rlkern.ops.policy_loss.cov_select import cov_selection

__all__ = ["Prepared", "entropy_quantile_threshold", "float_input", "normaliser", "prepare",
           "raise_non_finite"]


class Prepared(NamedTuple):
    """The checked arguments of one call."""

    lp: Tensor                    # (B, T) compute dtype (float32, or float64)
    old: Tensor                   # (B, T)
    adv: Tensor                   # (B,) or (B, T)
    mask: Tensor                  # (B, T) bool
    inputs: list[Tensor | None]   # the optional inputs by slot (layout("policy_loss").inputs)
    cfg: PolicyLossConfig
    flags: list[int]              # PolicyLossConfig.kernel_args
    hparams: list[float]
    backend: str                  # concrete: cpu / cuda / triton / torch
    out_dtype: torch.dtype

    def get(self, slot: str) -> Tensor | None:
        """The optional input of slot ``slot`` (e.g. ``"entropy"``), or None."""
        return self.inputs[entries("policy_loss", "inputs")[slot]]


def tensor_arg(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def float_input(t: Any, name: str, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """``t`` checked (floating, ``shape``, ``device``) and cast to ``dtype``, unit inner stride."""
    t = tensor_arg(t, name)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (like logprobs), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logprobs on {device}")
    if t.dtype != dtype:  # (a same-dtype .to() still costs a dispatcher call)
        t = t.to(dtype)
    return t if t.dim() < 2 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def normaliser(value: Any, name: str, device: torch.device) -> Tensor | float | None:
    """A global count (``num_tokens`` / ``num_seqs``): None, a finite number > 0, or a
    1-element real tensor (returned as float64 on ``device``).

    A number is checked on the host. A tensor count ≤ 0 or non-finite is a caller's bug (a
    count that was never all-reduced, a wrong sign) that would otherwise divide the loss into
    ±inf or flip its sign: while checks are on (:func:`rlkern.set_checks`) it raises
    ``ValueError`` (one host sync); with checks off — no sync, if the count already lives on
    ``device`` (a CPU count for CUDA inputs is copied, which waits) — it is replaced by NaN, so
    the loss and every gradient are NaN on every backend instead of silently wrong.
    """
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        if value.device.type == "meta" and device.type != "meta":
            raise ValueError(f"{name} is on meta (no data) but the inputs are on {device}")
        count = value.detach().reshape(()).to(device=device, dtype=torch.float64)
        valid = (count > 0) & torch.isfinite(count)
        if checks_enabled() and not torch.compiler.is_compiling() and count.device.type != "meta":
            if not bool(valid):
                raise ValueError(f"{name} must be finite and > 0, got {count.item()} (disable "
                                 "this check with rlkern.set_checks(False): the loss is then "
                                 "NaN)")
            return count  # checked: no poisoning needed
        return torch.where(valid, count, torch.nan)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


@functools.cache
def _default_config() -> PolicyLossConfig:
    """``PolicyLossConfig()``, built and validated once: a frozen config can serve every call,
    and its validation is a fixed cost of the order of a small call's kernel."""
    return PolicyLossConfig()


def _config(config: Any, overrides: dict[str, Any]) -> PolicyLossConfig:
    if config is None:
        config = _default_config()
    elif not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    return config.replace(**overrides)


def _check_options(cfg: PolicyLossConfig, B: int, adv: Tensor, opt: dict[str, Tensor | None],
                   ) -> None:
    """The inputs each enabled option needs, and the options each input needs."""
    kind = cfg.policy_loss
    if cfg.kl_coef != 0.0 and opt["ref_logprobs"] is None:
        raise ValueError(f"kl_coef = {cfg.kl_coef} needs ref_logprobs (or set kl_coef=0)")
    if (opt["rollout_logprobs"] is not None and cfg.rollout_correction is None
            and cfg.rollout_rs is None):
        raise ValueError("rollout_logprobs given but config.rollout_correction is None: choose "
                         "'token_truncate', 'token_mask', 'sequence_truncate' or 'sequence_mask'")
    if cfg.entropy_coef != 0.0 and opt["entropy"] is None:
        raise ValueError(f"entropy_coef = {cfg.entropy_coef} needs the per-token entropy "
                         "(entropy=...)")
    if cfg.top_entropy_quantile < 1.0 and opt["entropy"] is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropy (entropy=...)")
    if kind in ("gmpo", "gvpo") and opt["token_weights"] is not None:
        raise ValueError(f"token_weights do not apply to the sequence-level loss {kind!r}")
    if kind == "gvpo":
        if adv.dim() != 1:
            raise ValueError("gvpo takes one score per response: advantages of shape (B,)")
        if B % cfg.group_size:
            raise ValueError(f"gvpo: B = {B} rows is not a multiple of group_size = "
                             f"{cfg.group_size} (groups are contiguous rows)")
        if opt["rollout_logprobs"] is not None:
            raise ValueError("gvpo does not take a rollout correction")


def prepare(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
            config: PolicyLossConfig | None = None, ref_logprobs: Tensor | None = None,
            rollout_logprobs: Tensor | None = None, entropy: Tensor | None = None,
            token_weights: Tensor | None = None,
            entropy_threshold: float | Tensor | None = None, backend: str = "auto",
            overrides: dict[str, Any] | None = None,
            cov_select: Tensor | None = None) -> Prepared:
    """Check :func:`rlkern.policy_loss`'s arguments (same names) and turn them into the ops'.
    clip_cov / kl_cov without ``cov_select``: the selection of
    :func:`~rlkern.ops.policy_loss.cov_select.cov_selection` (verl's)."""
    cfg = _config(config, overrides or {})
    lp = tensor_arg(logprobs, "logprobs")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {lp.dtype}")
    if lp.dim() != 2:
        raise ValueError(f"logprobs must have shape (B, T), got {tuple(lp.shape)}")
    B, T = lp.shape
    dev = lp.device
    dt = acc_dtype(lp.dtype)
    lp = float_input(lp, "logprobs", (B, T), dev, dt)
    old = float_input(old_logprobs, "old_logprobs", (B, T), dev, dt)
    m = tensor_arg(mask, "mask")
    if tuple(m.shape) != (B, T):
        raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(m.shape)}")
    if m.device != dev:
        raise ValueError(f"mask is on {m.device} but logprobs on {dev}")
    m = bool_mask(m)
    adv = tensor_arg(advantages, "advantages")
    if not (adv.dtype.is_floating_point or adv.dtype in INDEX_DTYPES):
        raise TypeError(f"advantages must be a float tensor, got {adv.dtype}")
    if tuple(adv.shape) in ((B,), (B, 1)):
        if adv.dim() != 1 or adv.dtype != dt or not adv.is_contiguous():
            adv = adv.reshape(B).to(dt).contiguous()
    elif tuple(adv.shape) == (B, T):
        adv = float_input(adv, "advantages", (B, T), dev, dt)
    else:
        raise ValueError(f"advantages must have shape (B,) = ({B},) or (B, T) = {(B, T)}, got "
                         f"{tuple(adv.shape)}")
    if adv.device != dev:
        raise ValueError(f"advantages are on {adv.device} but logprobs on {dev}")
    if cfg.policy_loss in ("clip_cov", "kl_cov"):
        if cov_select is None:
            cov_select = cov_selection(logprobs, old_logprobs, advantages, mask, cfg)
    elif cov_select is not None:
        raise ValueError(f"cov_select applies to clip_cov / kl_cov, not {cfg.policy_loss!r}")
    given = {"ref_logprobs": ref_logprobs, "rollout_logprobs": rollout_logprobs,
             "entropy": entropy, "token_weights": token_weights, "cov_select": cov_select}
    opt = {name: None if t is None else float_input(t, name, (B, T), dev, dt)
           for name, t in given.items()}
    _check_options(cfg, B, adv, opt)
    with_kl = cfg.kl_coef != 0.0
    if not with_kl:
        opt["ref_logprobs"] = None  # no KL term: the reference is not read
    opt["entropy_threshold"] = None
    if cfg.top_entropy_quantile < 1.0:
        if entropy_threshold is None:
            opt["entropy_threshold"] = entropy_quantile_threshold(opt["entropy"], m,
                                                                  cfg.top_entropy_quantile)
        else:
            opt["entropy_threshold"] = torch.as_tensor(entropy_threshold, dtype=dt,
                                                       device=dev).reshape(())
    flags, hparams = cfg.kernel_args(with_kl=with_kl,
                                     with_rollout=opt["rollout_logprobs"] is not None)
    inputs = [opt[name] for name in entries("policy_loss", "inputs")]
    return Prepared(lp, old, adv, m, inputs, cfg, flags, hparams,
                    backends.resolve_backend(backend, dev), dt)


def entropy_quantile_threshold(entropy: Tensor, mask: Tensor, q: float) -> Tensor:
    """The (1 − q) quantile of the valid tokens' entropies as a 0-dim tensor: torch.quantile's
    linear interpolation in float32, as TRL's ``get_high_entropy_mask`` computes it, but with
    no host sync and no data-dependent shape (one sort of the masked values). +inf when no
    token is valid."""
    flat = torch.where(mask, entropy.detach(), math.inf).reshape(-1).to(torch.float32)
    values = torch.sort(flat).values
    n = mask.sum()
    last = (n - 1).clamp(min=0)
    if values.numel() == 0:
        return torch.full((), math.inf, dtype=entropy.dtype, device=entropy.device)
    pos = last.to(torch.float32) * torch.tensor(1.0 - q, dtype=torch.float32)
    lo = pos.long().reshape(1)  # torch.quantile truncates the rank
    hi = pos.ceil().long().reshape(1)
    # gather, not values[lo]: a tensor index would be a data-dependent .item() under compile
    thr = torch.lerp(values.gather(0, lo), values.gather(0, hi),
                     (pos - lo.to(torch.float32)).reshape(1)).reshape(())
    return torch.where(n > 0, thr, math.inf).to(entropy.dtype)


def raise_non_finite(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor,
                     inputs: list[Tensor | None], flags: list[int]) -> None:
    """The NaN policy's error: name the first input with a non-finite value at a valid token
    (the kernels flag the row; this finds the token). The rollout log-probabilities may be
    NaN (no correction); the reference is read only with a KL term."""
    lay = layout("policy_loss")
    B, T = mask.shape
    named = [("logprobs", lp), ("old_logprobs", old), ("advantages", adv)]
    for slot in lay.inputs:
        if slot.name in ("rollout_logprobs", "entropy_threshold"):
            continue
        if slot.name == "ref_logprobs" and flags[lay.flags.kl_kind] == lay.kl_kinds.none:
            continue
        named.append((slot.name, inputs[slot]))
    for name, t in named:
        if t is None:
            continue
        full = t if t.dim() == 2 else t[:, None].expand(B, T)
        bad = ~torch.isfinite(full) & mask
        if bool(bad.any()):
            b, t_ = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}: non-finite value {float(full[b, t_])} at valid token (row {b}, "
                f"position {t_}). NaN/Inf policy: inputs at tokens with mask = 1 must be "
                "finite (masked positions never reach the result; rollout_logprobs may be "
                "NaN, which counts as no correction). Disable the check with "
                "rlkern.set_checks(False).")
