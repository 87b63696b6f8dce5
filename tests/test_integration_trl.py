"""``rlkern.integrations.trl`` against TRL's real ``GRPOTrainer`` (TRL 1.16) on CPU.

* Training parity: the same seeded 4-step run (``num_iterations=2``, so every other step is
  off-policy and clips) with and without the patch; per-step ``loss`` and ``grad_norm`` from
  ``trainer.state.log_history`` agree to 1e-3 relative, and so do TRL's metrics (same keys).
* Loss parity for every TRL loss type and its options: ``GRPOTrainer._compute_loss`` (TRL's
  own) vs the patched one on one batch: loss, every parameter's gradient, the metrics.
* Log-probability parity of the fused head with an ``lm_head`` bias, tied embeddings and a
  temperature; the fallback path; ``remove()`` restoring TRL's methods.
* Peak memory of the log-probability computation (forward + backward) at V = 32768.

The model is a randomly initialised 2-layer Llama (vocab 512, hidden 64) saved with a
word-level tokenizer to a temp dir (no downloads), as /work/shared/PARITY.md describes. Its
EOS row of ``lm_head`` is scaled up so that completions end at different lengths (padding
and the masks are exercised). Runs use ``bf16=False``: under CPU bf16 autocast (GRPOConfig's
default) TRL's head and rlkern's both round logits tiles and their gradients to bf16, each in
its own order, and the gradients are then ~0.4 % from float64 (each), too coarse a test.
"""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16",
                          reason="the TRL integration targets TRL 1.16 (not installed or older)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import rlkern.integrations.trl as rt  # noqa: E402

# transformers 5 deprecates the gradient-checkpointing names that TRL's trainer still calls
pytestmark = [pytest.mark.parity,
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")]

VOCAB, HIDDEN = 512, 64
REL_TOL = 1e-3
ABS_TOL = 1e-6  # on-policy steps have a loss of ~0 (mean advantage 0): relative means nothing


def _tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


def _save_model(path, vocab: int) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # EOS likely after some tokens: completions of varying length
        model.lm_head.weight[2] = torch.randn(HIDDEN) * 0.6
    model.save_pretrained(path)
    _tokenizer(vocab).save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    return [len(c.split()) / 8 + (0.5 if "w7" in c.split() else 0.0) for c in completions]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The model is tiny: one intra-op thread is faster than two on a shared 2-core machine
    (no thread hand-offs per 64-wide matmul) and keeps the runs' timing steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return _save_model(tmp_path_factory.mktemp("tiny_llama"), VOCAB)


@pytest.fixture(scope="module")
def dataset():
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(6)) for i in range(32)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _config(out_dir, **overrides) -> GRPOConfig:
    kwargs = dict(output_dir=str(out_dir), use_cpu=True, report_to=[], save_strategy="no",
                  seed=0, bf16=False, num_iterations=2, max_steps=4, logging_steps=1,
                  per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
                  learning_rate=1e-3, disable_tqdm=True)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOConfig(**kwargs)


def _train(model_dir, dataset, out_dir, *, patch: bool, **overrides) -> tuple[list, dict]:
    rt.remove()
    rt.reset_usage()
    if patch:
        rt.apply()
    lora = overrides.pop("lora", None)
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft", reason="peft is not installed (the parity extra)")
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj", "up_proj"])
    try:
        trainer = GRPOTrainer(model=model_dir, reward_funcs=_reward, train_dataset=dataset,
                              args=_config(out_dir, **overrides), peft_config=peft_config)
        trainer.train()
    finally:
        rt.remove()
    return trainer.state.log_history, rt.usage()


# Each case: GRPOConfig overrides; every TRL loss type. The grpo case adds the KL to
# a reference model (beta > 0, TRL loads it from the model's path) and the sequence-level
# importance ratio (GSPO); luspo requires the sequence level. More options are checked batch
# by batch below (test_compute_loss_parity).
TRAIN_CASES = {
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "grpo-beta-sequence": dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence"),
    "bnpo": dict(loss_type="bnpo"),
    "cispo": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    # under bf16 autocast: the backbone in bf16, the head cast to fp32 on both sides
    "dapo-fp32-head": dict(loss_type="dapo", cast_lm_head_to_fp32=True, bf16=True),
    # a peft LoRA model, adapters on the backbone (TRL 1.16 refuses one on lm_head)
    "dapo-peft-lora": dict(loss_type="dapo", lora=True),
}
_BASELINES: dict[str, list] = {}


