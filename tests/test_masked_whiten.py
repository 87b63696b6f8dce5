"""verl's whitening (``masked_whiten``) as rlkern runs it after its GAE / REINFORCE++ scans
(``rlkern.integrations.verl._masked_whiten``): on the CPU backend one C++ op,
``rlkern::masked_whiten_out`` (float64 sums), elsewhere verl's torch operations one for one.
Without verl installed: the C++ op against the torch path. With verl,
tests/test_integration_verl_scan.py compares both with verl's own function."""

from __future__ import annotations

import pytest
import torch

from rlkern.integrations import verl as rv


def _inputs(shape, dtype, mask_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.3
    x = torch.where(mask, x, torch.full_like(x, 1e4))  # masked entries: large, not summed
    return x, mask.to(mask_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32,
                                        torch.float64])
@pytest.mark.parametrize("shape", [(1, 2), (12, 23), (64, 4099)])
def test_cpu_op_matches_the_torch_path(dtype, mask_dtype, shape):
    """The sums differ only in their rounding (float64 against torch's float32 / float64
    reductions): float32 within 2e-6, float64 within 1e-12; the same dtype and shape."""
    x, m = _inputs(shape, dtype, mask_dtype, shape[1])
    ours = rv._masked_whiten(x, m)
    torch_path = rv._masked_whiten(x, m, backend="torch")
    assert ours.dtype == torch_path.dtype == x.dtype and ours.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours, torch_path, rtol=tol, atol=tol)


def test_count_arithmetic_follows_the_mask_sum_dtype():
    """verl computes mask.sum() + 1e-8 in the dtype of mask.sum(): float32 for a bool mask even
    with float64 values, where 1e-8 vanishes, but not for a float64 mask, where it does not.
    Two valid entries make the difference visible in float64."""
    x = torch.tensor([[1.0, 3.0, 7.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False]])
    by_bool = rv._masked_whiten(x, m)
    by_f64 = rv._masked_whiten(x, m.double())
    for ours, mask in ((by_bool, m), (by_f64, m.double())):
        assert torch.equal(ours, rv._masked_whiten(x, mask, backend="torch"))
    assert not torch.equal(by_bool, by_f64)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_whitening_errors_are_verls(backend, mask_dtype):
    x = torch.randn(3, 4)
    one = torch.zeros(3, 4)
    one[1, 2] = 1
    for mask, match in ((torch.zeros(3, 4), "At least one element in the mask has to be 1"),
                        (one, "The sum of the mask is one")):
        with pytest.raises(ValueError, match=match):
            rv._masked_whiten(x, mask.to(mask_dtype), backend=backend)


def test_the_cpu_op_is_taken_in_plain_eager_mode(monkeypatch):
    """Plain CPU tensors take the C++ op; a float64 mask with float32 values (verl's sums
    would then be float64) takes the torch path."""
    calls = []
    real = rv.cpp_ops

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real(), name)

    monkeypatch.setattr(rv, "cpp_ops", lambda: Spy())
    x, m = _inputs((4, 5), torch.float32, torch.bool, 0)
    rv._masked_whiten(x, m)
    assert calls == ["masked_whiten_out"]
    rv._masked_whiten(x, m.double())
    assert calls == ["masked_whiten_out"]


def test_the_op_refuses_what_its_caller_never_passes():
    """The C++ op reads the mask in place, so it checks what the Python caller guarantees:
    a float64 count or mask only with float64 x, and a mask dtype it knows."""
    x = torch.randn(3, 4)
    m = torch.ones(3, 4)
    out = torch.empty_like(x)
    op = torch.ops.rlkern.masked_whiten_out
    with pytest.raises(ValueError, match="float64 count needs float64 x"):
        op(x, m, True, out)
    with pytest.raises(ValueError, match="float64 mask needs float64 x"):
        op(x, m.double(), False, out)
    with pytest.raises(TypeError, match="mask must be bool, int32, int64, float32 or float64"):
        op(x, m.half(), False, out)
    with pytest.raises(RuntimeError, match="mask"):
        op(x, m[:, :2].contiguous(), False, out)
