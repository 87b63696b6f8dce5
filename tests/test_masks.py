"""Masks of any dtype: the ops read ``rlkern.config.dtypes.bool_mask(mask)``, the same test as
the trainers' ``mask != 0`` (verl passes float ``response_mask``, TRL integer
``completion_mask``), so a float or integer mask gives bitwise the bool mask's results."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from policy_loss_cases import C, make_inputs
from rlkern.config.dtypes import bool_mask

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
          torch.int32, torch.uint8, torch.int8]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.0, 0.5, -2.0, math.nan, math.inf, 3.0]),
                       min_size=0, max_size=40),
       dtype=st.sampled_from(DTYPES), transpose=st.booleans())
def test_bool_mask_is_nonzero(values, dtype, transpose):
    x = torch.tensor(values, dtype=torch.float64)
    if not dtype.is_floating_point:  # integers: no NaN / inf / fractions
        x = torch.nan_to_num(x, nan=1.0, posinf=1.0).trunc()
    m = x.to(dtype).reshape(1, -1).expand(2, -1)
    if transpose:
        m = m.t()
    got = bool_mask(m)
    assert got.dtype == torch.bool and got.is_contiguous()
    assert torch.equal(got, m != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_takes_a_mask_of_any_dtype(dtype):
    inp = make_inputs(7, 23, torch.float32, seed=2)
    cfg = C(kl_coef=0.1)
    results = []
    for mask in (inp["mask"], inp["mask"].to(dtype)):
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], mask,
                                 ref_logprobs=inp["ref_logprobs"], config=cfg)
        (g,) = torch.autograd.grad(out.loss, lp)
        results.append((out.loss, g))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_gae_takes_a_float_mask():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 17, generator=g)
    v = torch.randn(4, 17, generator=g)
    mask = torch.rand(4, 17, generator=g) > 0.3
    a = rlkern.gae(r, v, mask, gamma=0.99, lam=0.95)
    b = rlkern.gae(r, v, mask.float() * 2.5, gamma=0.99, lam=0.95)  # nonzero, not only 1
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
