"""rlkern.integrations.openrlhf against OpenRLHF 0.11.2's own code and its own test files.

OpenRLHF publishes wheels only; the wheel (``pip download openrlhf==0.11.2 --no-deps``) carries
its ``tests/`` folder. The files used here are taken from it when the tests run, each checked
against its recorded sha256 (``upstream_sources.fetch_wheel_files``):

* :func:`test_openrlhf_upstream_tests_pass_against_rlkern` runs two of OpenRLHF's test files
  (``test_loss_aggregation.py``: ``PolicyLoss`` with every correction gating, dual-clip, GSPO,
  the data-parallel normalisers; ``test_actor_entropy_temperature.py``: the actor's
  log-probabilities and entropy at a temperature) in a pytest process of their own, with
  rlkern's drop-ins under OpenRLHF's names (``tests/openrlhf_upstream/conftest.py``);
* the parity tests below load OpenRLHF's ``models/utils.py`` and ``models/loss.py`` (as
  OpenRLHF's tests do, with DeepSpeed stood in for) and compare rlkern's drop-ins with them
  over every option, values and gradients.

OpenRLHF itself is not installed (it needs DeepSpeed, vLLM and Ray): only its files are used.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch

import rlkern.integrations.openrlhf as ro
from upstream_sources import fetch_wheel_files

pytestmark = pytest.mark.parity

UPSTREAM = Path(__file__).parent / "openrlhf_upstream"
VERSION = "0.11.2"
PREFIX = f"openrlhf-{VERSION}.data/purelib/"
#: files of the OpenRLHF 0.11.2 wheel → their sha256
FILES = {
    PREFIX + "tests/test_loss_aggregation.py":
        "2ceb7319fa7d29ec33c15719ed05739358d475f3d6ad8ac8b28ceb420338c233",
    PREFIX + "tests/test_actor_entropy_temperature.py":
        "7bae8ba6be4f455c1d8e19a149c4fac27cf19ee8f68a364ca48a0ac58b392b11",
    PREFIX + "openrlhf/models/utils.py":
        "bb0c73194c8a14173ebe15dff103f5a9440eb766f373444101a03ee9fca4af87",
    PREFIX + "openrlhf/models/loss.py":
        "a6dd82c27e8b1711c6a33b6acd0319be25df9f9d54e2326b950d8f2131060860",
    PREFIX + "openrlhf/models/actor.py":
        "4c9522114e57caf424a607235e17d8c7357e64e3fcb1cef5d083d3c880d8f975",
    PREFIX + "openrlhf/models/ring_attn_utils.py":
        "f0ec7490fd7b7ce5f07e34a8bf96d68630e9274498356da927c551a29d26d8cc",
    PREFIX + "openrlhf/utils/loss_utils.py":
        "e92296afa70862aa5d5ce3aea8085f29b5d9ef1b097ec03dc79b922b66c5f2e7",
}
TEST_FILES = ["test_actor_entropy_temperature.py", "test_loss_aggregation.py"]


@pytest.fixture(scope="module")
def openrlhf_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenRLHF's files as laid out in its tree (``tests/``, ``openrlhf/``)."""
    return fetch_wheel_files("openrlhf", VERSION, FILES, tmp_path_factory.mktemp("openrlhf"),
                             strip=PREFIX)


