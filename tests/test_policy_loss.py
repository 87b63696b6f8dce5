"""rlkern.policy_loss (CPU C++ and torch backends) against the float64 reference: every loss,
add-on and aggregation mode; loss, metrics, ∂/∂logprobs and ∂/∂entropy; gradcheck; the
bad-input errors; the NaN policy; kl_penalty; the chunked entry point."""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from conftest import bits, stable_seed
from policy_loss_cases import CASES, Case, call_kwargs, make_inputs
from rlkern import PolicyLossConfig
from rlkern.ops.policy_loss import finish_metrics, policy_loss_chunk
from rlkern.reference.policy_loss import kl_penalty_reference, policy_loss_reference

BACKENDS = ["cpu", "torch"]
# Per-dtype tolerances of the loss / metrics (relative, absolute). fp32: DESIGN.md's 1e-5; the
# absolute part covers losses near 0 made of O(1) terms that cancel.
LOSS_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 2e-6)}


def _run(case: Case, inp, backend, *, dtype=torch.float64):
    args, kw = call_kwargs(case, inp)
    lp = args[0].detach().clone().requires_grad_()
    ent = kw.get("entropy")
    if ent is not None:
        ent = ent.detach().clone().requires_grad_()
        kw["entropy"] = ent
    out = rlkern.policy_loss(lp, *args[1:], config=case.config, backend=backend, **kw)
    wrt = [lp] + ([ent] if ent is not None else [])
    grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
    return out, grads


def _reference(case: Case, inp):
    """The float64 reference on the (already rounded) inputs."""
    args, kw = call_kwargs(case, {k: v.double() if v.dtype.is_floating_point else v
                                  for k, v in inp.items()})
    lp = args[0].detach().clone().requires_grad_()
    ent = kw.get("entropy")
    if ent is not None:
        ent = ent.detach().clone().requires_grad_()
        kw["entropy"] = ent
    loss, metrics = policy_loss_reference(lp, *args[1:], case.config, **kw)
    wrt = [lp] + ([ent] if ent is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)]
    return loss, metrics, grads


def _terms_per_unit(config: PolicyLossConfig, inp) -> float:
    """How many O(1) per-token terms one unit of the loss sums before any division.

    An fp32 sum of n such terms carries a rounding error that grows like eps·√n (a random
    walk), so the loss tolerance scales with √n: "sum" / "token-sum" add every valid token,
    "seq-mean-token-sum" a row's tokens, the mean modes divide by as many terms as they add.
    """
    mask = inp["mask"].bool()
    mode = config.loss_agg_mode
    if mode in ("sum", "token-sum"):
        return float(mask.sum())
    if mode.startswith("seq-mean-token-sum"):
        return float(mask.sum(-1).max()) if mask.numel() else 1.0
    return 1.0


def _check(out, grads, ref, dtype, what, *, terms: float = 1.0):
    loss, metrics, ref_grads = ref
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol,
                               atol=atol * math.sqrt(max(terms, 1.0)),
                               msg=lambda m: f"{what} loss: {m}")
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for key, value in metrics.items():
        assert key in out.metrics, f"{what}: metric {key} missing"
        assert out.metrics[key].dim() == 0
        torch.testing.assert_close(out.metrics[key].double(), value.double(), rtol=rtol,
                                   atol=atol, equal_nan=True,
                                   msg=lambda m, key=key: f"{what} metric {key}: {m}")
    for g, rg, name in zip(grads, ref_grads, ("logprobs", "entropy"), strict=False):
        g = torch.zeros_like(rg) if g is None else g
        scale = float(rg.abs().max()) if rg.numel() else 1.0
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(scale, 1e-3),
                                   msg=lambda m, name=name: f"{what} ∂/∂{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_float64(name, backend):
    case = CASES[name]
    inp = make_inputs(6, 11, torch.float64, seed=stable_seed(name) % 1000)
    out, grads = _run(case, inp, backend)
    _check(out, grads, _reference(case, inp), torch.float64, f"{name}/{backend}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_float32_cpu(name):
    case = CASES[name]
    inp = make_inputs(12, 37, torch.float32, seed=1 + stable_seed(name) % 1000)
    out, grads = _run(case, inp, "cpu")
    _check(out, grads, _reference(case, inp), torch.float32, f"{name}/cpu fp32",
           terms=_terms_per_unit(case.config, inp))


@pytest.mark.parametrize("B,T", [(1, 1), (1, 99), (3, 1), (5, 16), (2, 33), (7, 1025)])
@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "ppo-seq-trl", "all-addons", "gmpo"])
def test_odd_sizes(B, T, name):
    case = CASES[name]
    inp = make_inputs(B, T, torch.float32, seed=B * 100 + T)
    out, grads = _run(case, inp, "cpu")
    _check(out, grads, _reference(case, inp), torch.float32, f"{name} B={B} T={T}")


