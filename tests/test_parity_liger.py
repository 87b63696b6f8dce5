"""rlkern's fused linear GRPO loss against Liger-Kernel's real ``LigerFusedLinearGRPOLoss``
(plain torch, runs on CPU): the drop-in ``rlkern.integrations.liger_compat`` must return
Liger's loss, metrics and gradients for every loss type Liger and rlkern share."""

from __future__ import annotations

import itertools

import pytest
import torch

import rlkern
from rlkern.integrations.liger_compat import LigerFusedLinearGRPOLoss as RlkernLiger

liger = pytest.importorskip("liger_kernel.chunked_loss",
                            reason="liger-kernel is not installed (pip install liger-kernel)")

B, T, H, V = 4, 6, 16, 40
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def data(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[2] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        logits = x @ w.T + (0 if b is None else b)
        lp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    old = lp + torch.randn(B, T, generator=g) * 0.3
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    return dict(x=x, w=w, b=b, y=y, mask=mask, adv=adv, old=old, ref=ref)


def run(module, d, **inputs):
    x = d["x"].clone().requires_grad_()
    w = d["w"].clone().requires_grad_()
    b = None if d["b"] is None else d["b"].clone().requires_grad_()
    loss, metrics = module(x, w, d["y"], d["mask"], d["adv"], b, **inputs)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], [t.grad for t in (x, w, b)
                                                         if t is not None]


def assert_matches_liger(kwargs, d, **inputs):
    kwargs = dict(kwargs, compiled=False)
    ours = run(RlkernLiger(**kwargs), d, **inputs)
    theirs = run(liger.LigerFusedLinearGRPOLoss(**kwargs), d, **inputs)
    # Liger computes in float32 with torch ops; rlkern in float32 with its own kernels.
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
    assert len(ours[1]) == len(theirs[1])
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=1e-6)
    for a, b in zip(ours[2], theirs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


CASES = [
    (lt, level, beta, bc)
    for lt, level, beta, bc in itertools.product(LOSS_TYPES, ["token", "sequence"],
                                                 [0.0, 0.04], [False, True])
    if not (level == "sequence" and lt in ("cispo", "sapo", "vespo"))
    # Liger 0.8.5's luspo does not mask padded tokens once the per-token loss is (B, T)
    # (token-level ratios, or a KL term); rlkern follows TRL there (test below).
    and not (lt == "luspo" and (level == "token" or beta != 0.0))
    and not (bc and beta == 0.0)
]


@pytest.mark.parametrize("loss_type,level,beta,bias_correction", CASES)
def test_matches_liger(loss_type, level, beta, bias_correction):
    kwargs = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level,
                  max_completion_length=8, use_bias_correction_kl=bias_correction,
                  epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    d = data()
    assert_matches_liger(kwargs, d, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])


def test_clipping_metric_nonzero_and_delta():
    """Larger ratios so that clipping (and INTELLECT-2's δ) is exercised."""
    d = data(seed=1)
    d["old"] = d["old"] + torch.randn(B, T) * 0.5
    assert_matches_liger(dict(beta=0.04, loss_type="dapo", delta=1.3), d,
                         ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])


def test_no_bias_on_policy_and_no_ref_model():
    d = data(bias=False)
    assert_matches_liger(dict(beta=0.0, loss_type="grpo", use_ref_model=False), d)
    assert_matches_liger(dict(beta=0.04, loss_type="dapo", use_ref_model=False), d)


def test_ref_model_hidden_states_and_temperature():
    """ref_input / ref_weight: the reference logprobs are computed from the reference model's
    hidden states, at the loss's temperature."""
    d = data()
    g = torch.Generator().manual_seed(5)
    ref_x = d["x"] + torch.randn(B, T, H, generator=g) * 0.1
    ref_w = d["w"] + torch.randn(V, H, generator=g) * 0.05
    assert_matches_liger(dict(beta=0.1, loss_type="bnpo", temperature=0.8), d,
                         old_per_token_logps=d["old"], ref_input=ref_x, ref_weight=ref_w,
                         ref_bias=d["b"])


@pytest.mark.parametrize("shape", [(B,), (B, 1), (B, T)])
def test_vllm_importance_ratio(shape):
    d = data()
    ratio = torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.5
    assert_matches_liger(dict(beta=0.04, loss_type="dapo"), d, ref_per_token_logps=d["ref"],
                         old_per_token_logps=d["old"], vllm_is_ratio=ratio)


