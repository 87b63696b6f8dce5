"""CPU's fused policy loss (rlkern.ops.policy_loss.fused): the forward writes each token's
gradient factor, the backward scales it in place; or, where the upstream gradient is guessed
right, the forward writes the gradient itself (``written``; test_policy_loss_written_grad.py
covers the guess).

Its claim is that the gradient is bitwise the two-pass backward's, so every test compares the
two paths on the same inputs (the two-pass path is reached by switching the fused one off);
the two-pass path itself is checked against the float64 reference by test_policy_loss.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
import rlkern.ops.policy_loss.api as api
from conftest import bits
from policy_loss_cases import CASES, C, Case, call_kwargs, make_inputs
from rlkern.config.layout import layout
from rlkern.ops.policy_loss import fused as fused_module
from rlkern.ops.policy_loss.fused import fused_applies
from rlkern.ops.policy_loss.inputs import prepare


@pytest.fixture(params=["written", "factors"], autouse=True)
def fused_mode(request, monkeypatch):
    """Every test runs twice: the upstream guess steady at 1 (a linear aggregate's forward
    writes the gradient) and unsteady (its forward writes the factors, as other fused
    losses always do)."""
    guess = fused_module.UpstreamGuess()
    guess.steady = request.param == "written"
    monkeypatch.setattr(fused_module, "UPSTREAM", guess)
    return request.param


#: The shared cases the fused path serves: token ratio mode, not gmpo / vespo.
FUSED = [name for name, case in CASES.items()
         if case.config.policy_loss not in ("gmpo", "vespo", "gspo")
         and case.config.importance_sampling_level == "token"]


def _grad(case: Case, inp: dict, *, fused: bool, monkeypatch, retain: bool = False,
          ) -> tuple[rlkern.PolicyLossOutput, torch.Tensor, list[bool]]:
    """The loss and ∂loss/∂logprobs on the CPU, by the fused path or the two-pass one;
    `taken` records whether the fused path was taken."""
    taken: list[bool] = []

    def spy(p):
        ok = fused and fused_applies(p)
        taken.append(ok)
        return ok

    monkeypatch.setattr(api, "fused_applies", spy)
    args, kw = call_kwargs(case, inp)
    lp = args[0].detach().clone().requires_grad_()
    out = rlkern.policy_loss(lp, *args[1:], config=case.config, backend="cpu", **kw)
    (g,) = torch.autograd.grad(out.loss, lp, retain_graph=retain)
    if retain:
        out = (out, torch.autograd.grad(out.loss, lp)[0])
    return out, g, taken


def _assert_same(a: rlkern.PolicyLossOutput, b: rlkern.PolicyLossOutput) -> None:
    assert torch.equal(a.loss, b.loss)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert torch.equal(a.metrics[k], b.metrics[k]) or (
            a.metrics[k].isnan().all() and b.metrics[k].isnan().all()), k


@pytest.mark.parametrize("T", [37, 131])  # 131: several unrolled step pairs and a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_fused_gradient_is_the_two_pass_gradient(name, dtype, T, monkeypatch):
    case = CASES[name]
    inp = make_inputs(12, T, dtype, seed=len(name))  # B: whole gvpo groups
    out_f, g_f, taken_f = _grad(case, inp, fused=True, monkeypatch=monkeypatch)
    out_t, g_t, taken_t = _grad(case, inp, fused=False, monkeypatch=monkeypatch)
    assert taken_f == [True] and taken_t == [False]
    _assert_same(out_f, out_t)
    assert torch.equal(g_f, g_t)
    assert g_f.isfinite().all()
    assert (g_f[~inp["mask"]] == 0).all()


def test_a_second_backward_recomputes_the_same_gradient(monkeypatch):
    """The first backward consumes the factors; retain_graph=True and a second backward run
    the two-pass kernel, with the same bits."""
    case = CASES["all-addons"]
    inp = make_inputs(8, 29, torch.float32, seed=3)
    case = Case(case.config, ref=True, rollout=True, entropy=True, token_weights=True)
    (_, g2), g1, taken = _grad(case, inp, fused=True, monkeypatch=monkeypatch, retain=True)
    assert taken == [True]
    assert torch.equal(g1, g2)
    _, g_t, _ = _grad(case, inp, fused=False, monkeypatch=monkeypatch)
    assert torch.equal(g1, g_t)


def _kl_loss(inp: dict, fused: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf for the log-probabilities and the PPO + KL loss on it, by either path."""
    monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                             ref_logprobs=inp["ref_logprobs"], config=C(kl_coef=0.1))
    return lp, out.loss


