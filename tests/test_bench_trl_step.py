"""The ``trl_step`` benchmark case end to end at its ``--quick`` size: TRL's real
``GRPOTrainer`` steps with and without rlkern (and with a LoRA adapter), one call per
optimizer step; the first steps agree (same weights, same random state) and the rlkern rows
really ran rlkern's methods with no fallback."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("trl", minversion="1.16", reason="the TRL integration targets TRL 1.16")
pytest.importorskip("peft", reason="peft is not installed (the LoRA rows need it)")
pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")

import rlkern.integrations.trl as rt
from rlkern.bench import cli
from rlkern.bench.cases import get_case
from rlkern.bench.cases.trl_step import IMPLS, QUICK_SIZES
from rlkern.bench.runner import OK

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_trl_step_quick_runs_every_implementation(tmp_path, capsys) -> None:
    rt.remove()
    rt.reset_usage()
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--op", "trl_step", "--quick", "--repeats", "1", "--max-iqr", "0",
                              "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == set(IMPLS)
    for name, row in rows.items():
        assert row["status"] == OK, row
        assert row["size"] == dict(QUICK_SIZES[0].dims)
        if name != "rlkern":
            assert row["check"]["ok"], row
    used = rt.usage()
    assert used["logps_rlkern"] > 0 and used["loss_rlkern"] > 0, used
    assert used["logps_fallback"] == used["loss_fallback"] == 0, used
    assert not rt.is_applied()  # every call restored the unpatched state it found
    out = capsys.readouterr().out
    assert "peak RSS per step" in out
    for name in IMPLS:
        assert f"K=16 {name}: " in out and " MiB (" in out


def test_trl_step_case_and_its_device_check() -> None:
    case = get_case("trl_step")
    assert case.modes == ("step",)
    assert [i.name for i in case.implementations("step")] == list(IMPLS)
    with pytest.raises(ValueError, match="--device cpu"):
        case.make_inputs(QUICK_SIZES[0], torch.bfloat16, torch.device("cuda"))