def test_long_rows_accumulate_in_blocks():
    """Rows longer than one accumulation block (1024 tokens) and a large ratio spread."""
    inp = make_inputs(3, 5000, torch.float32, seed=3, spread=1.0)
    case = CASES["all-addons"]
    out, grads = _run(case, inp, "cpu")
    _check(out, grads, _reference(case, inp), torch.float32, "long rows")


def test_cpu_matches_torch_backend_fp32():
    inp = make_inputs(9, 50, torch.float32, seed=5)
    for name in ("all-addons", "trl-preset", "gmpo", "gvpo"):
        case = CASES[name]
        a, ga = _run(case, inp, "cpu")
        b, gb = _run(case, inp, "torch")
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-5, atol=1e-7)


def test_ratio_clamps_and_extreme_log_ratios():
    """Δ beyond ±20 (verl's clamp: no gradient), huge sequence ratios (gspo's clamp at 10)."""
    inp = make_inputs(4, 9, torch.float64, seed=7)
    inp["old_logprobs"] = inp["old_logprobs"] + torch.tensor([30.0, -30.0, 0.0, 5.0])[:, None]
    for name in ("ppo-clip-higher-dual", "gspo", "ppo-seq-trl", "sapo", "cispo-verl"):
        case = CASES[name]
        for backend in BACKENDS:
            out, grads = _run(case, inp, backend)
            _check(out, grads, _reference(case, inp), torch.float64, f"{name} extreme")


def test_gradcheck_float64():
    inp = make_inputs(6, 5, torch.float64, seed=11, spread=0.2)
    # Every loss and add-on whose gradient is the true derivative of its value (not cispo's
    # or the "+" estimators' stop-gradients, nor the entropy mask's step).
    addons = Case(PolicyLossConfig(clip_ratio_high=0.28, clip_ratio_c=3.0, kl_coef=0.05,
                                   kl_bias_correction=True, entropy_coef=0.01,
                                   rollout_correction="token_truncate", rollout_min=0.9,
                                   rollout_max=1.1), ref=True, rollout=True, entropy=True,
                  token_weights=True)
    cases = {name: CASES[name] for name in ("ppo-clip-higher-dual", "ppo-seq-trl", "gspo",
                                            "sapo", "gmpo", "gvpo", "kl-bias-seq-full",
                                            "reinforce", "kl-k3", "agg-seq-mean-token-mean")}
    cases["addons"] = addons
    for name, case in cases.items():
        args, kw = call_kwargs(case, inp)
        ent = kw.pop("entropy", None)

        def f(lp, e, args=args, kw=kw, case=case):
            extra = {} if e is None else {"entropy": e}
            return rlkern.policy_loss(lp, *args[1:], config=case.config, **kw, **extra).loss

        lp = args[0].detach().clone().requires_grad_()
        e = None if ent is None else ent.detach().clone().requires_grad_()
        # Finite differences must not cross a clip boundary: eps small against the gaps.
        assert torch.autograd.gradcheck(f, (lp, e), eps=1e-7, atol=1e-6, rtol=1e-5), name


def test_kl_penalty_op_matches_reference_and_verl_names():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 4
    ref = lp + torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    for est in ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+", "kl", "mse",
                "low_var_kl", "low_var_kl+"):
        for clamps in ((20.0, 10.0), (None, None), (1.0, 0.5)):
            for backend in BACKENDS:
                x = lp.clone().requires_grad_()
                r = ref.clone().requires_grad_()
                v = rlkern.kl_penalty(x, r, estimator=est, log_clamp=clamps[0],
                                      value_clamp=clamps[1], backend=backend)
                x2 = lp.clone().requires_grad_()
                r2 = ref.clone().requires_grad_()
                v2 = kl_penalty_reference(x2, r2, est, log_clamp=clamps[0],
                                          value_clamp=clamps[1])
                torch.testing.assert_close(v, v2)
                w = torch.randn_like(v2)
                ga = torch.autograd.grad((v * w).sum(), (x, r))
                gb = torch.autograd.grad((v2 * w).sum(), (x2, r2))
                torch.testing.assert_close(ga[0], gb[0], msg=f"{est} {clamps} {backend}")
                torch.testing.assert_close(ga[1], gb[1], msg=f"{est} {clamps} {backend}")
    out = rlkern.kl_penalty(lp.float(), ref.float())
    assert out.dtype == torch.float32 and out.shape == lp.shape


