"""verl 0.9.1's own CPU tests of the functions rlkern replaces, run against rlkern's drop-ins.

Five of verl's test files (``tests/trainer/ppo/`` of the verl 0.9.1 source distribution) are
taken from that distribution when the test runs (``upstream_sources``: pip downloads it, each
file is checked against its recorded sha256) and run, next to ``tests/verl_upstream/conftest.py``
— which swaps rlkern's drop-ins in under verl's names (group advantage estimators, GAE /
REINFORCE++ / ReMax, the policy losses, ``kl_penalty``, the rollout correction) before the files
import them — in a pytest process of their own (verl's fixtures and imports stay out of this
suite). They must pass, except for the one documented difference, which the conftest marks
``xfail(strict=True)`` and :func:`test_rloo_nearer_the_exact_value_than_verls_loop` explains.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from upstream_sources import fetch_sdist_files

UPSTREAM = Path(__file__).parent / "verl_upstream"  # the conftest that swaps rlkern in
VERL_VERSION = "0.9.1"

#: verl's files (in its source distribution) → their sha256 in verl 0.9.1
VERL_FILES = {
    "tests/trainer/ppo/test_core_algos_on_cpu.py":
        "0a60e917589ab91646989f0a8616f810fea0dc70047d2b8c13914f4977f5569c",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py":
        "e22250753d57b7a83ddfee4210bee70bc319c77b856310cce4cd4be88fd0fb1c",
    "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py":
        "614b812b034dd14fdc4198e2a79b4a833059df8492a6f7d288dae97e48c77bb9",
    "tests/trainer/ppo/test_rollout_corr.py":
        "b5751c7599a3fbf14c722018d84490b7776619e88cc120dd0c74042f120c8678",
    "tests/trainer/ppo/test_rollout_corr_integration.py":
        "3d8c1a1471043a5cbe03cf010c0b2e3dff293370c79b2273aa70a02261bdd759",
}

NEEDS_VERL = ("verl is not installed (optional: pip install -e '.[parity]' && "
              "pip install --no-deps verl)")

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def verl_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with verl 0.9.1's five test files and this suite's conftest / pytest.ini."""
    verl = pytest.importorskip("verl", reason=NEEDS_VERL)
    if verl.__version__ != VERL_VERSION:
        pytest.skip(f"the drop-ins are checked against verl {VERL_VERSION}'s tests; "
                    f"verl {verl.__version__} is installed")
    dest = fetch_sdist_files("verl", VERL_VERSION, VERL_FILES,
                             tmp_path_factory.mktemp("verl_upstream"), strip="tests/trainer/ppo/")
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy(UPSTREAM / name, dest / name)
    return dest


def _summary_counts(stdout: str) -> dict[str, int]:
    last = stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


@pytest.mark.slow
def test_verl_upstream_tests_pass_against_rlkern(verl_tests: Path):
    env = dict(os.environ)
    python_dir = str(Path(__file__).parents[1] / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    files = sorted(Path(f).name for f in VERL_FILES)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *files],
                          cwd=verl_tests, env=env, capture_output=True, text=True, check=False)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    counts = _summary_counts(proc.stdout)
    # the five files' 60 tests: all pass but the one documented (strict) difference
    assert counts.get("passed") == 59 and counts.get("xfailed") == 1, tail
    assert not {"failed", "error", "errors", "skipped", "xpassed"} & set(counts), tail


def _verl_test_module(folder: Path):
    """verl's test_core_algos_on_cpu.py as a module (for its input helpers), importing verl's
    own functions: the swap lives in the conftest, which this process never loads."""
    spec = importlib.util.spec_from_file_location("verl_upstream_core_algos",
                                                  folder / "test_core_algos_on_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rloo_nearer_the_exact_value_than_verls_loop(verl_tests: Path):
    """The xfail of ``test_rloo_and_vectorized_equivalence[512-512-10-2]``: on that test's
    inputs, rlkern's RLOO is within one float32 ulp of the whole formula in float64 (the
    response sums included), and verl's float32 loop is the one that strays, by more than that
    test's tolerance."""
    import random

    from verl.trainer.ppo import core_algos

    from rlkern.integrations import verl as rlkern_verl

    upstream = _verl_test_module(verl_tests)
    batch_size, seq_len, num_groups, seed = 512, 512, 10, 2
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    index = upstream._make_group_index(batch_size, num_groups)
    mask = upstream._rand_mask(batch_size, seq_len)
    rewards = torch.randn(batch_size, seq_len, dtype=torch.float32) * mask

    verl_loop = core_algos.compute_rloo_outcome_advantage
    exact, _ = verl_loop(token_level_rewards=rewards.double(), response_mask=mask.double(),
                         index=index)
    ours, _ = rlkern_verl.ADV_ESTIMATORS["rlkern_rloo_vectorized"](
        token_level_rewards=rewards, response_mask=mask, index=index)
    theirs, _ = verl_loop(token_level_rewards=rewards, response_mask=mask, index=index)

    # rlkern: float64 math, rounded to float32 at the end (0.6 ulp at most on these inputs)
    ulp = exact.abs() * 2.0**-23
    assert bool(((ours.double() - exact).abs() <= ulp).all())
    # verl's float32 loop: off by more than the upstream test's tolerance somewhere
    assert not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (theirs.double() - exact).abs().max() > 4 * (ours.double() - exact).abs().max()