@pytest.fixture(scope="module")
def baselines(model_dir, dataset, tmp_path_factory):
    """The unpatched runs, trained once per case for the module."""
    def get(case: str) -> list:
        if case not in _BASELINES:
            out = tmp_path_factory.mktemp(f"base_{case}")
            _BASELINES[case], used = _train(model_dir, dataset, out, patch=False,
                                            **TRAIN_CASES[case])
            assert used["logps_rlkern"] == used["loss_rlkern"] == 0
        return _BASELINES[case]
    return get


def _close(a: float, b: float, rel: float = REL_TOL, abs_: float = ABS_TOL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_parity(case, model_dir, dataset, baselines, tmp_path):
    base = baselines(case)
    ours, used = _train(model_dir, dataset, tmp_path, patch=True, **TRAIN_CASES[case])
    # the rlkern paths really ran, with no fallback
    assert used["logps_rlkern"] > 0 and used["loss_rlkern"] == 4, used
    assert used["logps_fallback"] == used["loss_fallback"] == 0, used
    steps_a = [h for h in base if "loss" in h and "grad_norm" in h]
    steps_b = [h for h in ours if "loss" in h and "grad_norm" in h]
    assert len(steps_a) == len(steps_b) == 4
    worst_rel, worst_abs = 0.0, 0.0
    for a, b in zip(steps_a, steps_b, strict=True):
        assert set(a) == set(b), f"logged keys differ: {set(a) ^ set(b)}"
        for key in ("loss", "grad_norm"):
            assert _close(a[key], b[key]), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
            worst_abs = max(worst_abs, abs(a[key] - b[key]))
            if abs(a[key]) > 1e-3:
                worst_rel = max(worst_rel, abs(a[key] - b[key]) / abs(a[key]))
        for key in a:
            if key.startswith(("clip_ratio", "kl", "entropy", "cispo")):
                assert _close(a[key], b[key], 1e-3, 1e-5), f"step {a['step']} {key}: " \
                    f"{a[key]} vs {b[key]}"
    if "clip_ratio/region_mean" in steps_a[1]:  # the off-policy step exercised the clip
        assert steps_a[1]["clip_ratio/region_mean"] > 0
    print(f"\n{case}: loss / grad_norm over 4 steps: max relative diff {worst_rel:.2e} "
          f"(values > 1e-3), max absolute diff {worst_abs:.2e}")


# ---------------------------------------------------------------------------------------------
# One batch through _compute_loss: every loss type and option


@pytest.fixture(scope="module")
def trainer(model_dir, dataset, tmp_path_factory):
    rt.remove()
    out = tmp_path_factory.mktemp("one_batch")
    t = GRPOTrainer(model=model_dir, reward_funcs=_reward, train_dataset=dataset,
                    args=_config(out, beta=0.0))
    t.current_gradient_accumulation_steps = 1  # set by Trainer.train(); not trained here
    return t


def _batch(B: int = 8, P: int = 6, K: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, K + 1, (B,), generator=g)
    lens[0] = 0  # an empty completion (every token masked)
    completion_mask = (torch.arange(K)[None] < lens[:, None]).long()
    return {
        "prompt_ids": torch.randint(3, VOCAB, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, VOCAB, (B, K), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum() * 2,  # a generation batch of 2 windows
    }


_LOSS_BATCH: list[dict] = []


def _with_logps(trainer, inputs: dict, seed: int = 2) -> dict:
    """Old / reference logprobs near the current policy (ratios around the clip range)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        lp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, am, inputs["completion_ids"].shape[1])
    out = dict(inputs)
    out["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    out["ref_per_token_logps"] = lp + 0.5 * torch.randn(lp.shape, generator=g)
    return out


def _loss_batch(trainer) -> dict:
    """One batch for every loss case (the weights never change: no optimizer step here)."""
    if not _LOSS_BATCH:
        _LOSS_BATCH.append(_with_logps(trainer, _batch()))
    return _LOSS_BATCH[0]


LOSS_CASES = {
    **{lt: dict(loss_type=lt) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo",
                                          "luspo")},
    "grpo-kl-bias-corr": dict(loss_type="grpo", beta=0.04),
    "dapo-kl-no-bias-corr": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
    "grpo-delta-cliphigher": dict(loss_type="grpo", delta=1.3, epsilon_high=0.28),
    "grpo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "grpo-sequence-kl": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05),
    "sapo-sequence": dict(loss_type="sapo", importance_sampling_level="sequence"),
    "luspo-sequence-kl": dict(loss_type="luspo", importance_sampling_level="sequence",
                              beta=0.04),
    "dapo-entropy-mask-bonus": dict(loss_type="dapo", top_entropy_quantile=0.4,
                                    entropy_coef=0.01),
    "bnpo-entropy-bonus-ga2": dict(loss_type="bnpo", entropy_coef=0.02, ga=2),
    "cispo-ga2": dict(loss_type="cispo", ga=2),
    "grpo-off-policy-mask": dict(loss_type="grpo", off_policy_mask_threshold=0.02),
    # vLLM's importance-sampling ratio as TRL hands it over: (B, T) token / (B, 1) sequence
    "dapo-vllm-is-token": dict(loss_type="dapo", vllm_is="token"),
    "sapo-vllm-is-sequence-offpolicy": dict(loss_type="sapo", vllm_is="sequence",
                                            off_policy_mask_threshold=0.02),
    "vespo-params-kl": dict(loss_type="vespo", beta=0.04, vespo_k_pos=1.5,
                            vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=0.0),
    "vespo-entropy-mask-bonus-ga2": dict(loss_type="vespo", top_entropy_quantile=0.4,
                                         entropy_coef=0.01, ga=2),
    "vespo-vllm-is-token": dict(loss_type="vespo", vllm_is="token"),
    "vespo-vllm-is-token-offpolicy": dict(loss_type="vespo", vllm_is="token",
                                          off_policy_mask_threshold=0.02),
    "vespo-eval": dict(loss_type="vespo", eval=True),
    "dr_grpo-eval": dict(loss_type="dr_grpo", eval=True),
    "dapo-eval": dict(loss_type="dapo", eval=True),
}


def _configure(trainer, case: dict) -> None:
    args = trainer.args
    trainer.loss_type = case["loss_type"]
    trainer.beta = case.get("beta", 0.0)
    trainer.epsilon_low = 0.2
    trainer.epsilon_high = case.get("epsilon_high", 0.2)
    trainer.importance_sampling_level = case.get("importance_sampling_level", "token")
    trainer.top_entropy_quantile = case.get("top_entropy_quantile", 1.0)
    trainer.entropy_coef = case.get("entropy_coef", 0.0)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
    trainer.current_gradient_accumulation_steps = case.get("ga", 1)
    args.delta = case.get("delta")
    args.use_bias_correction_kl = case.get("use_bias_correction_kl", True)
    args.steps_per_generation = 2
    for name, default in (("vespo_k_pos", 2.0), ("vespo_lambda_pos", 3.0), ("vespo_k_neg", 3.0),
                          ("vespo_lambda_neg", 2.0)):
        setattr(args, name, case.get(name, default))
    trainer.off_policy_mask_threshold = case.get("off_policy_mask_threshold")
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = "vllm_is" in case
    trainer.model.train(not case.get("eval", False))


def _loss_and_grads(fn, trainer, inputs) -> tuple[float, dict, dict]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = fn(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    metrics = {mode: dict(m) for mode, m in trainer._metrics.items() if m}
    return float(loss.detach()), grads, metrics


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_compute_loss_parity(name, trainer):
    rt.remove()
    case = LOSS_CASES[name]
    _configure(trainer, case)
    try:
        inputs = _loss_batch(trainer)
        if "vllm_is" in case:
            B, T = inputs["completion_mask"].shape
            shape = (B, T) if case["vllm_is"] == "token" else (B, 1)
            ratio = torch.rand(shape, generator=torch.Generator().manual_seed(8)) * 2.5
            ratio = ratio.masked_fill(ratio > 2, 0.0)
            if case["loss_type"] == "vespo":
                # TRL's ratio is exp(0) = 1 at padding, and vespo sums its logs over every
                # position (rlkern: over the valid tokens, equal then)
                ratio = ratio.masked_fill(inputs["completion_mask"] == 0, 1.0)
            inputs = {**inputs, "importance_sampling_ratio": ratio}
        original = GRPOTrainer.__dict__["_compute_loss"]
        rt.reset_usage()
        loss_a, grads_a, metrics_a = _loss_and_grads(original, trainer, inputs)
        loss_b, grads_b, metrics_b = _loss_and_grads(rt.compute_loss, trainer, inputs)
        assert rt.usage()["loss_rlkern"] == 1 and rt.usage()["loss_fallback"] == 0
    finally:
        _configure(trainer, dict(loss_type="dapo"))
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5, abs_tol=1e-7), (loss_a, loss_b)
    assert set(grads_a) == set(grads_b)
    for n, ga in grads_a.items():
        scale = float(ga.norm())
        diff = float((ga - grads_b[n]).norm())
        assert diff <= 1e-5 * scale + 1e-9, f"{n}: |Δgrad| {diff:.3e} vs |grad| {scale:.3e}"
    assert metrics_a.keys() == metrics_b.keys()
    for mode, ma in metrics_a.items():
        assert ma.keys() == metrics_b[mode].keys(), (ma.keys(), metrics_b[mode].keys())
        for key, values in ma.items():
            for x, y in zip(values, metrics_b[mode][key], strict=True):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) or (
                    math.isnan(x) and math.isnan(y)), f"{key}: {x} vs {y}"


def test_compute_loss_adaptive_entropy(trainer):
    """The adaptive entropy controller takes the rlkern path (no fallback) and matches TRL's
    loss (eval mode: the controller's state does not move between the runs; train-mode
    windows and whole runs are in tests/test_integration_trl_softcap.py)."""
    _configure(trainer, dict(loss_type="dapo", entropy_coef=0.01, eval=True))
    trainer.use_adaptive_entropy = True
    trainer._entropy_bonus_enabled = True
    trainer._last_world_entropy = 0.0  # at or below the target: the bonus applies
    try:
        inputs = _loss_batch(trainer)
        rt.reset_usage()
        loss_a, grads_a, _ = _loss_and_grads(GRPOTrainer.__dict__["_compute_loss"], trainer,
                                             inputs)
        loss_b, grads_b, _ = _loss_and_grads(rt.compute_loss, trainer, inputs)
    finally:
        trainer.use_adaptive_entropy = False
        trainer._last_world_entropy = math.inf
        _configure(trainer, dict(loss_type="dapo"))
    assert rt.usage()["loss_fallback"] == 0 and rt.usage()["loss_rlkern"] == 1
    assert _close(loss_a, loss_b, 1e-5, 1e-7)
    for n, g in grads_a.items():
        assert float((g - grads_b[n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


# ---------------------------------------------------------------------------------------------
# Log-probabilities: bias, tied embeddings, temperature; fallback


def _logps_and_grads(fn, trainer, model, ids, am, K, weights):
    model.zero_grad(set_to_none=True)
    lp, ent, _ = fn(trainer, model, ids, am, K, compute_entropy=True)
    ((lp * weights).sum() + (ent * weights.flip(0)).sum()).backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}


def _trl_and_rlkern_logps(trainer, model, seed: int):
    """TRL's and rlkern's log-probs, entropies and gradients on one batch; rlkern's path must
    be taken (no fallback)."""
    inputs = _batch(seed=seed)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    K = inputs["completion_ids"].shape[1]
    w = torch.randn(ids.shape[0], K, generator=torch.Generator().manual_seed(seed + 1))
    rt.reset_usage()
    a = _logps_and_grads(GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"],
                         trainer, model, ids, am, K, w)
    b = _logps_and_grads(rt.per_token_logps_and_entropies, trainer, model, ids, am, K, w)
    assert rt.usage()["logps_rlkern"] == 1 and rt.usage()["logps_fallback"] == 0
    return inputs, a, b


@pytest.mark.parametrize("variant", ["plain", "bias", "tied", "temperature"])
def test_logps_parity(variant, trainer):
    rt.remove()
    model = trainer.model
    head, temperature = model.lm_head, trainer.temperature
    forward = model.__dict__.get("forward")
    try:
        if variant == "bias":
            biased = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
            with torch.no_grad():
                biased.weight.copy_(head.weight)
                biased.bias.copy_(torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)))
            model.lm_head = biased
        elif variant == "tied":
            tied = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
            tied.weight = model.model.embed_tokens.weight
            model.lm_head = tied
        elif variant == "temperature":
            # TRL's head takes the temperature when it is added (at trainer init)
            trainer.temperature = 0.7
            add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        inputs, a, b = _trl_and_rlkern_logps(trainer, model, seed=5)
    finally:
        rt.remove()  # take the forward wrapper off again
        model.lm_head, trainer.temperature = head, temperature
        model.forward = forward
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    assert (b[0][inputs["completion_mask"] == 0] == 0).all()
    assert set(a[2]) == set(b[2])
    if variant == "bias":
        assert "lm_head.bias" in b[2]
    for n, g in a[2].items():
        assert float((g - b[2][n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


def test_logps_fallback_bad_logit_softcapping(trainer):
    """A model whose soft-capping value is not a finite float > 0 is left to TRL's head (no
    error, counted). Valid caps take the rlkern path: tests/test_integration_trl_softcap.py."""
    rt.remove()
    text_config = trainer.model.config
    inputs = _batch(seed=6)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    text_config.final_logit_softcapping = -30.0
    try:
        rt.reset_usage()
        with torch.no_grad():
            lp, ent, aux = rt.per_token_logps_and_entropies(trainer, trainer.model, ids, am, 12,
                                                            compute_entropy=True)
            ref, _, _ = GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"](
                trainer, trainer.model, ids, am, 12)
    finally:
        del text_config.final_logit_softcapping
    assert rt.usage() == {"logps_rlkern": 0, "logps_fallback": 1, "loss_rlkern": 0,
                          "loss_fallback": 0, "generation_micro_groups": 0,
                          "generation_split_groups": 0}
    assert torch.equal(lp, ref) and ent is not None and aux is None


def _scaled_model(kind: str) -> torch.nn.Module:
    """A tiny random model of a family that scales its logits (the trainer's vocabulary)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(7)
    if kind == "cohere":  # logits * logit_scale
        return transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.3,
                                                                        **common))
    return transformers.GraniteForCausalLM(  # logits / logits_scaling
        transformers.GraniteConfig(logits_scaling=4.0, **common))