# --------------------------------------------------------------------------- chunked entry


@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "gspo", "ppo-seq-trl", "gmpo",
                                  "gvpo", "all-addons", "agg-seq-mean-token-mean",
                                  "agg-seq-mean-token-sum-norm", "kl-bias-seq-full"])
def test_chunks_of_whole_rows_add_up(name):
    """policy_loss_chunk over row chunks with the global normalisers = the one-shot loss."""
    case = CASES[name]
    if name == "all-addons":  # the entropy bonus under the entropy mask does not chunk
        case = Case(case.config.replace(entropy_coef=0.0), ref=True, rollout=True,
                    entropy=True, token_weights=True)
    inp = make_inputs(12, 9, torch.float64, seed=21)
    args, kw = call_kwargs(case, inp)
    cfg = case.config
    kw_full = dict(kw)
    ent = kw.get("entropy")
    lp = args[0].clone().requires_grad_()
    if ent is not None:
        kw_full["entropy"] = ent.clone().requires_grad_()
    full = rlkern.policy_loss(lp, *args[1:], config=cfg, **kw_full)
    wrt = [lp] + ([kw_full["entropy"]] if ent is not None else [])
    g_full = torch.autograd.grad(full.loss, wrt)
    mask = inp["mask"]
    glob = {"num_tokens": mask.sum(), "num_seqs": mask.any(-1).sum().double()}
    if cfg.count_empty_seqs or cfg.policy_loss in ("gmpo", "gvpo"):
        glob["num_seqs"] = float(mask.shape[0])
    glob.update(case.kwargs)
    if cfg.top_entropy_quantile < 1.0:
        glob["entropy_threshold"] = rlkern.ops.policy_loss.entropy_quantile_threshold(
            ent, mask, cfg.top_entropy_quantile)
    total = 0.0
    grads, grads_e, stats = [], [], []
    for rows in (slice(0, 6), slice(6, 9), slice(9, 12)):
        a = tuple(t[rows] for t in args)
        k = {key: (v[rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
             for key, v in kw.items()}
        if cfg.policy_loss == "gvpo":
            a = (a[0], a[1], args[2][rows], a[3])
        out = policy_loss_chunk(*a, config=cfg, **k, **glob)
        total = total + out.loss
        grads.append(out.grad_logprobs)
        if out.grad_entropy is not None:
            grads_e.append(out.grad_entropy)
        stats.append(out.row_stats)
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(torch.cat(grads), g_full[0])
    if grads_e:
        torch.testing.assert_close(torch.cat(grads_e), g_full[1])
    metrics = finish_metrics(torch.cat(stats, dim=1), with_kl=case.ref,
                             with_entropy=case.entropy, with_rollout=case.rollout,
                             dtype=torch.float64)
    for key, value in metrics.items():
        torch.testing.assert_close(value, full.metrics[key], equal_nan=True)


def test_chunks_may_split_rows_for_token_level_losses():
    cfg = PolicyLossConfig(clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean")
    inp = make_inputs(4, 10, torch.float64, seed=2)
    lp = inp["logprobs"].clone().requires_grad_()
    full = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], config=cfg)
    (g_full,) = torch.autograd.grad(full.loss, lp)
    lens = inp["mask"].sum(-1).double()
    ns = float((lens > 0).sum())
    total, grads = 0.0, torch.zeros_like(g_full)
    for b in range(4):
        for cols in (slice(0, 3), slice(3, 10)):
            out = policy_loss_chunk(
                inp["logprobs"][b:b + 1, cols], inp["old_logprobs"][b:b + 1, cols],
                inp["advantages"][b:b + 1], inp["mask"][b:b + 1, cols], config=cfg,
                num_seqs=ns, seq_lens=lens[b:b + 1])
            total = total + out.loss
            grads[b:b + 1, cols] = out.grad_logprobs
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(grads, g_full)


def test_chunk_requires_global_normalisers():
    inp = make_inputs(4, 5, torch.float64)
    a = (inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss_chunk(*a)
    with pytest.raises(ValueError, match="num_seqs"):
        policy_loss_chunk(*a, loss_agg_mode="seq-mean-token-mean")
    with pytest.raises(ValueError, match="entropy_threshold"):
        policy_loss_chunk(*a, entropy=inp["entropy"], top_entropy_quantile=0.5, num_tokens=3)
    with pytest.raises(ValueError, match="entropy mask"):
        policy_loss_chunk(*a, entropy=inp["entropy"], top_entropy_quantile=0.5, num_tokens=3,
                          entropy_coef=0.1, entropy_threshold=0.5)


# ------------------------------------------------------------------------------ behaviour


def test_metrics_are_tensors_without_host_sync():
    inp = make_inputs(4, 8, torch.float32)
    out = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"],
                             inp["mask"], ref_logprobs=inp["ref_logprobs"], kl_coef=0.1,
                             entropy=inp["entropy"], rollout_logprobs=inp["rollout_logprobs"],
                             rollout_correction="token_truncate")
    expected = {"pg_loss", "clipfrac", "clipfrac_low", "clipfrac_high", "dualclip_frac",
                "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl_loss", "kl",
                "entropy_loss", "entropy_mean", "rollout_weight_mean"}
    assert set(out.metrics) == expected
    for v in out.metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32
    assert isinstance(out, rlkern.PolicyLossOutput)


GARBAGE_CASES = ["ppo", "ppo-clip-higher-dual", "ppo-adv-per-token", "cispo-verl", "sapo",
                 "reinforce", "gvpo", "vespo", "trl-preset", "verl-preset", "dro", "dppo-tv",
                 "clip-cov", "token-weights", "all-addons", "kl-k3", "kl-low_var_kl",
                 "kl-k3-unclamped-bias", "kl-k3-tight-clamps", "kl-k1"]


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan, 1e30, -1e30])
@pytest.mark.parametrize("name", GARBAGE_CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_masked_positions_change_nothing(name, garbage, fused, monkeypatch):
    """Whatever masked positions hold, the loss, every metric and the gradients are bit for bit
    those of the same inputs with 0 there. The CPU's token loops form every position's ratio
    and k3 exp, masked or not (policy_loss.cpp, block_exps), so this is what keeps a masked one
    out: fp32 rows of 37 tokens (whole vectors and a tail) with holes, on the fused and two-pass
    paths."""
    from rlkern.ops.policy_loss import api
    from rlkern.ops.policy_loss.fused import fused_applies

    monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
    case = CASES[name]
    inp = make_inputs(6, 37, torch.float32, seed=4)  # gvpo: groups of 3 rows
    runs = []
    for fill in (0.0, garbage):
        filled = dict(inp)
        for key in ("logprobs", "old_logprobs", "ref_logprobs", "rollout_logprobs", "entropy",
                    "token_weights", "adv_per_token", "cov_select"):
            filled[key] = torch.where(inp["mask"], inp[key], torch.full_like(inp[key], fill))
        runs.append(_run(case, filled, "cpu"))
    (out_a, g_a), (out_b, g_b) = runs
    assert torch.equal(bits(out_a.loss), bits(out_b.loss))
    for k in out_a.metrics:
        assert torch.equal(bits(out_a.metrics[k]), bits(out_b.metrics[k])), k
    for a, b in zip(g_a, g_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(bits(a), bits(b))


# Row lengths around the 64-token steps of the kernels' scan for the last valid token, and
# one past a whole vector of 16: the token passes stop at that token (right padding).
PADDED_LENGTHS = [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 199, 200]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["ppo-clip-higher-dual", "ppo-seq-trl", "all-addons", "gmpo",
                                  "kl-k3-unclamped-bias", "vespo"])
@pytest.mark.parametrize("fused", [True, False])
def test_right_padded_rows_stop_at_their_last_valid_token(name, dtype, fused, monkeypatch):
    """Rows right-padded after every interesting length (plus one left-padded row and one with
    holes), against the float64 reference, on the fused and the two-pass CPU paths; the
    gradient at padding is exactly +0 on the two-pass path and 0 on both."""
    from rlkern.ops.policy_loss import api
    from rlkern.ops.policy_loss.fused import fused_applies

    monkeypatch.setattr(api, "fused_applies", fused_applies if fused else lambda p: False)
    case = CASES[name]
    T = max(PADDED_LENGTHS)
    B = len(PADDED_LENGTHS) + 2
    inp = make_inputs(B, T, dtype, seed=stable_seed(name) % 1000, empty_row=False)
    pos = torch.arange(T)
    lengths = torch.tensor(PADDED_LENGTHS)
    mask = torch.cat([pos[None] < lengths[:, None],
                      (pos >= T - 70)[None],  # left-padded
                      (pos % 7 != 3)[None] & (pos < 150)[None]])  # holes, then padding
    filled = make_inputs(B, T, dtype, seed=1 + stable_seed(name) % 1000, empty_row=False)
    for key, value in inp.items():
        if value.dim() == 2 and value.dtype.is_floating_point:
            # values everywhere mask is valid, garbage elsewhere (never read)
            inp[key] = torch.where(mask, filled[key].nan_to_num(0.5), torch.nan)
    inp["mask"] = mask
    out, grads = _run(case, inp, "cpu")
    _check(out, grads, _reference(case, inp), dtype, f"{name} padded",
           terms=_terms_per_unit(case.config, inp))
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    if not fused:
        assert not grads[0][~mask].signbit().any()


def test_row_results_do_not_depend_on_the_batch():
    """Batch invariance: a row's gradient is bitwise the same alone or in a batch (its
    coefficient is the same under 'sum')."""
    inp = make_inputs(8, 40, torch.float32, seed=9)
    cfg = PolicyLossConfig(loss_agg_mode="sum", kl_coef=0.1)
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"],
                             ref_logprobs=inp["ref_logprobs"], config=cfg)
    (g,) = torch.autograd.grad(out.loss, lp)
    for b in (0, 3, 7):
        lp1 = inp["logprobs"][b:b + 1].clone().requires_grad_()
        o1 = rlkern.policy_loss(lp1, inp["old_logprobs"][b:b + 1], inp["advantages"][b:b + 1],
                                inp["mask"][b:b + 1], ref_logprobs=inp["ref_logprobs"][b:b + 1],
                                config=cfg)
        (g1,) = torch.autograd.grad(o1.loss, lp1)
        assert torch.equal(g1[0], g[b])


