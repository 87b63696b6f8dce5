"""rlkern in verl's fused actor path (``use_fused_kernels=True``) against verl's own code.

:func:`rlkern.integrations.verl_fused.fused_linear_for_ppo` is compared with verl's
``FusedLinearForPPOFunction`` (its ``torch`` backend) and with verl's non-fused actor path
(logits, then ``logprobs_from_logits`` / ``entropy_from_logits``); after
``patch_fused_kernels()`` a tiny Llama patched by verl's own ``patch_forward_with_backends``
(both ``impl_backend`` values; verl's ``triton`` one needs CUDA unpatched) returns verl's
``log_probs`` / ``entropy`` and gradients. verl is optional (``parity`` extra): without it the
module skips with the install hint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_grad
from verl_cases import VERL_MISSING

verl_exp = pytest.importorskip("verl.utils.experimental.torch_functional", reason=VERL_MISSING)
verl_F = pytest.importorskip("verl.utils.torch_functional", reason=VERL_MISSING)  # noqa: N816

from rlkern.integrations import verl_fused as vf  # noqa: E402

pytestmark = pytest.mark.parity

VERL_FORWARD = verl_exp.FusedLinearForPPO.forward


def _inputs(dtype: torch.dtype, shape=(2, 7), h=24, v=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels, temperature):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fn(h, w, labels, temperature)
    (0.7 * lp.sum() - 0.3 * ent.float().sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _verl_torch_backend(h, w, y, t):
    return verl_exp.FusedLinearForPPOFunction.apply(h, w, y, t, 4)  # 4-token chunks


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", [(2, 7), (11,)])
def test_matches_verls_fused_torch_backend_fp32(shape, temperature):
    hidden, weight, labels = _inputs(torch.float32, shape)
    ours = _value_and_grads(vf.fused_linear_for_ppo, hidden, weight, labels, temperature)
    theirs = _value_and_grads(_verl_torch_backend, hidden, weight, labels, temperature)
    for name, a, b in zip(("log_probs", "entropy"), ours[:2], theirs[:2], strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == labels.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in zip(("∂hidden", "∂weight"), ours[2:], theirs[2:], strict=True):
        assert_close_grad(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backend_is_passed_through(backend):
    hidden, weight, labels = _inputs(torch.float32, (2, 7))
    want = vf.fused_linear_for_ppo(hidden, weight, labels)
    got = vf.fused_linear_for_ppo(hidden, weight, labels, backend=backend)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        vf.fused_linear_for_ppo(hidden, weight, labels, backend="numpy")


def test_bf16_as_accurate_as_verl():
    """In bf16 both round the logits to bf16 (a bf16 matmul), then work in float32: judged
    against float64 on the same rounded inputs, rlkern's error is of verl's size (the rounding
    of the logits dominates both)."""
    hidden, weight, labels = _inputs(torch.bfloat16, (3, 9), h=64, v=301, seed=4)
    ref = _value_and_grads(vf.fused_linear_for_ppo, hidden.double(), weight.double(), labels,
                           1.0)
    ours = _value_and_grads(vf.fused_linear_for_ppo, hidden, weight, labels, 1.0)
    theirs = _value_and_grads(_verl_torch_backend, hidden, weight, labels, 1.0)
    for i, name in enumerate(("log_probs", "entropy", "∂hidden", "∂weight")):
        err = lambda out, i=i: float((out[i].double() - ref[i]).abs().max())
        assert err(ours) <= 2 * err(theirs) + 1e-3, f"{name}: {err(ours)} vs verl {err(theirs)}"
    assert ours[1].dtype == torch.float32  # the function's own default


def test_patch_routes_both_backends_and_unpatch_restores():
    lce = pytest.importorskip("verl.utils.kernel.linear_cross_entropy")
    verl_lce = lce.linear_cross_entropy
    hidden, weight, labels = _inputs(torch.float32)
    patched = vf.patch_fused_kernels()
    try:
        assert vf.patch_fused_kernels() == patched  # idempotent
        assert vf.is_fused_patched()
        assert verl_exp.FusedLinearForPPO.forward is not VERL_FORWARD
        for backend in ("torch", "liger"):
            lp, ent = verl_exp.FusedLinearForPPO(impl_backend=backend)(hidden, weight, labels,
                                                                      temperature=0.8)
            ref = vf.fused_linear_for_ppo(hidden, weight, labels, 0.8)
            torch.testing.assert_close(lp, ref[0], rtol=0, atol=0)
            assert ent.dtype == hidden.dtype  # verl's torch backend's entropy dtype
            h16, w16 = hidden.bfloat16(), weight.bfloat16()  # where the dtypes differ
            lp16, ent16 = verl_exp.FusedLinearForPPO(impl_backend=backend)(h16, w16, labels)
            assert lp16.dtype == torch.float32 and ent16.dtype == torch.bfloat16
            torch.testing.assert_close(ent16, vf.fused_linear_for_ppo(h16, w16, labels)[1]
                                       .bfloat16(), rtol=0, atol=0)
        lp, ent = lce.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
        assert vf.fused_linear_for_ppo(hidden.bfloat16(), weight.bfloat16(), labels)[1].dtype \
            == torch.float32  # the triton route's entropy: the function's default
        torch.testing.assert_close(ent, vf.fused_linear_for_ppo(hidden, weight, labels, 0.8)[1])
        with pytest.raises(ValueError, match="per-token values only"):
            lce.linear_cross_entropy(hidden, weight, labels, 0.8, "mean")
        with pytest.raises(ValueError, match="dist_process_group=None"):
            lce.linear_cross_entropy(hidden, weight, labels, 0.8, "none", object())
        with pytest.raises(ValueError, match="must match hidden_states"):
            vf.fused_linear_for_ppo(hidden, weight, labels[:, :-1])
    finally:
        vf.unpatch_fused_kernels()
    assert verl_exp.FusedLinearForPPO.forward is VERL_FORWARD
    assert lce.linear_cross_entropy is verl_lce
    assert not vf.is_fused_patched()


def test_truncated_support_filters():
    """``patch_fused_kernels(top_k=, top_p=)``: verl's fused path returns the log-probs and
    entropy of the sampler's truncated distribution; verl's "off" values are off; unpatching
    clears them; the plugin's environment string parses (bad items refused)."""
    import rlkern

    hidden, weight, labels = _inputs(torch.float32, shape=(40,))
    with torch.no_grad():
        labels = (hidden @ weight.T).argsort(1, descending=True)[:, 2]  # often near the edge
    vf.patch_fused_kernels(top_k=6, top_p=0.8, min_p=0.0)
    try:
        assert vf._FILTERS == {"top_k": 6, "top_p": 0.8}
        lp, ent = verl_exp.FusedLinearForPPO(impl_backend="torch")(hidden, weight, labels,
                                                                  temperature=0.8)
        ref = rlkern.token_logprobs(torch.nn.functional.linear(hidden, weight), labels,
                                    temperature=0.8, top_k=6, top_p=0.8, return_entropy=True)
        assert torch.equal(torch.isinf(lp), torch.isinf(ref.logprobs))
        assert bool(torch.isinf(lp).any()) and bool(torch.isfinite(lp).any())
        torch.testing.assert_close(lp, ref.logprobs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent, ref.entropy, rtol=1e-6, atol=1e-6)
        vf.patch_fused_kernels(top_k=0, top_p=1.0)  # verl's "off"
        assert vf._FILTERS == {}
    finally:
        vf.unpatch_fused_kernels()
    assert vf._FILTERS == {}
    assert vf.parse_filters("top_k=50, top_p=0.9") == {"top_k": 50.0, "top_p": 0.9}
    assert vf.parse_filters("") == {}
    with pytest.raises(ValueError, match="RLKERN_VERL_TRUNCATED_SUPPORT"):
        vf.parse_filters("temperature=0.7")