def test_create_graph_takes_the_two_pass_op(monkeypatch):
    """A backward that builds a graph runs the registered two-pass op (whose own backward is
    not defined: second-order gradients fail loudly on both paths, never silently zero)."""
    inp = make_inputs(5, 19, torch.float64, seed=11)
    results = []
    for fused in (True, False):
        lp, loss = _kl_loss(inp, fused, monkeypatch)
        (g,) = torch.autograd.grad(loss, lp, create_graph=True)
        assert g.requires_grad
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.sum().backward()
        results.append(g.detach())
    assert torch.equal(results[0], results[1])


def test_backward_with_an_upstream_gradient(monkeypatch):
    """The coefficients carry the upstream gradient (here 3.5, through .backward())."""
    inp = make_inputs(6, 40, torch.float32, seed=5)
    grads = []
    for fused in (True, False):
        lp, loss = _kl_loss(inp, fused, monkeypatch)
        (3.5 * loss).backward()
        grads.append(lp.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("upstream", [1.0, -0.7310585786300049])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl", [0.0, 0.0137])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_formed_coefficients_have_autograds_bits(upstream, agg, kl, dtype, monkeypatch,
                                                      fused_mode):
    """Without entropy, gvpo or batch normalisation, the fused path differentiates the
    aggregation by hand (LinearAggregate.row_grads; no autograd graph for it). Its gradient
    has the bits of the fused rows differentiated through autograd's aggregation, signed
    zeros included (an empty row has weight 0, and a negative upstream gradient makes its
    coefficient −0), and the two-pass path's bits at every valid token. (At masked tokens a
    negative upstream gives −0 where factors are scaled, +0 on the two-pass path and where
    the forward wrote the gradient or the guess missed.)"""
    inp = make_inputs(7, 23, dtype, seed=17)
    inp["mask"][2] = False  # an empty row
    grads, kinds = [], []
    for path in ("hand", "autograd", "two-pass"):
        monkeypatch.setattr(api, "fused_applies",
                            fused_applies if path != "two-pass" else lambda p: False)
        if path == "autograd":
            monkeypatch.setattr(api.LinearAggregate, "applies",
                                staticmethod(lambda cfg, **kw: False))
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                 ref_logprobs=inp["ref_logprobs"] if kl else None,
                                 config=C(kl_coef=kl, loss_agg_mode=agg), backend="cpu")
        kinds.append(type(out.loss.grad_fn).__name__)
        (out.loss * upstream).backward()
        grads.append(lp.grad)
    assert kinds[0] == "_FusedLossBackward" and "_FusedLossBackward" not in kinds[1:]
    hand, auto, two_pass = grads
    valid = inp["mask"]
    if fused_mode == "factors":
        assert torch.equal(bits(hand), bits(auto))
    assert torch.equal(bits(hand[valid]), bits(auto[valid]))
    assert torch.equal(bits(hand[valid]), bits(two_pass[valid]))
    assert torch.equal(hand, two_pass) and (hand[~valid] == 0).all()


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
        "sum", "token-sum"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", [0.0, 0.0137])
