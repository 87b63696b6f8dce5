"""Parity with TRL's GRPO advantages.

TRL has no public function for them: ``GRPOTrainer._generate_and_score_completions`` computes
``(rewards − nanmean_g) / (nanstd_g + 1e-4)`` inline over contiguous groups of
``num_generations`` (or the batch std for ``scale_rewards="batch"``, no division for
``"none"``), then zeroes NaN rows. ``rlkern.reference.trl_grpo_advantages`` transcribes that
formula; where trl is installed, the same lines are also run with TRL's own ``nanstd``.
rlkern reproduces it with ``group_size=num_generations, eps=1e-4, nan_policy="omit"``.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern.reference import trl_grpo_advantages

SCALES = {"group": {"std_scope": "group"}, "batch": {"std_scope": "batch"},
          "none": {"std": "none"}}


def _rewards(seed: int, n_prompts: int = 9, num_generations: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n_prompts * num_generations,), generator=gen).float() / 2
    r[5] = math.nan  # an unscorable completion
    r[8:16] = 1.0  # a zero-variance group
    r[16:23] = math.nan  # a group with a single scorable completion
    return r


def _rlkern(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    return rlkern.group_advantages(rewards, group_size=num_generations, eps=1e-4,
                                   nan_policy="omit", **SCALES[scale]).advantages


@pytest.mark.parametrize("scale", list(SCALES))
def test_matches_trl_formula_transcription(scale):
    r = _rewards(0)
    torch.testing.assert_close(_rlkern(r, 8, scale).double(),
                               trl_grpo_advantages(r, 8, scale_rewards=scale), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("scale", list(SCALES))
def test_matches_trl_with_trls_nanstd(scale):
    utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed")
    r = _rewards(1)
    g = 8
    # The lines of GRPOTrainer._generate_and_score_completions, with TRL's own nanstd.
    mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g)
    if scale == "batch":
        std = utils.nanstd(r).expand_as(r)
    else:
        std = utils.nanstd(r.view(-1, g), dim=1).repeat_interleave(g)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    adv = torch.nan_to_num(adv, nan=0.0)
    torch.testing.assert_close(_rlkern(r, g, scale), adv, rtol=1e-5, atol=1e-5)
