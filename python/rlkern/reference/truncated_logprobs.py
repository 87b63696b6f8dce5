"""Reference for token log-probs under the sampler's truncated distribution (ALGORITHMS.md §4).

For one row ``x`` with label ``y``, temperature ``T`` and the sampler's filters (top-k, top-p,
min-p, ``filter_order``; the kept set ``K`` is :func:`rlkern.reference.sample.filtered_probs`'s,
with its tie rule: ties at the threshold kept in index order)::

    z        = (x − max x) / T
    q_v      = [v ∈ K] exp(z_v) / Σ_{u ∈ K} exp(z_u)
    logprobs = log q_y              (−inf for y ∉ K)
    entropy  = −Σ_v q_v log q_v
    lse      = max x / T + log Σ_v exp(z_v)      (the whole row's)

in float64, differentiable through ``z`` with ``K`` held fixed (it is piecewise constant in
``x``): the gradient is 0 outside ``K``, and a label outside ``K`` contributes no gradient (its
log-prob is the constant −inf). Rows with ``ignore_index`` give 0; a row holding NaN or +inf
gives NaN (``lse`` NaN), an all −inf row NaN with ``lse = −inf``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.reference.sample import filtered_probs, sampleable


def _row_values(value, n: int) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, Tensor):
        return value.reshape(-1).tolist()
    return [value] * n


def kept_mask(row: Tensor, *, temperature: float, top_k=None, top_p=None, min_p=None,
              filter_order: str = "top_k_first") -> Tensor:
    """The sampler's kept set of one row, a bool ``(V,)`` tensor (float64 arithmetic)."""
    q = filtered_probs(row.detach(), temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, filter_order=filter_order)
    return q > 0


class _Row(NamedTuple):
    """One row as both references see it: ``keep`` is ``None`` for an ignored row (``label ==
    ignore_index``) and for a row the sampler cannot draw from (NaN, +inf, all −inf)."""

    index: int
    x: Tensor  # (V,) float64, the logits' row (differentiable in the forward reference)
    label: int
    ignored: bool
    temperature: float
    keep: Tensor | None  # (V,) bool: the sampler's kept set K


def _rows(x2: Tensor, labels: Tensor, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
          filter_order: str = "top_k_first", ignore_index: int = -100) -> Iterator[_Row]:
    """The per-row setup shared by the forward and the backward reference: each row's label,
    its temperature and filters (numbers, or one value per row), and its kept set."""
    y1 = labels.reshape(-1).tolist()
    n = len(y1)
    temps, ks, ps, mps = (_row_values(v, n) for v in (temperature, top_k, top_p, min_p))
    for r, y in enumerate(y1):
        x = x2[r]
        if y == ignore_index or not sampleable(x.detach()):
            yield _Row(r, x, y, y == ignore_index, 0.0, None)
            continue
        T = float(temps[r])
        keep = kept_mask(x, temperature=T, top_k=None if ks[r] is None else int(ks[r]),
                         top_p=ps[r], min_p=mps[r], filter_order=filter_order)
        yield _Row(r, x, y, False, T, keep)


def truncated_logprobs_reference(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    filter_order: str = "top_k_first",
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """``logprobs``, ``entropy`` and ``lse`` of ``logits (..., V)`` / ``labels (...)`` in float64
    (differentiable wrt ``logits``); the filters and the temperature are numbers or tensors with
    one value per row (``labels.numel()`` of them)."""
    V = logits.shape[-1]
    x2 = logits.reshape(-1, V).to(torch.float64)
    n = labels.numel()
    lp, ent, lse = [], [], []
    nan = x2.new_tensor(float("nan"))
    for row in _rows(x2, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                     min_p=min_p, filter_order=filter_order, ignore_index=ignore_index):
        x, keep, T = row.x, row.keep, row.temperature
        if row.ignored:
            zero = (x * 0).sum() if x.requires_grad else x.new_zeros(())
            lp.append(zero)
            ent.append(zero)
            lse.append(zero)
            continue
        if keep is None:  # cannot be sampled
            lp.append(nan)
            ent.append(nan)
            ninf = bool(torch.isneginf(x.detach()).all()) and not bool(torch.isnan(x).any())
            lse.append(x.new_tensor(float("-inf")) if ninf else nan)
            continue
        m = x.detach().max()
        z = (x - m) / T
        lse.append(m / T + torch.logsumexp(z, -1))
        logq = torch.log_softmax(z.masked_fill(~keep, float("-inf")), -1)
        # log q masked to 0 outside K first: q · log q there would back-propagate 0 · (−inf).
        lq = torch.where(keep, logq, 0.0)
        ent.append(-(lq.exp() * lq * keep).sum())
        y = row.label
        if 0 <= y < V and bool(keep[y]):
            lp.append(logq[y])
        else:
            lp.append(x.new_tensor(float("-inf") if 0 <= y < V else float("nan")))
    shape = labels.shape
    return {"logprobs": torch.stack(lp).reshape(shape) if n else x2.new_zeros(shape),
            "entropy": torch.stack(ent).reshape(shape) if n else x2.new_zeros(shape),
            "lse": torch.stack(lse).reshape(shape) if n else x2.new_zeros(shape)}


def truncated_logprobs_grad_reference(
    logits: Tensor,
    labels: Tensor,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    grad_lse: Tensor | None,
    **options,
) -> Tensor:
    """The gradient wrt ``logits`` of ``Σ g_lp·logprobs + g_ent·entropy + g_lse·lse`` in
    closed form (float64, the logits' shape), ``K`` held fixed, with ``E = Σ_K q z``::

        ∂/∂x_v = ( g_lse p_v + [v ∈ K] q_v (g_ent (E − z_v) − g_lp') + [v = y] g_lp' ) / T

    ``g_lp' = g_lp`` for ``y ∈ K``, else 0; ignored rows 0; rows that cannot be sampled NaN.
    ``options``: :func:`truncated_logprobs_reference`'s (``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``filter_order``, ``ignore_index``).
    """
    V = logits.shape[-1]
    x2 = logits.detach().reshape(-1, V).to(torch.float64)
    n = labels.numel()
    gl, ge, gs = (_row_values(g, n) if g is not None else [0.0] * n
                  for g in (grad_logprobs, grad_entropy, grad_lse))
    out = torch.zeros_like(x2)
    for row in _rows(x2, labels, **options):
        r, x, keep, T = row.index, row.x, row.keep, row.temperature
        if row.ignored:
            continue
        if keep is None:  # cannot be sampled
            out[r] = float("nan")
            continue
        z = (x - x.max()) / T
        p = torch.softmax(z, -1)
        q = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        zk = torch.where(keep, z, 0.0)
        e = float((q * zk).sum())
        y = row.label
        g_lp = float(gl[r]) if 0 <= y < V and bool(keep[y]) else 0.0
        g = float(gs[r]) * p + torch.where(keep, q * (float(ge[r]) * (e - zk) - g_lp), 0.0)
        if g_lp:
            g[y] += g_lp
        out[r] = g / T
    return out.reshape(logits.shape)
