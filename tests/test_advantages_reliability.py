"""Edge inputs of the advantages family, the same answer on every backend (issue 14).

Each test is named after the documented behaviour it pins (docs/advantages.md, "Edge cases"):
a zero-variance group with ``eps=0`` gets exactly 0; no return flows across a reset (nor
across a discount of 0); non-finite old log-probabilities follow ``nan_policy``; the ops are
not differentiable and return outputs that do not require grad; every tensor argument on
another device is refused by name, by the public functions and by the registered ops; empty
inputs give empty outputs. Backends: the C++ kernels (``cpu``), the float64 reference
(``torch``) and the Triton kernels in the interpreter (``triton``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import rlkern
from rlkern.config.advantages import AdvantageConfig
from rlkern.reference.advantages import group_advantages_reference

BACKENDS = ["cpu", "torch", "triton"]
NAN = math.nan
INF = math.inf


def _ids(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


# --------------------------------------------------------------------------------- eps = 0

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(estimator="grpo"), dict(estimator="grpo", std="biased"),
    dict(estimator="grpo", std_scope="batch"), dict(estimator="ngrpo", r_max=0.0),
    dict(estimator="grpo_passk"), dict(estimator="unlikely"),
    dict(estimator="xrpo", lam=0.5, kappa=1.0),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_zero_variance_group_with_eps_zero_gives_exactly_zero(backend, options):
    # Group 0: all 0 (zero variance, also after unlikely's rank shaping r' = s·(…)); group 1:
    # a spread. With std_scope="batch" every score is equal, so σ_batch = 0 too.
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 2.0])
    if options.get("std_scope") == "batch":
        scores = torch.zeros(8)
    extra = {}
    if options["estimator"] in ("unlikely", "xrpo"):
        extra = dict(old_logprobs=-torch.rand(8, 3, generator=torch.Generator().manual_seed(0)),
                     mask=torch.ones(8, 3, dtype=torch.bool))
    out = rlkern.group_advantages(scores, group_size=4, eps=0.0, backend=backend, **options,
                                  **extra)
    adv = out.advantages if out.advantages.dim() == 1 else out.advantages[:, 0]
    assert torch.isfinite(adv).all(), adv
    zero_var = out.zero_variance_mask  # ngrpo: r_max = 0 equals group 0's value, σ' = 0 too
    assert bool(zero_var[:4].all())
    assert torch.equal(adv[zero_var], torch.zeros(int(zero_var.sum()))), adv


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_stats_zero_variance_group_with_eps_zero_gives_exactly_zero(backend):
    scores = torch.tensor([0.25, 0.25, 1.0, 3.0, 0.25])
    ids = _ids(7, 7, 9, 9, 7)
    stats = rlkern.GroupStats.from_scores(scores, ids)
    for estimator in ("grpo", "ngrpo"):
        out = stats.advantages(scores, ids, eps=0.0, estimator=estimator, r_max=0.25,
                               backend=backend)
        assert torch.isfinite(out.advantages).all(), (estimator, out.advantages)
        assert torch.equal(out.advantages[ids == 7], torch.zeros(3)), (estimator, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gigpo_zero_variance_group_with_eps_zero_gives_exactly_zero(backend, dtype):
    ep = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=dtype)
    st = torch.tensor([0.3, 0.3, 0.1, 0.9], dtype=dtype)
    keys = _ids(5, 5, 6, 6)
    out = rlkern.gigpo_advantages(ep, st, keys, group_ids=_ids(0, 0, 1, 1), omega=1.0,
                                  mode="std_norm", eps=0.0, backend=backend)
    for t in out:
        assert torch.isfinite(t).all(), out
    assert torch.equal(out.advantages[:2], torch.zeros(2, dtype=dtype))


# ------------------------------------------------------------------------- discounted returns

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_discounted_returns_no_return_flows_across_a_reset(backend, dtype, bad):
    rewards = torch.tensor([[1.0, 2.0, bad, 1.0], [0.5, 0.5, 0.5, bad]], dtype=dtype)
    reset = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    out = rlkern.discounted_returns(rewards, gamma=0.5, reset=reset, backend=backend)
    expected = torch.tensor([[2.0, 2.0, NAN, 1.0], [0.875, 0.75, 0.5, NAN]], dtype=torch.float64)
    expected[0, 2] = bad + 0.5 if not math.isnan(bad) else NAN
    expected[1, 3] = bad
    torch.testing.assert_close(out.double(), expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [INF, NAN])
def test_discounted_returns_gamma_zero_gives_the_rewards(backend, bad):
    # γ = 0: G = r, nothing flows from later positions, not even ±inf / NaN (0·inf is dropped
    # like a reset's carry, not NaN).
    rewards = torch.tensor([[1.0, -2.0, bad, 3.0]] * 2)
    out = rlkern.discounted_returns(rewards, gamma=0.0, backend=backend)
    torch.testing.assert_close(out, rewards, equal_nan=True)


# ------------------------------------------------------------- unlikely / xrpo: old_logprobs

def _loglik_case():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0])
    old = -torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[:, 3] = False
    return scores, old, mask


LOGLIK_ESTIMATORS = [dict(estimator="unlikely"), dict(estimator="xrpo", lam=0.5, kappa=1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LOGLIK_ESTIMATORS, ids=lambda o: o["estimator"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_old_logprobs_raise_under_nan_policy_raise(backend, options, bad):
    scores, old, mask = _loglik_case()
    old[2, 1] = bad
    with pytest.raises(ValueError, match="old_logprobs: row 2"):
        rlkern.group_advantages(scores, group_size=4, old_logprobs=old, mask=mask,
                                backend=backend, **options)


@pytest.mark.parametrize("options", LOGLIK_ESTIMATORS, ids=lambda o: o["estimator"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_old_logprobs_omit_the_response_under_nan_policy_omit(options, bad):
    # The response is left out like a NaN score: A = 0, and the others get what they get
    # without it, on every backend.
    scores, old, mask = _loglik_case()
    old[2, 1] = bad
    without = scores.clone()
    without[2] = NAN
    for backend in BACKENDS:
        out = rlkern.group_advantages(scores, group_size=4, old_logprobs=old, mask=mask,
                                      nan_policy="omit", backend=backend, **options)
        clean = old.clone()
        clean[2] = -1.0
        want = rlkern.group_advantages(without, group_size=4, old_logprobs=clean, mask=mask,
                                       nan_policy="omit", backend=backend, **options)
        for got, exp in zip(out, want, strict=True):
            torch.testing.assert_close(got, exp, equal_nan=True, msg=backend)
        assert bool((out.advantages[2] == 0).all()), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LOGLIK_ESTIMATORS, ids=lambda o: o["estimator"])
def test_nonfinite_old_logprobs_at_padding_are_ignored(backend, options):
    scores, old, mask = _loglik_case()
    clean = rlkern.group_advantages(scores, group_size=4, old_logprobs=old, mask=mask,
                                    backend=backend, **options)
    old[:, 3] = torch.tensor([NAN, INF, -INF, NAN, NAN, -INF, INF, NAN])  # masked out
    out = rlkern.group_advantages(scores, group_size=4, old_logprobs=old, mask=mask,
                                  backend=backend, **options)
    for got, exp in zip(out, clean, strict=True):
        torch.testing.assert_close(got, exp, equal_nan=True)


def test_nonfinite_loglik_is_refused_by_the_cpu_op():
    # The registered C++ op never sorts NaN log-likelihoods (std::sort needs a strict weak
    # order): it refuses them, naming the row.
    scores, _, _ = _loglik_case()
    flags, hparams = AdvantageConfig(estimator="unlikely").kernel_args()
    loglik = torch.zeros(8, dtype=torch.float64)
    loglik[5] = NAN
    outs = [torch.empty(8) for _ in range(3)] + [torch.empty(8, dtype=torch.bool)]
    with pytest.raises(ValueError, match="loglik: row 5"):
        torch.ops.rlkern.group_advantages_out(scores, None, 4, None, loglik, flags, hparams,
                                              *outs)


# ------------------------------------------------------------------------- not differentiable

def _calls() -> dict[str, Callable[..., object]]:
    """Each op of the family on small valid inputs; ``x`` is the main float input."""
    ids = _ids(3, 1, 3, 1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    old = -torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    return {
        "group_advantages": lambda x, b: rlkern.group_advantages(x[:, 0], group_ids=ids,
                                                                 backend=b),
        "group_advantages_tokens": lambda x, b: rlkern.group_advantages(
            x, group_size=2, mask=mask, estimator="unlikely", old_logprobs=old, backend=b),
        "group_stats": lambda x, b: rlkern.GroupStats.from_scores(x[:, 0], ids).advantages(
            x[:, 0], ids, backend=b),
        "discounted_returns": lambda x, b: rlkern.discounted_returns(x, gamma=0.9, backend=b),
        "position_baseline": lambda x, b: rlkern.position_baseline(x, mask, group_ids=ids,
                                                                   backend=b),
        "gtpo_weights": lambda x, b: rlkern.gtpo_weights(x.abs(), mask, group_size=2, backend=b),
        "gigpo_advantages": lambda x, b: rlkern.gigpo_advantages(
            x[:, 0], x[:, 1], _ids(1, 2, 1, 2), group_ids=ids, omega=0.5, mode="std_norm",
            backend=b),
        "empg_modulate": lambda x, b: rlkern.empg_modulate(x[:, 0], x[:, 1].abs(),
                                                           x[:, 2].abs(), backend=b),
    }


def _outputs(out: object) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(_calls()))
def test_outputs_do_not_require_grad(op, backend):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    outs = _outputs(_calls()[op](x, backend))
    assert outs and not any(t.requires_grad for t in outs), op
    assert all(t.grad_fn is None for t in outs)


# ------------------------------------------------------------------------------------ devices

def _device_inputs():
    """Small valid inputs (scores, tokens, mask, ids) and the move of one to meta."""
    return (torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.rand(4, 3),
            torch.ones(4, 3, dtype=torch.bool), _ids(0, 0, 1, 1), lambda t: t.to("meta"))


def _foreign_device_cases():
    """(op, argument name, call with that argument on the meta device)."""
    s, x, m, ids, meta = _device_inputs()
    ga = rlkern.group_advantages
    return [
        ("group_advantages", "group_ids", lambda b: ga(s, group_ids=meta(ids), backend=b)),
        ("group_advantages", "mask", lambda b: ga(s, group_size=2, mask=meta(m), backend=b)),
        ("group_advantages", "lengths", lambda b: ga(s, group_size=2, estimator="opo",
                                                     lengths=meta(s), backend=b)),
        ("group_advantages", "old_logprobs", lambda b: ga(s, group_size=2, estimator="unlikely",
                                                          old_logprobs=meta(x), mask=m,
                                                          backend=b)),
        ("GroupStats.update", "group_ids",
         lambda b: rlkern.GroupStats().update(s, meta(ids))),
        ("GroupStats.advantages", "group_ids",
         lambda b: rlkern.GroupStats.from_scores(s, ids).advantages(s, meta(ids), backend=b)),
        ("GroupStats.advantages", "scores",
         lambda b: rlkern.GroupStats.from_scores(s, ids).advantages(meta(s), ids, backend=b)),
        ("discounted_returns", "reset",
         lambda b: rlkern.discounted_returns(x, gamma=0.9, reset=meta(m), backend=b)),
        ("position_baseline", "mask",
         lambda b: rlkern.position_baseline(x, meta(m), group_size=2, backend=b)),
        ("position_baseline", "group_ids",
         lambda b: rlkern.position_baseline(x, m, group_ids=meta(ids), backend=b)),
        ("gtpo_weights", "mask", lambda b: rlkern.gtpo_weights(x, meta(m), group_size=2,
                                                               backend=b)),
        ("gigpo_advantages", "step_returns",
         lambda b: rlkern.gigpo_advantages(s, meta(s), ids, group_ids=ids, omega=1.0,
                                           mode="std_norm", backend=b)),
        ("gigpo_advantages", "state_keys",
         lambda b: rlkern.gigpo_advantages(s, s, meta(ids), group_ids=ids, omega=1.0,
                                           mode="std_norm", backend=b)),
        ("gigpo_advantages", "group_ids",
         lambda b: rlkern.gigpo_advantages(s, s, ids, group_ids=meta(ids), omega=1.0,
                                           mode="std_norm", backend=b)),
        ("empg_modulate", "step_entropy",
         lambda b: rlkern.empg_modulate(s, meta(s), s, backend=b)),
        ("empg_modulate", "next_step_entropy",
         lambda b: rlkern.empg_modulate(s, s, meta(s), backend=b)),
    ]


def _op_cases():
    """The registered functional ops, called directly with one argument on the meta device."""
    s, x, m, ids, meta = _device_inputs()
    flags, hp = AdvantageConfig(estimator="opo").kernel_args()
    ops = torch.ops.rlkern
    return [
        ("group_advantages", "group_ids",
         lambda b: ops.group_advantages(s, meta(ids), 0, None, None, flags, hp, False, b)),
        ("group_advantages", "weights",
         lambda b: ops.group_advantages(s, None, 2, meta(s.double()), None, flags, hp, False,
                                        b)),
        ("discounted_returns", "reset", lambda b: ops.discounted_returns(x, meta(m), 0.9, b)),
        ("position_baseline", "mask", lambda b: ops.position_baseline(x, meta(m), None, 2, b)),
        ("position_baseline", "group_ids",
         lambda b: ops.position_baseline(x, m, meta(ids), 0, b)),
        ("gtpo_weights", "mask", lambda b: ops.gtpo_weights(x, meta(m), None, 2, 1e-6, b)),
        ("gigpo_advantages", "state_keys",
         lambda b: ops.gigpo_advantages(s, s, meta(ids), ids, 1.0, 1, 1, 1e-6, b)),
        ("empg_modulate", "next_step_entropy",
         lambda b: ops.empg_modulate(s, s, meta(s), 1.0, 1.0, 0.1, b)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [("public", *c) for c in _foreign_device_cases()]
                         + [("registered op", *c) for c in _op_cases()],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_argument_on_another_device_raises_naming_it(case, backend):
    # The public functions, and the registered functional ops called directly (which must
    # never return their fake implementation's uninitialised outputs).
    _, _, name, call = case
    with pytest.raises(ValueError, match=name):
        call(backend)


# -------------------------------------------------------------------------------------- empty

def _empty_cases():
    e = torch.zeros(0)
    e_ids = torch.zeros(0, dtype=torch.int64)
    return {
        "group_advantages ids": (lambda b: rlkern.group_advantages(e, group_ids=e_ids, backend=b),
                                 [(0,)] * 4),
        "group_advantages size": (lambda b: rlkern.group_advantages(e, group_size=3, backend=b),
                                  [(0,)] * 4),
        "group_advantages tokens": (lambda b: rlkern.group_advantages(
            torch.zeros(0, 5), group_size=2, mask=torch.zeros(0, 5), backend=b),
            [(0, 5)] + [(0,)] * 3),
        "group_advantages unlikely": (lambda b: rlkern.group_advantages(
            e, group_size=2, estimator="unlikely", old_logprobs=torch.zeros(0, 4),
            mask=torch.zeros(0, 4, dtype=torch.bool), backend=b), [(0, 4)] + [(0,)] * 3),
        "GroupStats": (lambda b: rlkern.GroupStats.from_scores(e, e_ids).advantages(
            e, e_ids, backend=b), [(0,)] * 4),
        "discounted_returns N=0": (lambda b: rlkern.discounted_returns(
            torch.zeros(0, 4), gamma=0.9, backend=b), [(0, 4)]),
        "discounted_returns T=0": (lambda b: rlkern.discounted_returns(
            torch.zeros(3, 0), gamma=0.9, reset=torch.zeros(3, 0, dtype=torch.bool),
            backend=b), [(3, 0)]),
        "position_baseline": (lambda b: rlkern.position_baseline(
            torch.zeros(2, 0), torch.zeros(2, 0), group_size=2, backend=b), [(2, 0)]),
        "gtpo_weights": (lambda b: rlkern.gtpo_weights(
            torch.zeros(0, 3), torch.zeros(0, 3), group_ids=e_ids, backend=b), [(0, 3)] * 2),
        "gigpo_advantages": (lambda b: rlkern.gigpo_advantages(
            e, e, e_ids, group_ids=e_ids, omega=1.0, mode="mean_norm", backend=b), [(0,)] * 3),
        "empg_modulate": (lambda b: rlkern.empg_modulate(e, e, e, backend=b), [(0,)]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_empty_cases()))
def test_empty_inputs_give_empty_outputs(case, backend):
    call, shapes = _empty_cases()[case]
    outs = _outputs(call(backend))
    assert [tuple(t.shape) for t in outs] == shapes


# ---------------------------------------------------------------------------------- GTPO NaN

@pytest.mark.parametrize("backend", BACKENDS)
def test_gtpo_nan_entropy_gives_nan_weights_at_its_group_position(backend):
    # A NaN entropy at a valid token poisons its group's sums at that position (both weights
    # NaN there, as max(NaN, eps) is NaN), and nothing else.
    h = torch.tensor([[0.5, NAN, 0.2], [0.1, 0.3, 0.0], [0.7, 0.4, 0.9], [0.2, 0.2, 0.2]])
    mask = torch.ones(4, 3, dtype=torch.bool)
    out = rlkern.gtpo_weights(h, mask, group_size=2, eps=0.25, backend=backend)
    for t in out:
        nan = torch.zeros(4, 3, dtype=torch.bool)
        nan[:2, 1] = True
        assert torch.equal(torch.isnan(t), nan), t


# --------------------------------------------------------------------- constants in full

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["reinforce_pp_baseline", "gpg"])
def test_batch_constants_keep_float64_precision(backend, estimator):
    # Rewards of scale 1e10: REINFORCE++'s rstd is ~1e-10, and must reach every row in full
    # float64 precision (not as 1 + (rstd − 1), which keeps only ~6 of its digits).
    scores = torch.tensor([2.0972596601e10, -1.4304156006e10, 1.1636945876e10, -4.8751259298e8],
                          dtype=torch.float64)
    ids = _ids(0, 2, 0, 2)
    out = rlkern.group_advantages(scores, group_ids=ids, estimator=estimator, backend=backend)
    ref = group_advantages_reference(scores, group_ids=ids, estimator=estimator)
    torch.testing.assert_close(out.advantages, ref["advantages"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whitening_of_offset_rewards_is_as_accurate_as_the_data_allow(backend):
    """Rewards 1e10 + N(0, 1) in float64: a group mean carries ~ulp(1e10) ≈ 2e-6 of rounding
    whatever the summation order (the trainers' own torch code included), so the advantages
    can only be that close to exact. Judged against exact rational arithmetic, not the
    reference: every backend stays within a few ulp(1e10) / std."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(32, generator=gen, dtype=torch.float64) + 1e10
    ids = torch.arange(32) // 8
    out = rlkern.group_advantages(scores, group_ids=ids, estimator="reinforce_pp_baseline",
                                  backend=backend).advantages
    xs = [Fraction(float(v)) for v in scores]
    centred = []
    for i in range(32):
        members = [xs[j] for j in range(32) if ids[j] == ids[i]]
        centred.append(xs[i] - sum(members) / len(members))
    mu = sum(centred) / 32
    std = math.sqrt(float(sum((c - mu) ** 2 for c in centred) / 31))
    eps = AdvantageConfig(estimator="reinforce_pp_baseline").eps
    exact = torch.tensor([float(c - mu) / (std + eps) for c in centred], dtype=torch.float64)
    bound = 8 * math.ulp(1e10) / std
    assert float((out - exact).abs().max()) <= bound


def _out_op_cases():
    """The C++ ``*_out`` ops with one argument on the meta device (their Meta kernel)."""
    s, x, m, _, meta = _device_inputs()
    flags, hp = AdvantageConfig().kernel_args()
    outs = lambda: [torch.empty(4) for _ in range(3)] + [torch.empty(4, dtype=torch.bool)]
    ops = torch.ops.rlkern
    return [
        ("group_advantages_out", "group_ids", lambda: ops.group_advantages_out(
            s, meta(_ids(0, 0, 1, 1)), 0, None, None, flags, hp, *outs())),
        ("group_advantages_out", "advantages", lambda: ops.group_advantages_out(
            s, None, 2, None, None, flags, hp, meta(torch.empty(4)), *outs()[1:])),
        ("discounted_returns_out", "reset", lambda: ops.discounted_returns_out(
            x, meta(m), 0.9, torch.empty(4, 3))),
        ("position_baseline_out", "out", lambda: ops.position_baseline_out(
            x, m, None, 2, meta(torch.empty(4, 3)))),
        ("empg_modulate_out", "step_entropy", lambda: ops.empg_modulate_out(
            s, meta(s), s, 1.0, 1.0, 0.1, torch.empty(4))),
        ("masked_whiten_out", "mask", lambda: ops.masked_whiten_out(
            x, meta(m.float()), False, torch.empty(4, 3))),
    ]


@pytest.mark.parametrize("case", _out_op_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_out_op_refuses_a_meta_argument_by_name(case):
    _, name, call = case
    with pytest.raises(RuntimeError, match=f"{name}: expected device cpu"):
        call()


def test_out_op_on_meta_tensors_only_is_a_no_op():
    x = torch.empty(4, 3, device="meta")
    torch.ops.rlkern.discounted_returns_out(x, None, 0.9, torch.empty_like(x))