def _tiny_llama():
    """A tiny random Llama of its own subclass: verl's patch replaces ``forward`` on the class,
    and must not leak into other tests' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    cls = type("TinyLlama", (transformers.LlamaForCausalLM,), {})
    torch.manual_seed(0)
    return cls(cfg).float()


@pytest.mark.parametrize("impl_backend", ["torch", "triton"])
def test_actor_forward_matches_verls_non_fused_path(impl_backend):
    """verl's model patch + rlkern: the actor's log-probs, entropy and parameter gradients are
    those of verl's non-fused path (full logits, verl's logprobs_from_logits /
    entropy_from_logits). verl's own triton backend cannot run on CPU; rlkern's can."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    temperature = 0.9

    out = model(input_ids=ids)
    logits = out.logits / temperature
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    ref_lp = verl_F.logprobs_from_logits(logits, rolled)
    ref_ent = verl_F.entropy_from_logits(logits)
    (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    patch_forward_with_backends(model, use_fused_kernels=True,
                                fused_kernels_backend=impl_backend)
    vf.patch_fused_kernels()
    try:
        out = model(input_ids=ids, temperature=temperature, return_dict=True)
    finally:
        vf.unpatch_fused_kernels()
    assert out.log_probs.shape == ids.shape and out.log_probs.dtype == torch.float32
    torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.float(), ref_ent, rtol=1e-5, atol=1e-5)
    (out.log_probs.sum() + 0.1 * out.entropy.float().sum()).backward()
    for name, p in model.named_parameters():
        assert_close_grad(p.grad, ref_grads[name], torch.float32, name)


def test_plugin_patches_in_a_fresh_process():
    """``VERL_USE_EXTERNAL_MODULES`` + ``RLKERN_VERL_PATCH_FUSED=1``: importing verl patches its
    fused path in every process (Ray workers included)."""
    code = ("import verl, rlkern.integrations.verl_fused as vf; "
            "assert vf.is_fused_patched(), 'not patched'; "
            "assert vf._FILTERS == {'top_p': 0.9}, vf._FILTERS; print('ok')")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlkern.integrations.verl_plugin",
               RLKERN_VERL_PATCH_FUSED="1", RLKERN_VERL_TRUNCATED_SUPPORT="top_p=0.9")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_bench_case_peers_agree_and_rlkern_uses_least_memory(tmp_path):
    """``rlkern bench --op verl_actor`` end to end at a tiny size where the logits dominate:
    verl's two paths pass the agreement gate against rlkern, and rlkern's peak extra memory
    (a tile) is below both of theirs (a chunk of float32 logits; all the logits)."""
    import argparse
    import json

    from rlkern.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "verl_actor", "--size", "N=256,H=32,V=4000",
                              "--repeats", "1", "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    for mode in ("fwd", "fwd+bwd"):
        rows = {r["impl"]: r for r in results if r["mode"] == mode}
        assert set(rows) == {"rlkern", "verl fused (torch)", "verl (non-fused)", "floor"}
        for name in ("verl fused (torch)", "verl (non-fused)"):
            assert rows[name]["status"] == "ok" and rows[name]["check"]["ok"], rows[name]
            assert rows["rlkern"]["peak_bytes"] < rows[name]["peak_bytes"], (mode, name)
