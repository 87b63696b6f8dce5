"""Reference for token log-probabilities, entropy and the per-row softmax statistics.

ALGORITHMS.md §1, for one row ``x`` (length V) with label ``y`` and temperature ``T``::

    z              = x / T
    lse            = log Σ_v exp(z_v)
    logp           = z_y − lse
    entropy        = lse − Σ_v p_v z_v,            p_v = exp(z_v − lse)
    self_certainty = lse − mean_v z_v
    sum_p_sq       = Σ_v p_v²

evaluated in float64 and in coordinates shifted by the row max *before* the temperature scales
them: with ``m = max_v x_v`` and ``r_v = (x_v − m) / T ≤ 0``, ``lse = m / T + log Σ exp(r)``,
``logp = r_y − log Σ exp(r)`` and so on. Every quantity but ``lse`` itself is then formed from
numbers no larger than the row's spread over ``T``: a finite row gives finite outputs whatever
its magnitude (a constant row of −1e10, one logit of 1e10) or the temperature (1e-10, 1e300);
only ``lse`` can leave the output dtype's range (it is then ±inf, the rounding of a value that
large).

Rows whose label equals ``ignore_index`` give 0 for every output (and a zero gradient). A row
holding NaN or +inf gives NaN in every output; a row of all −inf gives ``lse = −inf`` and NaN
elsewhere; a label outside ``[0, V)`` gives a NaN logprob (checks off; never read).
"""

from __future__ import annotations

import torch

from rlkern.config.dtypes import acc_dtype


def _shifted(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(x − max x) / T`` in float64. The max is a constant shift (softmax is invariant to it,
    so it carries no gradient); an all −inf row is shifted by 0 so that it stays −inf rather
    than becoming −inf − (−inf) = NaN; NaN and +inf make the whole row NaN."""
    x = logits.to(torch.float64)
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return (x - m) * (1.0 / temperature), m


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """All per-row outputs of ``token_logprobs`` computed with plain torch ops.

    Args:
        logits: ``(..., V)`` float tensor (any float dtype, any strides).
        labels: ``(...)`` integer tensor matching ``logits.shape[:-1]``.
        temperature: ``T > 0``; logits are divided by it.
        ignore_index: label value whose rows give zero outputs.

    Returns:
        dict with ``logprobs, entropy, lse, self_certainty, sum_p_sq``, each of shape
        ``logits.shape[:-1]`` in float32 (float64 for float64 input), computed in float64.
        Differentiable wrt ``logits`` through every output.
    """
    acc = acc_dtype(logits.dtype)
    r, m = _shifted(logits, temperature)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe_labels = torch.where(valid & in_range, labels, torch.zeros_like(labels)).long()

    log_s = torch.logsumexp(r, dim=-1)
    rel = r - log_s.unsqueeze(-1)  # log p_v
    p = torch.exp(rel)
    # p·log p is 0 where p = 0 (the limit): the product is masked so that neither the value nor
    # its gradient meets 0·(−inf) on masked vocabularies.
    plogp = torch.where(p > 0, p * torch.where(p > 0, rel, 0.0), 0.0)
    nan = torch.full_like(log_s, torch.nan)
    r_y = torch.gather(r, -1, safe_labels.unsqueeze(-1)).squeeze(-1)

    out = {
        "logprobs": torch.where(in_range, r_y - log_s, nan),
        "entropy": 0.0 - plogp.sum(-1),  # +0 for a one-hot row
        "lse": m.squeeze(-1) * (1.0 / temperature) + log_s,
        "self_certainty": log_s - r.mean(-1),
        "sum_p_sq": (p * p).sum(-1),
    }
    # A row with NaN or +inf is NaN everywhere; an all −inf row (s = 0) is NaN but for lse.
    undefined = torch.isnan(log_s) | torch.isneginf(log_s)
    for k in out:
        if k != "lse":
            out[k] = torch.where(undefined, nan, out[k])
    zero = torch.zeros_like(log_s)
    return {k: torch.where(valid, v, zero).to(acc) for k, v in out.items()}


def token_logprobs_grad_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The gradient of ``Σ g_lp·logprobs + g_ent·entropy + g_lse·lse`` wrt ``logits``,
    ALGORITHMS.md §1::

        ∂/∂x_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) + g_lse p_v ] / T.

    Written out rather than taken from autograd: it is the ``backend="torch"`` backward of
    :func:`rlkern.token_logprobs`, which runs inside a registered op, below autograd. As the
    ground truth it recomputes ``p`` and ``E_p[z] − z_v`` from the logits in float64, in the
    max-shifted coordinates of :func:`token_logprobs_reference` (the saved ``lse`` and
    ``entropy`` are the forward's rounded outputs: they only say which terms are present).
    Rows of ``ignore_index`` get 0; where ``p = 0`` (a ``−inf`` logit) the entropy term is 0,
    its limit; a row whose outputs are undefined (NaN, +inf, all −inf) gets a NaN gradient row;
    a label outside ``[0, V)`` (checks off) matches no column: no ``1[v = y]`` term.

    Args:
        logits: ``(..., V)``; labels and the per-row tensors ``(...)`` (``None``: no such term).

    Returns:
        ``(..., V)`` in the accumulation dtype (float32; float64 for float64 logits).
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy: required when grad_entropy is given")
    acc = lse.dtype
    r, _ = _shifted(logits.detach(), temperature)
    log_s = torch.logsumexp(r, dim=-1, keepdim=True)
    rel = r - log_s
    p = torch.exp(rel)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    as64 = lambda g: g.to(torch.float64).unsqueeze(-1)
    grad = torch.zeros_like(r)
    if grad_lse is not None:
        grad = grad + as64(grad_lse) * p
    if grad_logprobs is not None:
        onehot = torch.zeros_like(r)
        safe = torch.where(valid & in_range, labels, 0).long()
        onehot.scatter_(-1, safe.unsqueeze(-1), (valid & in_range).to(r.dtype).unsqueeze(-1))
        grad = grad + as64(grad_logprobs) * (onehot - p)
    if grad_entropy is not None:
        # E_p[z] − z_v = E_p[r] − r_v (the shift cancels), 0 where p = 0. Formed from r, not
        # from log p = r − log s: for a near-uniform row the O(1) log s would drown
        # differences far below its rounding (logits of 1e-20 over W of 1e10).
        r_safe = torch.where(p > 0, r, 0.0)
        e_r = (p * r_safe).sum(-1, keepdim=True)
        grad = grad + as64(grad_entropy) * torch.where(p > 0, p * (e_r - r_safe), 0.0)
    undefined = torch.isnan(log_s) | torch.isneginf(log_s)
    grad = torch.where(undefined, torch.nan, grad)
    return (torch.where(valid.unsqueeze(-1), grad, 0.0) / temperature).to(acc)
