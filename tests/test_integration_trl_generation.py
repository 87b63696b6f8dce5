"""``rlkern.integrations.trl.apply(generation="micro_groups")``: TRL's ``GRPOTrainer`` (TRL 1.16)
generating through :func:`rlkern.generate_groups`, on CPU with the tiny random Llama and
word-level tokenizer of ``tests/test_integration_trl.py``.

* Training runs (2 steps, finite loss) with the generation patch, under a KV budget.
* TRL's batch format: ``_generate_and_score_completions`` patched vs unpatched — the same keys
  (plus ``sampling_per_token_logps``), dtypes, shapes, padding value and side; the sampler's
  log-probabilities equal the trainer's own recomputation of them.
* Greedy (``do_sample=False``): the same completions as TRL's own ``generate``.
* The same seed gives the same completions under every ``schedule`` and budget; every call
  draws fresh samples; prompts whose copies are split form smaller groups.
* Unsupported options (``repetition_penalty``, ``no_repeat_ngram_size``, vLLM, images) raise
  ``ValueError`` naming them; bad ``apply`` arguments raise; ``remove()`` restores TRL.
* Peak KV-cache tokens of generation at ``num_generations=16``, counted from the live caches
  after every model call (deterministic): rlkern < half of TRL's ``generate`` at the same
  number of completions.
"""

from __future__ import annotations

import math
import types
import weakref

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16",
                          reason="the TRL integration targets TRL 1.16 (not installed or older)")
pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from trl import GRPOTrainer  # noqa: E402

import rlkern  # noqa: E402
import rlkern.integrations.trl as rt  # noqa: E402
import rlkern.sampling.generate as gen_module  # noqa: E402
import test_integration_trl as trl_tests  # noqa: E402
from rlkern.integrations.trl_generation import (  # noqa: E402
    GENERATION_METHOD,
    check_generation_config,
    plan_groups,
)
from rlkern.sampling import SCHEDULES  # noqa: E402
from test_integration_trl import VOCAB, _config, _reward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

# the tiny model, dataset and one-thread fixtures of the TRL integration tests
model_dir, dataset, _one_thread = trl_tests.model_dir, trl_tests.dataset, trl_tests._one_thread
MAX_NEW = 12
TRL_GENERATE = GRPOTrainer.__dict__[GENERATION_METHOD]


@pytest.fixture(autouse=True)
def _unpatched():
    rt.remove()
    rt.reset_usage()
    yield
    rt.remove()


def _trainer(model_dir, dataset, tmp_path, **overrides) -> GRPOTrainer:
    overrides.setdefault("max_completion_length", MAX_NEW)
    return GRPOTrainer(model=model_dir, reward_funcs=_reward, train_dataset=dataset,
                       args=_config(tmp_path / "out", **overrides))


def _rows(trainer, texts: list[str], copies: int) -> list[list[int]]:
    """TRL's layout: ``copies`` consecutive copies of each prompt's token ids."""
    ids = trainer.processing_class(text=texts)["input_ids"]
    return [list(p) for p in ids for _ in range(copies)]


def _check_trl_completions(completions: list[list[int]], eos: set[int], rows: int) -> None:
    assert isinstance(completions, list) and len(completions) == rows
    for c in completions:
        assert isinstance(c, list) and all(type(t) is int for t in c)
        assert 1 <= len(c) <= MAX_NEW
        assert all(t not in eos for t in c[:-1])  # the first EOS ends it (and is kept)
        assert c[-1] in eos or len(c) == MAX_NEW
        assert all(0 <= t < VOCAB for t in c)


# ---------------------------------------------------------------------------------------------
# Training