def test_thread_count_does_not_change_results():
    inp = make_inputs(64, 33, torch.float32, seed=10)
    case = CASES["all-addons"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = _run(case, inp, "cpu")
        torch.set_num_threads(max(2, threads))
        b, gb = _run(case, inp, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga[0], gb[0])


def test_empty_inputs():
    for B, T in ((0, 5), (3, 0), (0, 0)):
        lp = torch.zeros(B, T, requires_grad=True)
        out = rlkern.policy_loss(lp, torch.zeros(B, T), torch.zeros(B),
                                 torch.ones(B, T, dtype=torch.bool))
        assert out.loss.item() == 0.0
        (g,) = torch.autograd.grad(out.loss, lp)
        assert g.shape == (B, T)
        assert math.isnan(out.metrics["ratio_min"].item())


def test_all_tokens_masked_gives_zero_loss_and_gradient():
    inp = make_inputs(3, 4, torch.float32)
    lp = inp["logprobs"].clone().requires_grad_()
    out = rlkern.policy_loss(lp, inp["old_logprobs"], inp["advantages"],
                             torch.zeros(3, 4, dtype=torch.bool))
    (g,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_rollout_nan_counts_as_no_correction():
    """TRL: a token the rollout engine could not score (NaN) gets weight 1."""
    inp = make_inputs(3, 6, torch.float64, seed=12)
    roll = inp["rollout_logprobs"].clone()
    roll[0, 0] = math.nan
    expected = roll.clone()
    expected[0, 0] = inp["old_logprobs"][0, 0]
    for mode in ("token_truncate", "sequence_mask"):
        for backend in BACKENDS:
            a = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"],
                                   inp["mask"], rollout_logprobs=roll,
                                   rollout_correction=mode, backend=backend)
            b = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"],
                                   inp["mask"], rollout_logprobs=expected,
                                   rollout_correction=mode, backend=backend)
            torch.testing.assert_close(a.loss, b.loss)