@pytest.fixture(scope="module")
def upstream(openrlhf_tree: Path):
    """OpenRLHF's own ``models/utils.py`` and ``models/loss.py`` as modules (DeepSpeed stood in
    for while they import, as OpenRLHF's tests do; ``compute_entropy``'s import-time
    ``torch.compile`` skipped, as OpenRLHF's actor test does)."""
    models = openrlhf_tree / "openrlhf" / "models"
    package = "_openrlhf_upstream_parity"
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(models)]
    sys.modules[package] = pkg
    stubbed = importlib.util.find_spec("deepspeed") is None and "deepspeed" not in sys.modules
    if stubbed:
        stub = MagicMock()
        stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        sys.modules["deepspeed"] = stub
    compile_ = torch.compile
    torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    try:
        for name in ("utils", "loss"):
            spec = importlib.util.spec_from_file_location(f"{package}.{name}",
                                                          models / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[f"{package}.{name}"] = module
            spec.loader.exec_module(module)
    finally:
        torch.compile = compile_
        if stubbed:
            del sys.modules["deepspeed"]
    return types.SimpleNamespace(utils=sys.modules[f"{package}.utils"],
                                 loss=sys.modules[f"{package}.loss"])


@pytest.mark.slow
def test_openrlhf_upstream_tests_pass_against_rlkern(openrlhf_tree: Path, tmp_path: Path):
    tree = tmp_path / "tree"
    shutil.copytree(openrlhf_tree, tree, ignore=shutil.ignore_patterns("wheel"))
    models = tree / "openrlhf" / "models"
    for name in ("utils", "loss"):
        (models / f"{name}.py").rename(models / f"{name}_upstream.py")
        shutil.copy(UPSTREAM / f"models_{name}.py", models / f"{name}.py")
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy(UPSTREAM / name, tree / "tests" / name)
    env = dict(os.environ)
    python_dir = str(Path(__file__).parents[1] / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    calls_file = tmp_path / "calls.json"
    env["RLKERN_UPSTREAM_CALLS"] = str(calls_file)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
                           *TEST_FILES], cwd=tree / "tests", env=env, capture_output=True,
                          text=True, check=False)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.strip().splitlines()[-1]
    counts = {w: int(n) for n, w in re.findall(r"(\d+) (\w+)", last)}
    # the two files' 16 tests, every one passing
    assert counts.get("passed") == 16, tail
    assert not {"failed", "error", "errors", "skipped", "xfailed", "xpassed"} & set(counts), tail
    # ...and they ran rlkern: every drop-in was called (the upstream conftest counts)
    calls = json.loads(calls_file.read_text())
    assert all(n > 0 for n in calls.values()), calls


# ---------------------------------------------------------------------------------------------
# Parity with OpenRLHF's own modules, every option


def _inputs(dtype=torch.float32, b=5, t=11, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    logp = r(b, t) * 0.3 - 1.0
    old = logp + r(b, t) * 0.2
    rollout = old + r(b, t) * 0.3
    adv = r(b, 1).expand(b, t)
    mask = (torch.rand(b, t, generator=g) > 0.2).double()
    if empty_row:
        mask[2] = 0
    return [x.to(dtype) for x in (logp, old, adv, mask, rollout)]


LOSS_OPTIONS = [
    {}, {"dual_clip": 3.0}, {"clip_eps_low": 0.1, "clip_eps_high": 0.28},
    {"token_level_loss": False}, {"policy_loss_type": "gspo"},
    {"policy_loss_type": "gspo", "is_correction_level": "token"},
    {"is_correction_level": "token"}, {"is_correction_level": "seq"},
    {"is_correction_level": "token", "is_correction_mode": "clip",
     "is_correction_threshold": [0.8, 1.2]},
    {"is_correction_level": "token", "is_correction_gating": "binary_kl",
     "is_correction_threshold": [0, 0.05]},
    {"is_correction_level": "seq", "is_correction_gating": "binary_kl",
     "is_correction_threshold": [0, 0.02]},
    {"is_correction_level": "token", "is_correction_gating": "tv",
     "is_correction_threshold": [0, 0.1]},
    {"is_correction_level": "seq", "is_correction_gating": "tv",
     "is_correction_threshold": [0, 0.1], "dual_clip": 2.0, "token_level_loss": False},
]
NORMALISERS = [{}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 6.0},
               {"dp_size": 4, "batch_num_tokens": torch.tensor(90.0),
                "global_batch_size": torch.tensor(12.0)}]
# float64: OpenRLHF divides each sequence's sum by its token count + 1e-8 (a relative 1e-8 / len
# that rlkern's exact mean does not have); float32: accumulation order
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-7), torch.float64: dict(rtol=1e-8, atol=1e-14)}


