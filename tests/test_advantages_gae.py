"""rlkern.gae (GAE with verl's carry over masked tokens) on every backend against the float64
reference; the reference against verl's own estimators (gae, reinforce_plus_plus, remax) where
verl is installed; the registered ops (opcheck, torch.compile); bad input.

The Triton backend runs in the interpreter on CPU tensors (conftest.py switches it on), the
CUDA C++ kernel where a GPU is present (tests/test_advantages_cuda_emulation.py runs it on the
host otherwise)."""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from advantages_cases import OUT_TOL
from rlkern import backends
from rlkern.reference.token_advantages import gae_reference
from verl_cases import VERL_MISSING

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GAMMAS = [0.0, 0.9, 1.0]
LAMS = [0.0, 0.95, 1.0]


def _backends() -> list:
    out = ["cpu", "torch"]
    try:
        import triton  # noqa: F401
    except ImportError:
        out.append(pytest.param("triton", marks=pytest.mark.skip(reason="triton not installed")))
    else:
        out.append("triton")
    if torch.cuda.is_available() and backends.has_cuda_kernels():
        out.append("cuda")
    return out


def _device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def multi_turn_mask(n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, t)`` bool response masks of multi-turn rollouts: random lengths (row 1 empty when
    n > 1: an all-masked row), and up to two observation spans (holes) inside each response."""
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    if n > 1:
        lengths[1] = 0
    lengths[0] = t  # a full row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    for i in range(n):
        for _ in range(2):
            a = int(torch.randint(0, t, (1,), generator=gen))
            w = int(torch.randint(1, max(2, t // 4), (1,), generator=gen))
            mask[i, a:a + w] = False
    return mask


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(shape, generator=gen).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    return rewards, values, multi_turn_mask(*shape, gen)


def _close(actual, expected, dtype, what):
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert actual.dtype == out_dtype, (what, actual.dtype)
    rtol, atol = OUT_TOL[out_dtype]
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- the reference


def test_reference_hand_example():
    """δ and the carries by hand: γ = 0.5, λ = 1, an observation token at t = 1."""
    r = torch.tensor([[1.0, 9.0, 2.0]])
    v = torch.tensor([[0.5, 7.0, 1.0]])
    m = torch.tensor([[1, 0, 1]])
    adv, ret = gae_reference(r, v, m, gamma=0.5, lam=1.0)
    a2 = 2.0 - 1.0  # δ_2 = r_2 − V_2 (no later value)
    a0 = (1.0 + 0.5 * 1.0 - 0.5) + 0.5 * a2  # δ_0 uses V_2 (the masked V_1 is skipped)
    torch.testing.assert_close(adv, torch.tensor([[a0, a2, a2]], dtype=torch.float64))
    torch.testing.assert_close(ret, adv + v.double())


def test_reference_special_cases():
    """values=None, λ = 1: the masked discounted return (REINFORCE++); γ = λ = 1: the reverse
    cumulative sum of the valid rewards (ReMax)."""
    r, _, m = _inputs((5, 11), torch.float64, 3)
    adv, ret = gae_reference(r, None, m, gamma=1.0, lam=1.0)
    cumsum = (r * m).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, cumsum)
    torch.testing.assert_close(ret, adv)
    adv, _ = gae_reference(r, None, m, gamma=0.7, lam=1.0)
    want = torch.zeros_like(r)
    for i in range(r.shape[0]):
        run = 0.0
        for t in range(r.shape[1] - 1, -1, -1):
            if m[i, t]:
                run = float(r[i, t]) + 0.7 * run
            want[i, t] = run
    torch.testing.assert_close(adv, want)


# ------------------------------------------------------------------------------ the backends


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 17), (9, 64)])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("lam", LAMS)
def test_backends_match_reference(backend, shape, gamma, lam):
    rewards, values, mask = _inputs(shape, torch.float32, shape[0] * 100 + shape[1])
    dev = _device(backend)
    for v in (values, None):
        out = rlkern.gae(rewards.to(dev), None if v is None else v.to(dev), mask.to(dev),
                         gamma=gamma, lam=lam, backend=backend)
        ref_adv, ref_ret = gae_reference(rewards, v, mask, gamma=gamma, lam=lam)
        _close(out.advantages, ref_adv, torch.float32, f"{backend} advantages")
        _close(out.returns, ref_ret, torch.float32, f"{backend} returns")
        assert not out.advantages.requires_grad and not out.returns.requires_grad


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(backend, dtype):
    rewards, values, mask = _inputs((6, 40), dtype, 7)
    dev = _device(backend)
    out = rlkern.gae(rewards.to(dev), values.to(dev), mask.to(dev), gamma=0.99, lam=0.95,
                     backend=backend)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    _close(out.advantages, ref_adv, dtype, f"{dtype} advantages")
    _close(out.returns, ref_ret, dtype, f"{dtype} returns")


@pytest.mark.parametrize("backend", _backends())
def test_all_masked_rows_and_a_long_row(backend):
    """An all-masked batch gives advantages 0 and returns V; T = 700 crosses any block."""
    dev = _device(backend)
    r, v = torch.randn(3, 700), torch.randn(3, 700)
    out = rlkern.gae(r.to(dev), v.to(dev), torch.zeros(3, 700, dtype=torch.bool).to(dev),
                     gamma=0.9, lam=0.9, backend=backend)
    assert (out.advantages.cpu() == 0).all()
    torch.testing.assert_close(out.returns.cpu(), v)
    mask = multi_turn_mask(3, 700, torch.Generator().manual_seed(1))
    out = rlkern.gae(r.to(dev), v.to(dev), mask.to(dev), gamma=0.999, lam=0.97,
                     backend=backend)
    ref_adv, _ = gae_reference(r, v, mask, gamma=0.999, lam=0.97)
    _close(out.advantages, ref_adv, torch.float32, "T=700")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
def test_mask_dtypes_and_mixed_input_dtypes(mask_dtype):
    rewards, values, mask = _inputs((5, 13), torch.float32, 11)
    want = rlkern.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    got = rlkern.gae(rewards, values, mask.to(mask_dtype), gamma=0.9, lam=0.8)
    torch.testing.assert_close(got.advantages, want.advantages, rtol=0, atol=0)
    # float64 values promote the outputs to float64
    mixed = rlkern.gae(rewards, values.double(), mask, gamma=0.9, lam=0.8)
    assert mixed.advantages.dtype == torch.float64
    _close(mixed.advantages, gae_reference(rewards, values, mask, gamma=0.9, lam=0.8)[0],
           torch.float64, "mixed")


def test_zero_discount_drops_a_non_finite_carry():
    """γ = 0: δ_t = r_t − V_t exactly, even when a later value is ±inf (0·inf is not NaN)."""
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, math.inf, 1.0]])
    m = torch.ones(1, 3)
    for backend in ("cpu", "torch"):
        out = rlkern.gae(r, v, m, gamma=0.0, lam=0.9, backend=backend)
        torch.testing.assert_close(out.advantages[0, 0], torch.tensor(0.5))


def test_inputs_requiring_grad_give_outputs_without_grad():
    r = torch.randn(2, 5, requires_grad=True)
    v = torch.randn(2, 5, requires_grad=True)
    out = rlkern.gae(r, v, torch.ones(2, 5), gamma=0.9, lam=0.9)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


def test_empty_inputs():
    for shape in ((0, 5), (4, 0)):
        out = rlkern.gae(torch.zeros(shape), None, torch.zeros(shape), gamma=0.9, lam=0.9)
        assert out.advantages.shape == shape and out.returns.shape == shape


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA tensors"):
        rlkern.gae(torch.zeros(2, 3), None, torch.ones(2, 3), gamma=1.0, lam=1.0,
                   backend="cuda")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rewards": torch.rand(3)}, ValueError, "shape"),
        ({"values": torch.rand(2, 4)}, ValueError, "values"),
        ({"mask": torch.ones(3, 2)}, ValueError, "mask"),
        ({"gamma": math.nan}, ValueError, "gamma"),
        ({"lam": math.inf}, ValueError, "lam"),
        ({"gamma": "0.9"}, TypeError, "gamma"),
        ({"rewards": torch.ones(2, 3, dtype=torch.long)}, TypeError, "rewards"),
        ({"values": torch.ones(2, 3, dtype=torch.long)}, TypeError, "values"),
        ({"mask": torch.ones(2, 3, dtype=torch.complex64)}, TypeError, "mask"),
        ({"values": torch.ones(2, 3, device="meta")}, ValueError, "values"),
        ({"backend": "numpy"}, ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"rewards": torch.rand(2, 3), "values": torch.rand(2, 3), "mask": torch.ones(2, 3),
            "gamma": 0.9, "lam": 0.95, **kwargs}
    with pytest.raises(error, match=match):
        rlkern.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


# -------------------------------------------------------------------------- registered ops


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    r, v, m = _inputs((6, 5), torch.float32, 2)
    torch.library.opcheck(torch.ops.rlkern.gae.default, (r, v, m, 0.9, 0.95, backend))
    torch.library.opcheck(torch.ops.rlkern.gae.default, (r, None, m, 1.0, 1.0, backend))


def test_opcheck_out_op():
    r, v, m = _inputs((6, 5), torch.float64, 4)
    torch.library.opcheck(torch.ops.rlkern.gae_out.default,
                          (r, v, m, 0.9, 0.95, torch.empty_like(r), torch.empty_like(r)))
    torch.library.opcheck(torch.ops.rlkern.gae_out.default,
                          (r, None, m, 0.9, 0.95, torch.empty_like(r), torch.empty_like(r)))


def test_out_op_checks_its_arguments():
    r, v, m = _inputs((3, 4), torch.float32, 5)
    with pytest.raises(TypeError, match="values"):
        torch.ops.rlkern.gae_out(r, v.double(), m, 0.9, 0.9, torch.empty_like(r),
                                 torch.empty_like(r))
    with pytest.raises(TypeError, match="mask"):
        torch.ops.rlkern.gae_out(r, v, m.float(), 0.9, 0.9, torch.empty_like(r),
                                 torch.empty_like(r))
    with pytest.raises(RuntimeError, match="returns"):
        torch.ops.rlkern.gae_out(r, v, m, 0.9, 0.9, torch.empty_like(r), torch.empty(3))


def test_torch_compile_fullgraph():
    r, v, m = _inputs((4, 9), torch.float32, 6)

    def step(r, v, m):
        out = rlkern.gae(r, v, m, gamma=0.99, lam=0.95)
        return out.advantages * 2 + out.returns

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(r, v, m)
    torch.testing.assert_close(got, step(r, v, m))


# -------------------------------------------------------- the reference against verl's own


def _verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason=VERL_MISSING)
    verl_f = pytest.importorskip("verl.utils.torch_functional", reason=VERL_MISSING)
    return core_algos, verl_f


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("lam", LAMS)
def test_reference_matches_verl_gae(gamma, lam, monkeypatch):
    """verl's compute_gae_advantage_return with its whitening switched off is the reference
    (and its returns are the reference's)."""
    core_algos, verl_f = _verl()
    r, v, m = _inputs((7, 19), torch.float64, 8)
    monkeypatch.setattr(verl_f, "masked_whiten", lambda x, mask, shift_mean=True: x)
    adv, ret = core_algos.compute_gae_advantage_return(r, v, m.double(), gamma, lam)
    ref_adv, ref_ret = gae_reference(r, v, m, gamma=gamma, lam=lam)
    torch.testing.assert_close(ref_adv, adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_ret, ret, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_reference_matches_verl_reinforce_plus_plus_and_remax(gamma):
    core_algos, _ = _verl()
    from verl.trainer.config import AlgoConfig

    r, _, m = _inputs((7, 19), torch.float64, 9)
    mask = m.double()
    _, ret = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        r, mask, config=AlgoConfig(gamma=gamma))
    ref, _ = gae_reference(r, None, m, gamma=gamma, lam=1.0)
    torch.testing.assert_close(ref * mask, ret, rtol=1e-12, atol=1e-12)
    baseline = torch.randn(7, dtype=torch.float64)
    adv, ret = core_algos.compute_remax_outcome_advantage(r, baseline, mask)
    ref, _ = gae_reference(r, None, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ref, ret, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref - baseline[:, None] * mask, adv, rtol=1e-12, atol=1e-12)


# ------------------------------------------------ verl's estimators on it (verl not needed)


@pytest.mark.parametrize("backend", _backends())
def test_scan_estimators_on_every_backend(backend):
    """rlkern.integrations.verl.scan_estimator (the body of rlkern_gae, _reinforce_plus_plus,
    _remax) gives the same on every backend, and its definitions from the reference hold."""
    from rlkern.integrations.verl import scan_estimator

    rewards, values, mask = _inputs((5, 21), torch.float32, 12)
    mask = mask.float()
    baselines = torch.randn(5)
    dev = _device(backend)
    for name, kw in (("gae", dict(values=values, gamma=0.99, lam=0.95)),
                     ("reinforce_plus_plus", dict(gamma=0.9)),
                     ("remax", dict(reward_baselines=baselines))):
        kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        adv, ret = scan_estimator(name, rewards.to(dev), mask.to(dev), backend=backend, **kw_dev)
        want_adv, want_ret = scan_estimator(name, rewards, mask, backend="torch", **kw)
        torch.testing.assert_close(adv.cpu(), want_adv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.cpu(), want_ret, rtol=1e-5, atol=1e-5)
    # remax: returns = the masked reverse cumsum, advantages = returns − b·mask
    adv, ret = scan_estimator("remax", rewards, mask, reward_baselines=baselines)
    torch.testing.assert_close(ret, (rewards * mask).flip(-1).cumsum(-1).flip(-1), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(adv, ret - baselines[:, None] * mask)
    # reinforce++: whitened over the valid tokens (mean 0, unbiased std 1), 0 elsewhere
    adv, ret = scan_estimator("reinforce_plus_plus", rewards, mask, gamma=0.9)
    valid = adv[mask.bool()]
    assert (adv[~mask.bool()] == 0).all() and (ret[~mask.bool()] == 0).all()
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std()) - 1) < 1e-4


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("gae", {}, "values"),
    ("remax", {}, "reward_baselines"),
    ("grpo", {}, "name"),
])
def test_scan_estimator_bad_input(name, kwargs, match):
    from rlkern.integrations.verl import scan_estimator

    with pytest.raises(ValueError, match=match):
        scan_estimator(name, torch.zeros(2, 3), torch.ones(2, 3), **kwargs)