def test_int_mask_and_bf16_inputs():
    inp = make_inputs(4, 7, torch.float32, seed=13)
    m = inp["mask"]
    a = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], m)
    b = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], m.long())
    c = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], m.float())
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)
    lp16 = torch.where(m, inp["logprobs"], 0.0).to(torch.bfloat16)
    d = rlkern.policy_loss(lp16, inp["old_logprobs"], inp["advantages"], m)
    assert d.loss.dtype == torch.float32
    e = rlkern.policy_loss(lp16.float(), inp["old_logprobs"], inp["advantages"], m)
    assert torch.equal(d.loss, e.loss)


def test_non_contiguous_rows_are_read_in_place():
    """verl slices responses out of (B, P + R) tensors: unit inner stride, any row stride."""
    inp = make_inputs(5, 8, torch.float32, seed=14)
    wide = {k: torch.cat([v, v], dim=1)[:, 8:] for k, v in inp.items() if v.dim() == 2}
    assert not wide["logprobs"].is_contiguous()
    a = rlkern.policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                           ref_logprobs=inp["ref_logprobs"], kl_coef=0.1)
    b = rlkern.policy_loss(wide["logprobs"], wide["old_logprobs"], inp["advantages"],
                           wide["mask"], ref_logprobs=wide["ref_logprobs"], kl_coef=0.1)
    assert torch.equal(a.loss, b.loss)


