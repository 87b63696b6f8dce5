"""Aggregation of the policy loss and its metrics: O(B) torch ops on the per-row sums of the
kernels (``row_sums``: pg_sum, kl_sum, ent_sum, lp_sum; ``row_stats``: every per-row statistic,
rows named by ``layout("policy_loss").row_stats``).

Every aggregation mode is linear in the per-row sums (gvpo's is quadratic in lp_sum): the loss
is Σ_i c_i · sums_i with per-row weights ``c`` that depend on the rows' counts only
(:func:`_term_weights`). Autograd differentiates :func:`aggregate` for
:func:`rlkern.policy_loss`; :func:`aggregate_grad` gives the same coefficients without a graph
for fused callers (they run inside a registered op).

The CPU's one-op forward (:class:`LinearAggregate`, ``csrc/cpu/policy_loss_linear.cpp``)
repeats :func:`_agg_weights`, :func:`aggregate` and the metrics in C++: a change to them here
needs the same change there (tests/test_policy_loss_fused.py compares the two bit for bit).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from rlkern.config.layout import layout
from rlkern.config.policy_loss import PolicyLossConfig
from rlkern.ops.eager import plain_eager
from rlkern.ops.policy_loss.autograd import gradients

__all__ = ["LinearAggregate", "aggregate", "aggregate_grad", "finish_metrics", "metric_names"]

# The aggregated loss parts (with the add-on each needs).
_PARTS = {"pg_loss": None, "kl_loss": "kl", "entropy_loss": "entropy"}
# Metrics that are a row statistic summed over the rows / the valid tokens, in output order.
_TOKEN_MEANS = {"clipfrac": "clip", "clipfrac_low": "clip_low", "clipfrac_high": "clip_high",
                "dualclip_frac": "dual_clip", "approx_kl": "neg_log_ratio",
                "ratio_mean": "ratio_sum"}
# ... and those of an add-on (present when the add-on is): metric → (statistic, add-on).
_ADDON_MEANS = {"kl": ("kl_sum", "kl"), "entropy_mean": ("entropy_valid", "entropy"),
                "rollout_weight_mean": ("rollout_w_sum", "rollout"),
                "vespo_phi_mean": ("phi_sum", "vespo")}


def _agg_weights(counts: Tensor, mode: str, *, num_tokens, num_seqs, count_empty: bool,
                 max_len: int | None, width: int) -> Tensor:
    """Per-row weights ``c`` with ``agg(sums) = Σ_i c_i · sums_i`` (also ``term_weights`` in
    csrc/cpu/policy_loss_linear.cpp, operation for operation)."""
    ones = torch.ones_like(counts)
    if mode == "token-mean":
        return ones / (counts.sum().clamp(min=1.0) if num_tokens is None else num_tokens)
    if mode in ("sum", "token-sum"):
        return ones
    if num_seqs is not None:
        d = num_seqs
    elif count_empty:
        d = float(max(counts.shape[0], 1))
    else:
        d = (counts > 0).sum().clamp(min=1).to(counts.dtype)
    if mode == "seq-mean-token-mean":
        return torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), 0.0) / d
    if mode == "seq-mean-token-sum":
        return ones / d
    return ones / d / (width if max_len is None else max_len)


def _seq_denominator(cfg: PolicyLossConfig, B: int, num_seqs) -> Any:
    if cfg.loss_agg_mode in ("sum", "token-sum"):
        return 1.0
    return float(max(B, 1)) if num_seqs is None else num_seqs


def _term_weights(lens: Tensor, cfg: PolicyLossConfig, width: int, num_tokens, num_seqs,
                  *, ent_counts: Tensor | None = None,
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-row weights of the policy, KL and entropy sums in their aggregates (None: the term
    is absent; the policy weight is None for gvpo, which is quadratic). ``lens``: ``(B,)``
    float64 valid tokens per row; ``ent_counts``: the entropy term's per-row counts (None:
    no entropy term)."""
    common = dict(num_tokens=num_tokens, num_seqs=num_seqs, count_empty=cfg.count_empty_seqs,
                  max_len=cfg.max_len, width=width)
    B = lens.shape[0]
    if cfg.policy_loss == "gmpo":
        w_pg = torch.ones_like(lens) / _seq_denominator(cfg, B, num_seqs)
    elif cfg.policy_loss == "gvpo":
        w_pg = None
    else:
        w_pg = _agg_weights(lens, cfg.loss_agg_mode, **common)
    w_kl = _agg_weights(lens, cfg.kl_agg(), **common) if cfg.kl_coef != 0.0 else None
    w_ent = None
    if ent_counts is not None:
        ent_common = dict(common)
        if not cfg.entropy_global_norm:
            ent_common.update(num_tokens=None, num_seqs=None)
        w_ent = _agg_weights(ent_counts, cfg.entropy_agg(), **ent_common)
    return w_pg, w_kl, w_ent