def test_train_two_steps_with_micro_group_generation(model_dir, dataset, tmp_path):
    budget = 64  # tokens: one prompt (6) and a few members' completions (≤ 12 each)
    rt.apply(generation="micro_groups", kv_budget_tokens=budget)
    trainer = _trainer(model_dir, dataset, tmp_path, max_steps=2, num_iterations=1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    used = rt.usage()
    assert used["generation_micro_groups"] == 2 and used["generation_split_groups"] == 0, used
    assert used["loss_rlkern"] == 2 and used["logps_rlkern"] > 0, used
    (rollouts,) = rt.last_rollouts(trainer)  # 8 rows = 2 prompts × 4 copies: one call
    assert len(rollouts.completions) == 8 and rollouts.group_ids.tolist() == [0] * 4 + [1] * 4
    assert 0 < rollouts.schedule.peak_tokens <= budget


# ---------------------------------------------------------------------------------------------
# TRL's format


def _score_batch(trainer, texts: list[str]) -> dict:
    inputs = [{"prompt": t} for t in texts for _ in range(trainer.num_generations)]
    with torch.no_grad():
        return trainer._generate_and_score_completions(inputs)


def test_batch_format_is_trls(model_dir, dataset, tmp_path):
    """The scored batch has TRL's keys, dtypes and padding; ``sampling_per_token_logps`` holds
    the sampler's log-probabilities, which equal the model's ``log_softmax(logits / T)``."""
    trainer = _trainer(model_dir, dataset, tmp_path, temperature=0.7, top_k=50, top_p=0.95,
                       min_p=0.01)
    texts = [*dataset["prompt"][:2], "w1 w2 w3"]  # prompts of two lengths: left padding
    ref = _score_batch(trainer, texts)
    rt.apply(generation="micro_groups", micro_group_size=2)
    out = _score_batch(trainer, texts)
    assert rt.usage()["generation_micro_groups"] == 1
    assert set(out) == set(ref) | {"sampling_per_token_logps"}
    assert "sampling_per_token_logps" not in ref  # TRL's transformers path has none
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            assert out[key].dtype == value.dtype and out[key].device == value.device, key
            if key not in ("completion_ids", "completion_mask"):
                assert out[key].shape == value.shape, key
    # prompts: identical (TRL pads them itself, left)
    assert torch.equal(out["prompt_ids"], ref["prompt_ids"])
    assert torch.equal(out["prompt_mask"], ref["prompt_mask"])
    ids, mask = out["completion_ids"], out["completion_mask"]
    pad = trainer.processing_class.pad_token_id
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).to(mask.dtype))
    assert bool((ids[mask == 0] == pad).all())  # right padding with the pad id
    rows = [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)]
    _check_trl_completions(rows, set(trainer.eos_token_ids), len(texts) * 4)
    # the sampler's log-probabilities: float32, 0 at padding, = the trainer's recomputation
    lp = out["sampling_per_token_logps"]
    assert lp.dtype == torch.float32 and lp.shape == ids.shape
    assert bool((lp[mask == 0] == 0).all()) and bool((lp[mask == 1] <= 0).all())
    full = torch.cat([out["prompt_ids"], ids], 1)
    am = torch.cat([out["prompt_mask"], mask], 1)
    with torch.no_grad():
        mine, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, full, am,
                                                                ids.shape[1])
    torch.testing.assert_close(lp[mask == 1], mine[mask == 1], rtol=1e-4, atol=1e-4)


def test_truncated_support_makes_the_ratio_unbiased(model_dir, dataset, tmp_path):
    """``apply(truncated_support=True)``: the sampler stores its processed log-probabilities
    and the trainer recomputes them under GRPOConfig's top-k / top-p / min-p at its
    temperature — they agree (ratio 1, all finite); without it the trainer's full-vocabulary
    log-probabilities sit below the sampler's processed ones (mean ratio ≈ the kept mass)."""
    trainer = _trainer(model_dir, dataset, tmp_path, temperature=0.7, top_k=20, top_p=0.6,
                       min_p=0.02)
    texts = [*dataset["prompt"][:2], "w1 w2 w3"]
    rt.apply(generation="micro_groups", micro_group_size=2, truncated_support=True)
    out = _score_batch(trainer, texts)
    ids, mask = out["completion_ids"], out["completion_mask"] == 1
    full = torch.cat([out["prompt_ids"], ids], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)

    def trainer_logps():
        with torch.no_grad():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, full, am,
                                                                  ids.shape[1])
        return lp[mask]

    sampled = out["sampling_per_token_logps"][mask]
    truncated = trainer_logps()
    assert bool(torch.isfinite(truncated).all())
    torch.testing.assert_close(truncated, sampled, rtol=1e-4, atol=1e-4)
    assert rt.usage()["logps_fallback"] == 0
    rt.apply(truncated_support=False)
    whole = trainer_logps()
    ratio = float(torch.exp(whole - sampled).mean())
    assert bool((whole <= truncated + 1e-6).all()) and ratio < 0.97, ratio
    assert float(torch.exp(truncated - sampled).mean()) == pytest.approx(1.0, abs=1e-4)
    assert rt.sampler_filters(trainer) == dict(top_k=20, top_p=0.6, min_p=0.02)