@pytest.mark.parametrize("upstream", [1.0, -0.7310585786300049, 3.5])
@pytest.mark.parametrize("kl_agg", [None, "seq-mean-token-mean"])
@pytest.mark.parametrize("global_counts", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_row_grads_are_autograds_through_aggregate(agg, kl, upstream, kl_agg, global_counts,
                                                   entropy):
    """LinearAggregate.row_grads (the C++ op's weights and products) against
    torch.autograd.grad through aggregate itself, bit for bit (signed zeros included: empty
    rows weigh 0), for float32 and float64 losses. With an entropy term the entropy row is
    left out: it reaches only the entropy's gradient, which this path never forms (0 there)."""
    from rlkern.ops.policy_loss.aggregate import LinearAggregate, aggregate
    from rlkern.ops.policy_loss.register import grad_rows_slice

    S = layout("policy_loss").row_stats
    gen = torch.Generator().manual_seed(5)
    B = 9
    row_stats = torch.rand(len(S), B, generator=gen, dtype=torch.float64)
    row_stats[S.len] = torch.randint(0, 30, (B,), generator=gen).double()
    row_stats[S.len, 3] = 0.0  # an empty row
    cfg = C(kl_coef=kl, loss_agg_mode=agg, loss_scale=0.37, kl_agg_mode=kl_agg,
            max_len=17 if global_counts else None, entropy_coef=0.02 if entropy else 0.0)
    for out_dtype in (torch.float32, torch.float64):
        # num_tokens / num_seqs as rlkern.policy_loss passes them: float64 0-dim tensors
        nt, ns = ((torch.tensor(123.0, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64))
                  if global_counts else (None, None))
        linear = LinearAggregate(cfg, 31, nt, ns, with_entropy=entropy, with_rollout=False)
        row_sums = row_stats[grad_rows_slice()].clone().requires_grad_()
        total, _ = aggregate(row_sums, row_stats, cfg, 31, torch.zeros(B), nt, ns,
                             with_entropy=entropy)
        u = torch.tensor(upstream, dtype=out_dtype)
        (want,) = torch.autograd.grad(total.to(out_dtype), row_sums, u)
        got = linear.row_grads(row_stats[S.len], u)
        ent = layout("policy_loss").row_grads.ent_sum
        keep = [r for r in range(got.shape[0]) if not (entropy and r == ent)]
        assert torch.equal(bits(got[keep]), bits(want[keep]))
        assert (got[ent] == 0).all()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", [0.0, 0.0137])
@pytest.mark.parametrize("counts", ["local", "global", "count_empty"])
@pytest.mark.parametrize("entropy", [None, "bonus", "mask-local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_linear_loss_and_metrics_are_the_two_pass_ones(agg, kl, counts, entropy, dtype,
                                                             monkeypatch):
    """The fused linear op's loss, parts and metrics (formed in C++) against the two-pass
    path's (torch ops), bit for bit, for every aggregation, with and without a KL term, with
    local or global counts, with an empty row; and its gradient."""
    inp = make_inputs(7, 23, dtype, seed=29)
    inp["mask"][4] = False  # an empty row
    extra = {"global": dict(num_tokens=torch.tensor(97.0), num_seqs=5.0)}.get(counts, {})
    ent = {None: {}, "bonus": dict(entropy_coef=0.03),
           "mask-local": dict(entropy_coef=0.01, top_entropy_quantile=0.6,
                              entropy_global_norm=False, entropy_agg_mode="seq-mean-token-mean")}
    cfg = C(kl_coef=kl, loss_agg_mode=agg, loss_scale=0.61,
            count_empty_seqs=counts == "count_empty", max_len=19 if counts == "global" else None,
            **ent[entropy])
    if entropy:
        extra = {**extra, "entropy": inp["entropy"]}  # no gradient: the fused path's case
    outs, grads, kinds = [], [], []
    for fused in (True, False):
        monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                 ref_logprobs=inp["ref_logprobs"] if kl else None, config=cfg,
                                 backend="cpu", **extra)
        kinds.append(type(out.loss.grad_fn).__name__)
        out.loss.backward()
        outs.append(out)
        grads.append(lp.grad)
    assert kinds[0] == "_FusedLossBackward" != kinds[1]
    _assert_same(*outs)
    assert list(outs[0].metrics) == list(outs[1].metrics)
    assert torch.equal(grads[0], grads[1])


def test_the_hand_formed_path_is_taken_only_where_it_applies():
    """gvpo and batch-normalised rollout weights keep autograd's aggregation over the fused
    rows; an entropy input (without a gradient) takes the one-op path."""
    inp = make_inputs(6, 13, torch.float32, seed=2)
    lp = inp["logprobs"].clone().requires_grad_()
    common = (inp["old_logprobs"], inp["advantages"], inp["mask"])
    cases = {
        "_FusedLossBackward": [dict(config=C()), dict(config=C(kl_coef=0.1),
                                                      ref_logprobs=inp["ref_logprobs"]),
                               dict(config=C(entropy_coef=0.01), entropy=inp["entropy"])],
        "other": [dict(config=C(entropy_coef=0.01),
                       entropy=inp["entropy"].clone().requires_grad_()),
                  dict(config=C(policy_loss="gvpo", group_size=2)),
                  dict(config=C(rollout_correction="token_truncate",
                                rollout_batch_normalize=True),
                       rollout_logprobs=inp["rollout_logprobs"])],
    }
    for want, calls in cases.items():
        for kw in calls:
            out = rlkern.policy_loss(lp, *common, backend="cpu", **kw)
            got = type(out.loss.grad_fn).__name__
            assert (got == want) if want != "other" else got != "_FusedLossBackward", kw


def test_non_finite_coefficient_reaches_valid_tokens_only(monkeypatch):
    """A NaN count (checks off) makes the gradient NaN at valid tokens and leaves masked ones
    0, on both paths."""
    inp = make_inputs(5, 21, torch.float32, seed=6)
    rlkern.set_checks(False)
    try:
        for kl in (0.0, 0.1):
            case = Case(C(kl_coef=kl), ref=kl > 0,
                        kwargs={"num_tokens": torch.tensor(math.nan)})
            _, g_f, taken = _grad(case, inp, fused=True, monkeypatch=monkeypatch)
            _, g_t, _ = _grad(case, inp, fused=False, monkeypatch=monkeypatch)
            assert taken == [True]
            assert torch.equal(g_f.isnan(), g_t.isnan())
            assert g_f[inp["mask"]].isnan().all() and (g_f[~inp["mask"]] == 0).all()
    finally:
        rlkern.set_checks(True)


def test_when_the_fused_path_applies():
    inp = make_inputs(4, 9, torch.float32, seed=7)
    lp = inp["logprobs"].clone().requires_grad_()
    ent = inp["entropy"].clone()

    def applies(config=None, *, logprobs=lp, backend="cpu", **kw):
        p = prepare(logprobs, inp["old_logprobs"], inp["advantages"], inp["mask"],
                    config=config, backend=backend, **kw)
        return fused_applies(p)

    assert applies()
    assert applies(C(kl_coef=0.1), ref_logprobs=inp["ref_logprobs"])
    assert applies(C(entropy_coef=0.01), entropy=ent)  # the entropy needs no gradient
    assert not applies(C(entropy_coef=0.01), entropy=ent.requires_grad_())
    assert not applies(logprobs=inp["logprobs"])  # no gradient wanted
    with torch.no_grad():
        assert not applies()
    assert not applies(backend="torch")
    for kind in ("gmpo", "vespo", "gspo"):
        assert not applies(C(policy_loss=kind))
    assert not applies(C(importance_sampling_level="sequence"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # a dispatch mode: the registered two-pass ops
        fake = mode.from_tensor(lp)
        assert fake.requires_grad and not applies(logprobs=fake)


def test_when_the_forward_alone_applies():
    """forward_applies: the fused path's conditions, where no graph is to be built."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlkern.ops.policy_loss.fused import forward_applies

    inp = make_inputs(4, 9, torch.float32, seed=7)

    def applies(config=None, *, logprobs=inp["logprobs"], backend="cpu", **kw):
        p = prepare(logprobs, inp["old_logprobs"], inp["advantages"], inp["mask"],
                    config=config, backend=backend, **kw)
        return forward_applies(p)

    assert applies() and applies(C(kl_coef=0.1), ref_logprobs=inp["ref_logprobs"])
    lp = inp["logprobs"].clone().requires_grad_()
    assert not applies(logprobs=lp)  # a graph is wanted: the fused path's business
    with torch.no_grad():
        assert applies(logprobs=lp)
    assert not applies(backend="torch")
    for kind in ("gmpo", "vespo", "gspo"):
        assert not applies(C(policy_loss=kind))
    with FakeTensorMode() as mode:  # a dispatch mode: the registered ops
        assert not applies(logprobs=mode.from_tensor(inp["logprobs"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_the_forward_alone_is_the_two_pass_forward(name, dtype, monkeypatch):
    """Without a gradient, the linear op's forward (the kernel alone, the aggregation and the
    metrics in C++) gives the two-pass path's loss and metrics, bit for bit."""
    import rlkern.ops.policy_loss.fused as fused_mod

    case = CASES[name]
    inp = make_inputs(12, 37, dtype, seed=len(name) + 1)
    inp["mask"][5] = False
    args, kw = call_kwargs(case, inp)
    outs, taken = [], []
    for on in (True, False):
        spy = (lambda p: taken.append(fused_mod.forward_applies(p)) or taken[-1]) if on \
            else (lambda p: False)
        monkeypatch.setattr(api, "forward_applies", spy)
        with torch.no_grad():
            outs.append(rlkern.policy_loss(*args, config=case.config, backend="cpu", **kw))
    scaled = case.config.rollout_batch_normalize and case.rollout
    linear = api.LinearAggregate.applies(case.config, pg_scaled=scaled)
    assert taken == ([True] if linear else [])
    _assert_same(*outs)


def test_the_ops_refuse_bad_arguments():
    inp = make_inputs(3, 8, torch.float32, seed=8)
    p = prepare(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    stats = torch.empty(len(layout("policy_loss").row_stats), 3, dtype=torch.float64)
    fwd = torch.ops.rlkern.policy_loss_fused_fwd_out
    d = torch.empty(3, 8)
    with pytest.raises(RuntimeError, match="token_grad_kl: only with a KL term"):
        fwd(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams, stats, d, d.clone())
    with pytest.raises(RuntimeError, match="token_grad"):
        fwd(p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams, stats,
            torch.empty(3, 7), None)
    kl = prepare(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                 ref_logprobs=inp["ref_logprobs"], config=C(kl_coef=0.1))
    with pytest.raises(RuntimeError, match="token_grad_kl: required with a KL term"):
        fwd(kl.lp, kl.old, kl.adv, kl.mask, kl.inputs, kl.flags, kl.hparams, stats, d, None)
    gmpo = prepare(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                   config=C(policy_loss="gmpo"))
    with pytest.raises(RuntimeError, match="fused policy loss needs"):
        fwd(gmpo.lp, gmpo.old, gmpo.adv, gmpo.mask, gmpo.inputs, gmpo.flags, gmpo.hparams,
            stats, d, None)
    bwd = torch.ops.rlkern.policy_loss_fused_bwd_
    rows = torch.zeros(len(layout("policy_loss").row_grads), 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="mask: expected Bool"):
        bwd(p.mask.float(), rows, p.flags, d, None)
    with pytest.raises(RuntimeError, match="grad_rows"):
        bwd(p.mask, rows[:, :2], p.flags, d, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        bwd(p.mask, rows, p.flags, d.bfloat16(), None)


def test_the_linear_ops_refuse_bad_arguments():
    """rlkern::policy_loss_fused_linear / _linear_grad_rows / _metrics, called directly."""
    from rlkern.ops.policy_loss.aggregate import LinearAggregate

    inp = make_inputs(3, 8, torch.float32, seed=8)
    p = prepare(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    lin = LinearAggregate(p.cfg, 8, None, None, with_entropy=False, with_rollout=False)
    op = torch.ops.rlkern.policy_loss_fused_linear
    args = (p.lp, p.old, p.adv, p.mask, p.inputs, p.flags, p.hparams)
    loss = op(*args, lin.agg, lin.values, None, False, lin.metric_codes)[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    with pytest.raises(RuntimeError, match="agg: expected 8"):
        op(*args, lin.agg[:7], lin.values, None, True, lin.metric_codes)
    with pytest.raises(RuntimeError, match="agg: bad pg mode"):
        op(*args, [99, *lin.agg[1:]], lin.values, None, True, lin.metric_codes)
    with pytest.raises(RuntimeError, match="agg_values: expected 5"):
        op(*args, lin.agg, lin.values[:4], None, True, lin.metric_codes)
    with pytest.raises(RuntimeError, match="agg: bad entropy mode"):
        op(*args, [*lin.agg[:2], 7, *lin.agg[3:]], lin.values, None, True, lin.metric_codes)
    with pytest.raises(RuntimeError, match="upstream: only with grad"):
        op(*args, lin.agg, lin.values, 1.0, False, lin.metric_codes)
    with pytest.raises(RuntimeError, match="metrics: bad row"):
        op(*args, lin.agg, lin.values, None, False, [10_000])
    with pytest.raises(RuntimeError, match="metrics: no loss part 5"):
        op(*args, lin.agg, lin.values, None, False, [-8])
    for kind in ("gmpo", "vespo", "gvpo"):
        q = prepare(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                    config=C(policy_loss=kind, group_size=3 if kind == "gvpo" else None))
        with pytest.raises(RuntimeError, match="token-level kind"):
            op(q.lp, q.old, q.adv, q.mask, q.inputs, q.flags, q.hparams, lin.agg, lin.values,
               None, False, lin.metric_codes)
    lens = torch.tensor([3.0, 0.0, 8.0], dtype=torch.float64)
    rows = torch.ops.rlkern.policy_loss_linear_grad_rows
    assert rows(lens, lin.agg, lin.values, 1.0, torch.float32).shape == (
        len(layout("policy_loss").row_grads), 3)
    with pytest.raises(TypeError, match="lens: expected Double"):
        rows(lens.float(), lin.agg, lin.values, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        rows(lens, lin.agg, lin.values, 1.0, torch.bfloat16)
    metrics = torch.ops.rlkern.policy_loss_metrics
    stats = torch.zeros(len(layout("policy_loss").row_stats), 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="row_stats: expected"):
        metrics(stats[1:], [], lin.metric_codes, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        metrics(stats.t().contiguous().t(), [], [0], torch.float32)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 70), seed=st.integers(0, 2**16),
       name=st.sampled_from(FUSED), spread=st.sampled_from([0.01, 0.3, 3.0]),
       f64=st.booleans())
def test_property_fused_equals_two_pass(B, T, seed, name, spread, f64):
    """Any shape (tails of every length), mask and ratio spread: the same bits."""
    case = CASES[name]
    if case.config.policy_loss == "gvpo":
        B = 6  # whole groups of 2 or 3
    dtype = torch.float64 if f64 else torch.float32
    inp = make_inputs(B, T, dtype, seed=seed, spread=spread)
    with pytest.MonkeyPatch.context() as mp:
        out_f, g_f, taken = _grad(case, inp, fused=True, monkeypatch=mp)
        out_t, g_t, _ = _grad(case, inp, fused=False, monkeypatch=mp)
    assert taken == [True]
    _assert_same(out_f, out_t)
    assert torch.equal(g_f, g_t)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("adv", ["advantages", "adv_per_token"])
def test_a_clamp_within_the_exp_range_keeps_the_full_exp_bits(fused, adv, monkeypatch):
    """With |log_ratio_clamp| ≤ 87 the float32 kernels take the exp without its range test
    (policy_loss_simd.h, expv_clamped). A clamp of 87 and one of 87 + 1e-6 (the same float32
    value, but beyond the test's bound: the full exp) must give the same loss, metrics and
    gradient, bit for bit, on log-ratios far beyond both (|Δ| up to ~400: clamped, then
    exp(±87) near the float range's ends), on the fused and the two-pass paths."""
    monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
    inp = make_inputs(6, 53, torch.float32, seed=3, spread=120.0)
    delta = (inp["old_logprobs"] - inp["logprobs"])[inp["mask"]]
    assert delta.max() > 200 and delta.min() < -200
    results = []
    for clamp in (87.0, 87.0 + 1e-6):
        assert torch.tensor(clamp, dtype=torch.float32).item() == 87.0
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp[adv], inp["mask"],
                                 config=C(log_ratio_clamp=clamp, clip_ratio_c=3.0))
        (g,) = torch.autograd.grad(out.loss, lp)
        results.append((out.loss, out.metrics, g))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert m1.keys() == m2.keys()
    for key in m1:
        assert torch.equal(m1[key], m2[key]) or (m1[key].isnan() and m2[key].isnan()), key
    assert m1["ratio_max"] > 1e37 and m1["ratio_min"] < 1e-37  # both ends of the exp reached


def test_linear_aggregates_are_shared_for_counts_given_as_numbers():
    """LinearAggregate.of hands out one instance per distinct arguments when the counts are
    numbers or absent, equal to a fresh one; tensor counts get a new instance each call."""
    from rlkern.ops.policy_loss.aggregate import LinearAggregate

    cfg = C(kl_coef=0.1, loss_agg_mode="seq-mean-token-mean")
    kw = dict(with_entropy=True, with_rollout=False)
    fields = lambda a: (a.agg, a.values, a.metric_names, a.metric_codes, a.part_names)
    shared = LinearAggregate.of(cfg, 16, 40.0, 3.0, **kw)
    assert shared is LinearAggregate.of(cfg, 16, 40.0, 3.0, **kw)
    assert fields(shared) == fields(LinearAggregate(cfg, 16, 40.0, 3.0, **kw))
    for other in (LinearAggregate.of(cfg, 16, 41.0, 3.0, **kw),
                  LinearAggregate.of(cfg, 17, 40.0, 3.0, **kw),
                  LinearAggregate.of(cfg.replace(kl_coef=0.2), 16, 40.0, 3.0, **kw),
                  LinearAggregate.of(cfg, 16, 40.0, 3.0, with_entropy=False, with_rollout=False)):
        assert other is not shared and fields(other) != fields(shared)
    count = torch.tensor(40.0, dtype=torch.float64)
    by_tensor = LinearAggregate.of(cfg, 16, count, 3.0, **kw)
    assert by_tensor is not LinearAggregate.of(cfg, 16, count, 3.0, **kw)
    assert fields(by_tensor) == fields(shared)


def test_a_negative_zero_loss_scale_is_not_served_the_positive_ones_aggregate(monkeypatch):
    """PolicyLossConfig(loss_scale=0.0) == PolicyLossConfig(loss_scale=-0.0), but the losses'
    signs differ (total · scale): the shared aggregates keep them apart, and each call's loss
    has the two-pass path's bits."""
    inp = make_inputs(4, 21, torch.float32, seed=2)
    for scale in (0.0, -0.0, 0.0):
        losses = []
        for fused in (True, False):
            monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
            lp = inp["logprobs"].clone().requires_grad_()
            out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                     config=C(loss_scale=scale))
            losses.append(out.loss)
        assert math.copysign(1.0, losses[0].item()) == math.copysign(1.0, scale)
        assert torch.equal(losses[0], losses[1])
        assert math.copysign(1.0, losses[0].item()) == math.copysign(1.0, losses[1].item())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_a_kl_clamp_within_the_exp_range_keeps_the_full_exp_bits(fused, bias, monkeypatch):
    """k3's exp skips its range test where |kl_log_clamp| ≤ 87 (kl_term's exp_in_range), as
    the ratio's does where |log_ratio_clamp| ≤ 87: clamps of 87 and 87 + 1e-6 (the same
    float32 value; the second takes the full exp) give the same loss, metrics and gradient,
    bit for bit, on reference log-ratios far beyond both, with and without the bias
    correction (whose ratio takes the clamped exp too)."""
    monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
    inp = make_inputs(5, 67, torch.float32, seed=4)
    g = torch.Generator().manual_seed(4)
    ref = inp["logprobs"] + torch.randn(inp["logprobs"].shape, generator=g) * 120
    gap = (ref - inp["logprobs"])[inp["mask"]]
    assert gap.max() > 200 and gap.min() < -200
    results = []
    for clamp in (87.0, 87.0 + 1e-6):
        cfg = C(kl_coef=0.1, kl_estimator="k3", kl_log_clamp=clamp, kl_value_clamp=None,
                kl_bias_correction=bias, log_ratio_clamp=clamp)
        lp = inp["logprobs"].clone().requires_grad_()
        out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                                 ref_logprobs=ref, config=cfg)
        (grad,) = torch.autograd.grad(out.loss, lp)
        results.append((out.loss, out.metrics, grad))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.isfinite(g1).all()  # (the loss itself overflows: Σ of exp(87)s)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert m1.keys() == m2.keys()
    for key in m1:
        assert torch.equal(m1[key], m2[key]) or (m1[key].isnan() and m2[key].isnan()), key
    assert g1.abs().max() > 1e30  # exp(87) reached