@pytest.mark.parametrize("options", LOSS_OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("normaliser", range(len(NORMALISERS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adv_layout", ["per-row view", "per-token"])
def test_policy_loss_matches_openrlhf(upstream, options, normaliser, dtype, adv_layout):
    """``adv_layout``: one advantage per row broadcast along T (a stride-0 view, which the
    drop-in hands the op as a column) or a (B, T) tensor of its own."""
    logp, old, adv, mask, rollout = _inputs(dtype)
    if adv_layout == "per-token":
        adv = adv + 0.1 * torch.arange(adv.shape[1], dtype=dtype)
    results = []
    for cls in (upstream.loss.PolicyLoss, ro.PolicyLoss):
        x = logp.clone().requires_grad_()
        out = cls(**options)(x, old, adv, action_mask=mask, rollout_log_probs=rollout,
                             **NORMALISERS[normaliser])
        out[0].backward()
        results.append((out, x.grad))
    (theirs, their_grad), (ours, our_grad) = results
    assert len(ours) == len(theirs) == 5
    for name, a, b in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"),
                          ours, theirs, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape == (), name
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=name)
    torch.testing.assert_close(our_grad, their_grad, **TOL[dtype])


@pytest.mark.parametrize("mask_kind", ["none", "bool", "long"])
def test_policy_loss_masks_and_unclamped_kl(upstream, mask_kind):
    """No mask (OpenRLHF: plain means), bool / int masks, and a log-ratio beyond the ±20 clamp
    (the ratio is clamped, the ``ppo_kl`` metric is not)."""
    logp, old, adv, mask, _ = _inputs(empty_row=False)
    old[0, 0] = logp[0, 0] + 30.0
    action_mask = {"none": None, "bool": mask.bool(), "long": mask.long()}[mask_kind]
    results = []
    for cls in (upstream.loss.PolicyLoss, ro.PolicyLoss):
        x = logp.clone().requires_grad_()
        out = cls(dual_clip=3.0)(x, old, adv, action_mask=action_mask)
        out[0].backward()
        results.append((out[:3], x.grad))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(b.double(), a.double(), rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-6, atol=2e-7)


def test_policy_loss_constructor_errors_match_openrlhf(upstream):
    bad = [{"is_correction_level": "batch"}, {"is_correction_mode": "drop"},
           {"is_correction_gating": "kl"},
           {"is_correction_level": "seq", "is_correction_mode": "clip"},
           {"is_correction_level": "token", "is_correction_gating": "tv"},
           {"is_correction_level": "token", "is_correction_gating": "tv",
            "is_correction_mode": "clip", "is_correction_threshold": [0, 0.1]}]
    for options in bad:
        with pytest.raises(ValueError) as theirs:
            upstream.loss.PolicyLoss(**options)
        with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
            ro.PolicyLoss(**options)
    with pytest.raises(ValueError, match=r"dual_clip must be > 1\.0"):
        ro.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="Invalid policy loss type"):
        ro.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        logp, old, adv, mask, _ = _inputs()
        ro.PolicyLoss(is_correction_level="token")(logp, old, adv, action_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_and_entropy_match_openrlhf(upstream, dtype, temperature):
    """Values, result dtype, gradient, and OpenRLHF's in-place division of the logits by the
    temperature (its callers read the scaled logits afterwards)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 7, 301, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 301, (3, 7), generator=g)
    weights = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for module in (upstream.utils, ro):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as a model's output: OpenRLHF divides it in place
        logp = module.log_probs_from_logits(logits, labels, temperature)
        entropy = module.compute_entropy(logits)
        ((weights[0] * logp).sum() + (weights[1] * entropy).sum()).backward()
        results.append((logp.detach(), entropy.detach(), logits.detach(), leaf.grad))
    # OpenRLHF's bf16 path rounds its sums to bf16; its entropy, logsumexp − Σ p·x, cancels
    # (in float32 an error of a few ulp of the logsumexp): compare at those resolutions, and
    # check that rlkern's entropy is the nearer to the float64 value
    tol = {torch.bfloat16: dict(rtol=2e-2, atol=4e-2), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.float64: TOL[torch.float64]}[dtype]
    for name, ours, theirs in zip(("logp", "entropy", "logits after", "grad"), results[1],
                                  results[0], strict=True):
        assert ours.dtype == theirs.dtype == dtype, name
        torch.testing.assert_close(ours.double(), theirs.double(), **tol, msg=name)
    scaled = base.double() / temperature
    exact = -(scaled.softmax(-1) * scaled.log_softmax(-1)).sum(-1)
    our_err = (results[1][1].double() - exact).abs().max()
    assert our_err <= (results[0][1].double() - exact).abs().max() + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", [(4, 9, 1000), (2, 3, 32000), (5, 151936)])
def test_half_precision_log_probs_are_openrlhfs_bits(upstream, dtype, temperature, shape):
    """OpenRLHF takes 16-bit logits row by row through torch's ``log_softmax`` in their dtype
    (after dividing them in place by T, which rounds them): the drop-in's values are its bits."""
    g = torch.Generator().manual_seed(len(shape))
    base = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    theirs = upstream.utils.log_probs_from_logits(base.clone(), labels, temperature)
    ours = ro.log_probs_from_logits(base.clone(), labels, temperature)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_patch_and_unpatch(upstream, monkeypatch):
    """:func:`patch` on an importable ``openrlhf`` package (OpenRLHF's two modules under their
    names, an importer of them by name beside them)."""
    package = types.ModuleType("openrlhf")
    package.__path__ = []
    models = types.ModuleType("openrlhf.models")
    models.__path__ = []
    actor = types.ModuleType("openrlhf.models.actor")
    actor.log_probs_from_logits = upstream.utils.log_probs_from_logits
    actor.compute_entropy = upstream.utils.compute_entropy
    for name, module in (("openrlhf", package), ("openrlhf.models", models),
                         ("openrlhf.models.utils", upstream.utils),
                         ("openrlhf.models.loss", upstream.loss),
                         ("openrlhf.models.actor", actor)):
        monkeypatch.setitem(sys.modules, name, module)
    originals = (upstream.utils.log_probs_from_logits, upstream.utils.compute_entropy,
                 upstream.loss.PolicyLoss)
    patched = ro.patch()
    try:
        # the two upstream modules go by their loading names
        home = {"utils": upstream.utils.__name__, "loss": upstream.loss.__name__}
        assert set(patched) == {
            f"{home['utils']}.log_probs_from_logits", f"{home['utils']}.compute_entropy",
            "openrlhf.models.actor.log_probs_from_logits", "openrlhf.models.actor.compute_entropy",
            f"{home['loss']}.PolicyLoss"}
        assert upstream.utils.compute_entropy is ro.compute_entropy
        assert actor.log_probs_from_logits is ro.log_probs_from_logits
        assert upstream.loss.PolicyLoss is ro.PolicyLoss
        assert ro.patch() == patched
    finally:
        ro.unpatch()
    assert (upstream.utils.log_probs_from_logits, upstream.utils.compute_entropy,
            upstream.loss.PolicyLoss) == originals
    assert actor.log_probs_from_logits is originals[0]


def test_every_option_is_covered():
    """The parity grid above spans every level, mode and gating OpenRLHF accepts."""
    seen = {(o.get("is_correction_level", "off"), o.get("is_correction_mode", "mask"),
             o.get("is_correction_gating", "ratio")) for o in LOSS_OPTIONS}
    valid = {(lvl, mode, gate) for lvl, mode, gate in itertools.product(
        ro._LEVELS, ro._MODES, ro._GATINGS)
        if lvl != "off" and not (mode == "clip" and (lvl == "seq" or gate != "ratio"))}
    assert valid <= seen


def test_non_finite_and_empty_inputs(upstream):
    """A NaN at a masked-out token changes nothing (OpenRLHF's masked sums turn it into a NaN
    loss); a NaN at a valid token raises while checks are on; no valid token: loss and
    clip_ratio 0 (OpenRLHF: NaN), ppo_kl NaN in both."""
    logp, old, adv, mask, _ = _inputs(empty_row=False)
    mask[1, 7:] = 0
    clean = ro.PolicyLoss(dual_clip=3.0)(logp, old, adv, action_mask=mask)
    dirty = logp.clone()
    dirty[1, 9] = float("nan")
    ours = ro.PolicyLoss(dual_clip=3.0)(dirty, old, adv, action_mask=mask)
    theirs = upstream.loss.PolicyLoss(dual_clip=3.0)(dirty, old, adv, action_mask=mask)
    assert torch.isnan(theirs[0])
    for a, b in zip(ours[:3], clean[:3], strict=True):
        assert torch.equal(a, b)
    dirty[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ro.PolicyLoss()(dirty, old, adv, action_mask=mask)
    for token_level in (True, False):
        empty = torch.zeros_like(mask)
        loss, clip_ratio, ppo_kl, _, _ = ro.PolicyLoss(token_level_loss=token_level)(
            logp, old, adv, action_mask=empty)
        assert loss == 0 and clip_ratio == 0 and torch.isnan(ppo_kl)
        assert torch.isnan(upstream.loss.PolicyLoss(token_level_loss=token_level)(
            logp, old, adv, action_mask=empty)[0])