def _row_weights(row_stats: Tensor, cfg: PolicyLossConfig, width: int, num_tokens, num_seqs,
                 *, with_entropy: bool, seq_lens: Tensor | None = None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_term_weights` with the counts read from ``row_stats`` (``seq_lens``: the rows'
    full lengths, for chunks that split a row)."""
    S = layout("policy_loss").row_stats
    lens = row_stats[S.len] if seq_lens is None else seq_lens.to(row_stats)
    ent_counts = None
    if with_entropy:
        split = seq_lens is not None and cfg.top_entropy_quantile == 1.0
        ent_counts = lens if split else row_stats[S.ent_count]
    return _term_weights(lens, cfg, width, num_tokens, num_seqs, ent_counts=ent_counts)


def aggregate(row_sums: Tensor, row_stats: Tensor, cfg: PolicyLossConfig, width: int,
              scores: Tensor, num_tokens, num_seqs, *, with_entropy: bool,
              seq_lens: Tensor | None = None, pg_scale: Tensor | None = None,
              weights: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (float64, differentiable wrt ``row_sums``) and its parts (``pg_loss``,
    ``kl_loss``, ``entropy_loss``). ``width``: T (seq-mean-token-sum-norm's default L);
    ``scores``: gvpo's per-response scores (the advantages); ``pg_scale``: a constant factor
    of the policy term (batch-normalised rollout weights), None: 1; ``weights``: the per-row
    weights ``_row_weights`` gives for these arguments, when the caller has them."""
    G = layout("policy_loss").row_grads
    w_pg, w_kl, w_ent = weights if weights is not None else _row_weights(
        row_stats, cfg, width, num_tokens, num_seqs, with_entropy=with_entropy,
        seq_lens=seq_lens)
    if w_pg is None:  # gvpo: ½ Σ e² / (g − 1), e = (R − R̄_g) − (s − s̄_g), R = β·Σ_t m·Δ
        reward = cfg.gvpo_beta * row_sums[G.lp_sum].view(-1, cfg.group_size)
        s = scores.to(row_sums).view(-1, cfg.group_size)
        e = (reward - reward.mean(-1, keepdim=True)) - (s - s.mean(-1, keepdim=True))
        pg = (0.5 * e.square()).sum() / (cfg.group_size - 1) / _seq_denominator(
            cfg, row_stats.shape[1], num_seqs)
    else:
        pg = (w_pg * row_sums[G.pg_sum]).sum()
    if pg_scale is not None:
        pg = pg * pg_scale
    parts = {"pg_loss": pg}
    total = pg
    if w_kl is not None:
        parts["kl_loss"] = (w_kl * row_sums[G.kl_sum]).sum()
        total = total + cfg.kl_coef * parts["kl_loss"]
    if w_ent is not None:
        parts["entropy_loss"] = (w_ent * row_sums[G.ent_sum]).sum()
        if cfg.entropy_coef != 0.0:
            total = total - cfg.entropy_coef * parts["entropy_loss"]
    return total * cfg.loss_scale, parts


class LinearAggregate:
    """:func:`aggregate` and :func:`finish_metrics` of a loss with no policy scale and a linear
    policy term (not gvpo), as the arguments of the CPU's fused linear op
    (``rlkern::policy_loss_fused_linear``, csrc/cpu/policy_loss_linear.cpp), which forms the
    per-row weights, the loss, its parts and the metrics in one call (an entropy input gets no
    gradient there: the fused path runs only when it needs none).

    The op repeats this module's operations in their order (``_agg_weights``, the weighted
    sums by torch's reduction, the terms added, ``total · loss_scale``; :meth:`row_grads`'
    products, each row written into zeros and the terms added as autograd accumulates the
    selects of ``row_sums``, signed zeros included), so the fused and two-pass paths have the
    same bits.
    """

    def __init__(self, cfg: PolicyLossConfig, width: int, num_tokens, num_seqs, *,
                 with_entropy: bool, with_rollout: bool) -> None:
        modes = layout("policy_loss").agg_modes
        with_kl = cfg.kl_coef != 0.0
        code = lambda mode: int(modes[mode.replace("-", "_")])
        #: the op's ``agg`` and ``agg_values`` (their order: the op's schema)
        self.agg = [code(cfg.loss_agg_mode), code(cfg.kl_agg()) if with_kl else -1,
                    code(cfg.entropy_agg()) if with_entropy else -1, int(cfg.count_empty_seqs),
                    width if cfg.max_len is None else cfg.max_len, int(num_tokens is not None),
                    int(num_seqs is not None), int(cfg.entropy_global_norm)]
        self.values = [float(cfg.loss_scale), float(cfg.kl_coef), float(cfg.entropy_coef),
                       _count(num_tokens), _count(num_seqs)]
        self.part_names = [name for name, on in (("pg_loss", True), ("kl_loss", with_kl),
                                                 ("entropy_loss", with_entropy)) if on]
        self.metric_names, self.metric_codes = metric_codes(
            tuple(metric_names(with_kl=with_kl, with_entropy=with_entropy,
                               with_rollout=with_rollout, with_parts=True)),
            tuple(self.part_names))

    @staticmethod
    def of(cfg: PolicyLossConfig, width: int, num_tokens, num_seqs, *, with_entropy: bool,
           with_rollout: bool) -> LinearAggregate:
        """The aggregate of these arguments: one shared instance per distinct arguments when
        the counts are numbers or absent (an instance is never modified, and building one
        costs a few µs, a share of a small call), a new one for tensor counts."""
        if isinstance(num_tokens, Tensor) or isinstance(num_seqs, Tensor):
            return LinearAggregate(cfg, width, num_tokens, num_seqs, with_entropy=with_entropy,
                                   with_rollout=with_rollout)
        # the config's equality takes −0.0 for 0.0; the loss's sign does not (total · scale)
        scale_sign = math.copysign(1.0, cfg.loss_scale)
        return _shared_linear(cfg, scale_sign, width, num_tokens, num_seqs, with_entropy,
                              with_rollout)

    @staticmethod
    def applies(cfg: PolicyLossConfig, *, pg_scaled: bool) -> bool:
        return not (pg_scaled or cfg.policy_loss == "gvpo")

    def row_grads(self, lens: Tensor, grad_loss: Tensor) -> Tensor:
        """``∂loss/∂row_sums``, ``(len(row_grads), B)`` float64, for the upstream gradient
        ``grad_loss`` of the loss (0-dim, the loss's dtype) and the rows' valid-token counts
        ``lens`` (``(B,)`` float64): autograd's bits through :func:`aggregate`."""
        return torch.ops.rlkern.policy_loss_linear_grad_rows(
            lens, self.agg, self.values, grad_loss.item(), grad_loss.dtype)


@functools.lru_cache(maxsize=64)
def _shared_linear(cfg: PolicyLossConfig, _scale_sign: float, width: int,
                   num_tokens: float | None, num_seqs: float | None, with_entropy: bool,
                   with_rollout: bool) -> LinearAggregate:
    return LinearAggregate(cfg, width, num_tokens, num_seqs, with_entropy=with_entropy,
                           with_rollout=with_rollout)


def _count(value: Tensor | float | None) -> float:
    """A global count as the op's float (0 for None: the op is told it is absent)."""
    return 0.0 if value is None else float(value)


#: metric codes of the C++ metrics (csrc/cpu/policy_loss_linear.cpp): a row_stats row, or one
#: of these, or _PART0 − j for loss part j
_RATIO_MIN, _RATIO_MAX, _PART0 = -1, -2, -3


@functools.lru_cache(maxsize=64)
def metric_codes(names: tuple[str, ...], part_names: tuple[str, ...]
                 ) -> tuple[list[str], list[int]]:
    """The metrics of ``names`` that can be formed (a loss part only if in ``part_names``) and
    their codes for ``rlkern::policy_loss_metrics`` / ``policy_loss_fused_linear``."""
    S = layout("policy_loss").row_stats
    kept, codes = [], []
    for name in names:
        if name in _TOKEN_MEANS:
            code = int(S[_TOKEN_MEANS[name]])
        elif name in _ADDON_MEANS:
            code = int(S[_ADDON_MEANS[name][0]])
        elif name in ("ratio_min", "ratio_max"):
            code = _RATIO_MIN if name == "ratio_min" else _RATIO_MAX
        elif name in part_names:
            code = _PART0 - part_names.index(name)
        else:
            continue
        kept.append(name)
        codes.append(code)
    return kept, codes


def aggregate_grad(row_sums: Tensor, row_stats: Tensor, cfg: PolicyLossConfig, width: int,
                   scores: Tensor, num_tokens, num_seqs, *, with_entropy: bool,
                   seq_lens: Tensor | None = None) -> Tensor:
    """``∂ aggregate / ∂ row_sums``, shape of ``row_sums``: the backward's ``grad_rows``."""
    total = lambda sums: aggregate(sums, row_stats, cfg, width, scores, num_tokens, num_seqs,
                                   with_entropy=with_entropy, seq_lens=seq_lens)[0]
    return gradients(total, [row_sums], torch.ones((), dtype=row_sums.dtype))[0]


def metric_names(*, with_kl: bool, with_entropy: bool, with_rollout: bool,
                 with_parts: bool = False, vespo: bool = False) -> list[str]:
    """The keys of :func:`finish_metrics`, in its order (``vespo``: the loss is vespo, whose
    metric ``vespo_phi_mean`` is the mean of φ over the valid tokens)."""
    addons = {"kl": with_kl, "entropy": with_entropy, "rollout": with_rollout, "vespo": vespo}
    parts = [p for p, addon in _PARTS.items() if addon is None or addons[addon]]
    return [*(parts if with_parts else []), *_TOKEN_MEANS, "ratio_min", "ratio_max",
            *(name for name, (_, addon) in _ADDON_MEANS.items() if addons[addon])]


def finish_metrics(row_stats: Tensor, parts: dict[str, Tensor] | None = None, *,
                   with_kl: bool = False, with_entropy: bool = False,
                   with_rollout: bool = False, vespo: bool = False,
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Metrics (0-dim tensors) from the per-row statistics of one or several chunks
    (concatenated along dim 1), and optionally the aggregated loss parts: means over the
    valid tokens, and the ratio's min / max (NaN without a valid token).

    Every metric is NaN when a row saw a non-finite input at a valid token (possible only with
    checks off): the loss is NaN then, and a clip fraction or ratio bound that skipped the bad
    token would read as a healthy step — and each backend would skip it differently.
    """
    S = layout("policy_loss").row_stats
    rs = row_stats.detach()
    if plain_eager(rs) and rs.dtype == torch.float64:  # (the kernels' row_stats)
        return _host_metrics(rs, parts, dtype, metric_names(
            with_kl=with_kl, with_entropy=with_entropy, with_rollout=with_rollout,
            with_parts=parts is not None, vespo=vespo))
    sums = rs.sum(1)  # one reduction for every per-row sum (no per-metric kernels)
    poisoned = sums[S.non_finite] > 0
    n_valid = sums[S.len]
    n = n_valid.clamp(min=1.0)
    nan = rs.new_full((), math.nan)  # on rs's device: no host-to-device copy per call
    out: dict[str, Tensor] = {}
    for name in metric_names(with_kl=with_kl, with_entropy=with_entropy,
                             with_rollout=with_rollout, with_parts=parts is not None,
                             vespo=vespo):
        if name in _TOKEN_MEANS:
            out[name] = sums[S[_TOKEN_MEANS[name]]] / n
        elif name in _ADDON_MEANS:
            out[name] = sums[S[_ADDON_MEANS[name][0]]] / n
        elif name == "ratio_min":
            out[name] = torch.where(n_valid > 0, rs[S[name]].min(), nan) if rs.shape[1] else nan
        elif name == "ratio_max":
            out[name] = torch.where(n_valid > 0, rs[S[name]].max(), nan) if rs.shape[1] else nan
        elif name in parts:  # a loss part (the KL part only exists with kl_coef != 0)
            out[name] = parts[name].detach()
    if not out:
        return out
    values = torch.where(poisoned, nan, torch.stack([v.to(rs.dtype) for v in out.values()]))
    return dict(zip(out, values.to(dtype).unbind(0), strict=True))


def _host_metrics(rs: Tensor, parts: dict[str, Tensor] | None, dtype: torch.dtype,
                  names: list[str]) -> dict[str, Tensor]:
    """:func:`finish_metrics` for CPU statistics in plain eager mode: the same float64
    arithmetic in one C++ call (``rlkern::policy_loss_metrics``, torch's reduction over the
    rows, then doubles), instead of the device path's ~30 torch ops on 0-dim tensors, each a
    fixed cost of a small call."""
    part_names = tuple(parts) if parts is not None else ()
    kept, codes = metric_codes(tuple(names), part_names)
    if not kept:
        return {}
    values = torch.ops.rlkern.policy_loss_metrics(
        rs.contiguous(), [parts[n].item() for n in part_names], codes, dtype)
    return dict(zip(kept, values, strict=True))
