"""linear_grpo_loss against the two-op composition it fuses:
``policy_loss(linear_logprobs(h, W, y), ...)`` (itself tested against the trainers), on every
loss family, chunkings that split responses, and float64 finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from conftest import assert_close_grad
from rlkern import PolicyLossConfig

CONFIGS = {
    "trl_dapo_kl": (PolicyLossConfig.trl("dapo", beta=0.04, epsilon_high=0.28), True),
    "trl_grpo": (PolicyLossConfig.trl("grpo"), False),
    "trl_bnpo": (PolicyLossConfig.trl("bnpo"), False),
    "trl_dr_grpo": (PolicyLossConfig.trl("dr_grpo", max_completion_length=9), False),
    "trl_cispo": (PolicyLossConfig.trl("cispo", epsilon_high=0.3), False),
    "trl_sapo": (PolicyLossConfig.trl("sapo", beta=0.02), True),
    "trl_luspo_seq": (PolicyLossConfig.trl("luspo", importance_sampling_level="sequence"),
                      False),
    "trl_grpo_seq_delta": (PolicyLossConfig.trl("grpo", importance_sampling_level="sequence",
                                                delta=1.5), False),
    "verl_vanilla_dual_clip": (PolicyLossConfig.verl("vanilla", loss_agg_mode="token-mean",
                                                     clip_ratio_c=3.0), False),
    "verl_gspo": (PolicyLossConfig.verl("gspo", loss_agg_mode="seq-mean-token-mean"), False),
    "verl_geo_mean": (PolicyLossConfig.verl("geo_mean", loss_agg_mode="seq-mean-token-mean"),
                      False),
    "verl_gpg_sum": (PolicyLossConfig.verl("gpg", loss_agg_mode="seq-mean-token-sum"), False),
    "verl_cispo_k3plus": (PolicyLossConfig.verl("cispo", use_kl_loss=True, kl_loss_coef=0.1,
                                                kl_loss_type="low_var_kl+"), True),
    "gvpo": (PolicyLossConfig(policy_loss="gvpo", group_size=2,
                              loss_agg_mode="seq-mean-token-mean"), False),
    "entropy_bonus": (PolicyLossConfig(entropy_coef=0.05, kl_coef=0.1, kl_estimator="k2"),
                      True),
    "entropy_bonus_local_norm": (PolicyLossConfig.trl("grpo", entropy_coef=0.05), False),
}

B, T, H, V = 4, 7, 16, 50


def make(dtype=torch.float64, *, seed=0, empty_row=True, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    if empty_row:
        mask[1] = False
    adv = torch.randn((B, T) if token_adv else (B,), generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = torch.log_softmax(h.double() @ w.double().T + b.double(), -1)
        lp = lp.gather(-1, y[..., None])[..., 0]
    noise = lambda: torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    return dict(h=h, w=w, b=b, y=y, mask=mask, adv=adv, old=lp + noise(), ref=lp + noise(),
                rollout=lp + noise())


def fused_and_twoop(d, cfg, *, kl, chunk_size=None, bias=True, temperature=1.0, **extra):
    """(loss, metrics, grads) of linear_grpo_loss and of the two-op composition."""
    results = []
    for fused in (True, False):
        h = d["h"].clone().requires_grad_()
        w = d["w"].clone().requires_grad_()
        b = d["b"].clone().requires_grad_() if bias else None
        ref = d["ref"] if kl else None
        if fused:
            out = rlkern.linear_grpo_loss(h, w, d["y"], d["mask"], d["adv"], bias=b,
                                          old_logprobs=d["old"], ref_logprobs=ref, config=cfg,
                                          temperature=temperature, chunk_size=chunk_size,
                                          **extra)
        else:
            lp = rlkern.linear_logprobs(h, w, d["y"], bias=b, temperature=temperature,
                                        return_entropy=cfg.entropy_coef != 0)
            out = rlkern.policy_loss(lp.logprobs, d["old"], d["adv"], d["mask"], config=cfg,
                                     ref_logprobs=ref, entropy=lp.entropy, **extra)
        out.loss.backward()
        results.append((out.loss.detach(), out.metrics,
                        [t.grad for t in (h, w, b) if t is not None]))
    return results


def assert_same(fused, twoop, dtype=torch.float64):
    (loss, metrics, grads), (loss_r, metrics_r, grads_r) = fused, twoop
    torch.testing.assert_close(loss.double(), loss_r.double(), rtol=1e-10, atol=1e-12)
    for key, value in metrics.items():
        torch.testing.assert_close(value.double(), metrics_r[key].double(), rtol=1e-10,
                                   atol=1e-12, equal_nan=True, msg=lambda m, k=key: f"{k}: {m}")
    assert len(grads) == len(grads_r)
    for name, g, g_r in zip("hWb", grads, grads_r, strict=False):
        assert_close_grad(g, g_r, dtype, f"grad {name}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 2 * T])
def test_matches_two_op_composition(name, chunk_size):
    """chunk_size 1 and 5 split responses across chunks (token-level losses) or are widened
    to whole responses (sequence-level ones); both must give the unchunked result."""
    cfg, kl = CONFIGS[name]
    d = make()
    assert_same(*fused_and_twoop(d, cfg, kl=kl, chunk_size=chunk_size))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_temperature_bias_and_token_advantages(bias, token_adv):
    d = make(token_adv=token_adv)
    cfg = PolicyLossConfig.trl("grpo", beta=0.04)
    assert_same(*fused_and_twoop(d, cfg, kl=True, bias=bias, temperature=0.7, chunk_size=3))


def test_rollout_correction_token_weights_and_global_counts():
    d = make()
    cfg = PolicyLossConfig.trl("dapo", vllm_importance_sampling_mode="token_truncate")
    tw = torch.rand(B, T, dtype=torch.float64) + 0.5
    for rollout_mode in ("token_truncate", "sequence_mask"):
        c = cfg.replace(rollout_correction=rollout_mode)
        assert_same(*fused_and_twoop(d, c, kl=False, chunk_size=4,
                                     rollout_logprobs=d["rollout"], token_weights=tw,
                                     num_tokens=40.0))
    c = PolicyLossConfig.verl("vanilla", loss_agg_mode="seq-mean-token-mean")
    assert_same(*fused_and_twoop(d, c, kl=False, chunk_size=4, num_seqs=torch.tensor(6.0)))


def test_on_policy_default_is_ratio_one():
    """old_logprobs=None means old = sg[logp]: the ratio is exactly 1."""
    d = make()
    out = rlkern.linear_grpo_loss(d["h"], d["w"], d["y"], d["mask"], d["adv"], bias=d["b"],
                                  config=PolicyLossConfig.trl("dapo"))
    lp = rlkern.linear_logprobs(d["h"], d["w"], d["y"], bias=d["b"]).logprobs
    ref = rlkern.policy_loss(lp, lp.detach(), d["adv"], d["mask"],
                             config=PolicyLossConfig.trl("dapo"))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    assert float(out.metrics["ratio_min"]) == float(out.metrics["ratio_max"]) == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_matches_two_op_composition(dtype):
    """bf16 / fp32: the logits are rounded to the input dtype as F.linear rounds them, so the
    loss agrees with the two-op composition to fp32 accuracy and the gradients within the
    dtype's storage rounding."""
    d = make(dtype)
    cfg = PolicyLossConfig.trl("grpo", beta=0.04)
    (loss, metrics, grads), (loss_r, metrics_r, grads_r) = fused_and_twoop(
        d, cfg, kl=True, chunk_size=5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"], metrics_r["kl"], rtol=1e-5, atol=1e-6)
    for name, g, g_r in zip("hWb", grads, grads_r, strict=True):
        assert g.dtype == dtype
        assert_close_grad(g, g_r, dtype, f"grad {name}")


def test_gradcheck_float64():
    d = make()
    cfg = PolicyLossConfig.trl("grpo", beta=0.04, importance_sampling_level="sequence")
    small = lambda t: t[:, :5].contiguous()

    def loss(h, w, b):
        return rlkern.linear_grpo_loss(h, w, small(d["y"]), small(d["mask"]), d["adv"],
                                       bias=b, old_logprobs=small(d["old"]),
                                       ref_logprobs=small(d["ref"]), config=cfg,
                                       temperature=0.9, chunk_size=5).loss

    inputs = (d["h"][:, :5].clone().requires_grad_(), d["w"].clone().requires_grad_(),
              d["b"].clone().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


def test_backward_scales_by_the_upstream_gradient():
    """Scale 1 returns the gradients computed in the forward, any other scale multiplies them;
    a retained graph gives the same gradients again."""
    d = make()
    grads = []
    for scale in (1.0, -2.5):
        h = d["h"].clone().requires_grad_()
        out = rlkern.linear_grpo_loss(h, d["w"], d["y"], d["mask"], d["adv"],
                                      old_logprobs=d["old"])
        (out.loss * scale).backward(retain_graph=True)
        grads.append(h.grad.clone())
        (again,) = torch.autograd.grad(out.loss * scale, h)
        torch.testing.assert_close(again, grads[-1], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], -2.5 * grads[0], rtol=1e-12, atol=0)


def test_2d_hidden_and_module_form():
    d = make()
    cfg = PolicyLossConfig.trl("dapo", beta=0.04)
    out = rlkern.linear_grpo_loss(d["h"].reshape(B * T, H), d["w"], d["y"], d["mask"],
                                  d["adv"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                  config=cfg)
    module = rlkern.LinearGRPOLoss(cfg)
    loss, metrics = module(d["h"], d["w"], d["y"], d["mask"], d["adv"], None, d["ref"],
                           d["old"])
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    assert metrics.keys() == out.metrics.keys()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 9), chunk=st.integers(1, 12),
       seed=st.integers(0, 2**16), level=st.sampled_from(["token", "sequence"]),
       loss_type=st.sampled_from(["dapo", "grpo", "dr_grpo"]))