def test_greedy_equals_trl_generate(model_dir, dataset, tmp_path):
    """``do_sample=False`` (generation_kwargs): the completions of TRL's own ``generate``."""
    trainer = _trainer(model_dir, dataset, tmp_path, generation_kwargs={"do_sample": False},
                       num_generations=2)
    rows = _rows(trainer, [*dataset["prompt"][:3], "w9 w8 w7 w6"], 2)
    ref, ref_lp = TRL_GENERATE(trainer, rows, None, {}, 2)
    assert ref_lp is None
    rt.apply(generation="micro_groups")
    out, lp = trainer._generate_single_turn(rows, None, {}, 2)
    _check_trl_completions(out, set(trainer.eos_token_ids), len(rows))
    assert out == ref
    assert [len(x) for x in lp] == [len(c) for c in out]
    assert len({len(c) for c in out}) > 1  # EOS ends some completions early


# ---------------------------------------------------------------------------------------------
# Seeds, schedules, groups


def test_same_seed_same_completions_under_every_schedule(model_dir, dataset, tmp_path):
    runs = {}
    cases = [(s, None) for s in SCHEDULES] + [("length_aware", 40), ("micro_group", 40)]
    for schedule, budget in cases:
        rt.apply(generation="micro_groups", schedule=schedule, kv_budget_tokens=budget,
                 micro_group_size=2)
        trainer = _trainer(model_dir, dataset, tmp_path, num_generations=8, top_k=40)
        rows = _rows(trainer, list(dataset["prompt"][:2]), 8)
        first, lp = trainer._generate_single_turn(rows, None, {}, 8)
        second, _ = trainer._generate_single_turn(rows, None, {}, 8)
        (r,) = rt.last_rollouts(trainer)
        if budget is not None:
            assert r.schedule.peak_tokens <= budget
        runs[(schedule, budget)] = (first, lp, second, r.schedule)
    ref = runs[cases[0]]
    _check_trl_completions(ref[0], {2}, 16)
    assert ref[0] != ref[2]  # each call draws fresh samples
    assert len({tuple(c) for c in ref[0]}) > 1  # members of a group differ
    for case, run in runs.items():
        assert run[0] == ref[0] and run[2] == ref[2], case
        assert run[1] == ref[1], case
    # the schedules did differ in how they ran
    assert runs[("full_group", None)][3].peak_tokens > runs[("micro_group", None)][3].peak_tokens


def test_another_seed_other_completions(model_dir, dataset, tmp_path):
    rt.apply(generation="micro_groups")
    outs = []
    for seed in (0, 1):
        trainer = _trainer(model_dir, dataset, tmp_path, seed=seed)
        rows = _rows(trainer, list(dataset["prompt"][:2]), 4)
        outs.append(trainer._generate_single_turn(rows, None, {}, 4)[0])
    assert outs[0] != outs[1]


def test_plan_groups():
    a, b, c = [5, 6], [7], [8, 9, 10]
    assert plan_groups([a, a, b, b, b, b, c], 4) == {2: [[0, 1]], 4: [[2, 3, 4, 5]], 1: [[6]]}
    assert plan_groups([a] * 8, 4) == {4: [[0, 1, 2, 3], [4, 5, 6, 7]]}
    assert plan_groups([a, b, a], 2) == {1: [[0], [1], [2]]}
    assert plan_groups([], 3) == {}
    with pytest.raises(ValueError, match="group_size"):
        plan_groups([a], 0)


