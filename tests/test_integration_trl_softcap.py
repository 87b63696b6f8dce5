"""``rlkern.integrations.trl`` with a soft-capped head (Gemma 2's ``final_logit_softcapping``)
and with TRL's adaptive entropy controller (``use_adaptive_entropy``), against TRL 1.16's real
``GRPOTrainer`` on CPU: both take the rlkern path (zero fallbacks) and match TRL.

* Gemma 2: a tiny random ``Gemma2ForCausalLM`` (vocab 512, hidden 64, cap 1.0 and a wide
  initialisation, so that ``c·tanh(x/c)`` is far from ``x``): TRL's
  ``_get_per_token_logps_and_entropies`` (its fused head, which applies the cap) vs rlkern's on
  one batch (log-probs, entropies, every gradient), and a seeded 4-step run
  (``num_iterations=2``) patched vs unpatched: per-step loss and grad norm to 1e-3 relative.
* Adaptive entropy: ``_compute_loss`` over a window of two micro-batches and an optimizer
  step boundary, TRL's vs rlkern's (loss, gradients, the controller's state and metrics), and
  a seeded 4-step run with gradient accumulation on the tiny Llama of
  tests/test_integration_trl.py.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16",
                          reason="the TRL integration targets TRL 1.16 (not installed or older)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from trl import GRPOTrainer  # noqa: E402

import rlkern.integrations.trl as rt  # noqa: E402
import test_integration_trl as trl_tests  # noqa: E402
from test_integration_trl import _one_thread  # noqa: E402, F401 (its autouse fixture: one thread)

pytestmark = trl_tests.pytestmark  # the parity mark and the warning filter

CAP = 1.0


def _save_gemma2(path) -> str:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=trl_tests.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=128, sliding_window=16, final_logit_softcapping=CAP,
        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config)
    model.save_pretrained(path)
    trl_tests._tokenizer(trl_tests.VOCAB).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    return _save_gemma2(tmp_path_factory.mktemp("tiny_gemma2"))


@pytest.fixture(scope="module")
def dataset():
    """32 prompts of 6 words of the tokenizer's vocabulary."""
    words = [f"w{(5 * i + 1) % 500}" for i in range(32 * 6)]
    return datasets.Dataset.from_dict(
        {"prompt": [" ".join(words[i:i + 6]) for i in range(0, len(words), 6)]})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return trl_tests._save_model(tmp_path_factory.mktemp("tiny_llama_adaptive"), trl_tests.VOCAB)


def _assert_runs_match(base: list, ours: list, used: dict, steps: int = 4) -> None:
    assert used["logps_rlkern"] > 0 and used["loss_rlkern"] > 0, used
    assert used["logps_fallback"] == used["loss_fallback"] == 0, used
    a = [h for h in base if "loss" in h and "grad_norm" in h]
    b = [h for h in ours if "loss" in h and "grad_norm" in h]
    assert len(a) == len(b) == steps
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y), f"logged keys differ: {set(x) ^ set(y)}"
        for key in ("loss", "grad_norm"):
            assert trl_tests._close(x[key], y[key]), f"step {x['step']} {key}: {x[key]} vs {y[key]}"
        for key in x:
            if key.startswith(("clip_ratio", "kl", "entropy")):
                assert trl_tests._close(x[key], y[key], 1e-3, 1e-5), f"step {x['step']} {key}: " \
                    f"{x[key]} vs {y[key]}"


# ---------------------------------------------------------------------------------------------
# Gemma 2: soft-capped logits


@pytest.fixture(scope="module")
def gemma_trainer(gemma_dir, dataset, tmp_path_factory):
    rt.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = GRPOTrainer(model=gemma_dir, reward_funcs=trl_tests._reward, train_dataset=dataset,
                        args=trl_tests._config(tmp_path_factory.mktemp("gemma_batch"), beta=0.0,
                                     temperature=0.8))
    t.current_gradient_accumulation_steps = 1
    return t


def _logps_and_grads(fn, trainer, ids, am, K, weights):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    lp, ent, _ = fn(trainer, model, ids, am, K, compute_entropy=True)
    ((lp * weights).sum() + (ent * weights.flip(0)).sum()).backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}


