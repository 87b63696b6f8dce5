"""rlkern.optimal_token_baseline (verl's OTB / TIR-OTB) on every backend: the C++ kernel and
the float64 reference against a loop written from the formula, the zero-tail and singleton
rules, the multi-turn alignment, registration (opcheck, torch.compile) and bad input.
Parity with verl's own functions: tests/test_parity_verl_estimators.py."""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import backends
from rlkern.reference.token_baseline import optimal_token_baseline_reference

BACKENDS = ["cpu", "torch", "triton"]  # triton: the interpreter on CPU tensors


def _inputs(seed: int, n: int = 14, t: int = 9, *, holes: bool = True, isw: bool = False,
            dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, t, generator=gen, dtype=dtype)
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    lengths[:3] = t  # ties in the longest length
    mask = torch.arange(t)[None] < lengths[:, None]
    if holes:  # observation tokens inside a response (multi-turn)
        mask &= torch.rand(n, t, generator=gen) > 0.2
    probs = torch.randn(n, t, 6, generator=gen, dtype=dtype).softmax(-1)
    tok = torch.randint(0, 6, (n, t, 1), generator=gen)
    logprobs = probs.gather(-1, tok).squeeze(-1).log()
    spi2 = (probs**2).sum(-1)
    rho = torch.rand(n, t, generator=gen, dtype=dtype) * 2 if isw else None
    ids = torch.randint(0, 4, (n,), generator=gen) * 7919 - 11  # sparse, negative ids
    ids[-1] = 123456  # a singleton group
    return rewards, mask, logprobs, spi2, rho, ids


def _loop(rewards, mask, logprobs, spi2, rho, ids, *, multi_turn, zero_tail, eps=1e-8):
    """The formula, one group and one index at a time, in float64."""
    r, m = rewards.double(), mask.bool()
    n, t_len = r.shape
    w = 1 - 2 * logprobs.double().exp() + spi2.double()
    if rho is not None:
        w = w * rho.double() ** 2
    g = torch.zeros(n, t_len, dtype=torch.float64)
    cw = torch.zeros(n, t_len, dtype=torch.float64)
    for i in range(n):
        acc = 0.0
        for t in range(t_len - 1, -1, -1):
            acc += float(r[i, t]) if m[i, t] else 0.0
            g[i, t] = acc
        acc = 0.0
        for t in range(t_len):
            acc += float(w[i, t]) if m[i, t] else 0.0
            cw[i, t] = acc
    pos = [m[i].nonzero().flatten().tolist() if multi_turn else
           [t for t in range(t_len) if m[i, t]] for i in range(n)]
    adv = torch.zeros(n, t_len, dtype=torch.float64)
    for gid in ids.unique().tolist():
        rows = [i for i in range(n) if ids[i] == gid and (not multi_turn or len(pos[i]) > 0)]
        lens = sorted(len(pos[i]) for i in rows)
        longest = [i for i in rows if len(pos[i]) == (lens[-1] if lens else -1)]
        for i in rows:
            for k, t in enumerate(pos[i]):
                kk = k if multi_turn else t
                b = 0.0
                if len(rows) >= 2:
                    num = den = 0.0
                    for j in rows:
                        if multi_turn and kk < len(pos[j]):
                            tj = pos[j][kk]
                        elif not multi_turn and m[j, kk]:
                            tj = kk
                        else:
                            continue
                        num += float(g[j, tj] * cw[j, tj])
                        den += float(cw[j, tj])
                    b = num / (den + eps)
                    if (zero_tail and len(longest) == 1 and i == longest[0]
                            and lens[-1] > lens[-2] and kk >= lens[-2]):
                        b = 0.0
                adv[i, t] = g[i, t] - b
    return adv, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("isw", [False, True])
