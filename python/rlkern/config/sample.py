"""The layouts of the sampler (:func:`rlkern.sample`), as ``csrc/include/rlkern/sample.h`` defines
them (read through :mod:`rlkern.config.layout`).

* :func:`filter_orders`: how top-k, top-p and min-p combine — ``top_k_first`` (each filter on the
  distribution the previous ones left, renormalised: HF / vLLM) or ``joint`` (each on the
  unfiltered distribution, the kept set is the intersection). The kernels take
  ``joint = filter_order == filter_orders().joint``.
"""

from __future__ import annotations

import enum

import torch

from rlkern.config.layout import layout

__all__ = ["filter_order_names", "filter_orders"]


def filter_orders() -> type[enum.IntEnum]:
    """The ``filter_order`` codes of :func:`rlkern.sample` (name → code)."""
    return layout("sample").filter_order


@torch.compiler.assume_constant_result
def filter_order_names() -> tuple[str, ...]:
    """The names of :func:`filter_orders` in code order, as a constant torch.compile can trace."""
    return tuple(filter_orders().__members__)