def test_num_items_in_batch():
    d = data()
    assert_matches_liger(dict(beta=0.0, loss_type="dapo", use_ref_model=False), d,
                         old_per_token_logps=d["old"],
                         num_items_in_batch=37)


def test_luspo_with_kl_follows_trl():
    """Where Liger 0.8.5 departs from TRL (luspo with a (B, T) per-token loss), the drop-in
    gives TRL's loss: rlkern.policy_loss with PolicyLossConfig.trl, itself tested against
    TRL's trainer code in test_parity_trl_policy_loss.py."""
    d = data()
    ours = run(RlkernLiger(beta=0.04, loss_type="luspo", importance_sampling_level="sequence"),
               d, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])
    lp = rlkern.linear_logprobs(d["x"], d["w"], d["y"], bias=d["b"]).logprobs
    cfg = rlkern.PolicyLossConfig.trl("luspo", beta=0.04, importance_sampling_level="sequence",
                                      use_bias_correction_kl=False,
                                      vllm_importance_sampling_correction=False)
    ref = rlkern.policy_loss(lp, d["old"], d["adv"], d["mask"], config=cfg,
                             ref_logprobs=d["ref"])
    torch.testing.assert_close(ours[0], ref.loss, rtol=1e-6, atol=1e-7)


def test_vespo_params_kl_and_is_ratio_match_liger():
    """vespo with its own (k, λ), a KL term and vLLM's ratio folded into the sequence weight
    (1 at padding, as TRL hands it over: Liger sums its log over every position)."""
    d = data(3)
    g = torch.Generator().manual_seed(9)
    ratio = (torch.rand(B, T, generator=g) * 2.0).masked_fill(d["mask"] == 0, 1.0)
    ratio[0, 0] = 0.0  # a masked-out token: log 0 → log 1e-8
    kw = dict(loss_type="vespo", beta=0.04, vespo_k_pos=1.5, vespo_lambda_pos=0.5,
              vespo_k_neg=4.0, vespo_lambda_neg=1.0)
    assert_matches_liger(kw, d, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"],
                         vllm_is_ratio=ratio)
    assert_matches_liger(dict(kw, beta=0.0), d, ref_per_token_logps=d["ref"],
                         old_per_token_logps=d["old"],
                         vllm_is_ratio=ratio[:, :1])  # one ratio per sequence


def test_cispo_clip_metric_counts_positive_advantages_only():
    """Liger and TRL count a cispo token as clipped when its ratio exceeds ε_high and A > 0."""
    d = data(4)
    d["adv"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    eps_high = 1.02
    loss_fn = RlkernLiger(loss_type="cispo", beta=0.0, epsilon_high=eps_high)
    _, metrics, _ = run(loss_fn, d, old_per_token_logps=d["old"])
    lp = rlkern.linear_logprobs(d["x"], d["w"], d["y"], bias=d["b"]).logprobs.view(B, T)
    hit = (torch.exp(lp - d["old"]) > eps_high) & (d["adv"][:, None] > 0) & (d["mask"] > 0)
    expected = hit.sum() / d["mask"].sum()
    torch.testing.assert_close(metrics[0], expected.float(), rtol=1e-6, atol=1e-7)
    assert_matches_liger(dict(loss_type="cispo", beta=0.0, epsilon_high=eps_high), d,
                         ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])


def test_ref_logps_and_ref_input_warn_like_liger():
    d = data()
    with pytest.warns(UserWarning, match="Both ref_per_token_logps and ref_input are provided"):
        run(RlkernLiger(beta=0.04), d, ref_per_token_logps=d["ref"], ref_input=d["x"])


def test_bad_arguments():
    d = data()
    for loss_type in ("cispo", "sapo", "vespo"):  # Liger refuses them in forward, in its words
        with pytest.raises(ValueError, match="Sequence-level importance sampling is not "
                                             f"supported for loss_type='{loss_type}'"):
            run(RlkernLiger(loss_type=loss_type, importance_sampling_level="sequence"), d)
    with pytest.raises(TypeError, match="vespo_k"):
        RlkernLiger(vespo_k=2.0)  # a misspelt argument is still refused
    with pytest.raises(ValueError, match="sapo_temperature_pos"):
        RlkernLiger(sapo_temperature_pos=0.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        run(RlkernLiger(loss_type="dr_grpo", beta=0.0), d)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        run(RlkernLiger(beta=0.04), d)
