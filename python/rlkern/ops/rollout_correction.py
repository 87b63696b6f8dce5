"""verl's rollout correction outside the loss: :func:`rollout_correction` returns verl's
``compute_rollout_correction_and_rejection_mask`` outputs — importance weights, the response
mask with rejected tokens / sequences removed, and the ``rollout_corr/*`` metrics.

How it is computed: one elementwise pass over the ``(B, T)`` log-ratios produces, per row, the
few sums, counts and extrema every output needs (:func:`_row_sums`); the weights and the mask
are formed from them, and every metric is an O(B) reduction of those per-row vectors (no metric
re-reads a ``(B, T)`` tensor), all on the inputs' device in float64, read back to the host once.
The formulas are verl 0.9.1's (``rollout_corr_helper``), operation for operation where they
decide a comparison (verl's ``masked_mean`` divides by ``count + 1e-8``, and so do these).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.config.rollout_correction import SAFETY_BOUND, RejectionOption, RolloutCorrection

__all__ = ["RolloutCorrectionOutput", "batch_norm_factor", "rejection_keep", "rollout_correction",
           "rollout_correction_tensors", "rs_estimators"]

_EPS = 1e-8  # verl_F.masked_mean's denominator guard


class RolloutCorrectionOutput(NamedTuple):
    """Outputs of :func:`rollout_correction` (verl's tuple, the weights as a tensor).

    * ``weights`` — ``(B, T)`` importance weights in the log-probabilities' dtype, 0 at
      padding (``None`` without ``rollout_is``); batch-normalised when asked.
    * ``mask`` — ``(B, T)`` the response mask (its dtype) with rejected tokens set to 0.
    * ``metrics`` — verl's ``rollout_corr/*`` metrics as Python floats.
    """

    weights: Tensor | None
    mask: Tensor
    metrics: dict[str, float]


def _check(old: Tensor, rollout: Tensor, mask: Tensor) -> None:
    for name, t in (("old_log_prob", old), ("rollout_log_prob", rollout)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if not isinstance(mask, Tensor):
        raise TypeError("response_mask must be a torch.Tensor")
    if old.dim() != 2:
        raise ValueError(f"old_log_prob must be (batch, response_length), got {tuple(old.shape)}")
    if old.shape != rollout.shape:
        raise ValueError(f"old_log_prob shape {old.shape} does not match rollout_log_prob shape "
                         f"{rollout.shape}.")
    if old.shape != mask.shape:
        raise ValueError(f"log_prob shape {old.shape} does not match response_mask shape "
                         f"{mask.shape}.")
    if old.device != rollout.device or old.device != mask.device:
        raise ValueError("old_log_prob, rollout_log_prob and response_mask must be on one device")


def _mean(s: Tensor, n: Tensor) -> Tensor:
    """verl_F.masked_mean from a masked sum and count."""
    return s / (n + _EPS)


def _std(x: Tensor) -> Tensor:
    """torch's unbiased std (0 for fewer than two values, as verl reports it)."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def rs_estimators(lr: Tensor) -> dict[str, Tensor]:
    """The per-token divergences of verl's rejection sampling, from log r clamped to ±20."""
    safe = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {"k1": -safe, "k2": 0.5 * safe.square(), "k3": torch.exp(safe) - 1.0 - safe}


def _row_stat(opt: RejectionOption, k: Tensor, m: Tensor, lens: Tensor) -> Tensor:
    """A sequence option's per-row statistic (sum / mean / max of the token divergence; a row
    without valid tokens gets 0 for max, as in verl)."""
    if opt.level == "max":
        if k.shape[1] == 0:  # amax refuses an empty dimension
            return k.new_zeros(k.shape[0])
        mx = torch.where(m, k, -math.inf).amax(1)
        return torch.where(mx == -math.inf, 0.0, mx)
    s = torch.where(m, k, 0.0).sum(1)
    return s if opt.level == "sum" else _mean(s, lens)


def _passes(opt: RejectionOption, x: Tensor) -> Tensor:
    return (x <= opt.upper) if opt.lower is None else (x >= opt.lower) & (x <= opt.upper)


def rejection_keep(opt: RejectionOption, est: dict[str, Tensor], m: Tensor,
                   lens: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(keep, row_stat)``: the ``(B, T)`` keep indicator of one option (a sequence option's
    broadcast over its row) and, for a sequence option, its ``(B,)`` statistic."""
    k = est[opt.estimator]
    if opt.level == "token":
        return _passes(opt, k), None
    row = _row_stat(opt, k, m, lens)
    return _passes(opt, row)[:, None].expand_as(m), row


def _rs_metrics(opt: RejectionOption, k: Tensor, row: Tensor | None, keep: Tensor, m: Tensor,
                lens: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """verl's ``compute_rs_metrics`` and the option's masked fractions, from per-row sums."""
    n = lens.sum()
    k1 = opt.lower is not None
    hi, lo = opt.upper, (opt.lower if k1 else 0.0)
    zero = lens.new_zeros(())
    p = f"rollout_rs_{opt.name}"
    out: dict[str, Tensor] = {}
    if row is None:  # token level: per-row sums of the token statistic
        kz = torch.where(m, k, 0.0)
        seq = _mean(kz.sum(1), lens)
        out[f"{p}_mean"] = _mean(kz.sum(), n)
        out[f"{p}_max"] = torch.where(m, k, -math.inf).amax(1).max()
        out[f"{p}_min"] = torch.where(m, k, math.inf).amin(1).min()
        out[f"{p}_fraction_high"] = _mean((m & (k > hi)).sum(1).sum().double(), n)
        out[f"{p}_fraction_low"] = (_mean((m & (k < lo)).sum(1).sum().double(), n) if k1
                                    else zero)
        clamped = torch.where(m, k.clamp(lo, hi), 0.0)
        c_sum, c_sq = clamped.sum(1).sum(), clamped.square().sum(1).sum()
    else:  # sequence level: the row statistic, weighted by the row's length where verl
        # averages its broadcast over tokens
        seq = row
        rv = row[valid]
        out[f"{p}_mean"] = _mean((lens * torch.where(lens > 0, row, 0.0)).sum(), n)
        out[f"{p}_max"], out[f"{p}_min"] = rv.max(), rv.min()
        out[f"{p}_fraction_high"] = (rv > hi).double().mean()
        out[f"{p}_fraction_low"] = (rv < lo).double().mean() if k1 else zero
        rc = torch.where(lens > 0, row.clamp(lo, hi), 0.0)
        c_sum, c_sq = (lens * rc).sum(), (lens * rc.square()).sum()
    mean_c = _mean(c_sum, n)
    var = _mean(c_sq, n) - mean_c.square()
    out[f"{p}_std"] = torch.where(n > 1, var.clamp(min=0.0).sqrt(), 0.0)
    sv = seq[valid]
    out[f"{p}_seq_mean"], out[f"{p}_seq_std"] = sv.mean(), _std(sv)
    out[f"{p}_seq_max"], out[f"{p}_seq_min"] = sv.max(), sv.min()
    out[f"{p}_seq_max_deviation"] = sv.abs().max()
    out[f"{p}_seq_fraction_high"] = (sv > hi).double().mean()
    if k1:
        out[f"{p}_seq_fraction_low"] = (sv < lo).double().mean()
    rejected = (m & ~keep).sum(1).double()  # per row: valid tokens this option rejects
    out[f"{p}_masked_fraction"] = _mean(rejected.sum(), n)
    n_valid = valid.sum()
    out[f"{p}_seq_masked_fraction"] = ((rejected > 0) & valid).sum() / n_valid.clamp(min=1)
    return out


def _weights(rc: RolloutCorrection, lr: Tensor, m: Tensor, lens: Tensor, valid: Tensor
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """verl's ``compute_rollout_correction_weights`` (``(weights, raw, metrics)``; float64)."""
    upper = rc.is_upper
    lower = 1.0 / upper if rc.is_lower is None else rc.is_lower
    n = lens.sum()
    out: dict[str, Tensor] = {}
    if rc.is_level == "token":
        raw = torch.where(m, torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)), 0.0)
    else:
        lsum = torch.where(m, lr, 0.0).sum(1)
        raw = torch.where(m, torch.exp(lsum.clamp(-SAFETY_BOUND, SAFETY_BOUND))[:, None], 0.0)
    if rc.icepop:
        w = torch.where((raw >= rc.is_lower) & (raw <= upper), raw, 0.0)
    else:
        w = raw.clamp(max=upper)
    w_rows = w.sum(1)
    if rc.is_level == "sequence":
        out["rollout_is_max"] = torch.exp(lsum.max().clamp(max=SAFETY_BOUND))
        out["rollout_is_min"] = torch.exp(lsum.min())
        out["rollout_is_mean"] = _mean(w_rows.sum(), n)
        out["rollout_is_ratio_fraction_high"] = (lsum > math.log(upper)).double().mean()
        out["rollout_is_ratio_fraction_low"] = (lsum < math.log(lower)).double().mean()
    else:
        out["rollout_is_mean"] = _mean(w_rows.sum(), n)
        out["rollout_is_ratio_fraction_high"] = _mean((m & (raw > upper)).sum().double(), n)
        out["rollout_is_ratio_fraction_low"] = _mean((m & (raw < lower)).sum().double(), n)
        out["rollout_is_max"] = torch.where(m, w, -math.inf).amax(1).max()
        out["rollout_is_min"] = torch.where(m, w, math.inf).amin(1).min()
    wc = w.clamp(0.0, upper)  # 0 at padding already
    wc_rows, wc_sq_rows = wc.sum(1), wc.square().sum(1)
    mean_c = _mean(wc_rows.sum(), n)
    var = _mean(wc_sq_rows.sum(), n) - mean_c.square()
    out["rollout_is_std"] = torch.where(n > 1, var.clamp(min=0.0).sqrt(), 0.0)
    out["rollout_is_eff_sample_size"] = 1.0 / _mean(wc_sq_rows.sum() / (mean_c + _EPS).square(),
                                                    n)
    seq_w = _mean(w_rows, lens)
    out["rollout_is_seq_mean"], out["rollout_is_seq_std"] = seq_w.mean(), _std(seq_w)
    out["rollout_is_seq_max"], out["rollout_is_seq_min"] = seq_w.max(), seq_w.min()
    out["rollout_is_seq_max_deviation"] = (seq_w - 1.0).abs().max()
    raw_seq = _mean(raw.sum(1), lens)
    out["rollout_is_seq_fraction_high"] = (raw_seq > upper).double().mean()
    out["rollout_is_seq_fraction_low"] = (raw_seq < lower).double().mean()
    if rc.icepop:
        oob = m & ((raw < rc.is_lower) | (raw > upper))
        out["rollout_is_oob_ratio"] = _mean(oob.sum().double(), n)
    if rc.batch_normalize:
        factor = batch_norm_factor(rc.is_level, w_rows, lens, valid)
        ok = factor > _EPS
        w = torch.where(ok, w / factor, w)
        out["rollout_is_batch_norm_factor"] = torch.where(ok, factor, 1.0)
    return w, raw, out