def test_gemma2_logps_parity(gemma_trainer):
    """TRL's fused head (which caps the logits) vs rlkern's capped epilogue on one batch."""
    trainer = gemma_trainer
    assert trainer.model.config.final_logit_softcapping == CAP
    inputs = trl_tests._batch(seed=11)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    K = inputs["completion_ids"].shape[1]
    w = torch.randn(ids.shape[0], K, generator=torch.Generator().manual_seed(12))
    rt.remove()
    rt.reset_usage()
    try:
        a = _logps_and_grads(GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"],
                             trainer, ids, am, K, w)
        b = _logps_and_grads(rt.per_token_logps_and_entropies, trainer, ids, am, K, w)
        assert rt.usage()["logps_rlkern"] == 1 and rt.usage()["logps_fallback"] == 0
        # the cap is not a no-op on this model: without it the log-probs differ
        trainer.model.config.final_logit_softcapping = None
        with torch.no_grad():
            plain, _, _ = rt.per_token_logps_and_entropies(trainer, trainer.model, ids, am, K)
    finally:
        trainer.model.config.final_logit_softcapping = CAP
        rt.remove()
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    valid = inputs["completion_mask"] == 1
    assert (plain[valid] - a[0][valid]).abs().max() > 0.05
    assert set(a[2]) == set(b[2])
    for n, g in a[2].items():
        assert float((g - b[2][n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


def test_gemma2_bad_softcap_falls_back(gemma_trainer):
    """A cap that is not a finite float > 0 is left to TRL (counted, reason logged)."""
    config = gemma_trainer.model.config
    try:
        for bad in (0.0, -1.0, math.nan, math.inf):
            config.final_logit_softcapping = bad
            reason = rt._logps_fallback_reason(gemma_trainer.model)
            assert reason is not None and "final_logit_softcapping" in reason
        config.final_logit_softcapping = CAP
        assert rt._logps_fallback_reason(gemma_trainer.model) is None
    finally:
        config.final_logit_softcapping = CAP


def test_gemma2_training_parity(gemma_dir, dataset, tmp_path):
    kwargs = dict(loss_type="dapo", temperature=0.8)
    base, used = trl_tests._train(gemma_dir, dataset, tmp_path / "base", patch=False, **kwargs)
    assert used["logps_rlkern"] == used["loss_rlkern"] == 0
    ours, used = trl_tests._train(gemma_dir, dataset, tmp_path / "ours", patch=True, **kwargs)
    assert used["loss_rlkern"] == 4, used
    _assert_runs_match(base, ours, used)


# ---------------------------------------------------------------------------------------------
# The adaptive entropy controller


@pytest.fixture(scope="module")
def llama_trainer(llama_dir, dataset, tmp_path_factory):
    rt.remove()
    t = GRPOTrainer(model=llama_dir, reward_funcs=trl_tests._reward, train_dataset=dataset,
                    args=trl_tests._config(tmp_path_factory.mktemp("adaptive_batch"), beta=0.0,
                                 loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.05,
                                 entropy_coef_delta=0.02, entropy_target=100.0,
                                 top_entropy_quantile=0.5))
    return t


def _window(fn, trainer, batches: list[dict], start_state: dict) -> tuple[list, dict, dict]:
    """Run ``fn`` (a ``_compute_loss``) over an accumulation window of micro-batches in train
    mode, the last one at the optimizer-step boundary. Returns the losses, the summed
    gradients and the controller's state and metrics afterwards."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    for key, value in start_state.items():
        setattr(trainer, key, copy.deepcopy(value))
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.current_gradient_accumulation_steps = len(batches)
    acc = trainer.accelerator
    losses = []
    sync = acc.gradient_state._set_sync_gradients
    try:
        for i, inputs in enumerate(batches):
            sync(i == len(batches) - 1)
            loss = fn(trainer, model, inputs)
            loss.backward()
            losses.append(float(loss.detach()))
    finally:
        sync(True)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    state = {"entropy_coef": trainer.entropy_coef,
             "_last_world_entropy": trainer._last_world_entropy,
             "_entropy_window_stats": trainer._entropy_window_stats,
             "metrics": {k: list(v) for k, v in trainer._metrics["train"].items()}}
    return losses, grads, state


@pytest.mark.parametrize(("last_entropy", "target"), [
    (math.inf, 100.0),  # first window: no measurement yet, no bonus; the coefficient rises
    (1.0, 100.0),  # entropy at or below the target: the bonus applies, the coefficient rises
    (1.0, 0.5),  # above the target: no bonus, the coefficient falls
])
def test_adaptive_entropy_compute_loss_parity(llama_trainer, last_entropy, target):
    trainer = llama_trainer
    trainer.args.entropy_target = target
    batches = [trl_tests._with_logps(trainer, trl_tests._batch(seed=s), seed=s + 1)
               for s in (21, 22)]
    start = {"entropy_coef": 0.05, "_last_world_entropy": last_entropy,
             "_entropy_window_stats": None}
    rt.reset_usage()
    loss_a, grads_a, state_a = _window(GRPOTrainer.__dict__["_compute_loss"], trainer, batches,
                                       start)
    loss_b, grads_b, state_b = _window(rt.compute_loss, trainer, batches, start)
    assert rt.usage()["loss_rlkern"] == 2 and rt.usage()["loss_fallback"] == 0
    for a, b in zip(loss_a, loss_b, strict=True):
        assert trl_tests._close(a, b, 1e-5, 1e-7), (loss_a, loss_b)
    assert set(grads_a) == set(grads_b)
    for n, g in grads_a.items():
        assert float((g - grads_b[n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n
    assert state_a["_entropy_window_stats"] is None and state_b["_entropy_window_stats"] is None
    assert math.isclose(state_a["_last_world_entropy"], state_b["_last_world_entropy"],
                        rel_tol=1e-5)
    assert state_a["entropy_coef"] == pytest.approx(state_b["entropy_coef"], abs=1e-12)
    moved = 0.07 if state_a["_last_world_entropy"] <= target else 0.03
    assert state_b["entropy_coef"] == pytest.approx(moved)
    assert state_a["metrics"].keys() == state_b["metrics"].keys()
    for key, values in state_a["metrics"].items():
        for x, y in zip(values, state_b["metrics"][key], strict=True):
            assert trl_tests._close(x, y, 1e-4, 1e-6), f"{key}: {x} vs {y}"


def test_adaptive_entropy_eval_leaves_the_controller(llama_trainer):
    """In eval mode the controller's state does not move (TRL gates its update on train)."""
    trainer = llama_trainer
    inputs = trl_tests._with_logps(trainer, trl_tests._batch(seed=31), seed=32)
    trainer.entropy_coef, trainer._last_world_entropy = 0.05, 1.0
    trainer._entropy_window_stats = None
    trainer.args.entropy_target = 100.0
    trainer.model.eval()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    try:
        with torch.no_grad():
            loss_a = GRPOTrainer.__dict__["_compute_loss"](trainer, trainer.model, inputs)
            loss_b = rt.compute_loss(trainer, trainer.model, inputs)
    finally:
        trainer.model.train()
    assert trl_tests._close(float(loss_a), float(loss_b), 1e-5, 1e-7)
    assert trainer.entropy_coef == 0.05 and trainer._last_world_entropy == 1.0
    assert trainer._entropy_window_stats is None


def test_adaptive_entropy_training_parity(llama_dir, dataset, tmp_path):
    """4 optimizer steps of two micro-batches each; the entropy target is above the entropy,
    so from the second step on the bonus applies and the coefficient climbs."""
    kwargs = dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.05,
                  entropy_coef_delta=0.02, entropy_target=100.0, gradient_accumulation_steps=2,
                  per_device_train_batch_size=4)
    base, used = trl_tests._train(llama_dir, dataset, tmp_path / "base", patch=False, **kwargs)
    assert used["loss_rlkern"] == 0
    ours, used = trl_tests._train(llama_dir, dataset, tmp_path / "ours", patch=True, **kwargs)
    assert used["loss_rlkern"] == 8, used
    _assert_runs_match(base, ours, used)
    coefs = [h["entropy_coef"] for h in ours if "entropy_coef" in h]
    assert coefs == pytest.approx([0.07, 0.09, 0.11, 0.13])
    assert coefs == pytest.approx([h["entropy_coef"] for h in base if "entropy_coef" in h])


def test_apply_backend_reaches_the_fused_head(gemma_trainer, monkeypatch):
    """``apply(backend=...)`` sets the fused head's backend (the soft-capped torch reference
    here gives TRL's values too); ``remove()`` resets it; a bad name raises."""
    import rlkern

    seen = []
    real = rlkern.linear_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rlkern, "linear_logprobs", spy)
    inputs = trl_tests._batch(seed=13)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    K = inputs["completion_ids"].shape[1]
    with pytest.raises(ValueError, match="backend must be one of"):
        rt.apply(backend="nope")
    try:
        rt.apply(backend="torch")
        rt.apply()  # None: leaves the backend as it is
        with torch.no_grad():
            lp, _, _ = rt.per_token_logps_and_entropies(gemma_trainer, gemma_trainer.model, ids,
                                                        am, K)
    finally:
        rt.remove()
    with torch.no_grad():
        rt.per_token_logps_and_entropies(gemma_trainer, gemma_trainer.model, ids, am, K)
        rt.remove()
        ref, _, _ = GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"](
            gemma_trainer, gemma_trainer.model, ids, am, K)
    assert seen == ["torch", "auto"]
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