@pytest.mark.parametrize(("fields", "scale"), [
    ({}, 1.0),
    ({"logit_scale": 0.25}, 0.25),                  # Cohere: logits * logit_scale
    ({"logits_scaling": 4.0}, 0.25),                # Granite: logits / logits_scaling
    ({"lm_head_multiplier": 3.0}, 3.0),             # Falcon-H1: lm_head(h) * multiplier
    ({"logit_scale": 2.0, "logits_scaling": 8.0}, 0.25),
    ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, 4.0),  # HyperCLOVA X multiplies
    ({"output_multiplier": 2.0}, 2.0),
])
def test_logit_multiplier(fields, scale):
    config = types.SimpleNamespace(**fields)
    assert rt.logit_multiplier(config) == pytest.approx(scale)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, "big"])
def test_logps_fallback_bad_logit_scale(value, trainer):
    """A scale the temperature cannot absorb (≤ 0, inf, not a number): TRL's head, said why."""
    config = trainer.model.config
    config.logit_scale = value
    try:
        reason = rt._logps_fallback_reason(trainer.model)
    finally:
        del config.logit_scale
    assert reason is not None and "scales its logits" in reason


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["cohere", "granite"])
def test_logps_parity_logit_scaling(kind, temperature, trainer):
    """Models that scale their logits (Cohere's logit_scale, Granite's logits_scaling) take
    the fused path — the scale folds into the temperature — and match TRL's own head."""
    rt.remove()
    model = _scaled_model(kind)
    # TRL's method reads log-probs from its own fused head, added at trainer init
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    saved = trainer.temperature
    trainer.temperature = temperature
    try:
        _, a, b = _trl_and_rlkern_logps(trainer, model, seed=8)
    finally:
        rt.remove()
        trainer.temperature = saved
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    for n, g in a[2].items():
        assert float((g - b[2][n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


# ---------------------------------------------------------------------------------------------
# apply / remove


def test_apply_remove_restores_trl(trainer):
    rt.remove()
    names = rt.PATCHED_METHODS
    originals = {n: GRPOTrainer.__dict__[n] for n in names}
    rt.apply()
    rt.apply()  # idempotent
    assert rt.is_applied()
    for n in names:
        assert GRPOTrainer.__dict__[n] is not originals[n]
    # a trainer built before apply() uses the patch too (class attributes)
    assert trainer._compute_loss.__func__ is GRPOTrainer.__dict__["_compute_loss"]
    # the first rlkern call wraps the model's forward; remove() takes it off again
    forward_before = trainer.model.__dict__.get("forward")
    inputs = _batch(seed=7)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 12)
    assert getattr(trainer.model.forward, "_rlkern_fused", False)
    rt.remove()
    rt.remove()  # idempotent
    assert not rt.is_applied()
    for n in names:
        assert GRPOTrainer.__dict__[n] is originals[n]
    assert trainer.model.__dict__.get("forward") is forward_before
    with rt.patched():
        assert rt.is_applied()
        assert GRPOTrainer.__dict__["_compute_loss"] is not originals["_compute_loss"]
    assert not rt.is_applied()
    assert GRPOTrainer.__dict__["_compute_loss"] is originals["_compute_loss"]


# ---------------------------------------------------------------------------------------------
# Peak memory at a larger vocabulary


def test_peak_memory_lower_at_large_vocab(dataset, tmp_path):
    harness = pytest.importorskip("rlkern.bench.harness", reason="rlkern.bench not importable")
    if not harness.cpu_peak_supported():
        pytest.skip(reason="no /proc/self/clear_refs: the peak resident set cannot be reset")
    rt.remove()
    vocab = 32768
    path = _save_model(tmp_path / "big_vocab", vocab)
    t = GRPOTrainer(model=path, reward_funcs=_reward, train_dataset=dataset,
                    args=_config(tmp_path / "out"))
    B, P, K = 4, 16, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, P + K), generator=g)
    am = torch.ones(B, P + K, dtype=torch.long)
    model = t.model

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            lp, ent, _ = fn(t, model, ids, am, K, compute_entropy=True)
            (lp.sum() + ent.sum()).backward()
        return run

    original = GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"]
    try:
        peaks = {}
        for name, fn in (("trl", original), ("rlkern", rt.per_token_logps_and_entropies)):
            step(fn)()  # warm-up: lazy initialisation, the forward wrapper, grad buffers
            peaks[name] = harness.peak_extra_memory(step(fn))
    finally:
        rt.remove()
    mib = {k: v / 2**20 for k, v in peaks.items()}
    print(f"\npeak extra memory, logps+entropy fwd+bwd, B={B} P={P} K={K} V={vocab}: "
          f"TRL {mib['trl']:.1f} MiB, rlkern {mib['rlkern']:.1f} MiB")
    # The (B·K, V) float32 logits alone would be 16 MiB; TRL's CPU path forms a
    # (B·(P+K−1), V) float32 tile and several temporaries of that size, rlkern one ~8M-logit
    # tile over the B·K completion rows.
    assert peaks["rlkern"] < 0.5 * peaks["trl"], mib