def test_backends_match_the_formula(backend, multi_turn, zero_tail, isw):
    for seed in range(3):
        r, m, lp, sp, rho, ids = _inputs(seed, isw=isw)
        want_a, want_g = _loop(r, m, lp, sp, rho, ids, multi_turn=multi_turn,
                               zero_tail=zero_tail)
        out = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, rollout_is_weights=rho,
                                            multi_turn=multi_turn, zero_tail=zero_tail,
                                            backend=backend)
        assert out.advantages.dtype == torch.float32 and out.returns.dtype == torch.float32
        torch.testing.assert_close(out.advantages.double(), want_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.returns.double(), want_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multi_turn", [False, True])
def test_cpu_kernel_matches_reference_in_float64(multi_turn):
    r, m, lp, sp, rho, ids = _inputs(5, n=40, t=17, isw=True, dtype=torch.float64)
    a = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, rollout_is_weights=rho,
                                      multi_turn=multi_turn, backend="cpu")
    ref = optimal_token_baseline_reference(r, m, lp, sp, group_ids=ids, rollout_is_weights=rho,
                                           multi_turn=multi_turn)
    assert a.advantages.dtype == torch.float64
    torch.testing.assert_close(a.advantages, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.returns, ref[1], rtol=1e-12, atol=1e-12)