def test_float_hyperparameters_are_runtime_values():
    """Changing a float hyperparameter changes the result without rebuilding anything."""
    inp = make_inputs(4, 8, torch.float64, seed=15, spread=0.5)
    args = (inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    values = {eps: rlkern.policy_loss(*args, clip_ratio_low=eps).loss.item()
              for eps in (0.05, 0.1, 0.2)}
    assert len(set(values.values())) == 3


# ---------------------------------------------------------------------------------- errors


def _inputs():
    inp = make_inputs(3, 4, torch.float32)
    return inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"]


@pytest.mark.parametrize("bad,match", [
    ({"policy_loss": "ppo2"}, "policy_loss must be one of 'ppo', 'gspo'"),
    ({"loss_agg_mode": "mean"}, "loss_agg_mode must be one of 'token-mean'"),
    ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
    ({"importance_sampling_level": "seq"}, "importance_sampling_level must be one of"),
    ({"rollout_correction": "token"}, "rollout_correction must be one of"),
    ({"clip_ratio_c": 1.0}, "clip_ratio_c .* must be > 1"),
    ({"clip_ratio_c": 0.5}, "clip_ratio_c .* must be > 1"),
    ({"clip_ratio_low": -0.1}, "clip_ratio_low .* must be >= 0"),
    ({"clip_ratio_high": -0.2}, "clip_ratio_high .* must be >= 0"),
    ({"clip_ratio_low": 2.5}, None),  # 1 − ε < 0 is legal (no lower clip)
    ({"delta": 0.0}, "delta must be > 0"),
    ({"sapo_tau_neg": 0.0}, "sapo_tau_neg must be > 0"),
    ({"top_entropy_quantile": 0.0}, "top_entropy_quantile must be in"),
    ({"rollout_min": 3.0, "rollout_max": 2.0}, "rollout_min must be <= rollout_max"),
    ({"kl_coef": math.nan}, "kl_coef must not be NaN"),
    ({"loss_scale": math.inf}, "loss_scale must be finite"),
    ({"max_len": 0}, "max_len must be a positive int"),
    ({"policy_loss": "gvpo"}, "needs group_size"),
    ({"group_size": 3}, "group_size applies to policy_loss='gvpo' only"),
    ({"policy_loss": "gspo", "importance_sampling_level": "sequence"}, "applies to ppo"),
    ({"policy_loss": "gmpo", "kl_bias_correction": True, "kl_coef": 1.0}, "token-level"),
    ({"no_such_option": 1}, "unknown PolicyLossConfig field"),
    ({"policy_loss": "vespo", "rollout_correction": "sequence_truncate"},
     "vespo folds token-level rollout weights"),
    ({"policy_loss": "vespo", "importance_sampling_level": "sequence"}, "fixes its own ratio"),
    ({"policy_loss": "vespo", "ratio_max": 2.0}, "do not apply to 'vespo'"),
    ({"policy_loss": "vespo", "vespo_k_pos": math.inf}, "vespo_k_pos must be finite"),
    ({"policy_loss": "vespo", "vespo_lambda_neg": math.nan}, "vespo_lambda_neg"),
])
def test_bad_config(bad, match):
    if match is None:
        rlkern.policy_loss(*_inputs(), **bad)
        return
    with pytest.raises(ValueError, match=match):
        rlkern.policy_loss(*_inputs(), **bad)


def test_default_config_is_built_once_and_equals_a_fresh_one():
    """config=None takes one validated PolicyLossConfig() for every call (a frozen value, so
    the calls cannot change it): the same results as a config built for the call."""
    from rlkern.ops.policy_loss.inputs import _default_config

    assert _default_config() is _default_config()
    assert _default_config() == rlkern.PolicyLossConfig()
    B, T = 3, 17
    lp, old = torch.randn(B, T), torch.randn(B, T)
    adv, mask = torch.randn(B), torch.rand(B, T) > 0.3
    a = rlkern.policy_loss(lp, old, adv, mask)
    b = rlkern.policy_loss(lp, old, adv, mask, config=rlkern.PolicyLossConfig())
    assert torch.equal(a.loss, b.loss)
    rlkern.policy_loss(lp, old, adv, mask, clip_ratio_low=0.1)  # overrides: a new config
    assert _default_config() == rlkern.PolicyLossConfig()


def test_bad_preset_names_list_valid_ones():
    with pytest.raises(ValueError, match="'vanilla', 'gspo', 'cispo', 'sapo', 'geo_mean', 'gpg'"):
        PolicyLossConfig.verl(policy_loss="not_a_verl_loss")
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        PolicyLossConfig.trl(loss_type="gspo")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        PolicyLossConfig.verl(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        PolicyLossConfig.trl(epsilon=-0.1)
    with pytest.raises(TypeError, match="float"):
        PolicyLossConfig(clip_ratio_low="0.2")


def test_shape_dtype_device_errors():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(3, 4\)"):
        rlkern.policy_loss(lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match=r"mask must have shape"):
        rlkern.policy_loss(lp, old, adv, mask[:2])
    with pytest.raises(ValueError, match=r"advantages must have shape \(B,\)"):
        rlkern.policy_loss(lp, old, adv[:2], mask)
    with pytest.raises(ValueError, match=r"advantages must have shape"):
        rlkern.policy_loss(lp, old, torch.zeros(3, 5), mask)
    with pytest.raises(ValueError, match=r"logprobs must have shape \(B, T\)"):
        rlkern.policy_loss(lp[0], old[0], adv[:1], mask[0])
    with pytest.raises(TypeError, match="logprobs must be a floating-point"):
        rlkern.policy_loss(lp.long(), old, adv, mask)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        rlkern.policy_loss(lp, old.tolist(), adv, mask)
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        rlkern.policy_loss(lp, old, adv, mask, ref_logprobs=old[:2], kl_coef=0.1)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        rlkern.policy_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="rollout_correction is None"):
        rlkern.policy_loss(lp, old, adv, mask, rollout_logprobs=old)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        rlkern.policy_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        rlkern.policy_loss(lp, old, adv, mask, top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        rlkern.policy_loss(lp, old, adv, mask, policy_loss="gvpo", group_size=2)
    with pytest.raises(ValueError, match="one score per response"):
        rlkern.policy_loss(lp, old, torch.zeros(3, 4), mask, policy_loss="gvpo", group_size=3)
    with pytest.raises(ValueError, match="token_weights do not apply"):
        rlkern.policy_loss(lp, old, adv, mask, policy_loss="gmpo", token_weights=old)
    with pytest.raises(ValueError, match="num_tokens must be finite and > 0"):
        rlkern.policy_loss(lp, old, adv, mask, num_tokens=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlkern.policy_loss(lp, old, adv, mask, backend="gpu")
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig"):
        rlkern.policy_loss(lp, old, adv, mask, config={"policy_loss": "ppo"})
    with pytest.raises(ValueError, match=r"unknown KL|must be one of"):
        rlkern.kl_penalty(lp, old, estimator="k5")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field", ["logprobs", "old_logprobs", "advantages", "ref_logprobs",
                                   "entropy", "token_weights"])
def test_nan_at_a_valid_token_raises(field, backend):
    inp = make_inputs(3, 5, torch.float32, seed=16)
    case = Case(PolicyLossConfig(kl_coef=0.1, entropy_coef=0.1), ref=True, entropy=True,
                token_weights=True)
    key = field
    inp[key] = inp[key].clone()
    if key == "advantages":
        inp[key][2] = math.nan
        where = "row 2"
    else:
        b, t = (int(i) for i in inp["mask"].nonzero()[-1])
        inp[key][b, t] = math.nan
        where = f"row {b}, position {t}"
    args, kw = call_kwargs(case, inp)
    msg = f"{field}: non-finite value nan at valid token \\({where}"
    with pytest.raises(ValueError, match=msg):
        rlkern.policy_loss(*args, config=case.config, backend=backend, **kw)
    rlkern.set_checks(False)
    try:
        out = rlkern.policy_loss(*args, config=case.config, backend=backend, **kw)
        assert math.isnan(out.loss.item())
    finally:
        rlkern.set_checks(True)


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
@pytest.mark.parametrize("count", [0.0, -3.0, math.inf, math.nan])
@pytest.mark.parametrize("which", ["num_tokens", "num_seqs"])
def test_count_tensor_not_positive(which, count, backend):
    """A tensor count ≤ 0 or non-finite: ValueError while checks are on; with checks off (no
    host sync) the loss and gradient are NaN on every backend, never a finite wrong value."""
    inp = make_inputs(3, 5, torch.float32, seed=11)
    mode = "token-mean" if which == "num_tokens" else "seq-mean-token-mean"
    lp = inp["logprobs"].clone().requires_grad_()
    args = (lp, inp["old_logprobs"], inp["advantages"], inp["mask"])
    kw = {which: torch.tensor(count), "loss_agg_mode": mode, "backend": backend}
    with pytest.raises(ValueError, match=f"{which} must be finite and > 0"):
        rlkern.policy_loss(*args, **kw)
    rlkern.set_checks(False)
    try:
        out = rlkern.policy_loss(*args, **kw)
    finally:
        rlkern.set_checks(True)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.isnan()
    assert grad[inp["mask"]].isnan().all()


def test_count_tensor_bad_type_or_device():
    inp = make_inputs(2, 3, torch.float32, seed=12)
    args = (inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])
    with pytest.raises(TypeError, match="num_tokens must be a real tensor"):
        rlkern.policy_loss(*args, num_tokens=torch.tensor(True))
    with pytest.raises(ValueError, match="num_tokens is on meta"):
        rlkern.policy_loss(*args, num_tokens=torch.tensor(4.0, device="meta"))
    out = rlkern.policy_loss(*args, num_tokens=torch.tensor(4))  # an integer count is fine
    assert torch.isfinite(out.loss)


