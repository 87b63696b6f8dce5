"""Aggregation of the policy loss and its metrics: O(B) torch ops on the per-row sums of the
kernels (``row_sums``: pg_sum, kl_sum, ent_sum, lp_sum; ``row_stats``: every per-row statistic,
rows named by ``layout("policy_loss").row_stats``).

Every aggregation mode is linear in the per-row sums (gvpo's is quadratic in lp_sum): the loss
is Σ_i c_i · sums_i with per-row weights ``c`` that depend on the rows' counts only
(:func:`_term_weights`). Autograd differentiates :func:`aggregate` for
:func:`rlkern.policy_loss`; :func:`aggregate_grad` gives the same coefficients without a graph
for fused callers (they run inside a registered op).
"""

from __future__ import annotations

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
    """Per-row weights ``c`` with ``agg(sums) = Σ_i c_i · sums_i``."""
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
    """:func:`aggregate` of a loss with no entropy term, no policy scale and a linear policy
    term (not gvpo), for a caller that differentiates it by hand (the CPU's fused path).

    :meth:`forward` gives the loss, cast to ``out_dtype``, and its parts; :meth:`row_grads`
    gives ``∂loss/∂row_sums`` for an upstream gradient of that loss. That gradient is formed
    by the operations autograd performs through :func:`aggregate`, in its order, so it has
    the same bits: the cast back to float64, ``× loss_scale``, then per row ``× w_pg`` for the
    policy sum and ``× kl_coef × w_kl`` for the KL sum, each row written into zeros and the
    two added (as autograd accumulates the two selects of ``row_sums``, signed zeros
    included).
    """

    def __init__(self, cfg: PolicyLossConfig, width: int, scores: Tensor, num_tokens,
                 num_seqs, out_dtype: torch.dtype) -> None:
        self.cfg, self.width, self.scores = cfg, width, scores
        self.num_tokens, self.num_seqs, self.out_dtype = num_tokens, num_seqs, out_dtype
        self.weights: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None
        self.part_names: list[str] = []  # the keys of aggregate's parts, set by forward()

    @staticmethod
    def applies(cfg: PolicyLossConfig, *, with_entropy: bool, pg_scaled: bool) -> bool:
        return not (with_entropy or pg_scaled or cfg.policy_loss == "gvpo")

    def set_lens(self, lens: Tensor) -> None:
        """The per-row weights from the rows' valid-token counts ``lens`` (``(B,)`` float64,
        what the forward's ``row_stats`` will hold), so that :meth:`row_grads` can run before
        the forward (the forward that writes the gradient itself)."""
        self.weights = _term_weights(lens, self.cfg, self.width, self.num_tokens,
                                     self.num_seqs)

    def forward(self, row_sums: Tensor, row_stats: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, parts)``: the loss in ``out_dtype`` and its parts as one float64 vector,
        in the order of :attr:`part_names` (``pg_loss``, then ``kl_loss`` with a KL term)."""
        if self.weights is None:
            self.weights = _row_weights(row_stats, self.cfg, self.width, self.num_tokens,
                                        self.num_seqs, with_entropy=False)
        total, parts = aggregate(row_sums, row_stats, self.cfg, self.width,
                                 self.scores, self.num_tokens, self.num_seqs,
                                 with_entropy=False, weights=self.weights)
        self.part_names = list(parts)
        return total.to(self.out_dtype), torch.stack(list(parts.values()))

    def row_grads(self, grad_loss: Tensor) -> Tensor:
        """``∂loss/∂row_sums``, ``(len(row_grads), B)`` float64 (see the class doc)."""
        assert self.weights is not None, "set_lens() or forward() first"
        G = layout("policy_loss").row_grads
        w_pg, w_kl, _ = self.weights
        g = grad_loss.to(torch.float64) * self.cfg.loss_scale
        out = w_pg.new_zeros(len(G), w_pg.shape[0])
        out[G.pg_sum] = g * w_pg
        if w_kl is not None:
            kl = w_pg.new_zeros(len(G), w_pg.shape[0])
            kl[G.kl_sum] = (g * self.cfg.kl_coef) * w_kl
            out = out + kl
        return out


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
    if plain_eager(rs):
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
    arithmetic on the host, one tensor made at the end, instead of the device path's ~30 torch
    ops on 0-dim tensors, each a fixed cost of a small call."""
    S = layout("policy_loss").row_stats
    sums = rs.sum(1).tolist()  # the device path's reduction, then exact doubles
    n_valid = sums[S.len]
    n = max(n_valid, 1.0)
    bounded = rs.shape[1] > 0 and n_valid > 0
    values: dict[str, float] = {}
    for name in names:
        if name in _TOKEN_MEANS:
            values[name] = sums[S[_TOKEN_MEANS[name]]] / n
        elif name in _ADDON_MEANS:
            values[name] = sums[S[_ADDON_MEANS[name][0]]] / n
        elif name == "ratio_min":
            values[name] = rs[S.ratio_min].min().item() if bounded else math.nan
        elif name == "ratio_max":
            values[name] = rs[S.ratio_max].max().item() if bounded else math.nan
        elif parts is not None and name in parts:
            values[name] = parts[name].item()
    if not values:
        return {}
    if sums[S.non_finite] > 0:
        values = dict.fromkeys(values, math.nan)
    # float64 → float32 rounds once either way: made directly in float32, one op fewer
    direct = dtype in (torch.float32, torch.float64)
    out = torch.tensor(list(values.values()), dtype=dtype if direct else torch.float64)
    if not direct:
        out = out.to(dtype)
    return dict(zip(values, out.unbind(0), strict=True))