def test_docstring_example_and_contiguous_groups():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    m = torch.ones(2, 2, dtype=torch.bool)
    lp = torch.full((2, 2), -1.0)
    for backend in BACKENDS:
        out = rlkern.optimal_token_baseline(r, m, lp, torch.full((2, 2), 0.3), group_size=2,
                                            backend=backend)
        torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
        torch.testing.assert_close(out.returns, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    r, m, lp, sp, _, _ = _inputs(1, n=12)
    by_size = rlkern.optimal_token_baseline(r, m, lp, sp, group_size=4)
    by_ids = rlkern.optimal_token_baseline(r, m, lp, sp,
                                           group_ids=torch.arange(12) // 4 * 31)
    torch.testing.assert_close(by_size.advantages, by_ids.advantages, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_turn", [False, True])
def test_zero_tail_rule(backend, multi_turn):
    """One longest response: no baseline past the second-longest length (A = G there); tied
    longest responses keep their baselines."""
    t = 6
    r = torch.zeros(3, t)
    r[:, -1] = torch.tensor([1.0, 0.0, 2.0])
    m = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4], dtype=torch.bool)
    lp, sp = torch.full((3, t), -0.5), torch.full((3, t), 0.4)
    on = rlkern.optimal_token_baseline(r, m, lp, sp, group_size=3, multi_turn=multi_turn,
                                       backend=backend)
    off = rlkern.optimal_token_baseline(r, m, lp, sp, group_size=3, multi_turn=multi_turn,
                                        zero_tail=False, backend=backend)
    torch.testing.assert_close(on.advantages[0, 3:], on.returns[0, 3:])  # tail: A = G
    assert (off.advantages[0, 3:] - off.returns[0, 3:]).abs().min() > 1e-3  # baseline there
    torch.testing.assert_close(on.advantages[:, :3], off.advantages[:, :3])
    torch.testing.assert_close(on.advantages[1:], off.advantages[1:])
    tied = m.clone()
    tied[1] = True  # two longest responses: the rule does not apply
    a = rlkern.optimal_token_baseline(r, tied, lp, sp, group_size=3, multi_turn=multi_turn,
                                      backend=backend)
    b = rlkern.optimal_token_baseline(r, tied, lp, sp, group_size=3, multi_turn=multi_turn,
                                      zero_tail=False, backend=backend)
    torch.testing.assert_close(a.advantages, b.advantages)


@pytest.mark.parametrize("backend", BACKENDS)
def test_singletons_and_empty_rows(backend):
    """A group of one row keeps its return (A = G). A row without valid tokens is a group
    member for OTB (its partner then gets a baseline without the zero tail) but not for
    TIR-OTB (its partner is a singleton)."""
    r = torch.tensor([[0.5, 1.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    lp, sp = torch.full((3, 3), -0.7), torch.full((3, 3), 0.2)
    ids = torch.tensor([5, 5, 9])
    for multi_turn in (False, True):
        out = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, zero_tail=False,
                                            multi_turn=multi_turn, backend=backend)
        torch.testing.assert_close(out.advantages[2], torch.tensor([3.0, 0.0, 0.0]))
        assert (out.advantages[1] == 0).all()  # no valid token
        g0 = torch.tensor([1.5, 1.0, 0.0])
        if multi_turn:
            torch.testing.assert_close(out.advantages[0], g0)
        else:  # B = G·W / (W + eps) ≈ G: the row is its own baseline
            assert out.advantages[0].abs().max() < 1e-6


def test_thread_count_does_not_change_results():
    r, m, lp, sp, rho, ids = _inputs(7, n=600, t=300, isw=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids % 97,
                                            rollout_is_weights=rho)
        torch.set_num_threads(max(2, threads))
        many = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids % 97,
                                             rollout_is_weights=rho)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.advantages, many.advantages) and torch.equal(one.returns, many.returns)


def test_dtypes_and_empty_inputs():
    r, m, lp, sp, _, ids = _inputs(2)
    half = rlkern.optimal_token_baseline(r.bfloat16(), m.float(), lp.bfloat16(), sp, group_ids=ids)
    assert half.advantages.dtype == torch.float32
    want = rlkern.optimal_token_baseline(r.bfloat16().float(), m, lp.bfloat16().float(), sp,
                                         group_ids=ids)
    torch.testing.assert_close(half.advantages, want.advantages)
    for shape in ((0, 5), (3, 0)):
        z = torch.zeros(shape)
        for backend in BACKENDS:
            out = rlkern.optimal_token_baseline(z, z.bool(), z, z, group_size=1,
                                                backend=backend)
            assert out.advantages.shape == shape and out.returns.shape == shape


def test_cuda_backend_raises_instead_of_computing_something_else():
    r, m, lp, sp, _, ids = _inputs(0)
    with pytest.raises(backends.BackendUnavailableError, match="no cuda kernel"):
        torch.ops.rlkern.optimal_token_baseline(r, m, lp, sp, None, ids, 0, False, True, 1e-8,
                                                "cuda")


@pytest.mark.parametrize("multi_turn", [False, True])
def test_triton_kernel_chunks_long_rows_and_contiguous_groups(multi_turn):
    """T above the Triton rows kernel's largest block (1024): the carries across chunks."""
    r, m, lp, sp, rho, _ = _inputs(8, n=6, t=1100, isw=True)
    want = optimal_token_baseline_reference(r, m, lp, sp, group_size=3, rollout_is_weights=rho,
                                            multi_turn=multi_turn)
    got = rlkern.optimal_token_baseline(r, m, lp, sp, group_size=3, rollout_is_weights=rho,
                                        multi_turn=multi_turn, backend="triton")
    torch.testing.assert_close(got.advantages.double(), want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.returns.double(), want[1], rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    r, m, lp, sp, _, ids = _inputs(0)
    f = rlkern.optimal_token_baseline
    with pytest.raises(TypeError, match="rewards must be"):
        f(r.long(), m, lp, sp, group_ids=ids)
    with pytest.raises(TypeError, match=r"rewards must be a torch\.Tensor"):
        f(r.tolist(), m, lp, sp, group_ids=ids)
    with pytest.raises(ValueError, match=r"rewards must have shape \(N, T\)"):
        f(r[0], m[0], lp[0], sp[0], group_ids=ids[:1])
    with pytest.raises(ValueError, match="mask must have shape"):
        f(r, m[:, :-1], lp, sp, group_ids=ids)
    with pytest.raises(TypeError, match="mask must be bool"):
        f(r, m.to(torch.complex64), lp, sp, group_ids=ids)
    with pytest.raises(ValueError, match="logprobs must have shape"):
        f(r, m, lp[:-1], sp, group_ids=ids)
    with pytest.raises(TypeError, match="sum_pi_squared must be"):
        f(r, m, lp, sp.long(), group_ids=ids)
    with pytest.raises(ValueError, match="rollout_is_weights must have shape"):
        f(r, m, lp, sp, group_ids=ids, rollout_is_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="either group_ids or group_size"):
        f(r, m, lp, sp, group_ids=ids, group_size=2)
    with pytest.raises(ValueError, match="neither"):
        f(r, m, lp, sp)
    with pytest.raises(TypeError, match="group_ids must be int64"):
        f(r, m, lp, sp, group_ids=ids.float())
    with pytest.raises(ValueError, match="group_ids must have shape"):
        f(r, m, lp, sp, group_ids=ids[:-1])
    with pytest.raises(ValueError, match="eps must be"):
        f(r, m, lp, sp, group_ids=ids, eps=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(r, m, lp, sp, group_ids=ids, backend="fast")
    with pytest.raises(ValueError, match="mask is on meta"):
        f(r, m.to("meta"), lp, sp, group_ids=ids)
    # the C++ glue guards its pointers against any other caller
    out = torch.empty_like(r)
    with pytest.raises(TypeError, match="logprobs: expected Float"):
        torch.ops.rlkern.optimal_token_baseline_out(r, m, lp.double(), sp, None, ids, 0, False,
                                                    True, 1e-8, out, out.clone())
    with pytest.raises(RuntimeError, match="mask: expected"):
        torch.ops.rlkern.optimal_token_baseline_out(r, m[:, :3], lp, sp, None, ids, 0, False,
                                                    True, 1e-8, out, out.clone())
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.rlkern.optimal_token_baseline_out(r, m, lp, sp, None, None, 5, False, True,
                                                    1e-8, out, out.clone())
    # a meta tensor among CPU ones reaches the Meta kernel: refused by name, not a no-op
    with pytest.raises(RuntimeError, match="group_ids: expected device cpu"):
        torch.ops.rlkern.optimal_token_baseline_out(r, m, lp, sp, None, ids.to("meta"), 0,
                                                    False, True, 1e-8, out, out.clone())
    with pytest.raises(RuntimeError, match="returns: expected device cpu"):
        torch.ops.rlkern.optimal_token_baseline_out(r, m, lp, sp, None, ids, 0, False, True,
                                                    1e-8, out, out.to("meta"))
    meta = [x.to("meta") for x in (r, m, lp, sp, ids, out, out)]
    torch.ops.rlkern.optimal_token_baseline_out(*meta[:4], None, meta[4], 0, False, True, 1e-8,
                                                *meta[5:])  # all on meta: nothing to do


@pytest.mark.parametrize("multi_turn", [False, True])
def test_opcheck(multi_turn):
    backends.cpp_ops()
    r, m, lp, sp, rho, ids = _inputs(3, isw=True)
    torch.library.opcheck(torch.ops.rlkern.optimal_token_baseline_out.default,
                          (r, m, lp, sp, rho, ids, 0, multi_turn, True, 1e-8,
                           torch.empty_like(r), torch.empty_like(r)))
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.rlkern.optimal_token_baseline.default,
                              (r, m, lp, sp, None, None, 2, multi_turn, False, 1e-8, backend))


def test_torch_compile_fullgraph():
    r, m, lp, sp, rho, ids = _inputs(4, isw=True)

    def step(r, m, lp, sp, rho, ids):
        a = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, rollout_is_weights=rho)
        b = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, multi_turn=True)
        return a.advantages + b.advantages, a.returns

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(r, m, lp, sp, rho, ids)
    for x, y in zip(got, step(r, m, lp, sp, rho, ids), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("multi_turn", [False, True])
def test_non_finite_inputs_agree_on_every_backend(multi_turn):
    """Padding is never read (NaN there changes nothing); a NaN / ±inf at a valid token flows
    into the sums it enters — the returns before it, the weights after it, its group's
    baselines — identically on every backend."""
    r, m, lp, sp, rho, ids = _inputs(9, isw=True)
    clean = rlkern.optimal_token_baseline(r, m, lp, sp, group_ids=ids, rollout_is_weights=rho,
                                          multi_turn=multi_turn)
    junk = [x.clone() for x in (r, lp, sp, rho)]
    for x in junk:
        x[~m] = float("nan")
    padded = rlkern.optimal_token_baseline(junk[0], m, junk[1], junk[2], group_ids=ids,
                                           rollout_is_weights=junk[3], multi_turn=multi_turn)
    assert torch.equal(padded.advantages, clean.advantages)
    assert torch.equal(padded.returns, clean.returns)
    rows = m.sum(-1).nonzero().flatten()
    i, j = int(rows[0]), int(rows[1])
    ti, tj = m[i].nonzero().flatten(), m[j].nonzero().flatten()
    bad_r, bad_lp = r.clone(), lp.clone()
    bad_r[i, ti[-1]] = float("inf")
    bad_r[i, ti[0]] = float("-inf")
    bad_lp[j, tj[len(tj) // 2]] = float("nan")
    outs = [rlkern.optimal_token_baseline(bad_r, m, bad_lp, sp, group_ids=ids,
                                          multi_turn=multi_turn, backend=b) for b in BACKENDS]
    assert not outs[0].advantages.isfinite().all()
    for out in outs[1:]:
        torch.testing.assert_close(out.advantages, outs[0].advantages, equal_nan=True,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.returns, outs[0].returns, equal_nan=True)
