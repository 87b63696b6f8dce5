"""TRL's loss through rlkern on an FSDP2-sharded model: 2 CPU processes (gloo).

``torch.distributed.fsdp.fully_shard`` of a tiny Llama (each decoder layer, optionally the LM
head on its own so that its weight is a sharded DTensor during the loss call, then the root);
each rank scores its half of a batch with TRL's ``_compute_loss`` patched by rlkern. FSDP2
averages the gradients over ranks, so the sharded run must give the single-process run's
``½(L(half 0) + L(half 1))``: the loss (all-reduced) and every parameter's gradient (gathered)
equal it. Then four AdamW steps on the sharded model with TRL's own loss and with rlkern's:
per-step loss and grad norm agree.

accelerate 1.16 cannot run ``GRPOTrainer`` itself under FSDP on CPU: its ``AcceleratorState``
switches to FSDP only for accelerator distributed types (MULTI_GPU, MULTI_XPU, ...), and a CPU
run (MULTI_CPU) is wrapped in DDP instead; so the trainer's own loss method is driven here on a
model sharded by hand, as accelerate would shard it.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections import defaultdict

import datasets
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[parity]')")
from torch.distributed.fsdp import fully_shard
from trl import GRPOTrainer

import rlkern.integrations.trl as rt
import test_integration_trl as trl_tests

pytestmark = trl_tests.pytestmark  # the parity mark and the warning filter

WORLD = 2
# Odd: FSDP2 chunks the LM head's dim 0 unevenly (the shards differ in size).
VOCAB = 511
CASES = [("dapo", "root"), ("dapo", "head"), ("grpo", "head"), ("cispo", "root")]


def _half(inputs: dict, rank: int) -> dict:
    B = inputs["completion_ids"].shape[0]
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in inputs.items()}


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


def _worker(rank: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 8})
        trainer = GRPOTrainer(model=model_dir, reward_funcs=trl_tests._reward,
                              train_dataset=dataset,
                              args=trl_tests._config(os.path.join(out_dir, str(rank)), beta=0.0))
        trainer.current_gradient_accumulation_steps = 1
        inputs = trl_tests._with_logps(trainer, trl_tests._batch())
        rt.apply()
        for loss_type, shard in CASES:
            trl_tests._configure(trainer, dict(loss_type=loss_type))
            _check(trainer, inputs, rank, shard)
        trl_tests._configure(trainer, dict(loss_type="dapo"))
        _check_training(trainer, inputs, rank)
    finally:
        rt.remove()
        dist.destroy_process_group()


def _check(trainer, inputs: dict, rank: int, shard: str) -> None:
    reference = copy.deepcopy(trainer.model)
    sharded = _shard(trainer.model, head=shard == "head")
    if shard == "head":
        assert type(sharded.lm_head.weight).__name__ == "DTensor"
    rt.reset_usage()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    ref = sum(rt.compute_loss(trainer, reference, _half(inputs, r)) for r in range(WORLD))
    (ref / WORLD).backward()
    loss = rt.compute_loss(trainer, sharded, _half(inputs, rank))
    loss.backward()
    usage = rt.usage()
    assert usage["loss_rlkern"] == WORLD + 1 and usage["loss_fallback"] == 0, usage
    assert usage["logps_rlkern"] == WORLD + 1 and usage["logps_fallback"] == 0, usage
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert math.isclose(float(total) / WORLD, float(ref) / WORLD, rel_tol=1e-5, abs_tol=1e-7)
    want, got = _grads(reference), _grads(sharded)
    assert want.keys() == got.keys()
    for n, g in want.items():
        diff = float((got[n] - g).norm())
        assert diff <= 1e-5 * float(g.norm()) + 1e-8, f"{shard}: {n}: |Δ| {diff:.2e}"


def _shard(model, head: bool = False):
    """A sharded copy: each decoder layer, the LM head on its own if ``head``, the root."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    if head:
        fully_shard(model.lm_head)
    return fully_shard(model)


def _check_training(trainer, inputs: dict, rank: int, steps: int = 4) -> None:
    """Four optimizer steps on the sharded model, TRL's own loss vs rlkern's, same data (the
    old log-probs fixed, as within ``num_iterations=2``): per-step loss and grad norm agree to
    1e-3 relative. The head stays in the root's unit here: with the head as its own FSDP2 unit,
    TRL's own path gives a head gradient far from the single-process one (its fused head gathers
    the weight with ``DTensor.full_tensor()`` outside the head's call, and that gather's backward
    keeps each rank's own gradient slice without FSDP's averaging over ranks); :func:`_check`
    shows that rlkern's is right there."""
    original = GRPOTrainer.__dict__["_compute_loss"]
    logs = []
    for patched in (False, True):
        if patched:
            rt.apply()
        else:
            rt.remove()
        model = _shard(trainer.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            fn = rt.compute_loss if patched else original
            loss = fn(trainer, model, _half(inputs, rank))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            total = loss.detach().clone()
            dist.all_reduce(total)
            run.append((float(total) / WORLD, float(norm)))
            opt.step()
        logs.append(run)
    for (la, na), (lb, nb) in zip(*logs, strict=True):
        assert math.isclose(la, lb, rel_tol=1e-3, abs_tol=1e-6), (la, lb)
        assert math.isclose(na, nb, rel_tol=1e-3), (na, nb)
    assert len({round(n, 6) for _, n in logs[0]}) == steps  # the steps really moved the model


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_sharded_model_matches_single_process(tmp_path):
    model_dir = trl_tests._save_model(tmp_path / "model", VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), model_dir, str(tmp_path)),
                 nprocs=WORLD, join=True)