def batch_norm_factor(level: str, w_rows: Tensor, lens: Tensor, valid: Tensor) -> Tensor:
    """verl's batch-normalisation divisor from per-row weight sums ``w_rows = Σ_t m·w`` and
    lengths: the token mean of the weights (``"token"``) or the mean over rows with a valid
    token of each row's mean weight (``"sequence"``). The caller divides only where it is
    > 1e-8, as verl does."""
    if level == "token":
        return _mean(w_rows.sum(), lens.sum())
    seq_w = _mean(w_rows, lens)
    vf = valid.to(seq_w.dtype)
    return (seq_w * vf).sum() / vf.sum().clamp(min=1e-8)


def _offpolicy(old: Tensor, rollout: Tensor, lr: Tensor, m: Tensor,
               lens: Tensor) -> dict[str, Tensor]:
    """verl's ``compute_offpolicy_metrics`` (KL, perplexities, χ²) from per-row sums."""
    n = lens.sum()
    mean_train = _mean(torch.where(m, old, 0.0).sum(1), lens)
    mean_roll = _mean(torch.where(m, rollout, 0.0).sum(1), lens)
    lr_rows = torch.where(m, lr, 0.0).sum(1)
    k3 = torch.where(m, torch.exp(lr) - lr - 1.0, 0.0).sum(1)
    rho_sq = torch.where(m, torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).square(), 0.0)
    diff = mean_roll - mean_train
    return {
        "training_ppl": torch.exp(-mean_train).mean(),
        "training_log_ppl": (-mean_train).mean(),
        "kl": _mean(-lr_rows.sum(), n),
        "k3_kl": _mean(k3.sum(), n),
        "rollout_ppl": torch.exp(-mean_roll).mean(),
        "rollout_log_ppl": (-mean_roll).mean(),
        "log_ppl_diff": diff.mean(),
        "log_ppl_abs_diff": diff.abs().mean(),
        "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(),
        "ppl_ratio": torch.exp(diff).mean(),
        "chi2_token": _mean(rho_sq.sum(1).sum(), n) - 1.0,
        "chi2_seq": torch.exp(2.0 * lr_rows.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0,
    }


def rollout_correction_tensors(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                               rc: RolloutCorrection, *, with_metrics: bool = True
                               ) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """:func:`rollout_correction` without the host read: ``(weights, keep, metrics)`` with
    ``keep`` the ``(B, T)`` bool mask of kept valid tokens and the metrics 0-dim float64
    tensors (keys without the ``rollout_corr/`` prefix). No gradient flows."""
    _check(old_logprobs, rollout_logprobs, mask)
    with torch.no_grad():
        m = mask.bool()
        lr = (old_logprobs - rollout_logprobs).double()  # verl's log r, in the inputs' dtype
        lens = m.sum(1).double()
        valid = lens > 0
        metrics: dict[str, Tensor] = {}
        weights = None
        if rc.is_level is not None:
            w, _, is_metrics = _weights(rc, lr, m, lens, valid)
            weights = w.to(old_logprobs.dtype)
            metrics.update(is_metrics)
        keep = m
        if rc.rejection:
            est = rs_estimators(lr)
            combined = torch.ones_like(m)
            for opt in rc.rejection:
                ok, row = rejection_keep(opt, est, m, lens)
                combined = combined & ok
                if with_metrics:
                    metrics.update(_rs_metrics(opt, est[opt.estimator], row, ok, m, lens, valid))
            rejected = (m & ~combined).sum(1)
            metrics["rollout_rs_masked_fraction"] = _mean(rejected.sum().double(), lens.sum())
            metrics["rollout_rs_seq_masked_fraction"] = (rejected > 0).double().mean()
            keep = m & combined
        if with_metrics:
            metrics.update(_offpolicy(old_logprobs.double(), rollout_logprobs.double(), lr, m,
                                      lens))
    return weights, keep, metrics


def rollout_correction(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
) -> RolloutCorrectionOutput:
    r"""verl's ``compute_rollout_correction_and_rejection_mask`` (verl 0.9.1
    ``rollout_corr_helper``): importance weights, rejection sampling and the metrics.

    With ``log r = old − rollout`` per token (``(B, T)``, masked by ``mask``):

    * ``rollout_is="token"``: ``w_t = exp(clamp(log r_t, ±20))``; ``"sequence"``:
      ``w_t = exp(clamp(Σ_s m_s·log r_s, ±20))`` for every token of the row. A number (or a
      float string) ``u`` as ``rollout_is_threshold`` truncates, ``min(w, u)``; ``"l_u"`` zeroes
      ``w ∉ [l, u]`` (IcePop). ``rollout_is_batch_normalize`` divides by the batch mean
      (token mean, or mean of the rows' weights), unless it is ≤ 1e-8.
    * ``rollout_rs``: comma-separated options of
      :data:`rlkern.config.rollout_correction.ROLLOUT_RS_OPTIONS`, all of which must pass;
      ``rollout_rs_threshold``: one threshold for all, or one per option (k1: ``"l_u"`` ratio
      bounds or ``u`` for ``[1/u, u]``; k2 / k3: an upper bound).

    Args:
        old_logprobs: ``(B, T)`` the training policy's log-probabilities.
        rollout_logprobs: ``(B, T)`` the rollout engine's.
        mask: ``(B, T)`` response mask (bool or 0/1); at least one valid token.

    Returns:
        :class:`RolloutCorrectionOutput` ``(weights, mask, metrics)``: verl's outputs
        (``weights`` as a tensor rather than a ``DataProto``).

    Raises:
        ValueError / TypeError: verl's messages for unknown options and bad thresholds; shape
        mismatches; a mask without a valid token.
    """
    rc = RolloutCorrection.from_verl(rollout_is, rollout_is_threshold,
                                     rollout_is_batch_normalize, rollout_rs,
                                     rollout_rs_threshold)
    _check(old_logprobs, rollout_logprobs, mask)
    if not bool(mask.bool().any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    weights, keep, metrics = rollout_correction_tensors(old_logprobs, rollout_logprobs, mask, rc)
    values = torch.stack([v.double() for v in metrics.values()]).tolist() if metrics else []
    floats = {f"rollout_corr/{k}": v for k, v in zip(metrics, values, strict=True)}
    # verl returns a copy of the mask, with the rejected tokens zeroed, in the mask's dtype
    out_mask = (mask * keep).to(mask.dtype) if rc.rejection else mask.clone()
    return RolloutCorrectionOutput(weights, out_mask, floats)