def test_split_copies_form_smaller_groups(model_dir, dataset, tmp_path):
    """A batch holding part of a prompt's copies (several processes, or TRL's tool loop)."""
    rt.apply(generation="micro_groups", micro_group_size=3)
    trainer = _trainer(model_dir, dataset, tmp_path)
    texts = list(dataset["prompt"][:3])
    full = _rows(trainer, texts, 4)
    rows = full[2:] + full[:1]  # 2 copies of p0, 4 of p1, 4 of p2, 1 of p0
    out, lp = trainer._generate_single_turn(rows, None, {}, 4)
    _check_trl_completions(out, set(trainer.eos_token_ids), len(rows))
    assert [len(x) for x in lp] == [len(c) for c in out]
    assert rt.usage()["generation_split_groups"] == 1
    sizes = sorted(int(r.group_ids.numel() // (int(r.group_ids.max()) + 1))
                   for r in rt.last_rollouts(trainer))
    assert sizes == [1, 2, 4]
    assert rt.usage()["generation_micro_groups"] == 1


def test_min_p_passes_through_generate_groups(model_dir):
    """``generate_groups(min_p=1.0)`` keeps only the most likely token: top-k 1's output."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [torch.tensor([5, 9, 14, 3]), torch.tensor([40, 41])]
    kw = dict(group_size=2, max_new_tokens=6, seed=3, eos_token_id=2)
    a = rlkern.generate_groups(model, prompts, min_p=1.0, **kw)
    b = rlkern.generate_groups(model, prompts, top_k=1, **kw)
    c = rlkern.generate_groups(model, prompts, **kw)
    assert a.completions == b.completions and a.completions != c.completions


# ---------------------------------------------------------------------------------------------
# Options that cannot be honoured, apply / remove


def test_repetition_penalty_raises(model_dir, dataset, tmp_path):
    rt.apply(generation="micro_groups")
    trainer = _trainer(model_dir, dataset, tmp_path, repetition_penalty=1.1, max_steps=1)
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.1"):
        check_generation_config(trainer)  # before training, for users who want it early
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.1"):
        trainer.train()
    assert rt.usage()["generation_micro_groups"] == 0


def test_unsupported_generation_options_raise(model_dir, dataset, tmp_path):
    rt.apply(generation="micro_groups")
    trainer = _trainer(model_dir, dataset, tmp_path,
                       generation_kwargs={"no_repeat_ngram_size": 2, "num_beams": 2})
    rows = _rows(trainer, list(dataset["prompt"][:1]), 4)
    with pytest.raises(ValueError, match="no_repeat_ngram_size=2, num_beams=2"):
        trainer._generate_single_turn(rows, None, {}, 4)
    trainer = _trainer(model_dir, dataset, tmp_path)
    with pytest.raises(ValueError, match="images"):
        trainer._generate_single_turn(rows, [[object()]] * 4, {}, 4)
    trainer.use_vllm = True  # what GRPOConfig(use_vllm=True) sets (vLLM is not installed)
    with pytest.raises(ValueError, match="use_vllm"):
        trainer._generate_single_turn(rows, None, {}, 4)


def test_budget_below_one_member_raises(model_dir, dataset, tmp_path):
    rt.apply(generation="micro_groups", kv_budget_tokens=4)  # < one 6-token prompt
    trainer = _trainer(model_dir, dataset, tmp_path)
    with pytest.raises(ValueError, match="kv_budget"):
        trainer._generate_single_turn(_rows(trainer, list(dataset["prompt"][:1]), 4),
                                      None, {}, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(generation="beam"), "generation must be one of"),
    (dict(kv_budget_tokens=64), "generation='micro_groups'"),
    (dict(schedule="micro_group"), "generation='micro_groups'"),
    (dict(generation="micro_groups", schedule="fifo"), "schedule must be one of"),
    (dict(generation="micro_groups", kv_budget_tokens=0), "kv_budget_tokens"),
    (dict(generation="micro_groups", kv_budget_tokens=1.5), "kv_budget_tokens"),
    (dict(generation="micro_groups", micro_group_size=0), "micro_group_size"),
])
def test_apply_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rt.apply(**kwargs)
    assert not rt.is_applied()


def test_apply_remove_generation():
    originals = {n: GRPOTrainer.__dict__[n] for n in (*rt.PATCHED_METHODS, GENERATION_METHOD)}
    rt.apply()
    assert GRPOTrainer.__dict__[GENERATION_METHOD] is originals[GENERATION_METHOD]
    rt.apply(generation="micro_groups", kv_budget_tokens=128)
    patched = GRPOTrainer.__dict__[GENERATION_METHOD]
    assert patched is not originals[GENERATION_METHOD]
    for n in rt.PATCHED_METHODS:
        assert GRPOTrainer.__dict__[n] is not originals[n]
    rt.apply()  # keeps the generation patch (and rt.patched() with it)
    assert GRPOTrainer.__dict__[GENERATION_METHOD] is patched
    with rt.patched():
        assert GRPOTrainer.__dict__[GENERATION_METHOD] is patched
    assert GRPOTrainer.__dict__[GENERATION_METHOD] is patched
    rt.remove()
    rt.remove()
    assert not rt.is_applied()
    for n, fn in originals.items():
        assert GRPOTrainer.__dict__[n] is fn
    # generation only while applied: patched() alone leaves TRL's
    with rt.patched():
        assert GRPOTrainer.__dict__[GENERATION_METHOD] is originals[GENERATION_METHOD]


# ---------------------------------------------------------------------------------------------
# Peak KV memory at num_generations = 16


def _cache_tokens(cache) -> int:
    """Resident KV tokens of a transformers cache: ``batch · length``, summed over the cache
    (each token's K and V of every layer; the same bytes per token for both paths)."""
    layers = getattr(cache, "layers", [])
    keys = getattr(layers[0], "keys", None) if layers else None
    if not isinstance(keys, torch.Tensor) or keys.dim() < 2:
        return 0
    return keys.shape[0] * keys.shape[-2]


class _LiveKV:
    """Peak of the KV tokens held by every live cache, sampled after each model call and each
    cache copy. Caches are found as they pass through the model (inputs and outputs) or are
    copied (generate_groups copies a prompt's prefix cache per member); weak references let
    a freed cache drop out at once (CPython frees on the last reference), so the count is
    deterministic."""

    def __init__(self, model, monkeypatch):
        self.caches: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)
        deepcopy = gen_module.copy.deepcopy

        def tracked_deepcopy(obj, *args):
            out = deepcopy(obj, *args)
            self._see(out)
            return out

        monkeypatch.setattr(gen_module, "copy", types.SimpleNamespace(deepcopy=tracked_deepcopy))

    def _see(self, *caches) -> None:
        for cache in caches:
            if cache is not None and hasattr(cache, "layers"):
                self.caches.add(cache)
        self.peak = max(self.peak, sum(_cache_tokens(c) for c in self.caches))

    def _hook(self, module, args, kwargs, output) -> None:
        self._see(kwargs.get("past_key_values"), getattr(output, "past_key_values", None))


def test_generation_peak_kv_lower_than_trl_generate(model_dir, dataset, tmp_path, monkeypatch):
    G = 16
    trainer = _trainer(model_dir, dataset, tmp_path, num_generations=G,
                       per_device_train_batch_size=G)
    rows = _rows(trainer, list(dataset["prompt"][:2]), G)  # 32 completions on both paths
    peaks, outs = {}, {}
    for name in ("trl", "rlkern"):
        if name == "rlkern":
            rt.apply(generation="micro_groups")  # default: length_aware, m = G // 8 = 2
        live = _LiveKV(trainer.model, monkeypatch)
        try:
            outs[name], _ = trainer._generate_single_turn(rows, None, {}, G)
        finally:
            live.handle.remove()
        peaks[name] = live.peak
    assert len(outs["trl"]) == len(outs["rlkern"]) == 2 * G
    (r,) = rt.last_rollouts(trainer)
    print(f"\npeak KV tokens, 2 prompts × {G} completions of ≤ {MAX_NEW} tokens: TRL generate "
          f"{peaks['trl']}, rlkern (measured) {peaks['rlkern']}, rlkern scheduler's count "
          f"{r.schedule.peak_tokens}")
    assert 0 < peaks["rlkern"] < 0.5 * peaks["trl"], peaks
    # TRL's generate holds every row's prompt and completion at once
    assert peaks["trl"] >= 2 * G * (6 + max(len(c) for c in outs["trl"]) - 1)
