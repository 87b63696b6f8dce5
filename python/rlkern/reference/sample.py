"""Pure-torch reference of the sampler (ALGORITHMS.md §4): the ground truth of the tests.

Written for clarity, with a full sort and float64 arithmetic:

* ``z = x / T``; ``p = softmax(z)``;
* order the vocabulary by value descending, ties by index ascending (a stable sort);
* top-k keeps the first ``k``; top-p keeps token ``j`` while the mass of the kept tokens before
  it is ``< top_p`` times the mass left by the previous filters (``filter_order="joint"``: times
  the total mass); min-p keeps ``p_v ≥ min_p · max_v p_v``; the kept set is the intersection;
* the draw is an inverse CDF over the kept probabilities in vocabulary order, with one uniform
  per row ``u = philox_uniform(seed, step, 0)``: the first token whose cumulative probability
  exceeds ``u · (kept mass)``.

Philox-4x32-10 (Salmon et al. 2011) is written out in Python integers so that it matches
``csrc/include/rlkern/philox.h`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x32 with 10 rounds: a keyed bijection of a 128-bit counter (four uint32 words)."""
    c0, c1, c2, c3 = (c & _MASK for c in counter)
    k0, k1 = (k & _MASK for k in key)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (((p1 >> 32) ^ c1 ^ k0) & _MASK, p1 & _MASK,
                          ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0 & _MASK)
    return c0, c1, c2, c3


def philox_uniform(seed: int, step: int, index: int = 0) -> float:
    """Uniform in [0, 1) for (seed, step, index): 53 bits of the first two Philox words.

    key = (seed mod 2³², seed >> 32), counter = (index, 0, step mod 2³², step >> 32); negative
    seeds/steps are taken modulo 2⁶⁴.
    """
    s, t = seed & 0xFFFFFFFFFFFFFFFF, step & 0xFFFFFFFFFFFFFFFF
    x = philox4x32_10((index, 0, t & _MASK, t >> 32), (s & _MASK, s >> 32))
    return (((x[0] >> 5) << 26) | (x[1] >> 6)) * 2.0**-53


def _per_row(value, n: int, dtype) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, Tensor):
        return [v.item() for v in value.reshape(-1).to(dtype)]
    return [value] * n


def sampleable(row: Tensor) -> bool:
    """A row can be sampled when it holds no NaN or +inf and at least one finite logit."""
    return not bool(torch.isnan(row).any() | torch.isposinf(row).any()) and \
        bool(torch.isfinite(row).any())


def row_lse(row: Tensor, temperature: float) -> float:
    """``log Σ exp(x / T)`` of one row, in float64 and shifted by its max before ``1/T`` scales
    it; NaN for a row with NaN or +inf, −inf for an all −inf row."""
    x = row.to(torch.float64)
    if bool(torch.isnan(x).any() | torch.isposinf(x).any()):
        return float("nan")
    m = float(x.max())
    if m == float("-inf"):
        return m
    return m / temperature + float(torch.logsumexp((x - m) / temperature, -1))


def filtered_probs(
    row: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    filter_order: str = "top_k_first",
) -> Tensor:
    """The exact filtered, renormalised distribution of one logits row, float64 ``(V,)``."""
    x = row.to(torch.float64)
    z = (x - x.max()) / temperature  # shifted first: finite at any magnitude and temperature
    p = torch.softmax(z, dim=-1)
    _, order = torch.sort(z, descending=True, stable=True)
    ps = p[order]
    keep = torch.ones_like(ps, dtype=torch.bool)
    V = z.numel()
    if top_k is not None and top_k < V:
        keep[top_k:] = False
    if top_p is not None and top_p < 1.0:
        base = ps * keep if filter_order != "joint" else ps
        before = torch.cumsum(base, 0) - base
        keep &= before < top_p * base.sum()
    if min_p is not None and min_p > 0.0:
        keep &= ps >= min_p * ps[0]
    q = torch.zeros_like(p)
    q[order] = torch.where(keep, ps, 0.0)
    return q / q.sum()


def sample_reference(
    logits: Tensor,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    seeds: Tensor,
    steps: Tensor,
    indices: Tensor | None = None,
    filter_order: str = "top_k_first",
    raw_temperature: bool = True,
    num_samples: int = 1,
) -> dict[str, Tensor]:
    """Reference sampler for ``logits (R, V)``; returns tokens (int64), raw / processed
    logprobs and entropy (float64), one per output row (``indices`` picks each row's logits).
    With ``num_samples = G`` each row gives ``G`` output rows: draw ``j`` uses the uniform
    ``philox_uniform(seed, step, j)``."""
    rows = indices.tolist() if indices is not None else list(range(logits.shape[0]))
    n = len(rows)
    temps = _per_row(temperature, n, torch.float64)
    ks = _per_row(top_k, n, torch.int64)
    ps_ = _per_row(top_p, n, torch.float64)
    mps = _per_row(min_p, n, torch.float64)
    out = {k: [] for k in ("tokens", "raw_logprobs", "processed_logprobs", "entropy")}
    for i, r in enumerate(rows):
        x = logits[r].to(torch.float64)
        if not sampleable(x):
            # Nothing to draw from (NaN or +inf logits, or all −inf): token −1, NaN logprobs.
            for _ in range(num_samples):
                out["tokens"].append(-1)
                for k in ("raw_logprobs", "processed_logprobs", "entropy"):
                    out[k].append(float("nan"))
            continue
        q = filtered_probs(x, temperature=temps[i], top_k=ks[i], top_p=ps_[i], min_p=mps[i],
                           filter_order=filter_order)
        cum = torch.cumsum(q, 0)
        z = (x - x.max()) / temps[i]
        logp = torch.log_softmax(z, -1)
        raw = logp if raw_temperature else torch.log_softmax(x, -1)
        p = logp.exp()
        entropy = float(-(torch.where(p > 0, p * logp, 0.0)).sum())
        for j in range(num_samples):
            u = philox_uniform(int(seeds[i]), int(steps[i]), j)
            tok = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])],
                                                           dtype=cum.dtype), right=True)[0])
            tok = min(tok, int((q > 0).nonzero()[-1]))
            out["tokens"].append(tok)
            out["raw_logprobs"].append(float(raw[tok]))
            out["processed_logprobs"].append(float(torch.log(q[tok])))
            out["entropy"].append(entropy)
    return {
        "tokens": torch.tensor(out["tokens"], dtype=torch.int64),
        **{k: torch.tensor(out[k], dtype=torch.float64) for k in
           ("raw_logprobs", "processed_logprobs", "entropy")},
    }
