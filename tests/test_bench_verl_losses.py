"""The ``verl_losses`` bench case at a tiny size (a functional test, nothing is timed for a
claim): every mode runs, and verl's own functions, where installed, pass the agreement gate
against rlkern's (loss and ∂loss/∂log_prob)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rlkern.bench import cli
from rlkern.bench.cases import CaseOptions, Size, get_case
from rlkern.bench.cases.verl_losses import LOSSES, actor_config, make_inputs
from rlkern.bench.runner import OK
from rlkern.integrations.verl import policy_loss_function


def _run(tmp_path, *extra: str) -> list[dict]:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "verl_losses", "--size", "B=5,T=40", "--repeats", "1",
                              "--device", "cpu", "--json", str(tmp_path / "r.json"), *extra])
    assert args.func(args) == 0
    return json.loads((tmp_path / "r.json").read_text())["results"]


def test_every_mode_runs_rlkern(tmp_path) -> None:
    rows = _run(tmp_path, "--backend", "cpu")
    rlkern_rows = {r["mode"]: r for r in rows if r["impl"] == "rlkern"}
    assert sorted(rlkern_rows) == sorted(LOSSES)
    assert all(r["status"] == OK for r in rlkern_rows.values()), rlkern_rows


def test_verl_peers_agree_tiny(tmp_path) -> None:
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    peers = [r for r in _run(tmp_path) if r["impl"].startswith("verl ")]
    assert sorted(r["impl"] for r in peers) == sorted(f"verl {n}" for n in LOSSES)
    for row in peers:
        assert row["status"] == OK and row["check"]["ok"], row


def test_case_inputs_and_config() -> None:
    case = get_case("verl_losses", CaseOptions())
    assert case.modes == LOSSES and case.environment
    inp = make_inputs(Size({"B": 4, "T": 9}), torch.bfloat16, torch.device("cpu"))
    assert inp.mask.any(dim=1).all() and not inp.adv[~inp.mask].any()
    cfg = actor_config()
    assert cfg.policy_loss.dro_beta == cfg["policy_loss"]["dro_beta"] == 0.5
    with pytest.raises(AttributeError):
        cfg.no_such_field  # noqa: B018
    loss, metrics = policy_loss_function("dro", "torch")(inp.old, inp.logp, inp.adv, inp.mask,
                                                          config=cfg)
    assert loss.dim() == 0 and set(metrics) == {"actor/ppo_kl"}
    with pytest.raises(ValueError, match="name must be one of"):
        policy_loss_function("no_such_loss")