def test_property_any_shape_and_chunking(b, t, chunk, seed, level, loss_type):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, 8, generator=g, dtype=torch.float64)
    w = torch.randn(20, 8, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 20, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    d = dict(h=h, w=w, b=torch.zeros(20, dtype=torch.float64), y=y, mask=mask,
             adv=torch.randn(b, generator=g, dtype=torch.float64),
             old=torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2 - 3.0,
             ref=torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2 - 3.0)
    cfg = PolicyLossConfig.trl(loss_type, beta=0.04, importance_sampling_level=level)
    assert_same(*fused_and_twoop(d, cfg, kl=True, chunk_size=chunk))


def test_torch_compile_fullgraph_matches_eager():
    d = make(torch.float32)
    cfg = PolicyLossConfig.trl("grpo", beta=0.04)

    def step(h, w):
        out = rlkern.linear_grpo_loss(h, w, d["y"], d["mask"], d["adv"],
                                      old_logprobs=d["old"], ref_logprobs=d["ref"], config=cfg)
        return out.loss, out.metrics["kl"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        h, w = d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()
        loss, kl = fn(h, w)
        loss.backward()
        results.append((loss.detach(), kl, h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_opcheck():
    d = make(torch.float32)
    cfg = PolicyLossConfig.trl("dapo")
    from rlkern.config.layout import layout

    inputs = [None] * len(layout("policy_loss").inputs)
    args = (d["h"].reshape(B * T, H).requires_grad_(), d["w"].requires_grad_(),
            d["y"].reshape(-1), None, d["mask"], d["adv"].float(), d["old"].float(), inputs,
            torch.tensor([20.0, 3.0], dtype=torch.float64), *cfg.to_args(), 1.0,
            -100, False, 14, "", "cpu")
    torch.library.opcheck(torch.ops.rlkern.linear_grpo_loss_fwd, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


def test_triton_backend_matches_cpu():
    """The Triton GEMM kernels (interpreter on CPU) with the loss in between."""
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    d = make(torch.float32)
    cfg = PolicyLossConfig.trl("grpo", beta=0.04)
    outs = []
    for backend in ("cpu", "triton"):
        h, w = d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()
        out = rlkern.linear_grpo_loss(h, w, d["y"], d["mask"], d["adv"], bias=d["b"],
                                      old_logprobs=d["old"], ref_logprobs=d["ref"],
                                      config=cfg, backend=backend)
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad, w.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for name, g, g_cpu in zip("hW", outs[1][1:], outs[0][1:], strict=True):
        assert_close_grad(g, g_cpu, torch.float32, f"grad {name}")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(config=PolicyLossConfig.trl("dapo", beta=0.1)), ValueError, "ref_logprobs"),
    (dict(config=PolicyLossConfig(top_entropy_quantile=0.5)), ValueError,
     "top_entropy_quantile"),
    (dict(config=PolicyLossConfig(policy_loss="gvpo", group_size=3)), ValueError, "gvpo"),
    (dict(config=PolicyLossConfig.trl("grpo", entropy_coef=0.1), num_tokens=10.0), ValueError,
     "entropy"),
    (dict(config="dapo"), TypeError, "PolicyLossConfig"),
    (dict(old_logprobs=torch.zeros(B, T + 1)), ValueError, "old_logprobs"),
    (dict(num_tokens=-1.0), ValueError, "num_tokens"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_bad_input(kwargs, error, match):
    d = make(torch.float32)
    with pytest.raises(error, match=match):
        rlkern.linear_grpo_loss(d["h"], d["w"], d["y"], d["mask"], d["adv"], **kwargs)


def test_bad_shapes():
    d = make(torch.float32)
    with pytest.raises(ValueError, match="B·T"):
        rlkern.linear_grpo_loss(d["h"].reshape(B * T, H)[:-1], d["w"], d["y"], d["mask"],
                                d["adv"])
    with pytest.raises(ValueError, match="labels"):
        rlkern.linear_grpo_loss(d["h"], d["w"], d["y"][:, :-1], d["mask"], d["adv"])
    with pytest.raises(ValueError, match="weight"):
        rlkern.linear_grpo_loss(d["h"], d["w"][:, :-1], d["y"], d["mask"], d["adv"])
    with pytest.raises(ValueError, match="advantages"):
        rlkern.linear_grpo_loss(d["h"], d["w"], d["y"], d["mask"], d["adv"][:-1])
    with pytest.raises(ValueError, match="labels"):
        y = d["y"].clone()
        y[0, 0] = V
        rlkern.linear_grpo_loss(d["h"], d["w"], y, d["mask"], d["adv"])


def test_inputs_on_another_device_and_an_empty_batch():
    """Every per-token input must be on hidden's device (a meta tensor would otherwise reach
    the op's fake implementation: uninitialised outputs); B = 0 gives a zero loss."""
    d = make(torch.float64)
    for name in ("old_logprobs", "ref_logprobs", "token_weights"):
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            rlkern.linear_grpo_loss(d["h"], d["w"], d["y"], d["mask"], d["adv"],
                                    **{name: torch.zeros(B, T, device="meta")})
    with pytest.raises(ValueError, match="mask is on meta"):
        rlkern.linear_grpo_loss(d["h"], d["w"], d["y"], d["mask"].to("meta"), d["adv"])
    w = d["w"].clone().requires_grad_()
    out = rlkern.linear_grpo_loss(d["h"][:0], w, d["y"][:0], d["mask"][:0], d["adv"][:0],
                                  old_logprobs=d["old"][:0])
    assert out.loss.item() == 0.0 and out.metrics["clipfrac"].item() == 0.0
    out.loss.backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("loss", ["ppo", "gspo", "gvpo"])
@pytest.mark.parametrize("n_seqs,T,vocab", [(8, 256, 151936), (40, 100, 151936), (3, 7, 32),
                                            (64, 4096, 262144)])
def test_default_chunks_are_equal_whole_units_within_the_cap(loss, n_seqs, T, vocab):
    """The default one-pass chunk: whole sequences (whole groups for gvpo) when they fit, the
    fewest chunks of at most the cap, all of equal size but the last."""
    from rlkern.ops.linear_grpo_loss import _chunk_rows, _needs_whole_rows
    from rlkern.ops.linear_logprobs import LinearTiling

    cfg = PolicyLossConfig(policy_loss=loss, **({"group_size": 4} if loss == "gvpo" else {}))
    unit = T * (4 if loss == "gvpo" else 1)
    n = n_seqs * T
    cap = LinearTiling.fused_rows(vocab)
    rows = _chunk_rows(cfg, T, vocab, None, _needs_whole_rows(cfg, False), n)
    if unit <= cap:
        assert rows % unit == 0 and rows <= cap
        units = math.ceil(n / unit)
        fewest = math.ceil(units / (cap // unit))
        chunks = -(-n // rows)
        assert chunks == fewest
        assert chunks * rows - n < chunks * unit  # equal chunks: no short tail chunk
    elif _needs_whole_rows(cfg, False):
        assert rows == unit  # a sequence-level loss needs whole units, even over the cap
    else:
        assert rows == cap  # pieces of sequences
    assert _chunk_rows(cfg, T, vocab, 5, _needs_whole_rows(cfg, False), n) in (5, unit)


def test_backward_does_not_fill_a_zero_weight_gradient():
    """The op's gradient outputs are never used downstream: autograd must not materialise a
    zero (V, H) incoming gradient for them (a full extra pass over ∂W every step)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    vocab, hid = 4096, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, hid, generator=g).requires_grad_()
    w = (torch.randn(vocab, hid, generator=g) * 0.1).requires_grad_()
    y = torch.randint(0, vocab, (2, 8), generator=g)
    out = rlkern.linear_grpo_loss(h, w, y, torch.ones(2, 8), torch.tensor([1.0, -1.0]),
                                  config=PolicyLossConfig.trl(loss_type="dapo"))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("backward"):
            out.loss.backward()
    fills = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")
             and any(list(s) == [vocab, hid] for s in e.input_shapes if s)]
    assert not fills, [(e.name, e.input_shapes) for e in fills]
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("count", [0.0, -3.0])
@pytest.mark.parametrize("which", ["num_tokens", "num_seqs"])
def test_count_tensor_not_positive(which, count, backend):
    """A tensor count ≤ 0: ValueError while checks are on; NaN loss and gradients (no host
    sync) with checks off — as rlkern.policy_loss."""
    d = make(torch.float32)
    h = d["h"].clone().requires_grad_()
    mode = "token-mean" if which == "num_tokens" else "seq-mean-token-mean"
    kw = {which: torch.tensor(count), "config": PolicyLossConfig(loss_agg_mode=mode),
          "backend": backend}
    with pytest.raises(ValueError, match=f"{which} must be finite and > 0"):
        rlkern.linear_grpo_loss(h, d["w"], d["y"], d["mask"], d["adv"], **kw)
    rlkern.set_checks(False)
    try:
        out = rlkern.linear_grpo_loss(h, d["w"], d["y"], d["mask"], d["adv"], **kw)
    finally:
        rlkern.set_checks(True)
    out.loss.backward()
    assert out.loss.isnan()
    assert h.grad[d["mask"]].isnan().all()
