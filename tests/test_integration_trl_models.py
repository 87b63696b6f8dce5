"""TRL's log-probabilities through rlkern for model families beyond a plain causal LM:
a vision-language model (a tiny Qwen2-VL with images) and an MoE model with the router's
load-balancing loss (a tiny Qwen3-MoE). TRL's own method prepares the backbone's inputs
(chunking, images sliced per chunk, ``output_router_logits``); rlkern serves the head. Each
is compared with TRL's own fused head: log-probabilities, entropies, the auxiliary loss and
every parameter's gradient; the MoE model also trains 4 steps patched vs unpatched."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[parity]')")
import transformers  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import rlkern.integrations.trl as rt  # noqa: E402
import test_integration_trl as trl_tests  # noqa: E402

pytestmark = trl_tests.pytestmark  # the parity mark and the warning filter

VOCAB, HIDDEN = 300, 64
IMAGE, VISION_START, VISION_END = 290, 292, 293


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, dataset):
    rt.remove()
    path = trl_tests._save_model(tmp_path_factory.mktemp("llama"), 512)
    t = GRPOTrainer(model=path, reward_funcs=trl_tests._reward, train_dataset=dataset,
                    args=trl_tests._config(tmp_path_factory.mktemp("out"), beta=0.0))
    t.current_gradient_accumulation_steps = 1
    return t


@pytest.fixture(scope="module")
def dataset():
    import datasets

    prompts = [" ".join(f"w{(7 * i + j) % 250}" for j in range(6)) for i in range(32)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _qwen2_vl() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Qwen2VLConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=HIDDEN,
                               in_channels=3, patch_size=4, spatial_merge_size=2,
                               temporal_patch_size=2, mlp_ratio=2),
            image_token_id=IMAGE, video_token_id=291, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END)
    return transformers.Qwen2VLForConditionalGeneration(config)


def _vl_batch(B: int = 3, P: int = 8, K: int = 6, seed: int = 0) -> dict:
    """Each prompt holds one 4×4-patch image (4 image tokens after the 2×2 merge)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 280, (B, P + K), generator=g)
    ids[:, 1], ids[:, 2:6], ids[:, 6] = VISION_START, IMAGE, VISION_END
    am = torch.ones_like(ids)
    am[1, -2:] = 0  # a shorter completion
    return dict(input_ids=ids, attention_mask=am, logits_to_keep=K,
                pixel_values=torch.randn(B * 16, 3 * 2 * 4 * 4, generator=g),
                image_grid_thw=torch.tensor([[1, 4, 4]] * B), num_images=[1] * B,
                mm_token_type_ids=(ids == IMAGE).long())


def _run(fn, trainer, model, batch: dict, weights: torch.Tensor, **kw):
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    args = (batch.pop("input_ids"), batch.pop("attention_mask"), batch.pop("logits_to_keep"))
    lp, ent, aux = fn(trainer, model, *args, compute_entropy=True, **kw, **batch)
    loss = (lp * weights).sum() + (ent * weights.flip(0)).sum()
    if aux is not None:
        loss = loss + 3.0 * aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), None if aux is None else aux.detach(), grads


def _compare(trainer, model, batch: dict, **kw) -> None:
    K = batch["logits_to_keep"]
    w = torch.randn(batch["input_ids"].shape[0], K, generator=torch.Generator().manual_seed(9))
    rt.reset_usage()
    a = _run(GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"], trainer, model, batch,
             w, **kw)
    b = _run(rt.per_token_logps_and_entropies, trainer, model, batch, w, **kw)
    usage = rt.usage()
    assert usage["logps_rlkern"] == 1 and usage["logps_fallback"] == 0, usage
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
    assert (b[0][batch["attention_mask"][:, -K:] == 0] == 0).all()
    if a[2] is None:
        assert b[2] is None
    else:
        torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-7)
    assert a[3].keys() == b[3].keys()
    for n, g in a[3].items():
        assert float((g - b[3][n]).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


@pytest.mark.parametrize("batch_size", [None, 1])
def test_vision_language_logps_parity(trainer, batch_size):
    """A tiny Qwen2-VL with one image per prompt: rlkern's head under TRL's own input handling
    (``batch_size=1`` makes TRL slice the image rows per chunk); the vision tower's gradients
    included."""
    model = _qwen2_vl()
    add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    try:
        _compare(trainer, model, _vl_batch(), batch_size=batch_size)
    finally:
        rt.remove()
    assert any(n.startswith("model.visual") for n, _ in model.named_parameters())


def _save_moe(path) -> str:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        output_router_logits=True, router_aux_loss_coef=0.05, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # EOS likely after some tokens: completions of varying length
        model.lm_head.weight[2] = torch.randn(HIDDEN) * 0.6
    model.save_pretrained(path)
    trl_tests._tokenizer(512).save_pretrained(path)
    return str(path)


def test_moe_aux_loss_logps_parity(trainer, tmp_path):
    """A tiny Qwen3-MoE with ``output_router_logits``: log-probs, entropy, TRL's router
    load-balancing loss and every gradient (the router's through the auxiliary loss)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(_save_moe(tmp_path / "moe"))
    add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 512, (4, 14), generator=g)
    am = torch.ones_like(ids)
    am[2, -3:] = 0
    batch = dict(input_ids=ids, attention_mask=am, logits_to_keep=6)
    try:
        _compare(trainer, model, batch, compute_aux_loss=True)
    finally:
        rt.remove()


def test_moe_training_parity(tmp_path, dataset):
    """TRL's GRPOTrainer on the MoE model (``router_aux_loss_coef`` in its loss), patched vs
    unpatched, same seed, 4 steps with ``num_iterations=2``: loss and grad norm to 1e-3, no
    fallback."""
    path = _save_moe(tmp_path / "moe")
    base, _ = trl_tests._train(path, dataset, tmp_path / "a", patch=False)
    logs, usage = trl_tests._train(path, dataset, tmp_path / "b", patch=True)
    assert usage["logps_fallback"] == 0 and usage["loss_fallback"] == 0, usage
    assert usage["logps_rlkern"] > 0 and usage["loss_rlkern"] > 0, usage
    steps = [(x, y) for x, y in zip(base, logs, strict=True) if "loss" in x]
    assert len(steps) == 4
    for x, y in steps:
        assert trl_tests._close(x["loss"], y["loss"]), (x["loss"], y["loss"])
        assert trl_tests._close(x["grad_norm"], y["grad_norm"]), (x["grad_norm"], y["grad_norm"])
        assert math.isfinite(x["aux_loss"]) and trl_tests._close(x["aux_loss"], y["aux_loss"])
