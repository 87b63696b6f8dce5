"""bench/profile/ids.sh, gigpo.sh (the per-pass tables docs/advantages.md quotes), sample_ab.sh,
policy_loss.sh and policy_loss_ab.sh (docs/policy_loss.md's per-token tables) build against the
sources and run, and
`SRC=` (the A/B option of bench/profile/common.sh) builds the same probe against another tree:
here this one, so it must print the same groups. Small sizes, so each run takes seconds after
its build; the figures themselves are not asserted, so the probes build with -O0
(`PROFILE_OPT`, common.sh), a fifth of the -O3 build's time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "bench" / "profile"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="needs g++ to build the profile probes")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp_path), "PROFILE_OPT": "-O0"}


def _run(script: str, args: list[str], tmp_path: Path, src: Path | None = None) -> str:
    env = _env(tmp_path)
    env.pop("SRC", None)
    if src is not None:
        env["SRC"] = str(src)
    out = subprocess.run(["bash", str(PROFILE / script), *args], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _numbers(line: str, *names: str) -> dict[str, float]:
    found = {}
    for name in names:
        m = re.search(rf"{re.escape(name)} (-?\d+(?:\.\d+)?)", line)
        assert m, f"{name!r} missing in {line!r}"
        found[name] = float(m.group(1))
    return found


def test_ids_probe(tmp_path):
    line = _run("ids.sh", ["4096", "2"], tmp_path)
    assert line.startswith("N = 4096, ") and "groups, 2 threads" in line, line
    times = _numbers(line, "id range", "numbering", "moments", "compact rows")
    assert all(t > 0 for t in times.values()), line


def _gigpo_groups(line: str, ids: str) -> re.Match:
    assert line.startswith(f"S = 4096, {ids} ids, "), line
    groups = re.search(r"(\d+) prompt groups, (\d+) step groups", line)
    assert groups and 0 < int(groups.group(1)) <= int(groups.group(2)) <= 4096, line
    times = _numbers(line, "call", "prompts", "pairs", "one-word pairs")
    assert all(t > 0 for t in times.values()), line
    return groups


def test_gigpo_probe_and_its_src_build(tmp_path):
    """Both ids modes of one build (the probe takes the mode as an argument), then the SRC=
    build of this tree: two builds, the slow part."""
    groups = _gigpo_groups(_run("gigpo.sh", ["4096", "2", "4", "hashed"], tmp_path), "hashed")
    probe = tmp_path / "rlkern_profile_gigpo"
    dense = subprocess.run([str(probe), "4096", "2", "4", "dense"], capture_output=True,
                           text=True, timeout=300)
    assert dense.returncode == 0, dense.stderr[-2000:]
    _gigpo_groups(dense.stdout, "dense")
    # SRC=: the same probe built against a given tree (this one) numbers the same groups.
    again = _run("gigpo.sh", ["4096", "2", "4", "hashed"], tmp_path, src=ROOT)
    assert _gigpo_groups(again, "hashed").group(0) == groups.group(0)
    assert (tmp_path / "rlkern_profile_gigpo_src").exists()


def test_policy_loss_probe(tmp_path):
    """bench/profile/policy_loss.sh (docs/policy_loss.md's one-thread table): each of the three
    forms prints a positive time per token for the streamed rows and the rows in L2."""
    out = _run("policy_loss.sh", ["64"], tmp_path)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}
    assert list(rows) == ["fwd", "fwd+grad", "fwd+factor"], out
    for form, values in rows.items():
        assert len(values) == 2 and all(float(v) > 0 for v in values), (form, out)


def test_policy_loss_ab_probe(tmp_path):
    """bench/profile/policy_loss_ab.sh with this tree on both sides (and holes in the masks):
    twelve rows (two sets, six forms), positive times, and no value whose bits differ."""
    env = _env(tmp_path)
    out = subprocess.run(["bash", str(PROFILE / "policy_loss_ab.sh"), str(ROOT), str(ROOT), "32",
                          "3", "37"], env=env, capture_output=True, text=True, check=True).stdout
    lines = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert len(lines) == 12, out
    for cols in lines:
        form, a, b, bits_off = cols[-6], float(cols[-5]), float(cols[-4]), int(cols[-1])
        forms = ("fwd", "fwd+grad", "fwd+factor", "grad+kl", "bwd", "bwd+kl")
        assert form in forms and a > 0 and b > 0, out
        assert bits_off == 0, out


def test_sample_ab_probe(tmp_path):
    """bench/profile/sample_ab.sh with this tree on both sides: one row per filter, positive
    times, and no row whose draw, kept set or log-prob differs in any bit."""
    out = subprocess.run(["bash", str(PROFILE / "sample_ab.sh"), str(ROOT), str(ROOT), "8", "2"],
                         env=_env(tmp_path), capture_output=True, text=True, check=True).stdout
    rows = [line.rsplit(None, 5) for line in out.splitlines()[1:] if line.strip()]
    assert [r[0] for r in rows] == ["no filter", "top-k 50", "top-p 0.9", "min-p 0.05",
                                    "top-k + top-p"], out
    for name, a, b, ratio, _quartiles, rows_off in rows:
        assert float(a) > 0 and float(b) > 0 and float(ratio) > 0, out
        assert int(rows_off) == 0, (name, out)