def test_trl_vespo_refuses_sequence_level_vllm_correction():
    """TRL refuses a sequence-level vLLM correction with vespo; the preset does too, rather
    than dropping the correction."""
    with pytest.raises(ValueError, match="needs a token-level vllm_importance_sampling_mode"):
        PolicyLossConfig.trl("vespo", vllm_importance_sampling_correction=True,
                             vllm_importance_sampling_mode="sequence_truncate")
    cfg = PolicyLossConfig.trl("vespo", vllm_importance_sampling_correction=True,
                               vllm_importance_sampling_mode="token_truncate")
    assert cfg.rollout_correction == "token_truncate"


def test_rows_past_element_2_31():
    """Log-probabilities whose rows lie 2^31 + 2T elements apart in one storage (strided
    views; the pages between are never touched) give the loss, metrics and gradient of the same
    values stored contiguously, bit for bit: the CPU kernels form 64-bit row offsets. Both the
    fused forward + backward and the forward alone (no graph)."""
    T = 64
    inp = make_inputs(2, T, torch.float32, seed=31)
    lp, old = inp["logprobs"], inp["old_logprobs"]
    stride = 2**31 + 2 * T
    base = torch.empty(stride + 2 * T, dtype=torch.float32)
    far_lp = base.as_strided((2, T), (stride, 1), 0)
    far_old = base.as_strided((2, T), (stride, 1), T)
    far_lp.copy_(lp)
    far_old.copy_(old)
    rest = (inp["advantages"], inp["mask"])

    def run(logp, old_logp, grad):
        logp = logp.detach().requires_grad_(grad)
        out = rlkern.policy_loss(logp, old_logp, *rest, backend="cpu")
        g = torch.autograd.grad(out.loss, logp)[0] if grad else None
        return out, g

    for grad in (True, False):
        (got, g_got), (want, g_want) = run(far_lp, far_old, grad), run(lp, old, grad)
        assert torch.equal(bits(got.loss), bits(want.loss))
        for name, value in want.metrics.items():
            assert torch.equal(bits(got.metrics[name]), bits(value)), name
        if grad:
            assert torch.equal(bits(g_got), bits(g_want))
