"""rlkern.generate_groups on a tiny randomly initialised LlamaForCausalLM (no downloads):
identical completions under every schedule, logprobs, streaming group statistics, errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rlkern  # noqa: E402
from rlkern.sampling import kv_bytes_per_token  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=g) for n in (5, 7, 3)]


def test_schedules_give_identical_completions(model):
    prompts = _prompts()
    kw = dict(group_size=4, max_new_tokens=10, seed=7, temperature=1.0, top_k=20,
              eos_token_id=[3, 17, 40, 64, 99])
    runs = {s: rlkern.generate_groups(model, prompts, schedule=s, micro_group_size=2, **kw)
            for s in ("full_group", "micro_group", "length_aware")}
    ref = runs["full_group"]
    assert len(ref.completions) == 12
    assert ref.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for s, r in runs.items():
        assert r.completions == ref.completions, s
        for a, b in zip(r.logprobs, ref.logprobs, strict=True):
            assert torch.equal(a, b), s
        assert torch.equal(r.lengths, ref.lengths)
        assert r.stats.num_groups == 3
        torch.testing.assert_close(r.stats.mean, ref.stats.mean)
    # micro groups of 2 hold less KV than the full group of 4
    assert runs["micro_group"].schedule.peak_tokens < ref.schedule.peak_tokens
    # with a budget (bytes) the result is still the same
    per_tok = kv_bytes_per_token(model.config, torch.float32)
    budget = per_tok * (7 + 2 * 10) * 2
    r = rlkern.generate_groups(model, prompts, schedule="length_aware", micro_group_size=2,
                               kv_budget_bytes=budget, **kw)
    assert r.completions == ref.completions
    assert r.schedule.peak_tokens * per_tok <= budget


def test_logprobs_match_a_full_forward(model):
    prompts = _prompts()[:1]
    r = rlkern.generate_groups(model, prompts, group_size=2, max_new_tokens=6, seed=3,
                               temperature=0.8)
    for comp, lp in zip(r.completions, r.logprobs, strict=True):
        ids = torch.cat([prompts[0], torch.tensor(comp)])
        with torch.no_grad():
            logits = model(ids[None]).logits[0, len(prompts[0]) - 1:-1].double() / 0.8
        expect = torch.log_softmax(logits, -1).gather(1, torch.tensor(comp)[:, None])[:, 0]
        torch.testing.assert_close(lp.double(), expect, rtol=1e-4, atol=1e-4)


def test_seed_changes_completions(model):
    prompts = _prompts()[:1]
    a = rlkern.generate_groups(model, prompts, group_size=2, max_new_tokens=5, seed=0)
    b = rlkern.generate_groups(model, prompts, group_size=2, max_new_tokens=5, seed=1)
    assert a.completions != b.completions
    assert a.completions[0] != a.completions[1]  # members differ


def test_bad_inputs(model):
    prompts = _prompts()
    with pytest.raises(ValueError, match="too small"):
        rlkern.generate_groups(model, prompts, group_size=2, max_new_tokens=5,
                               kv_budget_bytes=10)
    with pytest.raises(ValueError, match="prompts"):
        rlkern.generate_groups(model, [], group_size=2, max_new_tokens=5)

    class NoCache(torch.nn.Module):
        config = type("C", (), {"use_cache": False})()

    with pytest.raises(ValueError, match="KV cache"):
        rlkern.generate_groups(NoCache(), prompts, group_size=2, max_new_tokens=5)


def test_identical_completions_under_budgets_with_preemption(model):
    """Admission by predicted length under tight budgets preempts members and rebuilds their
    KV on resumption: completions and logprobs stay bitwise the same, and the run's metrics
    are those rlkern.sampling.simulate gives for the same lengths (one scheduler)."""
    from rlkern.sampling import simulate

    prompts = _prompts()
    kw = dict(group_size=4, max_new_tokens=10, seed=7, temperature=1.0, top_k=20,
              eos_token_id=[3, 17, 40, 64, 99], micro_group_size=2)
    ref = rlkern.generate_groups(model, prompts, schedule="full_group", **kw)
    assert ref.lengths.min() < ref.lengths.max()  # lengths differ: predictions matter
    preempted = {}
    # 17 = longest prompt + max_new_tokens: every member fits alone; prior 1 admits eagerly.
    for schedule in ("full_group", "micro_group", "length_aware"):
        for budget, prior in ((17, 1), (17, None), (25, 2), (40, 1)):
            r = rlkern.generate_groups(model, prompts, schedule=schedule,
                                       kv_budget_tokens=budget, length_prior=prior, **kw)
            key = (schedule, budget, prior)
            assert r.completions == ref.completions, key
            for a, b in zip(r.logprobs, ref.logprobs, strict=True):
                assert torch.equal(a, b), key
            assert r.schedule.peak_tokens <= budget, key
            assert r.stats.num_groups == 3
            sim = simulate(ref.lengths.reshape(3, 4), [5, 7, 3], schedule=schedule,
                           group_size=4, micro_group_size=2, kv_budget_tokens=budget,
                           length_prior=prior, max_new_tokens=10)
            assert sim == r.schedule, key
            preempted[key] = r.schedule
    for schedule in ("full_group", "micro_group", "length_aware"):
        run = preempted[(schedule, 17, 1)]
        assert run.preemptions > 0 and run.recomputed_tokens > 0, schedule


def test_budget_errors(model):
    prompts = _prompts()  # longest prompt: 7 tokens
    kw = dict(group_size=2, max_new_tokens=5, seed=0)
    with pytest.raises(ValueError, match="too small for one member"):
        rlkern.generate_groups(model, prompts, kv_budget_tokens=7, **kw)
    with pytest.raises(ValueError, match="not both"):
        rlkern.generate_groups(model, prompts, kv_budget_tokens=20, kv_budget_bytes=10**6,
                               **kw)
    # 8 tokens admit any member, but no member can reach 5 tokens alone: a clear error.
    with pytest.raises(ValueError, match="alone"):
        rlkern.generate_groups(model, prompts, kv_budget_tokens=8, **kw)
    # The same budget in bytes and in tokens is the same run.
    per_tok = kv_bytes_per_token(model.config, torch.float32)
    a = rlkern.generate_groups(model, prompts, kv_budget_tokens=12, **kw)
    b = rlkern.generate_groups(model, prompts, kv_budget_bytes=12 * per_tok + per_tok - 1, **kw)
    assert a.completions == b.completions and a.schedule == b.schedule
