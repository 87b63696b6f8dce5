"""The sampler's filter orders are defined once, in csrc/include/rlkern/sample.h: Python reads
them through rlkern._C, and rlkern.sample accepts exactly those names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rlkern
from rlkern.config.sample import filter_order_names, filter_orders
from test_logprobs_layout import header_list

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "include" / "rlkern" / "sample.h"


def test_python_layout_equals_the_header():
    assert list(filter_orders().__members__) == header_list("RLKERN_SAMPLE_FILTER_ORDERS", HEADER)
    assert filter_order_names() == tuple(filter_orders().__members__)


def test_sample_accepts_exactly_the_filter_orders():
    logits = torch.randn(3, 17)
    kw = dict(seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.long), top_k=5, top_p=0.8)
    tokens = {name: rlkern.sample(logits, filter_order=name, **kw).tokens
              for name in filter_order_names()}
    assert all(t.shape == (3,) for t in tokens.values())
    with pytest.raises(ValueError, match="filter_order must be one of"):
        rlkern.sample(logits, filter_order="nucleus_first", **kw)
