"""Reference for token log-probabilities, entropy and the per-row softmax statistics.

ALGORITHMS.md §1, for one row ``x`` (length V) with label ``y`` and temperature ``T``::

    z              = x / T
    lse            = log Σ_v exp(z_v)
    logp           = z_y − lse
    entropy        = lse − Σ_v p_v z_v,            p_v = exp(z_v − lse)
    self_certainty = lse − mean_v z_v
    sum_p_sq       = Σ_v p_v²

Rows whose label equals ``ignore_index`` give 0 for every output (and a zero gradient).
"""

from __future__ import annotations

import torch

from rlkern.config.dtypes import acc_dtype


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
        ``logits.shape[:-1]`` in float32 (float64 for float64 input). Differentiable wrt
        ``logits`` through every output.
    """
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc) / temperature
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()

    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    # entropy = lse − Σ p z, evaluated as −Σ p (z − lse): the same quantity without cancelling
    # lse against Σ p z (which costs fp32 precision when |z| is large and p is peaked).
    # p·(z − lse) is 0 where z = −inf (the limit): z is clamped to a finite value and the
    # product masked, so neither the value nor its gradient meets 0·inf on masked vocabularies.
    zc = torch.clamp(z, min=torch.finfo(acc).min)
    plogp = torch.where(p > 0, p * (zc - lse.unsqueeze(-1)), torch.zeros_like(p))
    z_y = torch.gather(z, -1, safe_labels.unsqueeze(-1)).squeeze(-1)

    zero = torch.zeros_like(lse)
    return {
        "logprobs": torch.where(valid, z_y - lse, zero),
        "entropy": torch.where(valid, -plogp.sum(-1), zero),
        "lse": torch.where(valid, lse, zero),
        "self_certainty": torch.where(valid, lse - z.mean(-1), zero),
        "sum_p_sq": torch.where(valid, (p * p).sum(-1), zero),
    }


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
    """The gradient of ``Σ g_lp·logprobs + g_ent·entropy + g_lse·lse`` wrt ``logits``, from the
    forward's per-row ``lse`` (and ``entropy``, for an entropy gradient), ALGORITHMS.md §1::

        ∂/∂x_v = [ g_lp (1[v = y] − p_v) + g_ent p_v (E_p[z] − z_v) + g_lse p_v ] / T,
        p_v = exp(z_v − lse),   E_p[z] = lse − entropy.

    Written out rather than taken from autograd: it is the ``backend="torch"`` backward of
    :func:`rlkern.token_logprobs`, which runs inside a registered op, below autograd. Rows of
    ``ignore_index`` get 0; where ``p = 0`` (a ``−inf`` logit) the entropy term is 0, its limit.

    Args:
        logits: ``(..., V)``; labels and the per-row tensors ``(...)`` (``None``: no such term).

    Returns:
        ``(..., V)`` in the accumulation dtype (float32; float64 for float64 logits).
    """
    acc = lse.dtype
    z = logits.to(acc) / temperature
    p = torch.exp(z - lse.unsqueeze(-1))
    valid = (labels != ignore_index).unsqueeze(-1)
    grad = torch.zeros_like(z)
    if grad_lse is not None:
        grad = grad + grad_lse.unsqueeze(-1) * p
    if grad_logprobs is not None:
        onehot = torch.zeros_like(z)
        safe = torch.where(labels != ignore_index, labels, 0)
        onehot.scatter_(-1, safe.unsqueeze(-1), 1.0)
        grad = grad + grad_logprobs.unsqueeze(-1) * (onehot - p)
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("entropy: required when grad_entropy is given")
        e_z = (lse - entropy).unsqueeze(-1)
        zc = torch.clamp(z, min=torch.finfo(acc).min)
        grad = grad + grad_entropy.unsqueeze(-1) * torch.where(p > 0, p * (e_z - zc), 0.0)
    return torch.where(valid, grad, 0.0) / temperature
