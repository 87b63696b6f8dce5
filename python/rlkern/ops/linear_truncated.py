""":func:`rlkern.linear_logprobs` on chunks of whole rows: under the sampler's truncated
distribution (``top_k``, ``top_p``, ``min_p``: the trainer's side of the rollout's truncation)
and with a LoRA-adapted head (``W + s·B·A`` without forming it), without the ``(N, V)`` logits.

The kept set of a row needs the whole row, so the head is applied to a chunk of complete rows
at a time: ``x = h[rows] Wᵀ (+ b)`` (``(rows, V)``, about :data:`CHUNK_LOGITS` logits), the
LoRA term ``s·(h Aᵀ) Bᵀ`` (``h Aᵀ`` is ``(rows, r)``: the adapted weight ``W + s·B·A`` is
never formed), the optional soft cap ``c·tanh(x/c)``, then :func:`rlkern.token_logprobs` with
the filters — the sampler's own kept-set search, so the log-probs equal
``sample(...).processed_logprobs`` of the same logits bit for bit. With autograd each chunk is
checkpointed (:func:`torch.utils.checkpoint.checkpoint`): the backward recomputes the chunk's
logits, so peak extra memory stays one chunk of logits (plus its gradient) whatever ``N``.
Gradients are exact with the kept set fixed (0 outside it; a label outside it has log-prob −inf
and no gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlkern.ops.logprobs import token_logprobs

__all__ = ["CHUNK_LOGITS", "active_filters", "check_filters_allowed", "check_lora", "filters_given",
           "truncated_linear_logprobs"]

#: Logits per chunk of complete rows (16M: 32 MiB in bf16, 64 MiB in fp32).
CHUNK_LOGITS = 1 << 24

# linear_logprobs backend → token_logprobs backend for the chunk's epilogue
_EPILOGUE_BACKEND = {"auto": "auto", "cpu": "cpu", "triton": "triton", "torch": "torch"}


def _rows(value: int | float | Tensor | None, sl: slice) -> int | float | Tensor | None:
    """A per-row filter tensor sliced to the chunk's rows; numbers pass through."""
    return value[sl] if isinstance(value, Tensor) and value.dim() == 1 else value


def _chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor | None,
           lora_b: Tensor | None, lora_scale: float, labels: Tensor,
           temperature: float, softcap: float | None, return_entropy: bool,
           ignore_index: int, backend: str, top_k, top_p, min_p,
           filter_order: str) -> tuple[Tensor, Tensor, Tensor | None]:
    x = F.linear(hidden, weight, bias)
    if lora_a is not None:
        # (h Aᵀ) Bᵀ: two thin matmuls through the rank r, never the (V, H) product B·A
        x = x + lora_scale * F.linear(F.linear(hidden, lora_a), lora_b)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    out = token_logprobs(x, labels, temperature=temperature, return_entropy=return_entropy,
                         ignore_index=ignore_index, backend=backend, top_k=top_k, top_p=top_p,
                         min_p=min_p, filter_order=filter_order)
    return out.logprobs, out.lse, out.entropy


def truncated_linear_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, *,
    lora_a: Tensor | None = None, lora_b: Tensor | None = None, lora_scale: float = 1.0,
    temperature: float, softcap: float | None, return_entropy: bool, ignore_index: int,
    chunk_size: int | None, backend: str, top_k: int | Tensor | None,
    top_p: float | Tensor | None, min_p: float | Tensor | None, filter_order: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(logprobs, lse, entropy or None)`` of the ``(N, H)`` rows of ``hidden`` under the
    (filtered, when a filter is given) distribution of ``softmax(z / T)`` (``z`` the head's —
    LoRA-adapted, soft-capped — logits); per-row filter tensors have shape ``(N,)``. ``lse``
    is the whole row's, as in :func:`rlkern.token_logprobs`."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_size or max(1, CHUNK_LOGITS // max(vocab, 1))
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias, lora_a, lora_b))
    epilogue = _EPILOGUE_BACKEND[backend]
    parts: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for r0 in range(0, n, rows):
        sl = slice(r0, min(n, r0 + rows))
        args = (hidden[sl], weight, bias, lora_a, lora_b, lora_scale, labels[sl], temperature,
                softcap, return_entropy, ignore_index, epilogue, _rows(top_k, sl),
                _rows(top_p, sl), _rows(min_p, sl), filter_order)
        # checkpointed: the backward recomputes the chunk's logits instead of keeping them
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if need_grad
                     else _chunk(*args))
    if not parts:
        empty = hidden.new_zeros((0,), dtype=torch.float32 if hidden.dtype != torch.float64
                                 else torch.float64)
        return empty, empty, empty if return_entropy else None
    lp = torch.cat([p[0] for p in parts])
    lse = torch.cat([p[1] for p in parts])
    ent = torch.cat([p[2] for p in parts]) if return_entropy else None
    return lp, lse, ent


def active_filters(top_k: int | float | None, top_p: float | None,
                   min_p: float | None) -> dict[str, int | float]:
    """A trainer's sampling settings as ``top_k`` / ``top_p`` / ``min_p`` options, keeping the
    ones that are on (the engines' "off" values — ``top_k`` ≤ 0, ``top_p`` ≥ 1, ``min_p`` ≤ 0,
    or None — dropped)."""
    out: dict[str, int | float] = {}
    if top_k is not None and int(top_k) > 0:
        out["top_k"] = int(top_k)
    if top_p is not None and float(top_p) < 1.0:
        out["top_p"] = float(top_p)
    if min_p is not None and float(min_p) > 0.0:
        out["min_p"] = float(min_p)
    return out


def filters_given(top_k, top_p, min_p) -> bool:
    """Whether any filter is set (``top_k`` / ``top_p`` / ``min_p`` not ``None``)."""
    return any(f is not None for f in (top_k, top_p, min_p))


def check_filters_allowed(process_group) -> None:
    """The filters (and a LoRA head) need each whole row on one rank."""
    if process_group is not None:
        raise ValueError("top_k / top_p / min_p and lora need each row's whole vocabulary on "
                         "one rank: not supported with process_group")


def check_lora(lora: tuple[Tensor, Tensor, float] | None,
               weight: Tensor) -> tuple[Tensor | None, Tensor | None, float]:
    """``lora = (A, B, s)`` checked against the head ``weight (V, H)``: ``A (r, H)``,
    ``B (V, r)``, same dtype and device, ``s`` a finite number. ``None`` → no adapter."""
    if lora is None:
        return None, None, 1.0
    if not (isinstance(lora, tuple | list) and len(lora) == 3):
        raise TypeError("lora must be a tuple (A, B, scale)")
    a, b, scale = lora
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("lora: A and B must be tensors")
    vocab, hidden = weight.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != hidden or b.shape != (vocab, a.shape[0]):
        raise ValueError(f"lora: A must be (r, H={hidden}) and B (V={vocab}, r); got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    for name, t in (("A", a), ("B", b)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise ValueError(f"lora: {name} must have the weight's dtype and device "
                             f"({weight.dtype}, {weight.device}); got {t.dtype}, {t.device}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"lora: the scale must be a finite number, got {scale!r}")
    return a, b, float(scale)
