"""torch.compile(fullgraph=True) of one whole GRPO-style training step that uses every rlkern op.

The step (``_train_step``) goes from an LM head's hidden states to a loss, touching every
public op on the way:

* sampling: :func:`rlkern.sample` draws the next token of every response (with its logprob and
  entropy), as a rollout engine would;
* logprobs: :func:`rlkern.token_logprobs` on materialised logits, :func:`rlkern.linear_logprobs`
  from the hidden states, :func:`rlkern.linear_logprobs_with_grad` (forward + parameter
  gradients in one pass) and :func:`rlkern.linear_grpo_loss` (the fused loss);
* advantages: :func:`rlkern.group_advantages` on shuffled int64 group ids, and the token
  helpers :func:`rlkern.discounted_returns`, :func:`rlkern.position_baseline`,
  :func:`rlkern.gtpo_weights`, :func:`rlkern.gigpo_advantages`, :func:`rlkern.empg_modulate`;
* losses: :func:`rlkern.policy_loss` (PPO clip with KL, entropy bonus and token weights) and
  :func:`rlkern.kl_penalty`.

The test compiles the step with ``fullgraph=True`` (any graph break is an error) with the
``eager``, ``aot_eager`` and ``inductor`` backends, runs the backward through the compiled
graph, and compares every output and the gradients wrt the hidden states and the head's
weight with the eager step. A second call with a different batch size checks that
recompilation (dynamic shapes) still traces without a break.
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import PolicyLossConfig

B, T, H, V = 12, 9, 16, 97  # 12 responses = groups of 3, 4 and 5 (shuffled)


def _batch(b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 4, 5] if b == B else [b // 2, b - b // 2]
    group_ids = torch.repeat_interleave(torch.tensor([101, 7, 55][: len(sizes)]),
                                        torch.tensor(sizes))
    perm = torch.randperm(b, generator=g)
    lengths = torch.randint(1, T + 1, (b,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.zeros(b, T)
    rewards[torch.arange(b), lengths - 1] = torch.randint(0, 2, (b,), generator=g).float()
    rewards += torch.rand(b, T, generator=g) * 0.1 * mask  # small process rewards
    return dict(
        hidden=torch.randn(b, T, H, generator=g),
        weight=torch.randn(V, H, generator=g) * 0.3,
        labels=torch.randint(0, V, (b, T), generator=g),
        mask=mask,
        rewards=rewards,
        group_ids=group_ids[perm].contiguous(),
        old=-torch.rand(b, T, generator=g) * 4 - 0.5,
        ref=-torch.rand(b, T, generator=g) * 4 - 0.5,
        seeds=torch.randint(0, 2**62, (b,), generator=g),
        steps=torch.full((b,), 5, dtype=torch.int64),
        state_keys=torch.randint(0, 3, (b,), generator=g),
    )


CFG = PolicyLossConfig.verl("vanilla", clip_ratio_low=0.2, clip_ratio_high=0.28,
                            use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl",
                            entropy_coeff=0.01)
FUSED_CFG = PolicyLossConfig.trl("grpo", beta=0.04)


def _train_step(hidden, weight, labels, mask, rewards, group_ids, old, ref, seeds, steps,
                state_keys):
    """One step: sample, score, compute advantages, form the loss. Returns the total loss
    (differentiable wrt ``hidden`` and ``weight``) and a dict of every intermediate."""
    logits = hidden @ weight.t()  # (B, T, V): materialised for token_logprobs / sample

    # rollout: the next token of every response, from its last position's logits
    with torch.no_grad():
        drawn = rlkern.sample(logits[:, -1, :].detach(), temperature=0.8, top_k=20, top_p=0.95,
                              seeds=seeds, steps=steps, return_entropy=True)

    # log-probabilities three ways
    tok = rlkern.token_logprobs(logits, labels, return_entropy=True)
    lin = rlkern.linear_logprobs(hidden, weight, labels, return_entropy=True)
    upstream = mask.to(hidden.dtype) / mask.sum()
    lwg = rlkern.linear_logprobs_with_grad(hidden.detach(), weight.detach(), labels,
                                           grad_logprobs=upstream)

    # advantages: outcome (GRPO), token-level (IGPO's position baseline, GTPO's weights),
    # step-level (GiGPO, EMPG; one step per response here)
    adv = rlkern.group_advantages(rewards, group_ids=group_ids, mask=mask).advantages
    returns = rlkern.discounted_returns(rewards, gamma=0.9, reset=~mask)
    pos = rlkern.position_baseline(returns, mask, group_ids=group_ids)
    gtpo = rlkern.gtpo_weights(tok.entropy.detach(), mask, group_ids=group_ids)
    episode = rewards.sum(-1)
    gigpo = rlkern.gigpo_advantages(episode, returns[:, 0], state_keys, group_ids=group_ids,
                                    omega=0.5, mode="std_norm")
    step_entropy = (tok.entropy.detach() * mask).sum(-1) / mask.sum(-1)
    next_entropy = torch.cat([step_entropy[1:], step_entropy.new_full((1,), float("nan"))])
    empg = rlkern.empg_modulate(gigpo.advantages, step_entropy, next_entropy)

    token_adv = adv + 0.1 * pos + 0.1 * empg[:, None] * mask
    weights = 1.0 + gtpo.weight

    # losses
    pl = rlkern.policy_loss(lin.logprobs, old, token_adv, mask, config=CFG, ref_logprobs=ref,
                            entropy=lin.entropy, token_weights=weights)
    kl = rlkern.kl_penalty(tok.logprobs, ref, estimator="k3")
    kl_term = (kl * mask).sum() / mask.sum()
    out = {
        "sample_tokens": drawn.tokens, "sample_logprobs": drawn.raw_logprobs,
        "sample_entropy": drawn.entropy,
        "tok_logprobs": tok.logprobs, "tok_entropy": tok.entropy,
        "lin_logprobs": lin.logprobs, "lin_entropy": lin.entropy,
        "lwg_logprobs": lwg.outputs.logprobs, "lwg_grad_hidden": lwg.grad_hidden,
        "lwg_grad_weight": lwg.grad_weight,
        "adv": adv, "returns": returns, "pos": pos, "gtpo": gtpo.weight,
        "gtpo_inv": gtpo.inverse_weight, "gigpo": gigpo.advantages, "empg": empg,
        "kl": kl, **{f"pl_{k}": v for k, v in pl.metrics.items()},
    }
    # the fused loss straight from the hidden states (TRL's grpo loss with a KL term)
    fused = rlkern.linear_grpo_loss(hidden, weight, labels, mask, adv[:, 0].contiguous(),
                                    old_logprobs=old, ref_logprobs=ref, config=FUSED_CFG)
    out.update({f"fused_{k}": v for k, v in fused.metrics.items()})
    out["fused_loss"] = fused.loss.detach()
    return pl.loss + 0.02 * kl_term + fused.loss, out


def _run(fn, data):
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    args = {k: v for k, v in data.items() if k not in ("hidden", "weight")}
    loss, out = fn(h, w, **args)
    loss.backward()
    return loss.detach(), out, h.grad, w.grad


def _assert_same(eager, compiled, tol):
    (l0, o0, gh0, gw0), (l1, o1, gh1, gw1) = eager, compiled
    assert set(o0) == set(o1)
    torch.testing.assert_close(l1, l0, **tol)
    for k in o0:
        if o0[k].dtype.is_floating_point:
            torch.testing.assert_close(o1[k], o0[k], **tol, equal_nan=True,
                                       msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(o1[k], o0[k]), k
    torch.testing.assert_close(gh1, gh0, **tol, msg=lambda m: f"grad hidden: {m}")
    torch.testing.assert_close(gw1, gw0, **tol, msg=lambda m: f"grad weight: {m}")


@pytest.mark.parametrize("backend", ["eager", "aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_train_step_compiles_without_graph_break(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    # inductor fuses and reorders the surrounding float32 torch math: rounding-level
    # differences; eager / aot_eager run the same kernels in the same order
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "inductor" else dict(rtol=1e-6, atol=1e-7)
    for b, seed in ((B, 0), (8, 1)):  # a second batch size: recompilation traces again
        data = _batch(b, seed)
        _assert_same(_run(_train_step, data), _run(compiled, data), tol)


def test_explain_reports_no_graph_break():
    """torch._dynamo.explain names any graph break (a clearer failure than fullgraph's)."""
    torch._dynamo.reset()
    data = _batch()
    args = {k: v for k, v in data.items() if k not in ("hidden", "weight")}
    explanation = torch._dynamo.explain(_train_step)(data["hidden"], data["weight"], **args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
