"""Edge values for the adversarial suite: how a tensor of a given shape is filled and laid out.

``fill(kind, shape, dtype, gen)`` draws the values, ``lay_out(t, layout)`` returns a view of the
same values with another memory layout (stride-0 expansion, transposed storage), so that every
op sees the inputs users actually pass: slices of logits, broadcast advantages, transposed
hidden states.
"""

from __future__ import annotations

import torch

#: How a floating tensor is filled. "normal" values are N(0, 1) (× a scale chosen per op).
KINDS = ("normal", "huge", "tiny", "constant", "big_constant", "with_inf", "with_nan",
         "with_neg_inf", "finfo_min", "one_huge")
#: Memory layouts of an input.
LAYOUTS = ("contiguous", "expanded", "transposed")


def fill(kind: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
         scale: float = 1.0) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` with the values of ``kind``."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    n = x.numel()
    if kind == "huge":
        x = x * 1e10
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "constant":
        x = torch.full(shape, 0.75, dtype=torch.float64)
    elif kind == "big_constant":
        x = torch.full(shape, -1e10, dtype=torch.float64)
    elif kind in ("with_inf", "with_nan", "with_neg_inf") and n:
        pick = torch.rand(shape, generator=gen) < 0.2
        value = {"with_inf": torch.inf, "with_nan": torch.nan, "with_neg_inf": -torch.inf}[kind]
        if kind == "with_inf":
            value_t = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.inf, -torch.inf)
            x = torch.where(pick, value_t.double(), x)
        else:
            x = torch.where(pick, torch.tensor(value, dtype=torch.float64), x)
    elif kind == "finfo_min":
        x = torch.full(shape, float(torch.finfo(dtype).min), dtype=torch.float64)
    elif kind == "one_huge" and n:
        flat = x.reshape(-1).clone()
        flat[int(torch.randint(n, (1,), generator=gen))] = 1e10
        x = flat.reshape(shape)
    return x.to(dtype)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout: ``expanded`` repeats the first row with
    stride 0 along dim 0 (every row equal); ``transposed`` stores the last two dims swapped."""
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def is_finite_kind(kind: str) -> bool:
    return kind not in ("with_inf", "with_nan", "with_neg_inf")
